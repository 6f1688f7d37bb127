"""The TensorRT plan builder without TensorRT: profiles from the contract, plan names, the
manifest and the compatibility check, the Triton config, the error when TensorRT is absent,
and the build's wiring against a stand-in `tensorrt` module that records what it is given."""
import json
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from builders import tensorrt as trtb
from fv2es.mtcnn import DETECT_MAX_SIDE, pyramid_scales
from fv2es_client.contract import AXES, NETWORKS, TRITON_DTYPES

GPU = "NVIDIA H100 PCIe"
TRT = "10.9.0.34"


@pytest.mark.parametrize("network", list(NETWORKS))
def test_profile_shapes_follow_the_contract(network):
    shapes = trtb.profile_shapes(network)
    assert list(shapes) == list(NETWORKS[network]["inputs"])
    ranges = trtb.axis_ranges(network)
    for name, (_dtype, axes) in NETWORKS[network]["inputs"].items():
        low, opt, high = (np.array(s) for s in shapes[name])
        assert len(low) == len(axes)
        assert (1 <= low).all() and (low <= opt).all() and (opt <= high).all()
        for i, axis in enumerate(axes):
            # Fixed dims as declared; a named axis takes its range in every input alike.
            expected = (axis,) * 3 if isinstance(axis, int) else ranges[axis]
            assert (low[i], opt[i], high[i]) == tuple(expected), (name, axis)


def test_batch_and_sequence_ranges():
    assert trtb.profile_shapes("visual")["faces"] == (
        (1, 1, 3, 48, 48), (8, 20, 3, 48, 48), (16, 256, 3, 48, 48))
    assert trtb.profile_shapes("audio_clip", clip_batch=(1, 2, 4))["items"][2] == (4, AXES["pieces"][2], 64)
    assert trtb.profile_shapes("audio_pieces", clip_batch=(1, 2, 4))["pieces"][2] == (32, 4, 32, 32)
    assert trtb.profile_shapes("text")["input_ids"] == ((1, 2), (8, 100), (16, 100))
    # P-Net's batch is the frames of a clip.
    assert trtb.axis_ranges("pnet")["batch"] == AXES["frames"]


def test_pnet_profile_covers_every_pyramid_level():
    low, _opt, high = trtb.profile_shapes("pnet")["image"]
    sizes = set()
    for height, width in [(640, 640), (360, 640), (640, 360), (480, 640), (20, 640), (21, 21), (13, 400)]:
        for scale in pyramid_scales(height, width):
            sizes.add((int(height * scale + 1), int(width * scale + 1)))
    assert all(low[2] <= h <= high[2] and low[3] <= w <= high[3] for h, w in sizes)
    # The largest level is the first one of a square frame at the detector's size: no slack.
    assert (high[2], high[3]) == max(sizes) == (int(DETECT_MAX_SIDE * 0.6 + 1),) * 2


def test_plan_names_carry_gpu_tensorrt_and_precision():
    assert trtb.plan_filename("visual", "fp16", GPU, TRT) == "visual.fp16.h100-pcie.trt10.9.plan"
    assert trtb.plan_filename("pnet", "fp32", "NVIDIA H100 80GB HBM3", "10.13.2.6") == \
        "pnet.fp32.h100-80gb-hbm3.trt10.13.plan"
    assert trtb.gpu_slug("Tesla T4") == "tesla-t4"
    assert trtb.timing_cache_filename(GPU, TRT) == "timing.h100-pcie.trt10.9.cache"


def test_compatibility_check_refuses_other_gpus_and_tensorrt_releases():
    manifest = {"gpu_name": GPU, "tensorrt": TRT}
    trtb.check_plan_compatible(manifest, GPU, TRT)
    trtb.check_plan_compatible(manifest, GPU, "10.9.0.40")     # another build of the release
    with pytest.raises(trtb.PlanMismatch, match="built on NVIDIA H100 PCIe, this GPU is NVIDIA A100"):
        trtb.check_plan_compatible(manifest, "NVIDIA A100-SXM4-40GB", TRT)
    with pytest.raises(trtb.PlanMismatch, match="TensorRT 10.9.0.34, this is TensorRT 10.9.1.2"):
        trtb.check_plan_compatible(manifest, GPU, "10.9.1.2")
    with pytest.raises(trtb.PlanMismatch, match="80GB HBM3.*TensorRT 10.8"):
        trtb.check_plan_compatible(manifest, "NVIDIA H100 80GB HBM3", "10.8.0.43")


def test_clear_error_when_tensorrt_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)     # `import tensorrt` now fails
    with pytest.raises(trtb.TensorRTMissing, match=r"nvcr\.io/nvidia/tritonserver"):
        trtb.require_tensorrt()
    assert trtb.main(["build", "--onnx-dir", str(tmp_path), "--out", str(tmp_path / "plans")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("network", list(NETWORKS))
def test_triton_config_parses_and_names_the_network_io(network):
    text = trtb.tensorrt_model_config(network, f"{network}.fp16.h100-pcie.trt10.9.plan",
                                      model_name=f"{network}_trt")
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert (config.name, config.platform) == (f"{network}_trt", "tensorrt_plan")
    assert config.max_batch_size == trtb.axis_ranges(network)["batch"][2]
    assert config.default_model_filename == f"{network}.fp16.h100-pcie.trt10.9.plan"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for entries, tensors in ((config.input, NETWORKS[network]["inputs"]),
                             (config.output, NETWORKS[network]["outputs"])):
        assert [e.name for e in entries] == list(tensors)
        for entry, (dtype, axes) in zip(entries, tensors.values()):
            assert model_config_pb2.DataType.Name(entry.data_type) == TRITON_DTYPES[dtype]
            assert list(entry.dims) == [a if isinstance(a, int) else -1 for a in axes[1:]]


def test_triton_config_refuses_a_batch_beyond_the_profile():
    with pytest.raises(ValueError, match="outside visual's profile"):
        trtb.tensorrt_model_config("visual", "v.plan", max_batch_size=32)


def test_random_inputs_have_contract_dtypes_and_real_data_first():
    shapes = {"faces": (3, 5, 3, 48, 48), "frame_mask": (3, 5)}
    inputs = trtb.random_inputs("visual", shapes, np.random.default_rng(0))
    assert inputs["faces"].dtype == np.float32 and inputs["frame_mask"].dtype == bool
    mask = inputs["frame_mask"]
    assert mask[:, 0].all()                                           # never an empty clip
    assert all(not row[row.argmin():].any() for row in mask if not row.all())   # a prefix


# --- the build, against a stand-in TensorRT ----------------------------------------------------

def fake_tensorrt(builds: list):
    """Just enough of the tensorrt module for build_all; each build is recorded in BUILDS."""
    class Network:
        inputs = []
        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.inputs = [i.name for i in onnx.load(path).graph.input]
            return True

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = {"TF32"}, [], None   # TF32 is on by default

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        # The timing cache grows by one byte per build, so its persistence shows.
        def create_timing_cache(self, data):
            return SimpleNamespace(data=bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return SimpleNamespace(serialize=lambda: self.cache.data + b"+")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            builds.append({"flags": set(config.flags), "profile": dict(config.profiles[0]),
                           "cache": config.cache.data})
            return b"plan"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    return SimpleNamespace(__version__=TRT, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
                           MemoryPoolType=SimpleNamespace(WORKSPACE=0),
                           BuilderFlag=SimpleNamespace(FP16="FP16", TF32="TF32"))


def write_onnx(path, input_names):
    """A graph with the given inputs (what the builder reads of an ONNX file here)."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in input_names]
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", [input_names[0]], ["out"])], "g", inputs, [output])
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture
def fake_trt(monkeypatch):
    builds = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(builds))
    return builds


def test_build_all_wires_profiles_flags_cache_and_manifest(fake_trt, tmp_path):
    networks = ("visual", "pnet")
    for n in networks:
        write_onnx(tmp_path / f"{n}.onnx", list(NETWORKS[n]["inputs"]))
    out = tmp_path / "plans"
    manifest = trtb.build_all(tmp_path, out, networks, gpu_name=GPU)

    assert [b["profile"] for b in fake_trt] == [trtb.profile_shapes(n) for n in networks for _ in range(2)]
    assert [b["flags"] for b in fake_trt] == [{"FP16", "TF32"}, set()] * 2     # fp32 without TF32
    assert [b["cache"] for b in fake_trt] == [b"", b"+", b"++", b"+++"]         # one cache, shared
    assert (out / "timing.h100-pcie.trt10.9.cache").read_bytes() == b"++++"

    assert json.loads((out / "manifest.json").read_text()) == manifest == trtb.read_manifest(out)
    assert (manifest["gpu_name"], manifest["tensorrt"]) == (GPU, TRT)
    for n in networks:
        for precision in ("fp16", "fp32"):
            entry = manifest["plans"][n][precision]
            assert entry["file"] == f"{n}.{precision}.h100-pcie.trt10.9.plan"
            assert entry["max_batch"] == trtb.axis_ranges(n)["batch"][2]
            assert (out / entry["file"]).read_bytes() == b"plan"
            assert entry["profile"] == {k: [list(s) for s in v] for k, v in trtb.profile_shapes(n).items()}
    trtb.check_plan_compatible(manifest, GPU, TRT)

    # A later build starts from the saved timing cache and keeps the earlier plans' entries;
    # a build for another GPU starts a new manifest.
    again = trtb.build_all(tmp_path, out, ("visual",), ("fp32",), gpu_name=GPU)
    assert fake_trt[-1]["cache"] == b"++++"
    assert again["plans"].keys() == manifest["plans"].keys()
    other = trtb.build_all(tmp_path, out, ("visual",), ("fp32",), gpu_name="NVIDIA L4")
    assert list(other["plans"]) == ["visual"] and fake_trt[-1]["cache"] == b""


def test_build_refuses_onnx_that_disagrees_with_the_contract(fake_trt, tmp_path):
    write_onnx(tmp_path / "text.onnx", ["input_ids", "token_type_ids"])
    with pytest.raises(RuntimeError, match="contract says"):
        trtb.build_all(tmp_path, tmp_path / "plans", ("text",), gpu_name=GPU)
    with pytest.raises(FileNotFoundError, match="audio_clip"):
        trtb.build_all(tmp_path, tmp_path / "plans", ("audio_clip",), gpu_name=GPU)
