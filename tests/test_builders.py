"""The one build entry, `python -m builders`, and the layering it relies on."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parents[1]


def builders(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builders", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_every_profile_and_encoder_format():
    from builders.__main__ import PROFILES

    out = builders("--help")
    assert out.returncode == 0, out.stderr
    for profile, (formats, _build) in PROFILES.items():
        assert profile in out.stdout
        assert all(f in out.stdout for f in formats)
    assert set(PROFILES) == {"cpu", "gpu"}
    assert {f for formats, _ in PROFILES.values() for f in formats} == {"onnx", "int8", "torch", "tensorrt"}


def test_an_encoder_format_of_another_profile_is_refused():
    out = builders("--profile", "cpu", "--encoders", "torch")
    assert out.returncode == 2 and "the cpu profile's encoders are onnx, int8, not torch" in out.stderr


def test_tensorrt_where_it_is_not_installed_says_so(tmp_path):
    out = builders("--profile", "gpu", "--encoders", "tensorrt", "--output", str(tmp_path / "repo"),
                   "--asr-model", "none")
    assert out.returncode == 1 and "TensorRT is not installed" in out.stderr, out.stderr


@pytest.mark.slow
def test_gpu_profile_with_torch_encoders_builds_without_a_gpu(tmp_path):
    output = tmp_path / "model_repository"
    out = builders("--profile", "gpu", "--encoders", "torch", "--output", str(output))
    assert out.returncode == 0, out.stderr
    kinds = {}
    for config in output.glob("*/config.pbtxt"):
        parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        kinds[parsed.name] = [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in parsed.instance_group]
    assert kinds["audio_encoder"] == ["KIND_GPU"] and kinds["respond"] == ["KIND_CPU"]


def test_the_library_never_imports_the_builders():
    """fv2es is what the served models import; builders import fv2es, never the other way."""
    for path in sorted((ROOT / "fv2es").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "builders" or n.startswith("builders.") for n in names), path


def test_every_contract_step_has_one_implementation():
    from fv2es_client.contract import STEPS, Step

    from fv2es import steps

    steps.check_table()     # the real graph: passes (it also runs at import)
    with pytest.raises(LookupError, match=r"no class for \['denoise_audio'\]"):
        steps.check_table(STEPS + (Step("denoise_audio", ("AUDIO",), ("AUDIO",)),))
    with pytest.raises(LookupError, match=r"no contract step for \['respond'\]"):
        steps.check_table(STEPS[:-1])
