"""The preprocessing choices a trained model depends on, recorded with its weights.

A checkpoint's config.json carries them ("preprocessing"), the builders write them into
the decode and crop steps' configs, and the predictor hands them to the same steps, so a
model is always fed the way it was trained. No torch here: the decode steps import it.

Two presets, and every field can be set on its own (`parse`):
- "ours" (the default, what our checkpoints record): frames by timestamp every 0.5 s (right
  for variable frame rate video), the true centre of the frame where no face is found, the
  channels' mean.
- "authors" (the authors' public code, which their checkpoint was trained with): every 15th
  decoded frame whatever the frame rate, their crop_img_center region where no face is
  found, the speaker's own channel (see AUDIO_CHANNELS).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

# Face crops: facenet-pytorch's MTCNN(image_size=48, margin=2, post_process=False) on float
# frames resizes each crop with OpenCV's INTER_AREA, in float (no rounding to integers).
FACE_RESIZES = ("opencv-area",)
# Where no face is found: "centre", the frame's central 48x48 square; "authors", their
# crop_img_center: rows off..off+48 and columns off-24..off+24 with off = (height - 48) // 2
# (on 360x640 frames columns 132:180, left of the centre), clamped into the frame.
NO_FACE_CROPS = ("centre", "authors")
# "every-0.5s": the frame on screen every 0.5 s by timestamp (fv2es.media); "every-15th-frame":
# decoded frames 0, 15, 30, ... (the authors' step int(0.5 * 29.97) + 1 = 15, for any rate).
FRAME_SAMPLINGS = ("every-0.5s", "every-15th-frame")
# "mean" of the channels; "left" / "right" (the first / second channel; mono files have one);
# "loudest", the channel with the most energy over the file: the authors take the speaker's
# own channel of IEMOCAP's two-microphone dialogs (known there from the utterance id), and a
# served file has no id, so the speaker's microphone is taken to be the louder one.
AUDIO_CHANNELS = ("mean", "left", "right", "loudest")

_CHOICES = {"face_resize": FACE_RESIZES, "no_face_crop": NO_FACE_CROPS,
            "frame_sampling": FRAME_SAMPLINGS, "audio_channel": AUDIO_CHANNELS}


@dataclass(frozen=True)
class Preprocessing:
    face_resize: str = "opencv-area"
    no_face_crop: str = "centre"
    frame_sampling: str = "every-0.5s"
    audio_channel: str = "mean"

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"preprocessing {name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        """From a checkpoint's config or a step's config parameters (other keys ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def describe(self) -> str:
        """The preset's name, or every field (what the served WEIGHTS identity shows)."""
        for name, preset in PRESETS.items():
            if self == preset:
                return name
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


PRESETS = {
    "ours": Preprocessing(),
    "authors": Preprocessing(no_face_crop="authors", frame_sampling="every-15th-frame", audio_channel="loudest"),
}


def parse(spec: str | None, base: Preprocessing) -> Preprocessing:
    """SPEC over BASE: a preset's name, or comma-separated field=value pairs
    ("frame_sampling=every-0.5s,audio_channel=left"); None or "" leaves BASE as it is."""
    if not spec:
        return base
    if spec in PRESETS:
        return PRESETS[spec]
    changes = {}
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in _CHOICES:
            raise ValueError(f"preprocessing {item.strip()!r}: expected a preset ({', '.join(PRESETS)}) or "
                             f"field=value with a field among {', '.join(_CHOICES)}")
        changes[name] = value
    return replace(base, **changes)
