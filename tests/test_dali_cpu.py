"""The gpu profile's DALI pipeline, run CPU-only (device_id=None): the video frames against
the cpu profile's PyAV decoding (fv2es.media), and the model.dali files Triton's DALI
backend loads."""
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from media_factory import make_clip, read_index

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

from fv2es import media  # noqa: E402
from builders.gpu_profile import write_dali_model  # noqa: E402
from fv2es.gpu import dali_pipelines as dp  # noqa: E402

def run(pipe, **inputs):
    """One batch through a fresh CPU pipeline (one run each: with DALI's default prefetching a
    second run would want more fed batches); INPUTS maps input names to lists of samples."""
    for name, samples in inputs.items():
        pipe.feed_input(name, samples)
    return [[np.array(sample) for sample in output] for output in pipe.run()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dali_clips")
    return {
        "vp9": make_clip(folder / "a.webm", "webm", "libvpx-vp9", None, 3.0, size=(320, 180)).read_bytes(),
        "mjpeg": make_clip(folder / "b.avi", "avi", "mjpeg", None, 2.0, size=(320, 180)).read_bytes(),
        "vp9_vfr": make_clip(folder / "c.webm", "webm", "libvpx-vp9", None, 3.0, size=(320, 180),
                             vfr=True).read_bytes(),
    }


def dali_frames(media_bytes: list[bytes], **pipeline_args) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """FRAMES and the instants the python step would send with them, one clip per sample."""
    pipe = dp.video_pipeline("cpu", batch_size=len(media_bytes), num_threads=2, **pipeline_args)
    probes = [dp.probe_video(data) for data in media_bytes]
    assert all(probe.codec in dp.CPU_CODECS for probe in probes)
    plans = [media.sample_indices(probe.times, probe.end) for probe in probes]
    (frames,) = run(pipe, MEDIA_U8=[np.frombuffer(d, np.uint8) for d in media_bytes],
                    FRAME_INDICES=[indices for indices, _ in plans])
    return frames, [instants for _, instants in plans]


def test_video_frames_match_pyav_decoding(clips):
    # One ragged batch: three clips, each with its own codec, frame times and frame count.
    names = ["vp9", "mjpeg", "vp9_vfr"]
    frames, instants = dali_frames([clips[n] for n in names])
    for name, got, times in zip(names, frames, instants):
        want = media.decode_video(clips[name])
        np.testing.assert_allclose(times, want.times, atol=1e-6, err_msg=name)
        assert dp.probe_video(clips[name]).duration == pytest.approx(want.duration), name
        assert got.shape == want.frames.shape, name
        # The same source frames (their drawn indices), converted from YUV alike: chroma
        # upsampling differs only at sharp edges (measured: mean ~1.2, 99th percentile 5).
        assert [read_index(f) for f in got] == [read_index(f) for f in want.frames], name
        diff = np.abs(got.astype(np.int16) - want.frames.astype(np.int16))
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6, name


def test_video_longer_side_is_capped_not_enlarged(clips):
    # 320x180 capped at 100: 100x56 (56.25 rounded as fv2es.media rounds), close to its
    # area-filtered frames; capped at 1280 it keeps its size (checked above).
    (got,), _ = dali_frames([clips["vp9"]], max_side=100)
    want = media.decode_video(clips["vp9"], max_side=100).frames
    assert got.shape == want.shape == (6, 56, 100, 3)
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).mean() < 4


def test_sample_indices_follow_the_frame_on_screen():
    times = np.array([0.0, 0.04, 0.3, 1.2, 1.25])
    indices, instants = media.sample_indices(times, video_end=1.3)
    assert instants.tolist() == [0.0, 0.5, 1.0]
    assert indices.tolist() == [0, 2, 2]
    # A stream starting late shows its first frame until then.
    assert media.sample_indices(np.array([0.7, 0.8]), 0.9)[0].tolist() == [0, 0]


def test_probe_video_names_the_codec_or_finds_no_video(tmp_path):
    h264 = make_clip(tmp_path / "a.mp4", "mp4", "libx264", None, 1.0, size=(160, 90)).read_bytes()
    assert dp.probe_video(h264).codec == "h264"
    assert "h264" not in dp.CPU_CODECS      # NVDEC only
    audio_only = make_clip(tmp_path / "b.wav", "wav", None, "pcm_s16le", 1.0).read_bytes()
    assert dp.probe_video(audio_only) is None


@pytest.mark.parametrize("model", sorted(dp.DALI_MODELS))
def test_serialised_model_round_trips_with_its_config(model, tmp_path, clips):
    import nvidia.dali as dali

    path = write_dali_model(model, tmp_path / model, gpu=False, max_batch_size=2, num_threads=2)
    config = text_format.Parse((tmp_path / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (model, "dali", 2)
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU

    samples = {"MEDIA_U8": [np.frombuffer(clips["vp9"], np.uint8)],
               "FRAME_INDICES": [np.array([0, 30, 74], np.int32)]}
    # The backend feeds inputs by the config's names: the pipeline must know each one.
    inputs = {i.name: samples[i.name] for i in config.input}
    loaded = dali.Pipeline.deserialize(filename=str(path), device_id=None)
    original = dp.make_pipeline(model, gpu=False, batch_size=2, num_threads=2)
    got, want = run(loaded, **inputs), run(original, **inputs)
    assert len(got) == len(config.output)
    for output, got_samples, want_samples in zip(config.output, got, want):
        np.testing.assert_array_equal(got_samples[0], want_samples[0])
        # What the backend checks against the config: rank and dtype of each output.
        assert got_samples[0].ndim == len(output.dims)
        assert got_samples[0].dtype == np.dtype(dp.DALI_MODELS[model]["outputs"][output.name][0])


@pytest.mark.parametrize("model", sorted(dp.DALI_MODELS))
def test_gpu_models_serialise_without_a_gpu(model, tmp_path):
    path = write_dali_model(model, tmp_path / model, gpu=True)
    config = text_format.Parse((tmp_path / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert path.stat().st_size > 0
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [i.name for i in config.input] == list(dp.DALI_MODELS[model]["inputs"])
    assert all(i.allow_ragged_batch for i in config.input)
