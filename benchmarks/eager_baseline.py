"""The authors' inference path, as a user would run their code: the baseline we measure against.

PyTorch eager fp32, one clip at a time; multi-branch RepVGG blocks (not fused); MTCNN called
on one frame at a time (their loop over frames); the four networks as torch modules. It
shares the product's preprocessing functions (decoding, mel pieces, face crops, tokenising)
and its seeded weights (default_model()), so it gives the product's answer
(tests/test_benchmarks.py checks the probabilities to 1e-4) and only the execution differs.

    python -m benchmarks.eager_baseline CLIP [--transcript TEXT] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from fv2es_client.contract import LABEL_SETS

from fv2es import features, media
from fv2es.asr import resolve_transcript
from fv2es.checkpoint import default_model
from fv2es.model.text import encode, load_tokenizer
from fv2es.mtcnn import detect_faces_per_frame, load_mtcnn_nets, plain_torch_runner
from fv2es.steps import pad_stack


@dataclass
class EagerOutput:
    probabilities: np.ndarray                      # [C] sigmoid of the fused logits
    modality_logits: dict[str, np.ndarray]         # "text" | "visual" | "audio" -> [C]
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage


class EagerBaseline:
    """`EagerBaseline().predict(media, transcript)`; `model`: an unfused FV2ES (default: the
    seeded default_model()); `transcriber`: an fv2es.asr.Transcriber for empty transcripts."""

    def __init__(self, model=None, transcriber=None, device: str = "cpu"):
        self.model = (model or default_model()).eval().to(device)
        self.device = device
        self.run_mtcnn = plain_torch_runner({name: net.to(device) for name, net in load_mtcnn_nets().items()})
        self.tokenizer = load_tokenizer(self.model.config)
        self.transcriber = transcriber
        self.labels = LABEL_SETS[self.model.config.label_set]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _timed(self, timings: dict, stage: str, work):
        start = time.perf_counter()
        result = work()
        if self.device.startswith("cuda"):   # kernels run asynchronously: wait for them
            torch.cuda.synchronize()
        timings[stage] = time.perf_counter() - start
        return result

    def predict(self, media_bytes: bytes, transcript: str = "") -> EagerOutput:
        model, t = self.model, {}
        with torch.inference_mode():
            video = self._timed(t, "decode_video", lambda: media.decode_video(media_bytes))
            boxes, scores = self._timed(t, "detect_faces", lambda: detect_faces_per_frame(
                video.frames, self.run_mtcnn, device=self.device))
            faces = self._timed(t, "crop_faces", lambda: features.crop_faces(video.frames, boxes, scores))
            faces, frame_mask = pad_stack([faces])   # a clip without frames still runs (its CLS alone)
            visual = self._timed(t, "visual_encoder", lambda: model.visual_logits(
                self._tensor(faces), self._tensor(frame_mask)))

            audio = self._timed(t, "decode_audio", lambda: media.decode_audio(media_bytes))
            pieces = self._timed(t, "mel_pieces", lambda: features.mel_pieces(audio.samples))
            pieces, piece_mask = pad_stack([pieces])
            acoustic = self._timed(t, "audio_encoder", lambda: model.audio_logits(
                self._tensor(pieces), self._tensor(piece_mask)))

            text, _, _ = self._timed(t, "transcribe", lambda: resolve_transcript(
                transcript or "", audio.samples if audio.present else None, self.transcriber))
            ids, mask = self._timed(t, "tokenize", lambda: encode(self.tokenizer, text.strip()))
            words = self._timed(t, "text_encoder", lambda: model.text_logits(
                self._tensor(ids[None]), self._tensor(mask[None])))

            # Stacked in the authors' order (text, visual, audio); an absent modality adds nothing.
            present = [bool(text.strip()), video.present, audio.present]
            fused = self._timed(t, "fusion", lambda: model.fusion_logits(
                torch.stack([words, visual, acoustic], dim=-1),
                self._tensor(np.array([present], np.float32))))
        logits = {"text": words, "visual": visual, "audio": acoustic}
        probabilities = 1.0 / (1.0 + np.exp(-fused[0].double().cpu().numpy()))
        return EagerOutput(probabilities.astype(np.float32),
                           {m: v[0].float().cpu().numpy() for m, v in logits.items()}, t)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clip")
    parser.add_argument("--transcript", default="", help="empty: recognise the speech (Whisper tiny.en)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    transcriber = None
    if not args.transcript:
        from fv2es.asr import Transcriber

        transcriber = Transcriber()
    baseline = EagerBaseline(transcriber=transcriber, device=args.device)
    with open(args.clip, "rb") as f:
        output = baseline.predict(f.read(), args.transcript)
    print(json.dumps({"probabilities": dict(zip(baseline.labels, output.probabilities.tolist())),
                      "seconds": {k: round(v, 4) for k, v in output.timings.items()}}, indent=2))


if __name__ == "__main__":
    main()
