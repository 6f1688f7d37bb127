"""The tensor contract: the single source of truth for every tensor's name, dtype and shape.

Read by the builders (ONNX export, TensorRT profiles), the generated Triton configs, the
in-process predictor, the client and the tests. Deliberately free of heavy imports: the
client installs without torch.

Shapes are per clip, without the batch axis that Triton adds (every served model has
max_batch_size > 0). A string in a shape is a named dynamic axis; an int is fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

# Named dynamic axes, with the range we accept (min, opt, max): TensorRT profiles and
# input validation read these.
AXES = {
    "frames": (1, 20, 256),        # sampled frames, one per 500 ms (256 = 128 s of video)
    "pieces": (1, 25, 256),        # 32-frame mel pieces, ~0.4 s each
    "tokens": (2, 100, 100),       # text tokens, CLS and SEP included
    "samples": (1, 160_000, 16_000 * 600),  # 16 kHz mono audio (10 min max)
    "height": (1, 360, 1280),
    "width": (1, 640, 1280),
    "classes": (6, 6, 6),
}

FRAME_INTERVAL_S = 0.5
FACE_SIZE = 48
FACE_MEAN = (159.0, 111.0, 102.0)   # 0-255 scale, RGB
FACE_STD = (37.0, 33.0, 32.0)
SAMPLE_RATE = 16_000
N_MELS = 128
PIECE_FRAMES = 32
MAX_TOKENS = 100
ITEM_DIM = 64                       # the clip transformers' d_model: one item per frame or piece
AUDIO_PIECES_PER_CALL = 32          # the audio encoder embeds at most this many pieces at once
MAX_FRAME_SIDE = 1280               # decoded frames are scaled down to this longer side
MAX_MEDIA_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str              # numpy dtype name, or "bytes" for Triton's TYPE_STRING
    shape: tuple            # per clip, no batch axis

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]

    def dims(self) -> list[int]:
        """Triton config dims: -1 for named dynamic axes, the value for axes fixed in AXES."""
        def dim(d):
            if isinstance(d, int):
                return d
            low, _, high = AXES[d]
            return low if low == high else -1
        return [dim(d) for d in self.shape]


TRITON_DTYPES = {
    "bytes": "TYPE_STRING", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
# Wire dtype names used by tritonclient's InferInput.
WIRE_DTYPES = {
    "bytes": "BYTES", "float32": "FP32", "float16": "FP16", "int64": "INT64",
    "int32": "INT32", "uint8": "UINT8", "bool": "BOOL",
}


def _t(name, dtype, *shape):
    return Tensor(name, dtype, tuple(shape))


# Every tensor that flows through the served graph, by name.
TENSORS = {t.name: t for t in [
    # request
    _t("MEDIA", "bytes", 1),                     # the video/audio file as sent
    _t("TRANSCRIPT", "bytes", 1),                # may be empty: recognition fills it
    # decode_video
    _t("FRAMES", "uint8", "frames", "height", "width", 3),   # RGB, sampled every 500 ms
    _t("FRAME_TIMES", "float32", "frames"),      # seconds
    _t("VIDEO_PRESENT", "bool", 1),
    _t("DURATION", "float32", 1),                # seconds, longest stream
    # detect_faces
    _t("FACE_BOXES", "float32", "frames", 4),    # x1, y1, x2, y2 in frame pixels
    _t("FACE_SCORES", "float32", "frames"),      # 0 where no face was found
    # crop_faces
    _t("FACES", "float32", "frames", 3, FACE_SIZE, FACE_SIZE),
    # decode_audio
    _t("AUDIO", "float32", "samples"),           # 16 kHz mono
    _t("AUDIO_PRESENT", "bool", 1),
    _t("AUDIO_STREAM", "int32", 1),             # the file's index of the audio stream used, -1: none
    # mel_pieces
    _t("MEL_PIECES", "float32", "pieces", 4, 32, 32),
    # transcribe
    _t("TRANSCRIPT_USED", "bytes", 1),
    _t("TRANSCRIPT_SOURCE", "bytes", 1),         # request | recognition | none
    _t("ASR_SECONDS", "float32", 1),
    # tokenize
    _t("INPUT_IDS", "int64", "tokens"),
    _t("ATTENTION_MASK", "int64", "tokens"),
    _t("TEXT_PRESENT", "bool", 1),
    # encoders
    _t("VISUAL_LOGITS", "float32", "classes"),
    _t("AUDIO_LOGITS", "float32", "classes"),
    _t("TEXT_LOGITS", "float32", "classes"),
    # fusion
    _t("FUSED_LOGITS", "float32", "classes"),
    _t("PROBABILITIES", "float32", "classes"),   # sigmoid: labels are multi-label (BCE)
    _t("WEIGHTS", "bytes", 1),                   # "untrained ..." or the checkpoint's identity
    _t("LABELS", "bytes", "classes"),            # label names, in PROBABILITIES' order
]}


@dataclass(frozen=True)
class Step:
    """One model folder of the served graph; the in-process predictor runs the same steps."""
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    batching: bool = False      # dynamic batching across requests (ragged inputs)

    @property
    def error(self) -> str:
        """The tensor that carries this step's failure on to RESPOND ("" when it worked)."""
        return f"{self.name.upper()}_ERROR"

    @property
    def served_outputs(self) -> tuple[str, ...]:
        """What its model answers: its outputs and, but for RESPOND, its error."""
        return self.outputs if self.name == RESPOND_STEP else self.outputs + (self.error,)


RESPOND_STEP = "respond"


# The graph, in an order where every input is produced before it is read.
COMPUTE_STEPS = (
    Step("decode_video", ("MEDIA",), ("FRAMES", "FRAME_TIMES", "VIDEO_PRESENT", "DURATION")),
    Step("decode_audio", ("MEDIA",), ("AUDIO", "AUDIO_PRESENT", "AUDIO_STREAM")),
    Step("detect_faces", ("FRAMES",), ("FACE_BOXES", "FACE_SCORES")),
    Step("crop_faces", ("FRAMES", "FACE_BOXES", "FACE_SCORES"), ("FACES",)),
    Step("visual_encoder", ("FACES",), ("VISUAL_LOGITS",), batching=True),
    Step("mel_pieces", ("AUDIO",), ("MEL_PIECES",)),
    Step("audio_encoder", ("MEL_PIECES",), ("AUDIO_LOGITS",), batching=True),
    Step("transcribe", ("AUDIO", "AUDIO_PRESENT", "TRANSCRIPT"), ("TRANSCRIPT_USED", "TRANSCRIPT_SOURCE", "ASR_SECONDS")),
    Step("tokenize", ("TRANSCRIPT_USED",), ("INPUT_IDS", "ATTENTION_MASK", "TEXT_PRESENT")),
    Step("text_encoder", ("INPUT_IDS", "ATTENTION_MASK"), ("TEXT_LOGITS",), batching=True),
    Step("fusion",
         ("VISUAL_LOGITS", "AUDIO_LOGITS", "TEXT_LOGITS", "VIDEO_PRESENT", "AUDIO_PRESENT", "TEXT_PRESENT"),
         ("FUSED_LOGITS", "PROBABILITIES", "WEIGHTS", "LABELS"), batching=True),
)

ENSEMBLE = "fv2es"
ENSEMBLE_INPUTS = ("MEDIA", "TRANSCRIPT")
ENSEMBLE_OUTPUTS = (
    "PROBABILITIES", "FUSED_LOGITS", "VISUAL_LOGITS", "AUDIO_LOGITS", "TEXT_LOGITS",
    "FACE_SCORES", "FRAME_TIMES", "DURATION", "VIDEO_PRESENT", "AUDIO_PRESENT", "AUDIO_STREAM", "TEXT_PRESENT",
    "TRANSCRIPT_USED", "TRANSCRIPT_SOURCE", "ASR_SECONDS", "WEIGHTS", "LABELS",
)
# A client may leave TRANSCRIPT out; MEDIA is required, and the ensemble says so: Triton
# refuses a request without it ("missing required input(s) ['MEDIA']"), or, when the
# request carries TRANSCRIPT alone, answers INVALID_ARGUMENT "unexpected deadlock ... no more
# ensemble steps can be made". An optional MEDIA would let a request with no input at all
# into Triton 2.51's ensemble, which then deadlocks the gRPC server (seen here in gdb).
# The steps take MEDIA as optional: decoding names its absence in its ERROR tensor.
OPTIONAL_INPUTS = ("TRANSCRIPT",)
STEP_OPTIONAL_INPUTS = ("MEDIA", "TRANSCRIPT")

# The last step: the only producer of the ensemble's outputs, and the only step that
# answers with an error. A failing step passes its error on as data (its ERROR tensor, empty
# outputs), because in Triton 2.51 a step's error response can deadlock a gRPC call that is
# still scheduling the ensemble's first steps; RESPOND runs after every other step, so its
# error cannot. And since no step reads an ensemble output, Triton's pruning for a request
# that asks for a subset of the outputs keeps every step that subset needs.
RESPOND = Step(RESPOND_STEP, ENSEMBLE_OUTPUTS + tuple(s.error for s in COMPUTE_STEPS), ENSEMBLE_OUTPUTS)
STEPS = COMPUTE_STEPS + (RESPOND,)
STEP_BY_NAME = {s.name: s for s in STEPS}
TENSORS.update({s.error: _t(s.error, "bytes", 1) for s in COMPUTE_STEPS})

# Network-level I/O (ONNX / TensorRT), batch-first with named axes. Masks are True where
# the position holds real data.
NETWORKS = {
    "visual": {"inputs": {"faces": ("float32", ("batch", "frames", 3, FACE_SIZE, FACE_SIZE)),
                          "frame_mask": ("bool", ("batch", "frames"))},
               "outputs": {"logits": ("float32", ("batch", "classes"))}},
    # The audio encoder in two: the NesT embeds each piece on its own, so the encoder step
    # runs it on a bounded number of pieces at a time, whatever the clips' lengths; the
    # transformer then reads each clip's items at once.
    "audio_pieces": {"inputs": {"pieces": ("float32", ("batch", 4, 32, 32))},
                     "outputs": {"items": ("float32", ("batch", ITEM_DIM))}},
    "audio_clip": {"inputs": {"items": ("float32", ("batch", "pieces", ITEM_DIM)),
                              "piece_mask": ("bool", ("batch", "pieces"))},
                   "outputs": {"logits": ("float32", ("batch", "classes"))}},
    "text": {"inputs": {"input_ids": ("int64", ("batch", "tokens")),
                        "attention_mask": ("int64", ("batch", "tokens"))},
             "outputs": {"logits": ("float32", ("batch", "classes"))}},
    "fusion": {"inputs": {"modality_logits": ("float32", ("batch", "classes", 3)),
                          "present": ("float32", ("batch", 3))},
               "outputs": {"logits": ("float32", ("batch", "classes"))}},
    "pnet": {"inputs": {"image": ("float32", ("batch", 3, "height", "width"))},
             "outputs": {"boxes": ("float32", ("batch", 4, "out_h", "out_w")),
                         "probs": ("float32", ("batch", 2, "out_h", "out_w"))}},
    "rnet": {"inputs": {"image": ("float32", ("batch", 3, 24, 24))},
             "outputs": {"boxes": ("float32", ("batch", 4)), "probs": ("float32", ("batch", 2))}},
    "onet": {"inputs": {"image": ("float32", ("batch", 3, 48, 48))},
             "outputs": {"boxes": ("float32", ("batch", 4)), "landmarks": ("float32", ("batch", 10)),
                         "probs": ("float32", ("batch", 2))}},
}
# Modality order in the fusion's stacked logits, as the authors stack them
# (torch.stack([text, visual, audio], dim=-1) before weighted_fusion).
MODALITIES = ("text", "visual", "audio")

LABEL_SETS = {
    "iemocap6": ("ang", "exc", "fru", "hap", "neu", "sad"),
    "mosei6": ("anger", "disgust", "fear", "happy", "sad", "surprise"),
}
DEFAULT_LABEL_SET = "iemocap6"
