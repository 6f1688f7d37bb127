"""Real media clips for the tests, written with PyAV's own encoders (no ffmpeg binary).

Each video frame carries its index as a row of black/white blocks in the top-left corner
(`read_index` reads it back), so a test can tell exactly which source frame a decoder
picked. `frame_image` regenerates any source frame, so decoded content can be compared.
"""
from __future__ import annotations

import math
import struct
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from scipy.signal import lfilter

INDEX_BITS = 8          # frame indices 0..255
SPEECH_SEED = 7

# Encoder options that keep the slow encoders fast and the files small.
_VIDEO_OPTIONS = {
    "libx264": {"preset": "veryfast", "crf": "23"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"},
    "mjpeg": {"q:v": "5"},
    "mpeg4": {"qscale": "4"},
}
# Pixel formats the encoders accept (mjpeg wants full-range YUV).
_PIX_FMT = {"mjpeg": "yuvj420p"}


# ---------------------------------------------------------------- video content


@lru_cache(maxsize=4)
def _face_patch(height: int) -> np.ndarray:
    """The astronaut's head and shoulders, scaled to HEIGHT pixels square."""
    from skimage import data
    from skimage.transform import resize

    head = data.astronaut()[0:280, 90:370]
    return (resize(head, (height, height), anti_aliasing=True) * 255).astype(np.uint8)


def _index_block(size: tuple[int, int]) -> int:
    return max(8, size[1] // 15)


@lru_cache(maxsize=4)
def _backdrop(width: int, height: int) -> np.ndarray:
    """Soft grey-blue studio backdrop, like a portrait photo's."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[..., 0] = 90 + 40 * x / width
    image[..., 1] = 100 + 30 * y / height
    image[..., 2] = 130
    return image.astype(np.uint8)


def _waves(width: int, height: int, t: float) -> np.ndarray:
    """Moving colour waves: texture and motion, nothing face-like."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[..., 0] = 128 + 100 * np.sin(x / 23 + 2 * t)
    image[..., 1] = 128 + 100 * np.sin(y / 17 - 3 * t)
    image[..., 2] = 128 + 100 * np.sin((x + y) / 31 + t)
    return image.astype(np.uint8)


def frame_image(index: int, size=(640, 360), face=True, fps=25.0) -> np.ndarray:
    """Source frame INDEX of a clip: uint8 [H, W, 3] RGB; SIZE is (width, height)."""
    width, height = size
    t = index / fps
    image = _backdrop(width, height).copy() if face else _waves(width, height, t)
    if face:
        side = int(height * 0.7) // 2 * 2
        patch = _face_patch(side)
        # The head sways a few pixels, as a speaker's does.
        top = (height - side) // 2 + int(round(4 * math.sin(2 * math.pi * 0.7 * t)))
        left = (width - side) // 2 + int(round(8 * math.sin(2 * math.pi * 0.5 * t)))
        image[top:top + side, left:left + side] = patch
    block = _index_block(size)
    for bit in range(INDEX_BITS):
        value = 255 if (index >> bit) & 1 else 0
        image[block // 2:block // 2 + block, (bit + 1) * block:(bit + 2) * block] = value
    return image


def read_index(frame: np.ndarray) -> int:
    """The frame index drawn by `frame_image`, read from a decoded (upright) frame."""
    height, width = frame.shape[:2]
    block = _index_block((width, height))
    index = 0
    for bit in range(INDEX_BITS):
        centre = frame[block, (bit + 1) * block + block // 2]
        if centre.mean() > 128:
            index |= 1 << bit
    return index


# ---------------------------------------------------------------- audio content


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def speech_like(seconds: float, rate: int, seed: int = SPEECH_SEED) -> np.ndarray:
    """Syllables of a voiced source through vowel formants, with pauses; deterministic.

    The source is a glottal-like pulse train whose pitch glides between 100 and 220 Hz;
    each syllable gets its own vowel (two formant resonators) and a rise-fall envelope.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    out = np.zeros(n, np.float64)
    vowels = [(730, 1090), (270, 2290), (530, 1840), (570, 840), (300, 870), (660, 1720)]
    pos = int(0.1 * rate)
    while pos < n:
        length = int(rng.uniform(0.12, 0.3) * rate)
        f0 = rng.uniform(100, 220) * np.linspace(1.1, 0.9, length)     # falling pitch
        phase = np.cumsum(f0 / rate)
        source = (phase % 1.0) ** 3 - 0.25                               # sharp glottal pulses
        syllable = source
        for formant, bandwidth in zip(vowels[rng.integers(len(vowels))], (80, 120)):
            radius = math.exp(-math.pi * bandwidth / rate)
            theta = 2 * math.pi * formant / rate
            syllable = lfilter([1 - radius], [1, -2 * radius * math.cos(theta), radius ** 2], syllable)
        envelope = np.sin(np.linspace(0, np.pi, length)) ** 2
        end = min(n, pos + length)
        out[pos:end] += (syllable * envelope)[:end - pos]
        pos = end + int(rng.choice([0.04, 0.08, 0.3]) * rate)            # short gaps, some pauses
    peak = np.abs(out).max()
    return (0.6 * out / peak if peak > 0 else out).astype(np.float32)


def audio_signal(kind: str, seconds: float, rate: int, tone_hz: float = 440.0) -> np.ndarray:
    """Mono float32 signal of the given kind: 'speech', 'silence' or 'tone'."""
    if kind == "speech":
        return speech_like(seconds, rate)
    if kind == "tone":
        return tone(seconds, rate, tone_hz)
    if kind == "silence":
        return np.zeros(int(round(seconds * rate)), np.float32)
    raise ValueError(f"unknown audio kind {kind!r}")


# ---------------------------------------------------------------- writing clips


def vfr_times(seconds: float) -> np.ndarray:
    """Irregular presentation times in ms: gaps from 10 ms to 700 ms, deterministic."""
    gaps = [40, 40, 10, 300, 40, 700, 20, 120, 460, 40, 80, 520, 30, 250]
    times, t, i = [], 0, 0
    while t < seconds * 1000:
        times.append(t)
        t += gaps[i % len(gaps)]
        i += 1
    return np.array(times, np.int64)


def make_clip(path, container: str, vcodec: str | None, acodec: str | None, seconds: float,
              size=(640, 360), fps=25, face=True, audio: str | None = "speech", vfr=False,
              rotation=0, audio_rate=44_100, audio_channels=2, tone_hz=440.0) -> Path:
    """Write a clip and return its path.

    CONTAINER is a PyAV/FFmpeg format name ('mp4', 'matroska', 'webm', 'avi', 'mov', 'wav',
    'ipod' for .m4a). VCODEC None gives an audio-only file; ACODEC or AUDIO None a
    video-only one. VFR spaces frames by `vfr_times` instead of 1/FPS. ROTATION is the
    clockwise angle a player must turn the picture by (the 'rotate' tag of phone videos).
    """
    path = Path(path)
    with av.open(str(path), "w", format=container) as out:
        video = None
        if vcodec:
            video = out.add_stream(vcodec, rate=fps, options=_VIDEO_OPTIONS.get(vcodec, {}))
            video.width, video.height = size
            video.pix_fmt = _PIX_FMT.get(vcodec, "yuv420p")
            if vfr:
                video.codec_context.time_base = Fraction(1, 1000)
            if rotation:
                video.set_display_rotation(-rotation)   # PyAV takes counter-clockwise degrees
        sound = None
        if acodec and audio:
            sound = out.add_stream(acodec, rate=audio_rate, layout="stereo" if audio_channels == 2 else "mono")
        if video is not None:
            times = vfr_times(seconds) if vfr else None
            count = len(times) if vfr else int(round(seconds * fps))
            for index in range(count):
                frame = av.VideoFrame.from_ndarray(frame_image(index, size, face, fps), format="rgb24")
                if vfr:
                    frame.pts, frame.time_base = int(times[index]), Fraction(1, 1000)
                else:
                    frame.pts = index
                out.mux(video.encode(frame))
            out.mux(video.encode(None))
        if sound is not None:
            _write_audio(out, sound, audio_signal(audio, seconds, audio_rate, tone_hz), audio_channels)
    return path


def _write_audio(out, stream, mono: np.ndarray, channels: int):
    # Channel 2 is a quieter copy, so a downmix has something to average.
    planes = np.stack([mono, 0.5 * mono] if channels == 2 else [mono]).astype(np.float32)
    layout = "stereo" if channels == 2 else "mono"
    chunk = 1024
    for start in range(0, planes.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, start:start + chunk]),
                                           format="fltp", layout=layout)
        frame.rate, frame.pts = stream.rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def make_song_with_cover(path) -> Path:
    """1 s MP3 (22.05 kHz tone) whose ID3 tag carries a cover picture: FFmpeg shows the
    picture as a one-frame video stream marked attached_pic."""
    path = Path(path)
    with av.open(str(path), "w", format="mp3") as out:
        sound = out.add_stream("libmp3lame", rate=22_050, layout="mono")
        art = out.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 64, 64, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(frame_image(0, (64, 64), face=False), format="rgb24")
        out.mux(art.encode(picture))
        out.mux(art.encode(None))
        _write_audio(out, sound, tone(1.0, 22_050), 1)
    return path


# ---------------------------------------------------------------- bad inputs


def write_empty(path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_random_bytes(path, size=64 * 1024, seed=3) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_truncated(source, path, keep=0.5) -> Path:
    """The first KEEP fraction of SOURCE's bytes: an upload cut off half way."""
    path = Path(path)
    data = Path(source).read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def write_subtitles(path) -> Path:
    """An SRT file: FFmpeg opens it, but it holds neither audio nor video."""
    path = Path(path)
    path.write_text("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                    "2\n00:00:01,500 --> 00:00:03,000\nHow are you?\n")
    return path


def write_empty_video_stream(path) -> Path:
    """A Matroska file whose video track is declared but holds no frames, beside 1 s of
    audio. (The MP4 muxer drops empty tracks; Matroska keeps them.)"""
    path = Path(path)
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        sound = out.add_stream("pcm_s16le", rate=16_000, layout="mono")
        _write_audio(out, sound, tone(1.0, 16_000), 1)
        out.mux(video.encode(None))
    return path


# ---------------------------------------------------------------- hostile inputs


def gif_bomb(width=16000, height=16000) -> bytes:
    """A GIF of a few dozen bytes whose logical screen is WIDTH x HEIGHT: one 1x1 image."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + image + b"\x3b"


def ffconcat_list(target: str) -> bytes:
    """An ffconcat list naming TARGET: FFmpeg would open that file on the decoding host."""
    return f"ffconcat version 1.0\nfile '{target}'\n".encode()


def sdp_description(port: int) -> bytes:
    """An SDP description of an RTP stream on PORT: FFmpeg would open UDP sockets for it."""
    return (f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 0.0.0.0\nt=0 0\n"
            f"m=audio {port} RTP/AVP 0\na=rtpmap:0 PCMU/8000\n").encode()


def make_lying_duration(path, seconds: float, declared: float) -> Path:
    """SECONDS of 8 kHz 16-bit PCM in Matroska (16 kB/s, nothing to encode) whose header
    says DECLARED seconds."""
    path = Path(path)
    with av.open(str(path), "w", format="matroska") as out:
        sound = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        _write_audio(out, sound, tone(seconds, 8000), 1)
    data = bytearray(path.read_bytes())
    # Segment Info's Duration element (ID 0x4489), an 8-byte float in milliseconds.
    at = data.index(b"\x44\x89\x88") + 3
    data[at:at + 8] = struct.pack(">d", declared * 1000)
    path.write_bytes(bytes(data))
    return path


def make_two_audio_tracks(path, first: str, second: str, seconds=3.0, default: int | None = None) -> Path:
    """Matroska with two 16 kHz mono AAC tracks of the given kinds (audio_signal); DEFAULT is
    the track (0 or 1) marked default-disposition, None for neither."""
    path = Path(path)
    with av.open(str(path), "w", format="matroska") as out:
        tracks = [out.add_stream("aac", rate=16_000, layout="mono") for _ in range(2)]
        for index, track in enumerate(tracks):
            track.disposition = av.stream.Disposition.default if index == default else av.stream.Disposition(0)
        for track, kind in zip(tracks, (first, second)):
            _write_audio(out, track, audio_signal(kind, seconds, 16_000), 1)
    return path
