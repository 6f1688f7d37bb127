"""The gpu profile's own pieces of the served graph: video decoding on NVDEC (DALI), with
host decoding for a share of the clips, and how each step is built from its folder on a
device. Every other computation is the cpu profile's step code (fv2es.steps,
fv2es.features, fv2es.mtcnn), in torch, on the device it is handed.

Between decoding and the encoders every image, spectrogram and network tensor is a torch
tensor on the step's device; the python-backend adapter (fv2es.serving.python_model_gpu)
passes them from step to step by DLPack, so no pixels or features come back to the host.
What does cross, and why:
- detect_faces: the candidate counts of each MTCNN stage (torch.nonzero sizes the next
  batch) and one flag per NMS round, and its boxes and scores (5 floats a frame), which
  crop_faces reads on the host to plan each frame's crop.
- the per-modality logits, at fusion, which runs on the host: they are part of the
  response anyway, and a Linear(3 -> 1) is not worth a GPU.
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import torch
from fv2es_client.contract import MAX_MEDIA_BYTES

from fv2es import media as host_media
from fv2es import steps
from fv2es.gpu.dali_pipelines import (
    CPU_CODECS, FRAME_INDICES, MEDIA_U8, probe_video, require_dali,
)
from fv2es.media import sample_indices
from fv2es.preprocessing import Preprocessing

log = logging.getLogger(__name__)

# What the DALI "mixed" video decoder (NVDEC) takes, by FFmpeg codec name.
NVDEC_CODECS = frozenset({"h264", "hevc", "av1", "mpeg4", "vp8", "vp9", "mjpeg"})


# --- video decoding: NVDEC for most clips, host cores for a share ----------------------------

def display_turns(media: bytes) -> int:
    """Counter-clockwise quarter turns that make the first video stream upright, as fv2es.media
    applies them. PyAV exposes the display matrix only on decoded frames, so this decodes the
    first frame (milliseconds; NVDEC still decodes the sampled ones)."""
    with host_media.open_media(media) as container:
        streams = [s for s in container.streams.video
                   if not s.disposition & av.stream.Disposition.attached_pic]
        for frame in container.decode(streams[0]):
            return round(frame.rotation / 90) % 4
    return 0


class HostSlots:
    """At most COUNT host decodes at a time across every process of one server: one lock file
    a slot in DIRECTORY, held with flock (the kernel releases it if the process dies)."""

    def __init__(self, directory: str | Path, count: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = count

    @contextmanager
    def take(self):
        """Yields True while holding a free slot, False when every slot is taken."""
        for i in range(self.count):
            fd = os.open(self.directory / f"slot-{i}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield True
            finally:
                os.close(fd)    # closing the descriptor releases the lock
            return
        yield False


class DaliVideoDecoder:
    """decode_video_dali's pipeline run in this process, one clip a run: for servers without
    Triton's DALI backend (the one in the nvidia-pytriton wheel has only the python backend).
    device_id None runs a CPU pipeline (the tests: MJPEG, VP8, VP9 only)."""

    def __init__(self, pipeline_file: str | Path, device_id: int | None):
        dali = require_dali()
        self.pipe = dali.Pipeline.deserialize(filename=str(pipeline_file), device_id=device_id,
                                              prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        self.pipe.build()

    def __call__(self, media_u8: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        self.pipe.feed_input(MEDIA_U8, [media_u8])
        self.pipe.feed_input(FRAME_INDICES, [indices])
        (frames,) = self.pipe.run()
        return torch.from_dlpack(frames[0]).clone()     # DALI reuses its buffers next run


class DecodeVideo(steps.Step):
    """decode_video with DALI: `nvdec(media_u8, frame_indices) -> FRAMES` for the CODECS it
    takes, PyAV on the host (fv2es.steps.DecodeVideo) while one of HOST_SLOTS is free, and
    for files without video, in other codecs, or that cannot be probed (the host decoder
    then names the problem). Rotation metadata is applied to DALI's frames too."""
    name = "decode_video"

    def __init__(self, nvdec, host_slots: HostSlots, codecs=NVDEC_CODECS,
                 preprocessing: Preprocessing = Preprocessing()):
        self.nvdec = nvdec
        self.host_slots = host_slots
        self.codecs = codecs
        self.host = steps.DecodeVideo(preprocessing)

    def process(self, clip):
        media = steps.read_media(clip)
        probe = _probe(media)
        if probe is None or probe.codec not in self.codecs:
            return self.host.process(clip)
        with self.host_slots.take() as on_host:
            if on_host:
                return self.host.process(clip)
        try:
            return self._on_nvdec(media, probe)
        except (RuntimeError, av.error.FFmpegError) as error:   # the host decoder reports bad media
            log.warning("decode_video: NVDEC failed (%s); decoding on the host", error)
            return self.host.process(clip)

    def _on_nvdec(self, media: bytes, probe) -> dict:
        indices, instants = sample_indices(probe.times, probe.end, self.host.preprocessing.frame_sampling)
        frames = self.nvdec(np.frombuffer(media, np.uint8), indices)
        turns = display_turns(media)
        if turns:
            frames = torch.rot90(frames, turns, dims=(1, 2)).contiguous()
        return {"FRAMES": frames, "FRAME_TIMES": instants, "VIDEO_PRESENT": steps.flag(True),
                "DURATION": np.array([probe.duration], np.float32)}


def _probe(media: bytes):
    """probe_video, or None where the host decoder should handle (and explain) the file."""
    if not media or len(media) > MAX_MEDIA_BYTES:
        return None
    try:
        return probe_video(media)
    except (av.error.FFmpegError, ValueError):
        return None


# --- building a step from its model folder ---------------------------------------------------

VIDEO_PIPELINE_FILE = "decode_video_dali.dali"


def host_slots_for(version_dir: Path, count: int) -> HostSlots:
    """The slots every instance of one served model shares (keyed by its folder)."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(version_dir.resolve()).encode()).hexdigest()[:16]
    return HostSlots(Path(tempfile.gettempdir()) / f"fv2es-host-decodes-{key}", count)


def build_step(params: dict[str, str], version_dir: Path, device: str, nvdec=None, runner=None) -> steps.Step:
    """The gpu-profile step named by the config's parameters, with the files in its version folder:
    the cpu profile's step classes on DEVICE (fv2es.steps.load_step), but for decode_video,
    whose NVDEC back end is this profile's own.

    nvdec and runner come from the serving adapter where they are Triton calls (BLS to the
    DALI model, to TensorRT plans); otherwise they are made here.
    """
    if params["step"] != "decode_video":
        return steps.load_step(params, version_dir, device, runner=runner)
    # On a CPU instance DALI decodes on host cores, which take fewer codecs than NVDEC.
    on_gpu = torch.device(device).type == "cuda"
    if nvdec is None:
        device_id = (torch.device(device).index or 0) if on_gpu else None
        nvdec = DaliVideoDecoder(version_dir / VIDEO_PIPELINE_FILE, device_id)
    return DecodeVideo(nvdec, host_slots_for(version_dir, int(params["host_decodes"])),
                       NVDEC_CODECS if on_gpu else CPU_CODECS, Preprocessing.from_dict(params))
