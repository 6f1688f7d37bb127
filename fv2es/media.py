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
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from fv2es_client import contract

# A frame this close after an instant counts as shown at it (float timestamps).
_EPS = 1e-6

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


def decode_video(media, interval: float = contract.FRAME_INTERVAL_S,
                 max_side: int = contract.MAX_FRAME_SIDE) -> DecodedVideo:
    """Frames sampled every INTERVAL seconds by timestamp (see the module docstring).

    MEDIA is the file's bytes or a path. Frames are scaled down so the longer side is at
    most MAX_SIDE (aspect kept, swscale's area filter: an average over each output
    pixel's footprint, so no aliasing); all frames get the first sampled frame's size.
    """
    with _open(media) as container:
        declared = container.duration / 1e6 if container.duration is not None else None
        stream = _video_stream(container)
        if stream is None:
            return DecodedVideo(np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.float32),
                                False, declared or 0.0)
        _check_length(declared, MAX_VIDEO_S, "video")
        stream.thread_type = "AUTO"
        reader = _Reader(container, stream)
        sampler = _Sampler(interval, max_side)
        prev_time = prev_duration = None
        for frame in reader.frames():
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


def decode_audio(media, sample_rate: int = contract.SAMPLE_RATE) -> DecodedAudio:
    """The first audio stream resampled to SAMPLE_RATE, mono.

    Mono is the mean of the channels (as librosa.load(mono=True) does), not swresample's
    downmix, which adds stereo channels at 0.707 each and changes the level.
    """
    with _open(media) as container:
        if not container.streams.audio:
            return DecodedAudio(np.zeros(0, np.float32), False)
        _check_length(container.duration / 1e6 if container.duration is not None else None,
                      MAX_AUDIO_S, "audio")
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        chunks, resampler, setup = [], None, None
        for frame in _Reader(container, stream).frames():
            # PyAV's resampler refuses frames unlike its first: start a new one when the
            # stream changes format, layout or rate mid-way.
            if (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
                chunks += _mono(resampler, None) if resampler else []
                resampler = av.AudioResampler(format="fltp", rate=sample_rate)   # layout kept
                setup = (frame.format.name, frame.layout.name, frame.sample_rate)
            chunks += _mono(resampler, frame)
        if resampler is None:
            raise MediaError("audio stream has no decodable samples")
        chunks += _mono(resampler, None)
        samples = np.concatenate(chunks).astype(np.float32)
        _check_length(len(samples) / sample_rate, MAX_AUDIO_S, "audio")
        return DecodedAudio(samples, True)


# The longest inputs the contract accepts (its frames and samples axes): a longer file
# gets a clear error instead of gigabytes of frames.
MAX_VIDEO_S = contract.AXES["frames"][2] * contract.FRAME_INTERVAL_S
MAX_AUDIO_S = contract.AXES["samples"][2] / contract.SAMPLE_RATE


def _check_length(seconds, limit: float, kind: str) -> None:
    if seconds is not None and seconds > limit:
        raise MediaError(f"{kind} too long: {seconds:.1f} s > limit {limit:.0f} s")


def _mono(resampler, frame) -> list:
    """Resample FRAME (None flushes) and average its channels."""
    # A resampler with nothing to change passes frames through, and None with them.
    return [out.to_ndarray().mean(axis=0) for out in resampler.resample(frame) if out is not None]


def _open(media):
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
        head = source.read(16)
        source.seek(0)
        try:
            # Opened from a file object, a path is probed by content alone, as bytes are.
            container = av.open(source, metadata_errors="ignore")
        except av.error.FFmpegError as error:
            kind = next((name for name, match in _SIGNATURES.items() if match(head)), None)
            if kind:
                raise MediaError(f"truncated or corrupt media: {kind} header unreadable "
                                 f"({_detail(error)})") from None
            raise MediaError("not a media file (format not recognised)") from None
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
    """Decodes one stream while demuxing all of them, to see where the file really ends."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self.origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        self.end = 0.0      # seconds from origin where the last packet of any stream ends

    def frames(self):
        for packet in self.container.demux():
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is not None and packet.time_base is not None:
                end = float((stamp + (packet.duration or 0)) * packet.time_base) - self.origin
                self.end = max(self.end, end)
            if packet.stream is self.stream:
                yield from packet.decode()
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
        _check_length(self._next_instant(), MAX_VIDEO_S - self.interval, "video")  # headers can lie
        self.times.append(self._next_instant())
        if self.converted is None or self.converted[0] is not frame:
            self.converted = (frame, self._convert(frame))
        self.images.append(self.converted[1])

    def _convert(self, frame) -> np.ndarray:
        if self.size is None:
            scale = min(1.0, self.max_side / max(frame.width, frame.height))
            self.size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
        scaling = (frame.width, frame.height) != self.size
        # Unscaled, swscale takes a fast colour-only path, which naming a filter forgoes.
        rgb = frame.reformat(width=self.size[0], height=self.size[1], format="rgb24",
                             interpolation="AREA" if scaling else None).to_ndarray()
        # frame.rotation is the display matrix's counter-clockwise angle; np.rot90 turns
        # counter-clockwise too.
        turns = round(frame.rotation / 90) % 4
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
