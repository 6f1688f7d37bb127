"""The steps of the served graph, one class per model folder (contract.STEPS).

Each step maps the contract's per-clip input tensors (numpy, no batch axis) to its
output tensors. The Triton python models and the in-process predictor both call these
classes, in contract.STEPS order, so server and library cannot drift.

Per-clip steps implement `process(clip)`; batching steps implement `__call__(clips)`
and pad variable-length inputs into one network call (masks keep padding out).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fv2es_client.contract import (
    AUDIO_PIECES_PER_CALL, COMPUTE_STEPS, ENSEMBLE_OUTPUTS, ITEM_DIM, LABEL_SETS, MODALITIES, RESPOND_STEP, STEP_BY_NAME,
    STEPS, TENSORS,
)

from fv2es import features, media
from fv2es.media import MediaError
from fv2es.preprocessing import Preprocessing
from fv2es.runners import Runner


def text_tensor(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=object)


def read_text(tensor: np.ndarray | None) -> str:
    """A BYTES tensor's first string; an absent optional input reads as ""."""
    value = tensor.reshape(-1)[0] if tensor is not None and tensor.size else b""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def read_bytes(tensor: np.ndarray) -> bytes:
    value = tensor.reshape(-1)[0]
    return value if isinstance(value, bytes) else bytes(value)


def flag(value: bool) -> np.ndarray:
    return np.array([bool(value)])


def pad_stack(arrays: list) -> tuple:
    """Stack [n_i, ...] arrays or tensors into a tensor [B, max n, ...] zero-padded, with a
    [B, max n] mask of real rows, on the first one's device.

    At least one position per clip, so a clip with no rows still runs (its CLS alone).
    """
    import torch

    tensors = [torch.as_tensor(a) for a in arrays]
    longest = max(1, max(len(t) for t in tensors))
    stacked = tensors[0].new_zeros((len(tensors), longest) + tuple(tensors[0].shape[1:]))
    mask = torch.zeros((len(tensors), longest), dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        stacked[i, :len(t)] = t.to(stacked.device)
        mask[i, :len(t)] = True
    return stacked, mask


def placeholder(name: str) -> np.ndarray:
    """A tensor of the contract's dtype and shape with no data along its named axes (zeros,
    or empty strings): what a failed step answers, so its consumers still run."""
    tensor = TENSORS[name]
    shape = tuple(d if isinstance(d, int) else 0 for d in tensor.shape)
    if tensor.dtype == "bytes":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=tensor.dtype)


def error_text(step_name: str, exc: Exception) -> str:
    """A step's failure as its ERROR tensor carries it: the kind, then the one-line message."""
    kind = "invalid" if isinstance(exc, MediaError) else "internal"
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{kind}:{step_name}: {message}"


class StepFailed(RuntimeError):
    """A step of the graph failed for a reason of ours (an INTERNAL error)."""


def guarded(step: "Step", clips: list[dict]) -> list[dict]:
    """Run STEP on CLIPS; a failure becomes data: placeholder outputs and the ERROR tensor
    (contract.RESPOND says why), for every clip of the call. RESPOND itself raises."""
    if not step.passes_errors_on:
        return step(clips)
    try:
        results = step(clips)
        error = ""
    except Exception as exc:  # noqa: BLE001 - passed on to RESPOND, which reports it
        results = [{name: placeholder(name) for name in step.spec.outputs} for _ in clips]
        error = error_text(step.name, exc)
    for result in results:
        result[step.spec.error] = text_tensor(error)
    return results


@dataclass
class Resources:
    """What steps are made from, besides their tensors: in-process (the predictor) or read
    from a step's model folder (load_step). Each step class names the kinds it needs."""
    device: str = "cpu"
    mtcnn_run: object = None        # "mtcnn": fv2es.mtcnn RunNet
    runner: Runner | None = None    # "networks": runs the step's STEP_NETWORKS
    tokenizer: object = None        # "tokenizer"
    transcriber: object = None      # "transcriber": fv2es.asr.Transcriber, or None
    weights_id: str = ""            # "labels": what the response says about the weights
    label_set: str = ""
    preprocessing: Preprocessing = Preprocessing()   # "preprocessing": the model's own (fv2es.preprocessing)


class Step:
    name: str = ""
    batching = False
    passes_errors_on = True     # a failure goes on as data (guarded); False: RESPOND raises it
    needs: tuple[str, ...] = ()     # kinds of Resources the step is made from (LOADERS, the builders)
    made_from: tuple[str, ...] = ()     # the Resources fields its constructor takes, in order

    @classmethod
    def create(cls, resources: Resources) -> "Step":
        return cls(*(getattr(resources, name) for name in cls.made_from))

    @property
    def spec(self):
        return STEP_BY_NAME[self.name]

    def process(self, clip: dict) -> dict:
        raise NotImplementedError

    def __call__(self, clips: list[dict]) -> list[dict]:
        return [self.process(clip) for clip in clips]


def read_media(clip: dict) -> bytes:
    if clip.get("MEDIA") is None:
        raise MediaError("MEDIA is required")
    return read_bytes(clip["MEDIA"])


class Preprocessor(Step):
    """A step whose work follows the model's preprocessing choices."""
    needs, made_from = ("preprocessing",), ("preprocessing",)

    def __init__(self, preprocessing: Preprocessing = Preprocessing()):
        self.preprocessing = preprocessing


class DecodeVideo(Preprocessor):
    name = "decode_video"

    def process(self, clip):
        video = media.decode_video(read_media(clip), self.preprocessing.frame_sampling)
        return {"FRAMES": video.frames, "FRAME_TIMES": video.times.astype(np.float32),
                "VIDEO_PRESENT": flag(video.present), "DURATION": np.array([video.duration], np.float32)}


class DecodeAudio(Preprocessor):
    name = "decode_audio"

    def process(self, clip):
        audio = media.decode_audio(read_media(clip), self.preprocessing.audio_channel)
        return {"AUDIO": audio.samples.astype(np.float32), "AUDIO_PRESENT": flag(audio.present),
                "AUDIO_STREAM": np.array([audio.stream], np.int32)}


class DetectFaces(Step):
    """MTCNN (fv2es.mtcnn) on the sampled frames, a few frames per network call, on DEVICE.

    run_net runs the three nets (mtcnn.torch_runner).
    Frames are independent, so chunking changes no result; it bounds memory (a 256-frame
    clip at once needs gigabytes for P-Net's first scale) and keeps activations in the
    CPU cache (measured on 2 cores: 4 frames per call beat 20 at once by ~25%).
    """
    name = "detect_faces"
    needs, made_from = ("mtcnn",), ("mtcnn_run", "device")

    def __init__(self, run_net, device: str = "cpu", frames_per_call: int = 4):
        import torch

        from fv2es.mtcnn import detect_faces

        self._torch, self._detect = torch, detect_faces
        self.run_net = run_net
        self.device = device
        self.frames_per_call = frames_per_call

    def process(self, clip):
        torch = self._torch
        frames = torch.as_tensor(clip["FRAMES"]).to(self.device)
        # No frames: one call on the empty batch gives the empty (float32) results.
        found = [self._detect(frames[start:start + self.frames_per_call], self.run_net)
                 for start in range(0, max(len(frames), 1), self.frames_per_call)]
        # 5 floats a frame: they go to the host, where crop_faces plans its crops.
        return {"FACE_BOXES": torch.cat([b for b, _ in found]).cpu().numpy(),
                "FACE_SCORES": torch.cat([s for _, s in found]).cpu().numpy()}


class CropFaces(Preprocessor):
    name = "crop_faces"

    def process(self, clip):
        return {"FACES": features.crop_faces(clip["FRAMES"], clip["FACE_BOXES"], clip["FACE_SCORES"],
                                             self.preprocessing.no_face_crop)}


class MelPieces(Step):
    name = "mel_pieces"

    def process(self, clip):
        return {"MEL_PIECES": features.mel_pieces(clip["AUDIO"])}


class Encoder(Step):
    """A batching step: pad every clip's sequence, one network call, split the logits."""
    batching = True
    network = ""
    output = ""
    needs, made_from = ("networks",), ("runner",)

    def __init__(self, runner: Runner):
        self.runner = runner

    def network_inputs(self, clips):
        raise NotImplementedError

    def __call__(self, clips):
        logits = self.runner(self.network, self.network_inputs(clips))["logits"]
        return [{self.output: row} for row in logits]


class VisualEncoder(Encoder):
    name, network, output = "visual_encoder", "visual", "VISUAL_LOGITS"

    def network_inputs(self, clips):
        faces, mask = pad_stack([c["FACES"] for c in clips])
        return {"faces": faces, "frame_mask": mask}


class AudioEncoder(Encoder):
    """The NesT on at most AUDIO_PIECES_PER_CALL pieces at a time (of all the batch's clips
    together), then the transformer over each clip's items: memory is bounded by the chunk,
    not by the clips' lengths, and the result is the whole network's (pieces are embedded
    independently; padding pieces are never embedded)."""
    name, network, output = "audio_encoder", "audio_clip", "AUDIO_LOGITS"

    def network_inputs(self, clips):
        import torch

        pieces = [torch.as_tensor(c["MEL_PIECES"]) for c in clips]
        every = torch.cat(pieces)
        chunks = [self.runner("audio_pieces", {"pieces": every[start:start + AUDIO_PIECES_PER_CALL]})["items"]
                  for start in range(0, len(every), AUDIO_PIECES_PER_CALL)]
        items = torch.cat([torch.as_tensor(c).to(every.device) for c in chunks]) if chunks \
            else every.reshape(0, ITEM_DIM)
        bounds = np.cumsum([0] + [len(p) for p in pieces])
        items, mask = pad_stack([items[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        return {"items": items, "piece_mask": mask}


class TextEncoder(Encoder):
    name, network, output = "text_encoder", "text", "TEXT_LOGITS"

    def network_inputs(self, clips):
        ids, _ = pad_stack([c["INPUT_IDS"] for c in clips])
        mask, _ = pad_stack([c["ATTENTION_MASK"] for c in clips])
        return {"input_ids": ids.long(), "attention_mask": mask.long()}


class Transcribe(Step):
    """Passes the request's transcript through, or recognises speech when it is empty."""
    name = "transcribe"
    needs, made_from = ("transcriber",), ("transcriber",)

    def __init__(self, transcriber=None):
        self.transcriber = transcriber

    def process(self, clip):
        from fv2es.asr import resolve_transcript

        audio = clip["AUDIO"] if clip["AUDIO_PRESENT"].reshape(-1)[0] else None
        text, source, seconds = resolve_transcript(read_text(clip["TRANSCRIPT"]), audio, self.transcriber)
        return {"TRANSCRIPT_USED": text_tensor(text), "TRANSCRIPT_SOURCE": text_tensor(source),
                "ASR_SECONDS": np.array([seconds], np.float32)}


class Tokenize(Step):
    name = "tokenize"
    needs, made_from = ("tokenizer",), ("tokenizer",)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def process(self, clip):
        from fv2es.model.text import encode

        text = read_text(clip["TRANSCRIPT_USED"]).strip()
        ids, mask = encode(self.tokenizer, text)
        return {"INPUT_IDS": ids.astype(np.int64), "ATTENTION_MASK": mask.astype(np.int64),
                "TEXT_PRESENT": flag(bool(text))}


class Fusion(Step):
    """Weighted late fusion; an absent modality (no video/audio/words) is left out."""
    name = "fusion"
    batching = True

    needs, made_from = ("networks", "labels"), ("runner", "weights_id", "label_set")

    def __init__(self, runner: Runner, weights_id: str, label_set: str):
        self.runner = runner
        self.weights = text_tensor(weights_id)
        self.labels = np.array([label.encode() for label in LABEL_SETS[label_set]], dtype=object)

    def __call__(self, clips):
        logits = {"text": "TEXT_LOGITS", "visual": "VISUAL_LOGITS", "audio": "AUDIO_LOGITS"}
        present = {"text": "TEXT_PRESENT", "visual": "VIDEO_PRESENT", "audio": "AUDIO_PRESENT"}
        stacked = np.stack([np.stack([c[logits[m]] for m in MODALITIES], axis=-1) for c in clips])
        mask = np.array([[float(c[present[m]].reshape(-1)[0]) for m in MODALITIES] for c in clips], np.float32)
        fused = self.runner("fusion", {"modality_logits": stacked.astype(np.float32), "present": mask})["logits"]
        probabilities = 1.0 / (1.0 + np.exp(-fused.astype(np.float64)))  # multi-label (BCE-trained)
        return [{"FUSED_LOGITS": f.astype(np.float32), "PROBABILITIES": p.astype(np.float32),
                 "WEIGHTS": self.weights, "LABELS": self.labels}
                for f, p in zip(fused, probabilities)]


class Respond(Step):
    """The ensemble's outputs; the first failure in graph order, if any step failed, as the
    request's error (MediaError: the client's problem; StepFailed: ours)."""
    name = RESPOND_STEP
    passes_errors_on = False

    def process(self, clip):
        for step in COMPUTE_STEPS:
            kind, _, message = read_text(clip[step.error]).partition(":")
            if message:
                raise (MediaError if kind == "invalid" else StepFailed)(message)
        return {name: clip[name] for name in ENSEMBLE_OUTPUTS}


STEP_CLASSES = {cls.name: cls for cls in (
    DecodeVideo, DecodeAudio, DetectFaces, CropFaces, VisualEncoder, MelPieces, AudioEncoder,
    Transcribe, Tokenize, TextEncoder, Fusion, Respond)}

# The steps that run networks on batches of clips (the gpu profile puts them on the GPU).
ENCODER_STEPS = tuple(name for name, cls in STEP_CLASSES.items() if issubclass(cls, Encoder))

# The networks each step runs through a runner: the builders put these ONNX files in the
# step's folder. (detect_faces runs its three small nets as torch modules: fv2es.mtcnn.)
STEP_NETWORKS = {
    "visual_encoder": ("visual",),
    "audio_encoder": ("audio_pieces", "audio_clip"),
    "text_encoder": ("text",),
    "fusion": ("fusion",),
}


def make_step(name: str, **resources) -> Step:
    """The step NAME made from RESOURCES (fields of Resources; those it does not need are ignored)."""
    return STEP_CLASSES[name].create(Resources(**resources))


def load_step(params: dict[str, str], version_dir: Path, device: str = "cpu", runner: Runner | None = None) -> Step:
    """The step a model folder's config names, made from the files beside it (the python
    models of both profiles). RUNNER: the caller's own (the gpu profile's TensorRT plans by BLS)."""
    cls = STEP_CLASSES[params["step"]]
    resources = Resources(device=device, runner=runner)
    for kind in cls.needs:
        LOADERS[kind](resources, params, Path(version_dir), cls)
    return cls.create(resources)


def _load_mtcnn(resources, params, folder, cls):
    from fv2es.mtcnn import load_saved_nets, torch_runner

    resources.mtcnn_run = torch_runner(load_saved_nets(folder, resources.device))


CHECKPOINT_DIR = "checkpoint"       # the gpu profile's torch encoders: our checkpoint, in the folder


def _load_networks(resources, params, folder, cls):
    if resources.runner is not None:
        return
    networks = STEP_NETWORKS[cls.name]
    if all((folder / f"{net}.onnx").exists() for net in networks):
        from fv2es.runners import OnnxRunner

        resources.runner = OnnxRunner({net: folder / f"{net}.onnx" for net in networks},
                                      threads=int(params.get("onnx_threads", "0")))
        return
    from fv2es.checkpoint import load_checkpoint
    from fv2es.gpu.torch_cuda import CudaRunner

    modules = load_checkpoint(folder / CHECKPOINT_DIR).networks()
    resources.runner = CudaRunner({net: modules[net] for net in networks}, resources.device,
                                  precision=params["precision"], graphs=params["cuda_graphs"] == "yes")


def _load_tokenizer(resources, params, folder, cls):
    from fv2es.model.text import load_tokenizer_file

    resources.tokenizer = load_tokenizer_file(folder / "tokenizer.json")


def _load_transcriber(resources, params, folder, cls):
    if params.get("asr_model", "none") != "none":
        from fv2es.asr import Transcriber

        resources.transcriber = Transcriber(params["asr_model"], device=params.get("asr_device", "cpu"),
                                            compute_type=params.get("asr_compute_type") or None)


def _load_labels(resources, params, folder, cls):
    resources.weights_id, resources.label_set = params.get("weights_id", ""), params.get("label_set", "")


def _load_preprocessing(resources, params, folder, cls):
    resources.preprocessing = Preprocessing.from_dict(params)


# How each kind of resource is read back from a step's folder (the builders write them).
LOADERS = {"mtcnn": _load_mtcnn, "networks": _load_networks, "tokenizer": _load_tokenizer,
           "transcriber": _load_transcriber, "labels": _load_labels, "preprocessing": _load_preprocessing}


def check_table(graph=STEPS) -> None:
    """Every step of the contract's graph has its class here, and nothing else does; every
    kind of resource a class needs has its loader."""
    missing = [s.name for s in graph if s.name not in STEP_CLASSES]
    extra = sorted(set(STEP_CLASSES) - {s.name for s in graph})
    if missing or extra:
        raise LookupError(f"fv2es.steps and the contract's STEPS disagree: no class for {missing}, "
                          f"no contract step for {extra}")
    unknown = {cls.name: kind for cls in STEP_CLASSES.values() for kind in cls.needs if kind not in LOADERS}
    if unknown:
        raise LookupError(f"no loader for the resources {unknown}")


check_table()
