"""gRPC client for the served `fv2es` ensemble: send a video file, get a `Prediction` back.

Depends only on numpy, tritonclient[grpc] and tqdm (no torch), so any service can install it.
Tensor names, dtypes and shapes come from `contract`, the same module the server is built from.
"""
from __future__ import annotations

import heapq
import os
import queue
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from . import contract

Media = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Triton answers UNAVAILABLE both when no server listens and when the model is not loaded;
# these phrases in its message mean the latter, which a retry does not fix.
_MODEL_PROBLEMS = ("unknown model", "not ready", "no available version", "is not found")


# ---------------------------------------------------------------------------- errors

class Fv2esError(Exception):
    """Base of every error this client raises. `status` and `server_message` are set when
    the server answered with an error."""

    def __init__(self, message: str, status: Optional[str] = None, server_message: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class ServerUnreachable(Fv2esError):
    """No server answers at the URL (nothing listening, wrong host, TLS mismatch)."""


class ModelNotReady(Fv2esError):
    """The server answers but the fv2es model is not loaded or not ready."""


class Timeout(Fv2esError, TimeoutError):
    """The server did not answer within the client's timeout."""


class InvalidInput(Fv2esError, ValueError):
    """The input cannot be sent: missing file, empty file, file too big."""


class InputRejected(InvalidInput):
    """The server refused the input; `server_message` says why (e.g. "empty file")."""


class ServerError(Fv2esError):
    """The server failed on the request, or answered outside the tensor contract."""


# ---------------------------------------------------------------------------- tensors

def build_inputs(media: bytes, transcript: Optional[str] = None) -> list:
    """The request tensors, [1, 1] BYTES each. An absent transcript is sent empty, which
    the ensemble reads as "recognise the speech"."""
    values = {"MEDIA": bytes(media), "TRANSCRIPT": (transcript or "").encode("utf-8")}
    inputs = []
    for name in contract.ENSEMBLE_INPUTS:
        tensor = contract.TENSORS[name]
        array = np.empty((1, *tensor.shape), dtype=np.object_)   # leading batch axis of 1
        array[...] = values[name]
        tensor_input = grpcclient.InferInput(name, list(array.shape), contract.WIRE_DTYPES[tensor.dtype])
        tensor_input.set_data_from_numpy(array)
        inputs.append(tensor_input)
    return inputs


def build_outputs() -> list:
    return [grpcclient.InferRequestedOutput(name) for name in contract.ENSEMBLE_OUTPUTS]


def _per_clip(name: str, array) -> np.ndarray:
    """Drop Triton's batch axis (when there) and check the shape against the contract."""
    tensor = contract.TENSORS[name]
    array = np.asarray(array)
    if array.ndim == len(tensor.shape) + 1 and array.shape[0] == 1:
        array = array[0]
    fixed_ok = all(not isinstance(d, int) or d == s for d, s in zip(tensor.shape, array.shape))
    if array.ndim != len(tensor.shape) or not fixed_ok:
        raise ValueError(f"{name} has shape {list(array.shape)}, the contract says [1, {tensor.shape}]")
    return array


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------- prediction

@dataclass
class Prediction:
    """One clip's answer. Probabilities are independent sigmoids (multi-label), in `labels` order."""

    labels: list
    probabilities: np.ndarray          # (C,)
    fused_logits: np.ndarray           # (C,)
    modality_logits: dict              # "text" | "visual" | "audio" -> (C,)
    face_scores: np.ndarray            # (F,) per sampled frame, 0 where no face was found
    frame_times: np.ndarray            # (F,) seconds
    duration: float                    # seconds, longest stream
    video_present: bool
    audio_present: bool
    audio_stream: int                  # the file's index of the audio stream used, -1: none
    text_present: bool
    transcript: str                    # the transcript the text encoder read
    transcript_source: str             # request | recognition | none
    asr_seconds: float
    weights: str                       # identity of the served weights
    source: str = ""                   # what was sent: a path, or "<N bytes>"

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, np.ndarray], source: str = "") -> "Prediction":
        """Parse the ensemble's outputs, with or without the leading batch axis of 1.
        Raises ValueError when a tensor is missing or shaped outside the contract."""
        missing = [name for name in contract.ENSEMBLE_OUTPUTS if outputs.get(name) is None]
        if missing:
            raise ValueError(f"outputs lack {', '.join(missing)}")
        t = {name: _per_clip(name, outputs[name]) for name in contract.ENSEMBLE_OUTPUTS}
        labels = [_text(label) for label in t["LABELS"]]
        per_class = ["PROBABILITIES", "FUSED_LOGITS"] + [f"{m.upper()}_LOGITS" for m in contract.MODALITIES]
        for name in per_class:
            if len(t[name]) != len(labels):
                raise ValueError(f"{name} has {len(t[name])} values for {len(labels)} labels")
        if len(t["FACE_SCORES"]) != len(t["FRAME_TIMES"]):
            raise ValueError(f"FACE_SCORES has {len(t['FACE_SCORES'])} frames, "
                             f"FRAME_TIMES {len(t['FRAME_TIMES'])}")
        return cls(
            labels=labels,
            probabilities=t["PROBABILITIES"].astype(np.float32),
            fused_logits=t["FUSED_LOGITS"].astype(np.float32),
            modality_logits={m: t[f"{m.upper()}_LOGITS"].astype(np.float32) for m in contract.MODALITIES},
            face_scores=t["FACE_SCORES"].astype(np.float32),
            frame_times=t["FRAME_TIMES"].astype(np.float32),
            duration=float(t["DURATION"][0]),
            video_present=bool(t["VIDEO_PRESENT"][0]),
            audio_present=bool(t["AUDIO_PRESENT"][0]),
            audio_stream=int(t["AUDIO_STREAM"][0]),
            text_present=bool(t["TEXT_PRESENT"][0]),
            transcript=_text(t["TRANSCRIPT_USED"][0]),
            transcript_source=_text(t["TRANSCRIPT_SOURCE"][0]),
            asr_seconds=float(t["ASR_SECONDS"][0]),
            weights=_text(t["WEIGHTS"][0]),
            source=source,
        )

    @property
    def label_probabilities(self) -> dict:
        return {label: float(p) for label, p in zip(self.labels, self.probabilities)}

    def ranked(self) -> list:
        """(label, probability) pairs, most probable first."""
        return sorted(self.label_probabilities.items(), key=lambda item: -item[1])

    @property
    def top_label(self) -> str:
        return self.labels[int(np.argmax(self.probabilities))]

    @property
    def top_probability(self) -> float:
        return float(np.max(self.probabilities))

    @property
    def modality_present(self) -> dict:
        """Whether each modality's logits took part in the fusion."""
        present = {"text": self.text_present, "visual": self.video_present, "audio": self.audio_present}
        return {m: present[m] for m in contract.MODALITIES}

    @property
    def modality_top_labels(self) -> dict:
        """Each modality's own top label (None when it was left out): which modality agrees
        with the fused answer is as far as the client can tell what drove it."""
        return {m: self.labels[int(np.argmax(logits))] if self.modality_present[m] else None
                for m, logits in self.modality_logits.items()}

    @property
    def faces_found(self) -> list:
        return [bool(score > 0) for score in self.face_scores]

    @property
    def untrained(self) -> bool:
        return self.weights.strip().lower().startswith("untrained")

    @property
    def warnings(self) -> list:
        """Human-readable reasons to distrust or qualify this answer."""
        notes = []
        if self.untrained:
            notes.append(f"UNTRAINED WEIGHTS ({self.weights}): these probabilities mean nothing; "
                         "serve the authors' checkpoint or a trained one")
        if not self.video_present:
            notes.append("no video stream: the visual modality was left out")
        elif len(self.face_scores) == 0:
            notes.append("no frame could be sampled from the video stream")
        elif not any(self.faces_found):
            notes.append(f"no face found in any of the {len(self.face_scores)} sampled frames: "
                         "the visual modality saw centre crops")
        if not self.audio_present:
            notes.append("no audio track: the audio modality was left out")
        if not self.text_present:
            if self.transcript_source == "none":
                reason = "no transcript was sent and the server recognised no speech"
            elif not self.transcript.strip():
                reason = f"the transcript is empty (source: {self.transcript_source})"
            else:
                reason = "the server marked it absent"
            notes.append(f"text left out: {reason}")
        return notes

    def to_dict(self) -> dict:
        """Plain JSON-ready values."""
        return {
            "source": self.source,
            "top_label": self.top_label,
            "top_probability": self.top_probability,
            "labels": list(self.labels),
            "probabilities": self.label_probabilities,
            "fused_logits": self.fused_logits.tolist(),
            "modality_logits": {m: logits.tolist() for m, logits in self.modality_logits.items()},
            "modality_present": self.modality_present,
            "modality_top_labels": self.modality_top_labels,
            "frame_times": self.frame_times.tolist(),
            "face_scores": self.face_scores.tolist(),
            "faces_found": self.faces_found,
            "duration": self.duration,
            "audio_stream": self.audio_stream,
            "transcript": self.transcript,
            "transcript_source": self.transcript_source,
            "asr_seconds": self.asr_seconds,
            "weights": self.weights,
            "untrained": self.untrained,
            "warnings": self.warnings,
        }


# ---------------------------------------------------------------------------- client

def read_media(media: Media) -> tuple:
    """(file bytes, a name for messages), checked before anything is sent."""
    if isinstance(media, (bytes, bytearray, memoryview)):
        data = bytes(media)
        name = f"<{len(data)} bytes>"
    else:
        path = Path(media)
        name = str(path)
        if not path.is_file():
            raise InvalidInput(f"{name}: no such file")
        size = path.stat().st_size
        if size > contract.MAX_MEDIA_BYTES:     # checked before reading: the file may be huge
            raise InvalidInput(f"{name}: {size} bytes is over the {contract.MAX_MEDIA_BYTES} byte limit")
        data = path.read_bytes()
    if not data:
        raise InvalidInput(f"{name}: empty file")
    if len(data) > contract.MAX_MEDIA_BYTES:
        raise InvalidInput(f"{name}: {len(data)} bytes is over the {contract.MAX_MEDIA_BYTES} byte limit")
    return data, name


def _tls_credentials(url, root_certificates, private_key, certificate_chain):
    """Read the PEM files here, so a missing one is a clear Fv2esError (None: gRPC's default)."""
    pems = []
    for path in (root_certificates, private_key, certificate_chain):
        try:
            pems.append(None if path is None else Path(path).read_bytes())
        except OSError as error:
            raise Fv2esError(f"cannot read TLS file for {url}: {error}") from error
    return grpc.ssl_channel_credentials(*pems)


class Fv2esClient:
    """Talks to the `fv2es` ensemble on a Triton server over gRPC.

    Requests that meet no server (UNAVAILABLE) are retried `retries` times, waiting
    `retry_backoff_s`, then twice that, and so on; rejected inputs are not retried.
    `timeout_s` bounds each request end to end (None: wait for ever).
    """

    def __init__(self, url: str = "localhost:8001", model: str = contract.ENSEMBLE,
                 timeout_s: Optional[float] = 300.0, ssl: bool = False,
                 root_certificates: Optional[str] = None, private_key: Optional[str] = None,
                 certificate_chain: Optional[str] = None, retries: int = 3, retry_backoff_s: float = 0.5):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        creds = _tls_credentials(url, root_certificates, private_key, certificate_chain) if ssl else None
        self._client = grpcclient.InferenceServerClient(url, creds=creds)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Fv2esClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def predict(self, media: Media, transcript: Optional[str] = None) -> Prediction:
        """One file (path or bytes) -> Prediction. Raises a Fv2esError subclass on failure."""
        result = self.predict_many([media], concurrency=1, transcripts=[transcript])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def predict_many(self, items: Sequence[Media], concurrency: int = 4,
                     transcripts: Optional[Sequence[Optional[str]]] = None,
                     progress: bool = False) -> list:
        """Predict every item with at most `concurrency` requests in flight. Returns, in the
        items' order, a Prediction or the Fv2esError that item met."""
        items = list(items)
        transcripts = [None] * len(items) if transcripts is None else list(transcripts)
        if len(transcripts) != len(items):
            raise ValueError(f"{len(transcripts)} transcripts for {len(items)} items")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")

        results = [None] * len(items)
        payloads = {}                      # index -> (bytes, name) until that item is finished
        ready = deque((i, 0) for i in range(len(items)))   # (index, attempt) to send now
        waiting = []                       # heap of (send at, index, attempt): retries after backoff
        done = queue.Queue()               # (index, attempt, result, error) from gRPC's threads
        in_flight = 0
        bar = tqdm(total=len(items), disable=not progress, unit="file", file=sys.stderr)

        def finish(i, value):
            results[i] = value
            payloads.pop(i, None)
            bar.update()

        with bar:
            while ready or waiting or in_flight:
                while waiting and waiting[0][0] <= time.monotonic():
                    _, i, attempt = heapq.heappop(waiting)
                    ready.append((i, attempt))
                while ready and in_flight < concurrency:
                    i, attempt = ready.popleft()
                    try:
                        if i not in payloads:
                            payloads[i] = read_media(items[i])
                        self._send(i, attempt, payloads[i][0], transcripts[i], done)
                        in_flight += 1
                    except Fv2esError as error:
                        finish(i, error)
                    except InferenceServerException as error:
                        finish(i, self._convert(error, payloads[i][1]))

                until_retry = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
                if not in_flight:
                    time.sleep(until_retry or 0.0)
                    continue
                try:
                    i, attempt, result, error = done.get(timeout=until_retry)
                except queue.Empty:
                    continue
                in_flight -= 1
                name = payloads[i][1]
                if error is None:
                    finish(i, self._parse(result, name))
                    continue
                problem = self._convert(error, name)
                if isinstance(problem, ServerUnreachable) and attempt < self.retries:
                    retry_at = time.monotonic() + self.retry_backoff_s * 2 ** attempt
                    heapq.heappush(waiting, (retry_at, i, attempt + 1))
                else:
                    finish(i, problem)
        return results

    def _send(self, index, attempt, media, transcript, done) -> None:
        # Newer tritonclient versions call back by keyword, older ones by position.
        def callback(result=None, error=None):
            done.put((index, attempt, result, error))

        self._client.async_infer(self.model, build_inputs(media, transcript), callback,
                                 outputs=build_outputs(), client_timeout=self.timeout_s)

    def _parse(self, result, name: str):
        outputs = {output: result.as_numpy(output) for output in contract.ENSEMBLE_OUTPUTS}
        try:
            return Prediction.from_outputs(outputs, source=name)
        except ValueError as error:
            return ServerError(f"{self.model} at {self.url} answered {name} outside the tensor contract: {error}")

    def _convert(self, error: InferenceServerException, what: str) -> Fv2esError:
        """Map a tritonclient error to this client's errors, naming the problem and the URL."""
        status = error.status() or ""
        message = error.message() or str(error)
        code = status.rsplit(".", 1)[-1]
        model_problem = code == "NOT_FOUND" or (code == "UNAVAILABLE" and any(
            phrase in message.lower() for phrase in _MODEL_PROBLEMS))
        if code == "DEADLINE_EXCEEDED":
            return Timeout(f"{what}: no answer from {self.url} within {self.timeout_s} s", status, message)
        if model_problem:
            return ModelNotReady(f"model '{self.model}' is not ready at {self.url} ({what}): {message}",
                                 status, message)
        if code == "UNAVAILABLE":
            return ServerUnreachable(f"server not reachable at {self.url} ({what}): {message}", status, message)
        if code == "INVALID_ARGUMENT":
            return InputRejected(f"{self.model} at {self.url} rejected {what}: {message}", status, message)
        return ServerError(f"{self.model} at {self.url} failed on {what}: [{code or 'error'}] {message}",
                           status, message)

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> None:
        """Return once the server is live and the model ready; after `timeout_s` raise
        ServerUnreachable or ModelNotReady. timeout_s=0 checks once."""
        deadline = time.monotonic() + timeout_s
        while True:
            probe_s = max(1.0, min(5.0, deadline - time.monotonic()))
            try:
                if not self._client.is_server_live(client_timeout=probe_s):
                    problem = ServerUnreachable(f"server at {self.url} is not live")
                elif not self._client.is_model_ready(self.model, client_timeout=probe_s):
                    problem = ModelNotReady(f"model '{self.model}' is not ready at {self.url}")
                else:
                    return
            except InferenceServerException as error:
                problem = self._convert(error, "readiness check")
                if isinstance(problem, Timeout):    # no answer to a ping: nobody is there
                    problem = ServerUnreachable(f"server not reachable at {self.url}: "
                                                f"no answer within {probe_s:.0f} s")
            if time.monotonic() >= deadline:
                raise problem
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def server_health(self) -> dict:
        """The server's and the model's state, and how the served model differs from the
        client's tensor contract (`contract_problems`, empty when they agree)."""
        probe_s = 10.0
        try:
            live = self._client.is_server_live(client_timeout=probe_s)
            ready = self._client.is_server_ready(client_timeout=probe_s)
            metadata = self._client.get_server_metadata(as_json=True, client_timeout=probe_s)
            model_ready = self._client.is_model_ready(self.model, client_timeout=probe_s)
            problems = self._contract_problems(probe_s) if model_ready else []
        except InferenceServerException as error:
            raise self._convert(error, "health check") from None
        return {"url": self.url, "server": metadata.get("name", ""), "version": metadata.get("version", ""),
                "live": live, "ready": ready, "model": self.model, "model_ready": model_ready,
                "contract_problems": problems}

    def _contract_problems(self, probe_s: float) -> list:
        metadata = self._client.get_model_metadata(self.model, as_json=True, client_timeout=probe_s)
        served = {t["name"]: t["datatype"] for t in metadata.get("inputs", []) + metadata.get("outputs", [])}
        problems = []
        for name in contract.ENSEMBLE_INPUTS + contract.ENSEMBLE_OUTPUTS:
            wanted = contract.WIRE_DTYPES[contract.TENSORS[name].dtype]
            if name not in served:
                problems.append(f"{name} is not served")
            elif served[name] != wanted:
                problems.append(f"{name} is served as {served[name]}, the contract says {wanted}")
        return problems
