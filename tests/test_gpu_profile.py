"""The gpu profile without a GPU.

- Its configs: every config.pbtxt parses; every ensemble step's tensors exist in the composing
  model with the contract's dtype and dims; GPU steps are KIND_GPU and keep their inputs on
  the GPU (FORCE_CPU_ONLY_INPUT_TENSORS "no"); the ensemble is the cpu profile's.
- Its files run on CPU: the DALI models (device_id=None) and the torch steps built from their
  folders give the cpu profile's outputs (bit for bit where the same ops run: MTCNN, crops, mel).
- The GPU code's CPU-runnable logic: the bucketing runner in fp32 and bf16, the decode
  routing policy and its host slots.
- The whole profile served by the real tritonserver with every step on CPU (device="cpu"):
  the GPU adapter's DLPack paths, against the in-process predictor.
"""
from __future__ import annotations

import importlib.util
import re
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fv2es_client.contract import ENSEMBLE, NETWORKS, STEPS, TENSORS, TRITON_DTYPES
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import media_factory
from builders.build_repository import LABELS_FILE, load_model
from builders.gpu_profile import build_gpu, plan_model_name
from builders.triton_config import ensemble_config, internal_name
from fv2es import features, media, mtcnn, steps
from fv2es.gpu import steps as gpu_steps
from fv2es.gpu.torch_cuda import CudaRunner, bucket, pad_to_buckets
from fv2es.parity import TOLERANCE
from fv2es.runners import TorchRunner

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")
KIND = model_config_pb2.ModelInstanceGroup


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def configs(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: parse(p) for p in sorted(repository.glob("*/config.pbtxt"))}


def params(config) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def fake_plans(folder: Path) -> Path:
    """A plan folder as builders.tensorrt writes it (the plans' bytes are never read here)."""
    folder.mkdir()
    plans = {}
    for network in ("visual", "audio_pieces", "audio_clip", "text"):
        (folder / f"{network}.fp16.h100.trt10.9.plan").write_bytes(b"plan")
        plans[network] = {"fp16": {"file": f"{network}.fp16.h100.trt10.9.plan"}}
    (folder / "manifest.json").write_text(json.dumps({"gpu_name": "NVIDIA H100", "tensorrt": "10.9.0",
                                                      "plans": plans}))
    return folder


# Builds: (dali, device, encoders). Stand-in plans where TensorRT may serve (device "gpu").
BUILDS = {
    "none-gpu-torch": dict(dali="none", device="gpu", encoders="torch"),
    "backend-gpu-tensorrt": dict(dali="backend", device="gpu", encoders="tensorrt"),
    "backend-cpu-torch": dict(dali="backend", device="cpu", encoders="torch"),
    # What the server test serves: DALI in the glue's process on CPU, every clip DALI takes
    # sent to it (no host slots), fp32 to compare with the predictor.
    "python-cpu-torch": dict(dali="python", device="cpu", encoders="torch", host_decodes=0, nvdec_clips=1,
                             precision="fp32"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_profile")
    plans = fake_plans(root / "plans")
    cache = {}

    def build(name: str) -> Path:
        if name not in cache:
            args = dict(BUILDS[name])
            if args["dali"] != "none" and importlib.util.find_spec("nvidia.dali") is None:
                pytest.skip("NVIDIA DALI is not installed")
            if args["encoders"] == "tensorrt":
                args["plan_dir"] = plans
            # One build checks the speech recognition settings; the others skip loading it.
            asr = "whisper-tiny.en" if name == "none-gpu-torch" else "none"
            cache[name] = build_gpu(root / name, asr_model=asr, **args)
        return cache[name]
    return build


def uses_gpu_adapter(repository: Path, name: str) -> bool:
    model_py = repository / name / "1" / "model.py"
    return model_py.exists() and "python_model_gpu" in model_py.read_text()


@pytest.mark.parametrize("name", list(BUILDS))
def test_ensemble_steps_are_wired_by_the_contract(built, name):
    repository = built(name)
    models = configs(repository)
    assert all(config.name == model for model, config in models.items())
    assert (repository / ENSEMBLE / "config.pbtxt").read_text() == ensemble_config(LABELS_FILE)
    ensemble = models[ENSEMBLE]
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [s.name for s in STEPS]
    for step in ensemble.ensemble_scheduling.step:
        composing = models[step.model_name]
        for mapping, declared in ((step.input_map, composing.input), (step.output_map, composing.output)):
            declared = {t.name: t for t in declared}
            for key, value in mapping.items():
                # Between steps a tensor has its internal name; only RESPOND's outputs are the ensemble's.
                assert value in (key, internal_name(key)) and key in declared, (step.model_name, key)
                tensor = TENSORS[key]
                assert model_config_pb2.DataType.Name(declared[key].data_type) == tensor.triton_dtype, key
                assert list(declared[key].dims) == tensor.dims(), (step.model_name, key)


@pytest.mark.parametrize("name", list(BUILDS))
def test_instance_kinds_and_gpu_inputs(built, name):
    repository = built(name)
    on_gpu = BUILDS[name]["device"] == "gpu"
    for model, config in configs(repository).items():
        if model == ENSEMBLE:
            continue
        kind = config.instance_group[0].kind
        if uses_gpu_adapter(repository, model) or config.backend == "dali":
            assert kind == (KIND.KIND_GPU if on_gpu else KIND.KIND_CPU), model
        elif config.platform == "tensorrt_plan":
            assert kind == KIND.KIND_GPU, model
        else:   # the cpu profile's host steps
            assert config.backend == "python" and kind == KIND.KIND_CPU, model
        if uses_gpu_adapter(repository, model):
            assert params(config)["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no", model
    gpu_steps_expected = {"detect_faces", "crop_faces", "mel_pieces", "visual_encoder", "audio_encoder",
                          "text_encoder"}
    gpu_steps_expected |= {"decode_video"} if BUILDS[name]["dali"] != "none" else set()
    assert {m for m in configs(repository) if uses_gpu_adapter(repository, m)} == gpu_steps_expected


def test_speech_recognition_runs_on_cuda(built):
    transcribe = params(configs(built("none-gpu-torch"))["transcribe"])
    assert (transcribe["asr_device"], transcribe["asr_compute_type"]) == ("cuda", "float16")


def test_torch_encoders_share_one_checkpoint_on_disk(built):
    repository = built("none-gpu-torch")
    weights = [repository / n / "1" / steps.CHECKPOINT_DIR / "model.safetensors"
               for n in ("visual_encoder", "audio_encoder", "text_encoder")]
    assert len({w.stat().st_ino for w in weights}) == 1 and weights[0].stat().st_nlink == 3


def test_plan_models_serve_the_networks_the_glue_asks_for(built):
    models = configs(built("backend-gpu-tensorrt"))
    for step, network in (("visual_encoder", "visual"), ("audio_encoder", "audio_pieces"),
                          ("audio_encoder", "audio_clip"), ("text_encoder", "text")):
        glue = params(models[step])
        assert f"{network}:{plan_model_name(network)}" in glue["plan_models"].split(",")
        plan = models[plan_model_name(network)]
        assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 16
        assert not plan.HasField("dynamic_batching")    # the glue forms the batches
        for declared, spec in ((plan.input, NETWORKS[network]["inputs"]), (plan.output, NETWORKS[network]["outputs"])):
            assert [t.name for t in declared] == list(spec)
            assert [model_config_pb2.DataType.Name(t.data_type) for t in declared] == \
                [TRITON_DTYPES[dtype] for dtype, _axes in spec.values()]
        assert (built("backend-gpu-tensorrt") / plan_model_name(network) / "1" / plan.default_model_filename).exists()


# --- the built files run on CPU --------------------------------------------------------------

@pytest.fixture(scope="module")
def vp9_clip(tmp_path_factory):
    """3 s VP9 + Opus webm, 320x180, shown turned by 90 degrees (rotation metadata)."""
    return media_factory.make_clip(tmp_path_factory.mktemp("vp9") / "face.webm", "webm", "libvpx-vp9", "libopus",
                                   3.0, size=(320, 180), rotation=90, audio_rate=48_000)


def run_dali(path: Path, **samples):
    import nvidia.dali as dali

    pipe = dali.Pipeline.deserialize(filename=str(path), device_id=None)
    for name, value in samples.items():
        pipe.feed_input(name, [value])
    return [np.array(output[0]) for output in pipe.run()]


def assert_frames_close(got: np.ndarray, want: np.ndarray):
    # DALI and swscale convert YUV alike but for chroma at sharp edges (tests/test_dali_cpu.py).
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6


@needs_dali
def test_dali_model_runs_on_cpu_like_the_cpu_profile(built, vp9_clip):
    from fv2es.gpu.dali_pipelines import probe_video
    from fv2es.media import sample_indices

    repository = built("backend-cpu-torch")
    data = vp9_clip.read_bytes()
    probe = probe_video(data)
    indices, instants = sample_indices(probe.times, probe.end)
    (frames,) = run_dali(repository / "decode_video_dali" / "1" / "model.dali",
                         MEDIA_U8=np.frombuffer(data, np.uint8), FRAME_INDICES=indices)
    want = media.decode_video(data)
    np.testing.assert_allclose(instants, want.times, atol=1e-6)
    turns = gpu_steps.display_turns(data)      # DALI leaves the rotation to the glue
    assert turns == 3
    assert_frames_close(np.rot90(frames, turns, axes=(1, 2)), want.frames)



@needs_dali
def test_decode_glue_applies_rotation_after_dali(built, vp9_clip):
    repository = built("python-cpu-torch")
    step = gpu_steps.build_step(params(configs(repository)["decode_video"]), repository / "decode_video" / "1", "cpu")
    assert step.host_slots.count == 0       # every VP9 clip goes to DALI
    clip = {"MEDIA": np.array([vp9_clip.read_bytes()], dtype=object)}
    got, want = step.process(clip), steps.DecodeVideo().process(clip)
    assert isinstance(got["FRAMES"], torch.Tensor)      # DALI's output, not PyAV's
    assert_frames_close(got["FRAMES"].numpy(), want["FRAMES"])
    for name in ("FRAME_TIMES", "VIDEO_PRESENT", "DURATION"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


def test_gpu_steps_are_the_cpu_steps_on_tensors(built, face_clip, noface_clip):
    folder = built("none-gpu-torch") / "detect_faces" / "1"
    detector = gpu_steps.build_step({"step": "detect_faces"}, folder, "cpu")
    assert type(detector) is steps.DetectFaces and detector.frames_per_call == 4     # chunked, as on CPU
    for name in ("crop_faces", "mel_pieces"):
        assert type(gpu_steps.build_step({"step": name}, folder, "cpu")) is steps.STEP_CLASSES[name]
    for path, faces_expected in ((face_clip, True), (noface_clip, False)):
        frames = media.decode_video(path).frames
        cpu = steps.DetectFaces(mtcnn.torch_runner(mtcnn.load_mtcnn_nets())).process({"FRAMES": frames})
        assert (cpu["FACE_SCORES"] > 0).all() if faces_expected else (cpu["FACE_SCORES"] == 0).all()
        got = detector.process({"FRAMES": torch.from_numpy(frames)})
        np.testing.assert_array_equal(got["FACE_BOXES"], cpu["FACE_BOXES"])
        np.testing.assert_array_equal(got["FACE_SCORES"], cpu["FACE_SCORES"])
        # The one crop, given a tensor (the gpu profile) or an array (the cpu profile).
        faces = features.crop_faces(torch.from_numpy(frames), got["FACE_BOXES"], got["FACE_SCORES"])
        assert isinstance(faces, torch.Tensor)
        np.testing.assert_array_equal(faces.numpy(), features.crop_faces(frames, cpu["FACE_BOXES"], cpu["FACE_SCORES"]))
    rng = np.random.default_rng(1)
    for audio in (media.decode_audio(face_clip).samples, rng.standard_normal(150).astype(np.float32),
                  rng.standard_normal(6_400).astype(np.float32)):
        np.testing.assert_array_equal(features.mel_pieces(torch.from_numpy(audio)).numpy(), features.mel_pieces(audio))


def test_no_frames_give_no_faces():
    run_net = mtcnn.torch_runner(mtcnn.load_mtcnn_nets())
    boxes, scores = mtcnn.detect_faces(torch.zeros((0, 0, 0, 3), dtype=torch.uint8), run_net)
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    assert features.crop_faces(torch.zeros((0, 0, 0, 3), dtype=torch.uint8), boxes, scores).shape == (0, 3, 48, 48)


def test_encoders_built_from_their_folders_match_torch_runner(built):
    repository = built("python-cpu-torch")
    reference = load_model()      # the builder's model: seeded, fused
    runner = TorchRunner(reference.networks())
    rng = np.random.default_rng(2)
    clips = {   # ragged clips, a batch each
        "visual_encoder": [{"FACES": rng.standard_normal((n, 3, 48, 48)).astype(np.float32)} for n in (5, 1, 3)],
        "audio_encoder": [{"MEL_PIECES": (100 * rng.standard_normal((n, 4, 32, 32)) ** 2).astype(np.float32)}
                          for n in (1, 40)],     # more than one call's worth of pieces
        "text_encoder": [{"INPUT_IDS": rng.integers(0, 1000, n), "ATTENTION_MASK": np.ones(n, np.int64)}
                         for n in (9, 4)],
    }
    models = configs(repository)
    for name, batch in clips.items():
        step = gpu_steps.build_step(params(models[name]), repository / name / "1", "cpu")
        want = steps.make_step(name, runner=runner)(batch)
        got = step([{k: torch.from_numpy(v) for k, v in clip.items()} for clip in batch])
        output = step.spec.outputs[0]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[output].numpy(), w[output], rtol=1e-4, atol=1e-5, err_msg=name)


# --- the GPU runner's logic in fp32 and bf16 on CPU --------------------------------------------

def test_buckets_are_powers_of_two_up_to_the_cap():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, 17]
    assert bucket(60, 100) == 64 and bucket(70, 100) == 100


def test_padding_to_buckets_masks_what_it_adds():
    inputs = {"faces": torch.ones(3, 5, 3, 48, 48), "frame_mask": torch.ones(3, 5, dtype=torch.bool)}
    (faces, mask), sizes = pad_to_buckets("visual", inputs)
    assert sizes == {"batch": 3, "frames": 5}
    assert faces.shape == (4, 8, 3, 48, 48) and mask.shape == (4, 8)
    assert mask[:3, :5].all() and not mask[3:].any() and not mask[:, 5:].any()
    assert faces[:3, :5].eq(1).all() and faces[3:].eq(0).all() and faces[:, 5:].eq(0).all()


@pytest.fixture(scope="module")
def small_model():
    model = load_model()
    return {"visual": model.visual_net(), "text": model.text_net()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_runner_matches_torch_runner_within_its_tolerance(small_model, precision):
    rng = np.random.default_rng(3)
    inputs = {
        "visual": {"faces": rng.standard_normal((3, 5, 3, 48, 48)).astype(np.float32),
                   "frame_mask": np.arange(5)[None] < np.array([[5], [3], [1]])},
        "text": {"input_ids": rng.integers(0, 1000, (2, 7)),
                 "attention_mask": (np.arange(7)[None] < np.array([[7], [4]])).astype(np.int64)},
    }
    reference, runner = TorchRunner(small_model), CudaRunner(small_model, "cpu", precision)
    for network, x in inputs.items():
        want = reference(network, x)["logits"]
        got = runner(network, x)["logits"]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == want.shape
        error = np.abs(got.numpy() - want).max() / np.abs(want).max()
        assert error <= TOLERANCE[f"torch-{precision}"], (network, error)


# --- the decode routing policy --------------------------------------------------------

def test_host_slots_are_shared_and_released(tmp_path):
    first, second = gpu_steps.HostSlots(tmp_path, 1), gpu_steps.HostSlots(tmp_path, 1)
    with first.take() as held:
        assert held
        with second.take() as also:
            assert not also
    with second.take() as held:
        assert held
    with gpu_steps.HostSlots(tmp_path / "none", 0).take() as held:
        assert not held


class RecordingDecoder:
    """A stand-in for NVDEC: records its calls, answers black frames (or fails)."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def __call__(self, media_u8, indices):
        self.calls.append(indices)
        if self.fail:
            raise RuntimeError("decoder error")
        return torch.zeros((len(indices), 4, 6, 3), dtype=torch.uint8)


def decode(step, path):
    return step.process({"MEDIA": np.array([Path(path).read_bytes()], dtype=object)})


def test_routing_fills_host_slots_first_then_nvdec(tmp_path, face_clip):
    nvdec = RecordingDecoder()
    step = gpu_steps.DecodeVideo(nvdec, gpu_steps.HostSlots(tmp_path, 1))
    on_host = decode(step, face_clip)
    assert not nvdec.calls and on_host["FRAMES"].shape == (6, 360, 640, 3)
    with step.host_slots.take():        # another request holds the only host slot
        on_gpu = decode(step, face_clip)
    [indices] = nvdec.calls
    assert len(indices) == 6 and on_gpu["FRAMES"].shape == (6, 4, 6, 3)
    for name in ("FRAME_TIMES", "VIDEO_PRESENT", "DURATION"):
        np.testing.assert_allclose(on_gpu[name], on_host[name], atol=1e-6, err_msg=name)


def test_routing_sends_what_nvdec_cannot_take_to_the_host(tmp_path, audio_only_clip, bad_media, face_clip):
    nvdec = RecordingDecoder()
    step = gpu_steps.DecodeVideo(nvdec, gpu_steps.HostSlots(tmp_path, 0), codecs={"vp9"})
    assert decode(step, face_clip)["FRAMES"].shape == (6, 360, 640, 3)      # H.264 is not in its codecs
    assert not decode(step, audio_only_clip)["VIDEO_PRESENT"][0]
    path, message = bad_media["random_bytes"]
    with pytest.raises(media.MediaError, match=re.escape(message)):
        decode(step, path)
    assert not nvdec.calls


def test_a_failed_nvdec_decode_falls_back_to_the_host(tmp_path, face_clip):
    step = gpu_steps.DecodeVideo(RecordingDecoder(fail=True), gpu_steps.HostSlots(tmp_path, 0))
    assert decode(step, face_clip)["FRAMES"].shape == (6, 360, 640, 3)


def test_display_turns_read_the_rotation(tmp_path):
    # ROTATION is clockwise (the phone's 'rotate' tag); turns are counter-clockwise (np.rot90's).
    for rotation, turns in ((0, 0), (90, 3), (270, 1)):
        path = media_factory.make_clip(tmp_path / f"r{rotation}.mp4", "mp4", "libx264", None, 0.5,
                                       size=(64, 48), rotation=rotation)
        assert gpu_steps.display_turns(path.read_bytes()) == turns


# --- served: the whole profile on CPU through the real tritonserver ----------------------------

@pytest.fixture(scope="module")
def served(built):
    import tritonclient.grpc as grpcclient

    from fv2es.serving.tritonserver import TritonServer
    from fv2es.serving.tritonserver import free_ports

    repository = built("python-cpu-torch")
    http, grpc, metrics = free_ports(3)
    triton = TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          model_control_mode="explicit").start()
    try:
        admin = grpcclient.InferenceServerClient(triton.grpc_url)
        for name in [s.name for s in STEPS] + [ENSEMBLE]:
            admin.load_model(name)
        yield triton
    finally:
        triton.stop()


@pytest.mark.server
@pytest.mark.slow
@needs_dali
def test_served_on_cpu_matches_the_predictor(served, face_clip, vp9_clip):
    from fv2es_client import Fv2esClient, Prediction

    from fv2es.predictor import Predictor

    predictor = Predictor()
    with Fv2esClient(served.grpc_url, timeout_s=300) as client:
        for path in (face_clip, vp9_clip):     # H.264: PyAV; VP9: DALI in the glue's process
            served_answer = client.predict(path, transcript="hello there")
            local = Prediction.from_outputs(predictor.predict(path, "hello there").tensors, source=str(path))
            fields = ["probabilities", "fused_logits", "frame_times", "duration", "face_scores"]
            if path == vp9_clip:    # DALI's pixels differ from PyAV's a little: not the faces' logits
                fields = ["frame_times", "duration"]
            for field in fields:
                np.testing.assert_allclose(getattr(served_answer, field), getattr(local, field), rtol=1e-4,
                                           atol=1e-5, err_msg=f"{path.name}: {field}")
            modalities = ("audio", "text") if path == vp9_clip else ("audio", "text", "visual")
            for modality in modalities:
                np.testing.assert_allclose(served_answer.modality_logits[modality], local.modality_logits[modality],
                                           rtol=1e-4, atol=1e-5, err_msg=f"{path.name}: {modality}")
            assert served_answer.labels == local.labels and served_answer.weights == local.weights


def test_the_nvdec_path_is_held_to_the_host_decoders_rules(tmp_path):
    from fv2es.gpu.dali_pipelines import probe_video

    long = media_factory.make_clip(tmp_path / "long.mkv", "matroska", "libx264", None, 130.0, size=(32, 32),
                                   fps=1, face=False)
    for data, message in [(media_factory.gif_bomb(), "frame 16000x16000 exceeds the 8192x8192 limit"),
                          (media_factory.ffconcat_list("clip.mp4"), "refused: an ffconcat list"),
                          (media_factory.sdp_description(5004), "refused: an SDP session description"),
                          (long.read_bytes(), r"video too long: 1[23]\d\.\d s > limit 128 s")]:
        with pytest.raises(media.MediaError, match=message):
            probe_video(data)
