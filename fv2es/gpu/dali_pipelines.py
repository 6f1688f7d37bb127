"""The DALI pipeline of the gpu profile, served by Triton's DALI backend as a `model.dali` file
(builders.gpu_profile writes the model folder).

decode_video_dali: MEDIA_U8 (uint8 [bytes]) + FRAME_INDICES (int32 [frames]) -> FRAMES
    (uint8 [frames, H, W, 3] RGB, longer side at most MAX_FRAME_SIDE, never enlarged).
    Device "mixed" decodes on NVDEC (H.264, HEVC, AV1, MPEG-4, VP8, VP9, MJPEG); device
    "cpu" decodes on host cores, which DALI 2.4 can do only for MJPEG, VP8 and VP9.

The mel pieces are not a DALI model: the gpu profile runs the one torch implementation
(fv2es.gpu.steps.mel_pieces) on the GPU, which DALI would only copy.

How the request's bytes reach DALI. MEDIA is a BYTES (TYPE_STRING) tensor, which the DALI
backend does not take (numeric tensors only), and DALI's video decoder picks frames by
index, not by time. So the gpu profile's decode_video is a python step in front of the
DALI model: it views MEDIA's bytes as a uint8 array (np.frombuffer, no copy), demuxes the
container without decoding (`probe_video`, milliseconds) for the frame timestamps, picks
the frames with the cpu profile's sampling rule (`fv2es.media.sample_indices`), and calls
decode_video_dali with MEDIA_U8 and FRAME_INDICES (a BLS call, so a file without a video
stream skips DALI). It answers FRAME_TIMES, VIDEO_PRESENT and DURATION itself.

nvidia.dali is imported only when a pipeline is made.
"""
from __future__ import annotations

from typing import NamedTuple

import av
import numpy as np
from fv2es_client.contract import MAX_FRAME_SIDE, TENSORS

from fv2es import media as host_media

MEDIA_U8 = "MEDIA_U8"
FRAME_INDICES = "FRAME_INDICES"
# What DALI 2.4 decodes on host cores (FFmpeg codec names); anything else fails there with
# "Failed to create video decoder" and leaves the pipeline unusable, so route it to PyAV.
CPU_CODECS = frozenset({"mjpeg", "vp8", "vp9"})

# Each DALI model's I/O as (numpy dtype, Triton dims without the batch axis); outputs in the
# pipeline's output order, which is how the DALI backend matches them to the config.
DALI_MODELS = {
    "decode_video_dali": {
        "inputs": {MEDIA_U8: ("uint8", [-1]), FRAME_INDICES: ("int32", [-1])},
        "outputs": {"FRAMES": ("uint8", TENSORS["FRAMES"].dims())},
    },
}


def require_dali():
    try:
        import nvidia.dali as dali
    except ImportError as error:
        raise RuntimeError("NVIDIA DALI is not installed: pip install -e '.[dali]' "
                           "(nvidia-dali-cuda120)") from error
    return dali


def video_pipeline(device: str = "mixed", *, max_side: int = MAX_FRAME_SIDE, batch_size: int = 8,
                   num_threads: int = 4, device_id: int | None = None):
    """decode_video_dali's pipeline. device_id None serialises anywhere; running "mixed" needs a GPU."""
    dali = require_dali()
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                         output_dtype=[types.UINT8], output_ndim=[4])
    with pipe:
        encoded = fn.external_source(name=MEDIA_U8, dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name=FRAME_INDICES, dtype=types.INT32, ndim=1)
        frames = fn.decoders.video(encoded, device=device, frames=indices)
        # Scale so the longer side is at most max_side, rounded as fv2es.media does; the
        # shape comes back on the host even for NVDEC output.
        shape = frames.shape(dtype=types.FLOAT)
        height, width = shape[1], shape[2]
        scale = dali.math.min(1.0, max_side / dali.math.max(height, width))
        size = fn.stack(dali.math.max(1.0, dali.math.floor(height * scale + 0.5)),
                        dali.math.max(1.0, dali.math.floor(width * scale + 0.5)))
        pipe.set_outputs(fn.resize(frames, size=size, antialias=True))
    return pipe


def make_pipeline(model: str, *, gpu: bool = True, batch_size: int = 8, num_threads: int = 4,
                  device_id: int | None = None):
    if model == "decode_video_dali":
        return video_pipeline("mixed" if gpu else "cpu", batch_size=batch_size,
                              num_threads=num_threads, device_id=device_id)
    raise KeyError(f"no DALI model {model!r}; known: {sorted(DALI_MODELS)}")


class VideoProbe(NamedTuple):
    times: np.ndarray       # frame timestamps in presentation order, seconds from the start
    end: float              # where the video stream ends (last frame + its duration)
    duration: float         # seconds, longest stream (DURATION)
    codec: str              # FFmpeg's name: "h264", "vp9", "mjpeg", ...


def probe_video(media: bytes) -> VideoProbe | None:
    """Demux without decoding; None when the file has no video stream.

    Errors are PyAV's (FFmpegError) or fv2es.media's (MediaError: a refused file). Rotation metadata is not read: PyAV exposes it only
    on decoded frames.
    """
    # The host decoder's opening, allow-lists and limits: NVDEC is held to the same rules.
    with host_media.open_media(media) as container:
        streams = [s for s in container.streams.video
                   if not s.disposition & av.stream.Disposition.attached_pic]   # cover art
        if not streams:
            return None
        stream = streams[0]
        if stream.codec_context is None:
            raise host_media.MediaError("video codec not supported")
        host_media.check_frame_size(stream.codec_context.width, stream.codec_context.height)
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        times, ends = [], [0.0]
        for packet in container.demux():
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None or packet.time_base is None:
                continue
            start = float(stamp * packet.time_base) - origin
            ends.append(start + float((packet.duration or 0) * packet.time_base))
            if packet.stream is stream and packet.size:
                host_media.check_length(start, host_media.MAX_VIDEO_S, "video")
                times.append((start, float((packet.duration or 0) * packet.time_base)))
        if not times:
            raise ValueError("video stream has no timestamped frames")
        times.sort()
        last, last_duration = times[-1]
        if not last_duration and stream.average_rate:
            last_duration = float(1 / stream.average_rate)
        declared = container.duration / 1e6 if container.duration is not None else max(ends)
        host_media.check_length(declared, host_media.MAX_VIDEO_S, "video")
        return VideoProbe(np.array([t for t, _ in times]), last + last_duration, declared,
                          stream.codec_context.name)
