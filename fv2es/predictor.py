"""The in-process predictor: the served graph's steps, in the same order, in one process."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fv2es_client.contract import ENSEMBLE_OUTPUTS, STEPS

from fv2es.steps import guarded, make_step, text_tensor


@dataclass
class PredictorOutput:
    tensors: dict[str, np.ndarray]              # the ensemble's outputs, per clip (no batch axis)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per step


class Predictor:
    """Runs FV2ES on one video at a time with PyTorch on the CPU (or a given device).

    `checkpoint`: our safetensors checkpoint or the authors' state dict; None gives the
    untrained seeded model (every output says so). `transcriber`: an fv2es.asr.Transcriber,
    or None to use the request's transcript only.
    """

    def __init__(self, checkpoint: str | Path | None = None, model=None, transcriber=None,
                 device: str = "cpu", fuse: bool = True):
        from fv2es.checkpoint import default_model, load_checkpoint, served_identity
        from fv2es.model.text import load_tokenizer
        from fv2es.mtcnn import load_mtcnn_nets, torch_runner
        from fv2es.runners import TorchRunner

        if model is None:
            model = load_checkpoint(checkpoint) if checkpoint else default_model()
        model.eval()
        if fuse:
            model.fuse_repvgg()
        self.model = model
        runner = TorchRunner(model.networks(), device=device)
        mtcnn_run = torch_runner({name: net.to(device) for name, net in load_mtcnn_nets().items()})
        tokenizer = load_tokenizer(model.config)
        self.steps = [make_step(s.name, runner=runner, tokenizer=tokenizer, transcriber=transcriber,
                                weights_id=served_identity(model), label_set=model.config.label_set,
                                preprocessing=model.preprocessing, mtcnn_run=mtcnn_run, device=device)
                      for s in STEPS]

    def predict(self, media: bytes | str | Path, transcript: str = "", progress=None) -> PredictorOutput:
        """Run every step on one clip; `progress` (optional) is called with each step's name."""
        if not isinstance(media, bytes):
            media = Path(media).read_bytes()
        tensors = {"MEDIA": np.array([media], dtype=object), "TRANSCRIPT": text_tensor(transcript or "")}
        timings = {}
        for step in self.steps:
            if progress:
                progress(step.name)
            start = time.perf_counter()
            clip = {name: tensors[name] for name in step.spec.inputs}
            tensors.update(guarded(step, [clip])[0])    # the last step raises any step's failure
            timings[step.name] = time.perf_counter() - start
        return PredictorOutput({name: tensors[name] for name in ENSEMBLE_OUTPUTS}, timings)
