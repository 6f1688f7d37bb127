"""The real tritonserver 2.51 and perf_analyzer 2.51, run from the wheels' files, on CPU."""
from __future__ import annotations

import base64
import json
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fv2es.serving.perf_analyzer import (perf_analyzer_command, read_csv_report, run_perf_analyzer,
                                         write_input_data)
from fv2es.serving.tritonserver import TritonServer

ECHO_CONFIG = """
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 1000 }
input [{ name: "TEXT", data_type: TYPE_STRING, dims: [1] }]
output [{ name: "ECHO", data_type: TYPE_STRING, dims: [1] },
        { name: "PREFIX", data_type: TYPE_STRING, dims: [1] }]
"""
# Imports fv2es and reports sys.prefix: proves the stub runs the project's interpreter.
ECHO_MODEL = """
import sys
import numpy as np
import fv2es
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            echo = np.array([[b"echo:" + row[0]] for row in text], dtype=object)
            prefix = np.array([[sys.prefix.encode()]] * len(text), dtype=object)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("ECHO", echo), pb_utils.Tensor("PREFIX", prefix)]))
        return responses
"""
FAILING_CONFIG = """
backend: "python"
max_batch_size: 8
input [{ name: "TEXT", data_type: TYPE_STRING, dims: [1] }]
output [{ name: "ECHO", data_type: TYPE_STRING, dims: [1] }]
"""
FAILING_MODEL = """
class TritonPythonModel:
    def execute(self, requests):
        raise ValueError("cannot decode this media: bad header")
"""

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_model(repository: Path, name: str, config: str, code: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repository / name / "1" / "model.py").write_text(textwrap.dedent(code))


def make_server(repository: Path, log_file: Path, **options) -> TritonServer:
    return TritonServer(repository, http_port=free_port(), grpc_port=free_port(),
                        metrics_port=free_port(), log_file=log_file, **options)


def bytes_input(name: str, values: list[bytes]) -> grpcclient.InferInput:
    array = np.array([[v] for v in values], dtype=object)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    add_model(root, "echo", ECHO_CONFIG, ECHO_MODEL)
    add_model(root, "failing", FAILING_CONFIG, FAILING_MODEL)
    return root


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    with make_server(repository, tmp_path_factory.mktemp("logs") / "server.log") as running:
        yield running


@pytest.mark.server
def test_bytes_in_bytes_out_over_grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready() and client.is_model_ready("echo")
    values = [b"hello", "w\u00f6rld".encode(), b"", bytes(range(256))]
    result = client.infer("echo", [bytes_input("TEXT", values)])
    assert result.as_numpy("ECHO").ravel().tolist() == [b"echo:" + v for v in values]
    assert result.as_numpy("PREFIX")[0, 0].decode() == sys.prefix


@pytest.mark.server
def test_model_error_reaches_client_and_server_keeps_serving(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="cannot decode this media: bad header"):
        client.infer("failing", [bytes_input("TEXT", [b"x"])])
    assert server.is_alive()
    assert client.infer("echo", [bytes_input("TEXT", [b"again"])]).as_numpy("ECHO")[0, 0] == b"echo:again"


@pytest.mark.server
def test_perf_analyzer_with_bytes_input_data(server, tmp_path):
    data = write_input_data(tmp_path / "input.json", [{"TEXT": b"short"}, {"TEXT": b"x" * 10_000}])
    report = tmp_path / "report.csv"
    command = perf_analyzer_command("echo", url=server.grpc_url, input_data=data,
                                    request_count=500, csv_file=report)
    result = run_perf_analyzer(command, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    throughput = read_csv_report(report)[0]["Inferences/Second"]
    print(f"perf_analyzer on the echo model: {throughput:.0f} infer/s")
    assert throughput > 0


@pytest.mark.server
def test_explicit_model_control_load_unload_and_clean_stop(repository, tmp_path):
    server = make_server(repository, tmp_path / "server.log", model_control_mode="explicit")
    with server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert not client.is_model_ready("echo")
        client.load_model("echo")
        assert client.is_model_ready("echo")
        assert client.infer("echo", [bytes_input("TEXT", [b"a"])]).as_numpy("ECHO")[0, 0] == b"echo:a"
        client.unload_model("echo")
        assert not client.is_model_ready("echo")
        with pytest.raises(InferenceServerException):
            client.infer("echo", [bytes_input("TEXT", [b"a"])])
    assert not server.is_alive()
    assert server.process.returncode == 0
    assert not list(Path("/dev/shm").glob(server.shm_prefix + "*"))


@pytest.mark.server
def test_start_failure_shows_the_cause(tmp_path):
    add_model(tmp_path / "repository", "broken", ECHO_CONFIG, "raise ImportError('missing weights file')\n")
    server = make_server(tmp_path / "repository", tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="missing weights file"):
        server.start()
    assert not server.is_alive()


def test_input_data_file_uses_the_wire_format(tmp_path):
    path = write_input_data(tmp_path / "input.json", [{"MEDIA": b"abc", "IDS": np.arange(3, dtype=np.int64)}])
    entry = json.loads(path.read_text())["data"][0]
    assert base64.b64decode(entry["MEDIA"]["b64"]) == struct.pack("<I", 3) + b"abc"
    assert entry["MEDIA"]["shape"] == [1]
    assert np.frombuffer(base64.b64decode(entry["IDS"]["b64"]), np.int64).tolist() == [0, 1, 2]
    assert entry["IDS"]["shape"] == [3]


@pytest.mark.server
def test_serve_command_runs_until_sigterm(repository):
    grpc_port = free_port()
    command = [sys.executable, "-m", "fv2es.serving.serve", "--model-repository", str(repository),
               "--grpc-port", str(grpc_port), "--http-port", str(free_port()),
               "--metrics-port", str(free_port()), "--startup-timeout", "120"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:     # the server's log, then our line once it is ready
            if "FV2ES is being served" in line:
                break
        assert f"gRPC: localhost:{grpc_port}" in line
        assert grpcclient.InferenceServerClient(f"localhost:{grpc_port}").is_model_ready("echo")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)     # drains the shutdown log
        assert process.returncode == 0
    finally:
        process.kill()
        process.wait()
