"""Test media with known words: English speech from espeak-ng, muxed into H.264 + AAC mp4 clips.

espeak-ng is a Debian package (scripts/install_system_deps.sh installs it). Its voice is
robotic but fixed, so a recogniser's word error rate on it is a stable check.
"""
from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from fv2es_client.contract import SAMPLE_RATE

SENTENCE = "I am so happy to see you again. This is the best day of my whole life."
# Distinct sentences, so a long transcript can be scored word for word.
LONG_SENTENCES = (
    "Good morning everyone, thank you for coming to the meeting today.",
    "We have a lot of work to finish before the end of the week.",
    "I am worried that the new plan will not be ready in time.",
    "Please send me your notes when you get back to your desk.",
    "The weather is cold and the train was late again this morning.",
    "I think we should take a short break and talk about it after lunch.",
    "My sister is coming to visit us next month with her two children.",
    "Thank you all for your patience, I will see you tomorrow.",
)
MAX_WER = 0.35          # the bar for recognised speech
SPEED_WPM = 140         # espeak-ng words per minute: fixed, so clips are reproducible
PAUSE_S = 1.5           # silence between sentences in the long clip
FPS = 10
VIDEO_SIZE = (160, 120)


def synthesize(text: str) -> tuple[np.ndarray, int]:
    """Speak TEXT with espeak-ng's US English voice: (float32 mono samples, sample rate)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: run scripts/install_system_deps.sh as root")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(SPEED_WPM), "-w", str(path), text],
                       check=True, capture_output=True)
        with wave.open(str(path)) as wav:
            assert wav.getnchannels() == 1 and wav.getsampwidth() == 2, "espeak-ng writes 16-bit mono"
            rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0, rate


def mux_clip(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write an mp4 with a moving square (H.264) over the given mono audio (AAC), same length."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height = VIDEO_SIZE
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=rate, layout="mono")

        n_frames = max(1, round(len(samples) / rate * FPS))
        width, height = VIDEO_SIZE
        for i in range(n_frames):
            image = np.full((height, width, 3), 40, np.uint8)
            x = (i * 4) % (width - 32)
            image[44:76, x:x + 32] = (220, 180, 60)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            container.mux(video.encode(frame))
        container.mux(video.encode())

        # The AAC encoder takes planar float frames of its own size: the resampler reframes.
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate,
                                      frame_size=audio.codec_context.frame_size)
        pcm = av.AudioFrame.from_ndarray(
            (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None], format="s16", layout="mono")
        pcm.sample_rate = rate
        pcm.pts = 0
        for frame in itertools.chain(resampler.resample(pcm), resampler.resample(None)):
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def speech_clip(folder: Path) -> tuple[Path, str]:
    """A ~5 s clip speaking SENTENCE: (path, the words spoken)."""
    samples, rate = synthesize(SENTENCE)
    return mux_clip(Path(folder) / "speech.mp4", samples, rate), SENTENCE


def long_speech_clip(folder: Path, seconds: float = 60.0) -> tuple[Path, str]:
    """A clip of at least SECONDS: LONG_SENTENCES in turn, with pauses; (path, the words spoken)."""
    spoken, pieces, total = [], [], 0
    rate = None
    for sentence in itertools.cycle(LONG_SENTENCES):
        samples, rate = synthesize(sentence)
        pause = np.zeros(int(PAUSE_S * rate), np.float32)
        pieces += [samples, pause]
        spoken.append(sentence)
        total += len(samples) + len(pause)
        if total >= seconds * rate:
            break
    return mux_clip(Path(folder) / "long_speech.mp4", np.concatenate(pieces), rate), " ".join(spoken)


def silent_clip(folder: Path, seconds: float = 5.0) -> Path:
    """A clip whose audio track holds only digital silence."""
    return mux_clip(Path(folder) / "silent.mp4", np.zeros(int(seconds * SAMPLE_RATE), np.float32), SAMPLE_RATE)


def read_audio(path: Path) -> np.ndarray:
    """The clip's first audio stream as float32 mono at SAMPLE_RATE, decoded with PyAV."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)


def normalise(text: str) -> str:
    """Lower case, no punctuation: WER should count words, not commas."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(normalise(reference), normalise(hypothesis))
