"""Decoding of the uploaded media with PyAV: a frame every 500 ms and 16 kHz mono audio.

No torch here: the Triton python-backend decode steps import this module on its own.

Frame sampling rule. Times are seconds from the container's start. The sampling instants
are t_k = k * interval for k = 0, 1, 2, ... while t_k < end, where end is the last
frame's timestamp plus its duration (the end of the video stream). At each instant we
take the frame on screen then: the last frame whose timestamp is <= t_k, or the first
frame when t_k comes before it. This follows timestamps, not frame counts, so it is right
for variable frame rate video. A 3 s clip gives instants 0, 0.5, ..., 2.5: 6 frames,
i.e. ceil(video_duration / interval).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from fv2es_client import contract

# A frame this close after an instant counts as shown at it (float timestamps).
_EPS = 1e-6

# Decoding is confined to the request's bytes. FFmpeg demuxers by name (FFmpeg's
# format_whitelist): plain containers only. Playlists and lists of other files (concat,
# HLS, DASH), stream descriptions (SDP, RTSP), image sequences and filter graphs would open
# files on the server or network sockets, so they are not on the list; nested opens get no
# protocol at all (protocol_whitelist names none that exists).
ACCEPTED_FORMATS = ("mov", "matroska", "avi", "ogg", "wav", "flac", "mp3", "aac", "gif",
                    "mpegts", "mpeg", "flv", "h264", "hevc")
_CONFINED = {"format_whitelist": ",".join(ACCEPTED_FORMATS), "protocol_whitelist": "none"}

# Decoded picture size, from the stream header and again on every decoded frame (headers
# can lie): a 127 KB GIF may declare a 16000x16000 screen, gigabytes once decoded.
MAX_SOURCE_SIDE = 8192
MAX_SOURCE_PIXELS = 8192 * 4320
# Audio streams compared when choosing the one with the words (see _audio_stream).
MAX_AUDIO_STREAMS = 8
# Peak below which a decoded audio stream counts as silent (-60 dBFS).
SILENCE_PEAK = 1e-3

# File signatures of the containers we read, to tell a damaged media file from a file
# that is not media at all when FFmpeg cannot open it.
_SIGNATURES = {
    "MP4/MOV": lambda head: head[4:8] == b"ftyp",
    "Matroska/WebM": lambda head: head[:4] == b"\x1a\x45\xdf\xa3",
    "AVI/WAV": lambda head: head[:4] == b"RIFF",
    "Ogg": lambda head: head[:4] == b"OggS",
    "FLAC": lambda head: head[:4] == b"fLaC",
    "MP3": lambda head: head[:3] == b"ID3",
}
# Text files that point at other media: named in the error, never opened.
_REFERENCES = {
    "an ffconcat list": lambda head: head.startswith(b"ffconcat"),
    "an HLS playlist": lambda head: head.lstrip().startswith(b"#EXTM3U"),
    "an SDP session description": lambda head: head.lstrip().startswith(b"v=0"),
    "a DASH manifest": lambda head: b"<MPD" in head,
}


class MediaError(ValueError):
    """The uploaded file cannot be used; the message names the problem in one line."""


@dataclass
class DecodedVideo:
    frames: np.ndarray      # uint8 [F, H, W, 3] RGB, upright (rotation metadata applied)
    times: np.ndarray       # float32 [F] sampling instants, seconds
    present: bool           # False when the file has no video stream
    duration: float         # seconds, longest stream


@dataclass
class DecodedAudio:
    samples: np.ndarray     # float32 [S] mono
    present: bool           # False when the file has no audio stream
    stream: int = -1        # the container's index of the stream used, -1 for none


def decode_video(media, interval: float = contract.FRAME_INTERVAL_S,
                 max_side: int = contract.MAX_FRAME_SIDE) -> DecodedVideo:
    """Frames sampled every INTERVAL seconds by timestamp (see the module docstring).

    MEDIA is the file's bytes or a path. Frames are scaled down so the longer side is at
    most MAX_SIDE (aspect kept, swscale's area filter: an average over each output
    pixel's footprint, so no aliasing); all frames get the first sampled frame's size.
    """
    with open_media(media) as container:
        declared = container.duration / 1e6 if container.duration is not None else None
        stream = _video_stream(container)
        if stream is None:
            return DecodedVideo(np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.float32),
                                False, declared or 0.0)
        check_length(declared, MAX_VIDEO_S, "video")
        if stream.codec_context is None:    # FFmpeg has no decoder for it
            raise MediaError("video codec not supported")
        check_frame_size(stream.codec_context.width, stream.codec_context.height)
        stream.thread_type = "AUTO"
        reader = _Reader(container, [stream])
        sampler = _Sampler(interval, max_side)
        prev_time = prev_duration = None
        for _, frame in reader.frames():
            check_frame_size(frame.width, frame.height)
            if frame.pts is not None:
                time = frame.time - reader.origin
            else:   # raw streams carry no timestamps: count durations
                time = prev_time + prev_duration if prev_time is not None else 0.0
            sampler.add(frame, time)
            prev_time, prev_duration = time, _frame_duration(frame, stream)
        if prev_time is None:
            raise MediaError("video stream has no decodable frames")
        video_end = prev_time + prev_duration
        sampler.finish(video_end)
        if declared is None:    # raw streams: measure what was read
            declared = max(reader.end, video_end)
        return DecodedVideo(np.stack(sampler.images), np.array(sampler.times, np.float32), True,
                            declared)


def scaled_size(width: int, height: int, max_side: int = contract.MAX_FRAME_SIDE) -> tuple[int, int]:
    """(width, height) with the longer side at most MAX_SIDE, aspect kept, never enlarged;
    halves round up (2560x1441 -> 1280x721), as the NVDEC path's DALI resize computes it."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5))


def sample_indices(frame_times: np.ndarray, video_end: float,
                   interval: float = contract.FRAME_INTERVAL_S) -> tuple[np.ndarray, np.ndarray]:
    """The sampling rule (module docstring) on known frame timestamps, for decoders that pick
    frames by index (NVDEC): (frame indices int32, instants float32), the frame on screen at
    each instant k * interval before the video ends (the first frame before it starts).
    decode_video applies the same rule while it decodes (_Sampler)."""
    end = max(video_end, frame_times[-1] + _EPS)
    instants = np.arange(int(np.ceil((end - _EPS) / interval))) * interval
    indices = np.searchsorted(frame_times, instants + _EPS, side="right") - 1
    return np.maximum(indices, 0).astype(np.int32), instants.astype(np.float32)


def check_frame_size(width: int, height: int) -> None:
    """MediaError when a picture of WIDTH x HEIGHT is larger than we decode (0: unknown)."""
    if width > MAX_SOURCE_SIDE or height > MAX_SOURCE_SIDE:
        raise MediaError(f"frame {width}x{height} exceeds the {MAX_SOURCE_SIDE}x{MAX_SOURCE_SIDE} limit")
    if width * height > MAX_SOURCE_PIXELS:
        raise MediaError(f"frame {width}x{height} has {width * height} pixels, over the "
                         f"{MAX_SOURCE_PIXELS} limit")


def decode_audio(media, sample_rate: int = contract.SAMPLE_RATE) -> DecodedAudio:
    """The audio stream with the words, resampled to SAMPLE_RATE, mono.

    Which stream: the default-disposition ones first, then the others in file order; the
    first of them that is not silent (a file may carry a silent or a music track first).
    Mono is the mean of the channels (as librosa.load(mono=True) does), not swresample's
    downmix, which adds stereo channels at 0.707 each and changes the level. The length
    limit holds while decoding: a header that understates the length stops nothing.
    """
    with open_media(media) as container:
        candidates = _audio_candidates(container)
        if not candidates:
            return DecodedAudio(np.zeros(0, np.float32), False)
        check_length(container.duration / 1e6 if container.duration is not None else None,
                      MAX_AUDIO_S, "audio")
        decoders = {stream.index: _AudioDecoder(sample_rate) for stream in candidates}
        for stream in candidates:
            stream.thread_type = "AUTO"
        for stream, frame in _Reader(container, candidates).frames():
            decoders[stream.index].add(frame)
        tracks = [(stream, decoders[stream.index].finish()) for stream in candidates]
        tracks = [(stream, samples) for stream, samples in tracks if samples is not None]
        if not tracks:
            raise MediaError("audio stream has no decodable samples")
        stream, samples = next(((s, a) for s, a in tracks if np.abs(a).max(initial=0) >= SILENCE_PEAK), tracks[0])
        return DecodedAudio(samples, True, stream.index)


def _audio_candidates(container) -> list:
    streams = list(container.streams.audio)
    decodable = [s for s in streams if s.codec_context is not None]
    if streams and not decodable:
        raise MediaError("audio codec not supported")
    default = [s for s in decodable if s.disposition & av.stream.Disposition.default]
    return (default + [s for s in decodable if s not in default])[:MAX_AUDIO_STREAMS]


class _AudioDecoder:
    """One audio stream's frames, resampled to mono at SAMPLE_RATE, with the length limit."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.chunks, self.count = [], 0
        self.resampler, self.setup = None, None

    def add(self, frame) -> None:
        # PyAV's resampler refuses frames unlike its first: start a new one when the
        # stream changes format, layout or rate mid-way.
        if (frame.format.name, frame.layout.name, frame.sample_rate) != self.setup:
            self._keep(_mono(self.resampler, None) if self.resampler else [])
            self.resampler = av.AudioResampler(format="fltp", rate=self.sample_rate)   # layout kept
            self.setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        self._keep(_mono(self.resampler, frame))

    def _keep(self, chunks: list) -> None:
        self.chunks += chunks
        self.count += sum(len(c) for c in chunks)
        if self.count > MAX_AUDIO_S * self.sample_rate:
            raise MediaError(f"audio too long: more than {MAX_AUDIO_S:.0f} s decoded "
                             f"(the limit is {MAX_AUDIO_S:.0f} s)")

    def finish(self):
        """float32 [S] samples, None when the stream gave none."""
        if self.resampler is None:
            return None
        self._keep(_mono(self.resampler, None))
        return np.concatenate(self.chunks).astype(np.float32) if self.chunks else np.zeros(0, np.float32)


# The longest inputs the contract accepts (its frames and samples axes): a longer file
# gets a clear error instead of gigabytes of frames.
MAX_VIDEO_S = contract.AXES["frames"][2] * contract.FRAME_INTERVAL_S
MAX_AUDIO_S = contract.AXES["samples"][2] / contract.SAMPLE_RATE
MAX_MEDIA_S = max(MAX_VIDEO_S, MAX_AUDIO_S) + 1.0   # any stream; the margin allows for rounding


def check_length(seconds, limit: float, kind: str) -> None:
    if seconds is not None and seconds > limit:
        raise MediaError(f"{kind} too long: {seconds:.1f} s > limit {limit:.0f} s")


def _mono(resampler, frame) -> list:
    """Resample FRAME (None flushes) and average its channels."""
    # A resampler with nothing to change passes frames through, and None with them.
    return [out.to_ndarray().mean(axis=0) for out in resampler.resample(frame) if out is not None]


def open_media(media):
    """Open MEDIA (bytes or path) with the size checks; MediaError for anything unusable."""
    if isinstance(media, (bytes, bytearray, memoryview)):
        size, source = len(media), io.BytesIO(media)
    else:
        path = Path(media)
        try:
            size, source = path.stat().st_size, open(path, "rb")
        except OSError as error:
            raise MediaError(f"cannot read {path}: {error.strerror}") from None
    try:
        if size == 0:
            raise MediaError("empty file")
        if size > contract.MAX_MEDIA_BYTES:
            raise MediaError(f"file too large: {size} bytes > limit {contract.MAX_MEDIA_BYTES}")
        head = source.read(64)
        source.seek(0)
        refers = next((name for name, match in _REFERENCES.items() if match(head)), None)
        if refers:
            raise MediaError(f"refused: {refers} refers to other files or the network; send the media itself")
        try:
            # Opened from a file object, a path is probed by content alone, as bytes are.
            container = av.open(source, metadata_errors="ignore", options=_CONFINED)
        except av.error.FFmpegError as error:
            kind = next((name for name, match in _SIGNATURES.items() if match(head)), None)
            if kind:
                raise MediaError(f"truncated or corrupt media: {kind} header unreadable "
                                 f"({_detail(error)})") from None
            raise MediaError("not a media file (format not recognised, or not one we accept: "
                             f"{', '.join(ACCEPTED_FORMATS)})") from None
    except BaseException:
        source.close()
        raise
    if not container.streams.video and not container.streams.audio:
        container.close()
        source.close()
        raise MediaError("not a media file (no audio or video stream found)")
    return _Closing(container, source)


class _Closing:
    """Closes the container and its source together; FFmpeg's errors while reading
    become MediaError."""

    def __init__(self, container, source):
        self.container, self.source = container, source

    def __enter__(self):
        return self.container

    def __exit__(self, exc_type, exc, traceback):
        self.container.close()
        self.source.close()
        if isinstance(exc, av.error.FFmpegError):
            raise MediaError(f"truncated or corrupt media: {_detail(exc)}") from None


def _video_stream(container):
    # Cover art in audio files is a one-picture "video" stream: not video.
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _detail(error) -> str:
    return getattr(error, "strerror", None) or str(error)


class _Reader:
    """Decodes some streams while demuxing all of them, to see where the file really ends.

    Demuxing stops at the longest length we accept: a file whose header understates its
    length is not read to its end first.
    """

    def __init__(self, container, streams):
        self.container = container
        self.streams = {stream.index: stream for stream in streams}
        self.origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        self.end = 0.0      # seconds from origin where the last packet of any stream ends

    def frames(self):
        """(stream, frame) for the chosen streams, in file order."""
        for packet in self.container.demux():
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is not None and packet.time_base is not None:
                end = float((stamp + (packet.duration or 0)) * packet.time_base) - self.origin
                self.end = max(self.end, end)
                check_length(self.end, MAX_MEDIA_S, "media")
            stream = self.streams.get(packet.stream.index)
            if stream is not None:
                for frame in packet.decode():
                    yield stream, frame
        self._check_complete()

    def _check_complete(self):
        # Matroska/WebM cut short still demux without error, but the header declares the
        # full length. (MP4 and AVI cut short fail to open or drop the length; a short WAV
        # looks whole.) The margin allows for durations FFmpeg estimates.
        if self.container.duration is None:
            return
        declared = self.container.duration / 1e6
        if self.end < 0.9 * declared and declared - self.end > 1.0:
            raise MediaError(f"truncated or corrupt media: data ends at {self.end:.2f} s "
                             f"but the header declares {declared:.2f} s")


def _frame_duration(frame, stream) -> float:
    if frame.duration and frame.time_base is not None:
        return float(frame.duration * frame.time_base)
    if stream.average_rate:
        return float(1 / stream.average_rate)
    return 0.0


class _Sampler:
    """Picks the frame on screen at each instant; converts only the frames it keeps."""

    def __init__(self, interval: float, max_side: int):
        self.interval, self.max_side = interval, max_side
        self.images, self.times = [], []
        self.shown = None           # (frame, its time): the frame on screen so far
        self.size = None            # output (width, height), fixed by the first frame
        self.converted = None       # (frame, image): the last conversion, for reuse

    def _next_instant(self) -> float:
        return len(self.times) * self.interval

    def add(self, frame, time: float):
        # Instants before this frame show the previous one (or this one, if it is first).
        while self._next_instant() < time - _EPS:
            self._emit(self.shown[0] if self.shown else frame)
        self.shown = (frame, time)

    def finish(self, end: float):
        # The last frame stays on screen until the stream ends; it is shown at least at
        # its own timestamp, even when its duration is unknown.
        end = max(end, self.shown[1] + _EPS)
        while self._next_instant() < end - _EPS:
            self._emit(self.shown[0])

    def _emit(self, frame):
        check_length(self._next_instant(), MAX_VIDEO_S - self.interval, "video")  # headers can lie
        self.times.append(self._next_instant())
        if self.converted is None or self.converted[0] is not frame:
            self.converted = (frame, self._convert(frame))
        self.images.append(self.converted[1])

    def _convert(self, frame) -> np.ndarray:
        if self.size is None:
            self.size = scaled_size(frame.width, frame.height, self.max_side)
        scaling = (frame.width, frame.height) != self.size
        # Unscaled, swscale takes a fast colour-only path, which naming a filter forgoes.
        rgb = frame.reformat(width=self.size[0], height=self.size[1], format="rgb24",
                             interpolation="AREA" if scaling else None).to_ndarray()
        # frame.rotation is the display matrix's counter-clockwise angle; np.rot90 turns
        # counter-clockwise too.
        turns = round(frame.rotation / 90) % 4
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
