"""Decoding of the uploaded media with PyAV: sampled frames and 16 kHz mono audio.

No torch here: the Triton python-backend decode steps import this module on its own.

Frame sampling rules (fv2es.preprocessing.FRAME_SAMPLINGS). Times are seconds from the
container's start.
- "every-0.5s" (the default): the sampling instants are t_k = k * 0.5 for k = 0, 1, 2, ...
  while t_k < end, where end is the last frame's timestamp plus its duration (the end of
  the video stream). At each instant we take the frame on screen then: the last frame whose
  timestamp is <= t_k, or the first frame when t_k comes before it. This follows
  timestamps, not frame counts, so it is right for variable frame rate video. A 3 s clip
  gives instants 0, 0.5, ..., 2.5: 6 frames, i.e. ceil(video_duration / 0.5).
- "every-15th-frame" (the authors'): decoded frames 0, 15, 30, ..., each at its own
  timestamp, whatever the frame rate (a 10 s clip: 20 frames at 30 fps, 17 at 25 fps).
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


def decode_video(media, sampling: str = "every-0.5s", max_side: int = contract.MAX_FRAME_SIDE) -> DecodedVideo:
    """Frames sampled by the SAMPLING rule (see the module docstring).

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
        sampler = _SAMPLERS[sampling](max_side)
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
                   sampling: str = "every-0.5s") -> tuple[np.ndarray, np.ndarray]:
    """The SAMPLING rule (module docstring) on known frame timestamps, for decoders that pick
    frames by index (NVDEC): (frame indices int32, their times float32). decode_video applies
    the same rules while it decodes (_SAMPLERS)."""
    if sampling == "every-15th-frame":
        indices = np.arange(0, len(frame_times), FRAME_STRIDE)
        return indices.astype(np.int32), np.asarray(frame_times, np.float32)[indices]
    interval = contract.FRAME_INTERVAL_S
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


def decode_audio(media, channel: str = "mean", sample_rate: int = contract.SAMPLE_RATE) -> DecodedAudio:
    """The audio stream with the words, resampled to SAMPLE_RATE, one channel.

    Which stream: the default-disposition ones first, then the others in file order; the
    first of them that is not silent (a file may carry a silent or a music track first).
    Which CHANNEL (fv2es.preprocessing.AUDIO_CHANNELS): "mean" is the mean of the channels
    (as librosa.load(mono=True) does), not swresample's downmix, which adds stereo channels
    at 0.707 each and changes the level; "left" / "right" the first / second channel (the
    only one of a mono file); "loudest" the louder of the first two. The length limit holds
    while decoding: a header that understates the length stops nothing.
    """
    with open_media(media) as container:
        candidates = _audio_candidates(container)
        if not candidates:
            return DecodedAudio(np.zeros(0, np.float32), False)
        check_length(container.duration / 1e6 if container.duration is not None else None,
                      MAX_AUDIO_S, "audio")
        decoders = {stream.index: _AudioDecoder(sample_rate, channel) for stream in candidates}
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
    """One audio stream's frames, resampled to SAMPLE_RATE, reduced to the CHANNEL rule's
    channels as they come (at most two are kept, for "loudest"), with the length limit."""

    def __init__(self, sample_rate: int, channel: str):
        if channel not in _CHANNEL_ROWS:
            raise ValueError(f"audio channel {channel!r}: choose one of {', '.join(_CHANNEL_ROWS)}")
        self.sample_rate, self.channel = sample_rate, channel
        self.chunks, self.count = [], 0
        self.resampler, self.setup = None, None

    def add(self, frame) -> None:
        # PyAV's resampler refuses frames unlike its first: start a new one when the
        # stream changes format, layout or rate mid-way.
        if (frame.format.name, frame.layout.name, frame.sample_rate) != self.setup:
            self._keep(self._resample(None) if self.resampler else [])
            self.resampler = av.AudioResampler(format="fltp", rate=self.sample_rate)   # layout kept
            self.setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        self._keep(self._resample(frame))

    def _resample(self, frame) -> list:
        """FRAME (None flushes) resampled: one [kept channels, samples] array per output frame."""
        # A resampler with nothing to change passes frames through, and None with them.
        return [_CHANNEL_ROWS[self.channel](out.to_ndarray()) for out in self.resampler.resample(frame)
                if out is not None]

    def _keep(self, chunks: list) -> None:
        self.chunks += chunks
        self.count += sum(c.shape[1] for c in chunks)
        if self.count > MAX_AUDIO_S * self.sample_rate:
            raise MediaError(f"audio too long: more than {MAX_AUDIO_S:.0f} s decoded "
                             f"(the limit is {MAX_AUDIO_S:.0f} s)")

    def finish(self):
        """float32 [S] samples, None when the stream gave none."""
        if self.resampler is None:
            return None
        self._keep(self._resample(None))
        if not self.chunks:
            return np.zeros(0, np.float32)
        rows = min(c.shape[0] for c in self.chunks)     # a layout change mid-way may drop one
        samples = np.concatenate([c[:rows] for c in self.chunks], axis=1)
        if self.channel == "loudest":
            return samples[int(np.argmax(np.square(samples, dtype=np.float64).sum(axis=1)))].astype(np.float32)
        return samples[0].astype(np.float32)


# Per output frame [channels, samples]: the rows each channel rule keeps.
_CHANNEL_ROWS = {
    "mean": lambda planes: planes.mean(axis=0, keepdims=True),
    "left": lambda planes: planes[:1],
    "right": lambda planes: planes[min(1, len(planes) - 1):][:1],
    "loudest": lambda planes: planes[:2],
}


# The longest inputs the contract accepts (its frames and samples axes): a longer file
# gets a clear error instead of gigabytes of frames.
MAX_FRAMES = contract.AXES["frames"][2]
MAX_VIDEO_S = MAX_FRAMES * contract.FRAME_INTERVAL_S
MAX_AUDIO_S = contract.AXES["samples"][2] / contract.SAMPLE_RATE
MAX_MEDIA_S = max(MAX_VIDEO_S, MAX_AUDIO_S) + 1.0   # any stream; the margin allows for rounding


def check_length(seconds, limit: float, kind: str) -> None:
    if seconds is not None and seconds > limit:
        raise MediaError(f"{kind} too long: {seconds:.1f} s > limit {limit:.0f} s")


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
    """Keeps the sampled frames, converting each only once; subclasses say which."""

    def __init__(self, max_side: int):
        self.max_side = max_side
        self.images, self.times = [], []
        self.size = None            # output (width, height), fixed by the first frame
        self.converted = None       # (frame, image): the last conversion, for reuse

    def add(self, frame, time: float):
        raise NotImplementedError

    def finish(self, end: float):
        pass

    def _emit(self, frame, time: float):
        if len(self.times) >= MAX_FRAMES:   # headers can lie
            raise MediaError(f"video too long: more than {MAX_FRAMES} sampled frames "
                             f"(the limit is {MAX_VIDEO_S:.0f} s at one frame every {contract.FRAME_INTERVAL_S} s)")
        self.times.append(time)
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


class _EveryInterval(_Sampler):
    """"every-0.5s": the frame on screen at each instant k * 0.5 s."""
    interval = contract.FRAME_INTERVAL_S

    def __init__(self, max_side: int):
        super().__init__(max_side)
        self.shown = None           # (frame, its time): the frame on screen so far

    def _next_instant(self) -> float:
        return len(self.times) * self.interval

    def add(self, frame, time: float):
        # Instants before this frame show the previous one (or this one, if it is first).
        while self._next_instant() < time - _EPS:
            self._emit(self.shown[0] if self.shown else frame, self._next_instant())
        self.shown = (frame, time)

    def finish(self, end: float):
        # The last frame stays on screen until the stream ends; it is shown at least at
        # its own timestamp, even when its duration is unknown.
        end = max(end, self.shown[1] + _EPS)
        while self._next_instant() < end - _EPS:
            self._emit(self.shown[0], self._next_instant())


class _EveryNthFrame(_Sampler):
    """"every-15th-frame": decoded frames 0, 15, 30, ... at their own times."""

    def __init__(self, max_side: int):
        super().__init__(max_side)
        self.decoded = 0

    def add(self, frame, time: float):
        if self.decoded % FRAME_STRIDE == 0:
            self._emit(frame, time)
        self.decoded += 1


FRAME_STRIDE = 15
_SAMPLERS = {"every-0.5s": _EveryInterval, "every-15th-frame": _EveryNthFrame}
