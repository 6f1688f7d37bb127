"""The client's parts that need no server: tensors from the contract, parsing, warnings,
local checks, the CLI, and failing fast against a closed port. Real-server tests live elsewhere."""
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from fv2es_client import cli, contract
from fv2es_client.client import (Fv2esClient, Fv2esError, InputRejected, InvalidInput, ModelNotReady, Prediction,
                                 ServerError, ServerUnreachable, Timeout, build_inputs, build_outputs,
                                 read_media)

LABELS = contract.LABEL_SETS["iemocap6"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensemble_outputs(frames=4, batch=True, **values):
    """Outputs shaped and typed as the ensemble returns them; `values` override per tensor."""
    defaults = {
        "PROBABILITIES": [0.1, 0.2, 0.9, 0.3, 0.4, 0.05],
        "FUSED_LOGITS": [-2.0, -1.4, 2.2, -0.8, -0.4, -2.9],
        "VISUAL_LOGITS": [0.0, 0.0, 0.0, 3.0, 0.0, 0.0],
        "AUDIO_LOGITS": [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        "TEXT_LOGITS": [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        "FACE_SCORES": [0.99, 0.0, 0.97, 0.0][:frames],
        "FRAME_TIMES": [0.0, 0.5, 1.0, 1.5][:frames],
        "DURATION": [2.0], "VIDEO_PRESENT": [True], "AUDIO_PRESENT": [True], "AUDIO_STREAM": [1],
        "TEXT_PRESENT": [True],
        "TRANSCRIPT_USED": [b"I can't believe it"], "TRANSCRIPT_SOURCE": [b"request"],
        "ASR_SECONDS": [0.0], "WEIGHTS": [b"fv2es-iemocap sha256:abc"],
        "LABELS": [label.encode() for label in LABELS],
    }
    defaults.update(values)
    outputs = {}
    for name in contract.ENSEMBLE_OUTPUTS:
        dtype = contract.TENSORS[name].dtype
        array = np.array(defaults[name], dtype=np.object_ if dtype == "bytes" else dtype)
        outputs[name] = array[None] if batch else array
    return outputs


# ---------------------------------------------------------------- tensors

def test_inputs_follow_the_contract():
    inputs = build_inputs(b"\x00video\xff", "hello")
    assert [i.name() for i in inputs] == list(contract.ENSEMBLE_INPUTS)
    for tensor_input in inputs:
        tensor = contract.TENSORS[tensor_input.name()]
        assert tensor_input.datatype() == contract.WIRE_DTYPES[tensor.dtype] == "BYTES"
        assert tensor_input.shape() == [1, 1]
    sent = {i.name(): deserialize_bytes_tensor(i._raw_content)[0] for i in inputs}
    assert sent == {"MEDIA": b"\x00video\xff", "TRANSCRIPT": b"hello"}


def test_absent_transcript_is_sent_empty():
    sent = {i.name(): deserialize_bytes_tensor(i._raw_content)[0] for i in build_inputs(b"v")}
    assert sent["TRANSCRIPT"] == b""


def test_requested_outputs_are_the_contracts():
    assert [o.name() for o in build_outputs()] == list(contract.ENSEMBLE_OUTPUTS)


# ---------------------------------------------------------------- parsing

def test_prediction_from_batched_outputs():
    p = Prediction.from_outputs(ensemble_outputs(), source="clip.mp4")
    assert p.labels == list(LABELS)
    assert p.top_label == "fru" and p.top_probability == pytest.approx(0.9)
    assert p.ranked()[0] == ("fru", pytest.approx(0.9)) and p.ranked()[-1][0] == "sad"
    assert p.label_probabilities["hap"] == pytest.approx(0.3)
    assert list(p.modality_logits) == list(contract.MODALITIES)
    assert p.modality_top_labels == {"text": "ang", "visual": "hap", "audio": "fru"}
    assert p.faces_found == [True, False, True, False]
    assert p.frame_times.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert p.duration == 2.0 and p.video_present and p.audio_present and p.text_present
    assert (p.transcript, p.transcript_source) == ("I can't believe it", "request")
    assert p.weights == "fv2es-iemocap sha256:abc" and not p.untrained
    assert p.warnings == []


def test_batched_and_unbatched_outputs_parse_alike():
    batched = Prediction.from_outputs(ensemble_outputs(batch=True)).to_dict()
    assert Prediction.from_outputs(ensemble_outputs(batch=False)).to_dict() == batched


def test_to_dict_is_json():
    p = Prediction.from_outputs(ensemble_outputs(WEIGHTS=[b"UNTRAINED seed 0"]), source="clip.mp4")
    d = json.loads(json.dumps(p.to_dict()))
    assert d["source"] == "clip.mp4" and d["top_label"] == "fru" and d["untrained"] is True
    assert d["probabilities"]["fru"] == pytest.approx(0.9)
    assert d["modality_logits"]["text"][0] == 5.0
    assert d["faces_found"] == [True, False, True, False]
    assert d["warnings"] == p.warnings


def test_zero_sampled_frames_parse():
    p = Prediction.from_outputs(ensemble_outputs(frames=0, VIDEO_PRESENT=[False]))
    assert p.faces_found == [] and p.frame_times.shape == (0,)


@pytest.mark.parametrize("name", contract.ENSEMBLE_OUTPUTS)
def test_every_output_is_required(name):
    outputs = ensemble_outputs()
    del outputs[name]
    with pytest.raises(ValueError, match=name):
        Prediction.from_outputs(outputs)


def test_outputs_outside_the_contract_are_refused():
    with pytest.raises(ValueError, match="DURATION"):
        Prediction.from_outputs({**ensemble_outputs(), "DURATION": np.zeros((1, 2), np.float32)})
    with pytest.raises(ValueError, match="PROBABILITIES"):
        Prediction.from_outputs({**ensemble_outputs(), "PROBABILITIES": np.zeros((1, 5), np.float32)})
    with pytest.raises(ValueError, match="FACE_SCORES"):
        Prediction.from_outputs({**ensemble_outputs(), "FACE_SCORES": np.zeros((1, 3), np.float32)})


# ---------------------------------------------------------------- warnings

@pytest.mark.parametrize("weights", [b"UNTRAINED seed 0", b"untrained (random init)"])
def test_untrained_weights_are_flagged(weights):
    p = Prediction.from_outputs(ensemble_outputs(WEIGHTS=[weights]))
    assert p.untrained
    assert len(p.warnings) == 1 and p.warnings[0].startswith("UNTRAINED WEIGHTS")


def test_missing_modalities_are_flagged():
    p = Prediction.from_outputs(ensemble_outputs(
        VIDEO_PRESENT=[False], AUDIO_PRESENT=[False], TEXT_PRESENT=[False],
        TRANSCRIPT_USED=[b""], TRANSCRIPT_SOURCE=[b"recognition"]))
    text = " | ".join(p.warnings)
    assert "no video stream" in text and "no audio track" in text
    assert "text left out: the transcript is empty (source: recognition)" in text
    assert p.modality_top_labels == {"text": None, "visual": None, "audio": None}


def test_no_face_in_any_frame_is_flagged():
    p = Prediction.from_outputs(ensemble_outputs(FACE_SCORES=[0.0, 0.0, 0.0, 0.0]))
    assert p.warnings == ["no face found in any of the 4 sampled frames: the visual modality saw centre crops"]


def test_no_transcript_and_no_recognition_is_flagged():
    p = Prediction.from_outputs(ensemble_outputs(TEXT_PRESENT=[False], TRANSCRIPT_USED=[b""],
                                                 TRANSCRIPT_SOURCE=[b"none"]))
    assert p.warnings == ["text left out: no transcript was sent and the server recognised no speech"]


# ---------------------------------------------------------------- local checks

def test_read_media_checks_files(tmp_path, monkeypatch):
    with pytest.raises(InvalidInput, match="no such file"):
        read_media(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty file"):
        read_media(tmp_path / "empty.mp4")
    with pytest.raises(InvalidInput, match="empty file"):
        read_media(b"")
    (tmp_path / "big.mp4").write_bytes(b"x" * 11)
    monkeypatch.setattr(contract, "MAX_MEDIA_BYTES", 10)
    with pytest.raises(InvalidInput, match="over the 10 byte limit"):
        read_media(tmp_path / "big.mp4")
    with pytest.raises(InvalidInput, match="over the 10 byte limit"):
        read_media(b"x" * 11)
    assert read_media(b"x" * 10) == (b"x" * 10, "<10 bytes>")


def test_local_errors_come_before_the_network(tmp_path):
    client = Fv2esClient(f"127.0.0.1:{closed_port()}", retries=0)
    with pytest.raises(InvalidInput, match="no such file"):
        client.predict(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    results = client.predict_many([tmp_path / "missing.mp4", b"video", tmp_path / "empty.mp4"], concurrency=2)
    assert [type(r) for r in results] == [InvalidInput, ServerUnreachable, InvalidInput]
    assert "empty.mp4: empty file" in str(results[2])


def test_unreachable_server_is_retried_with_backoff():
    url = f"127.0.0.1:{closed_port()}"
    client = Fv2esClient(url, retries=2, retry_backoff_s=0.2)
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match=f"server not reachable at {url}"):
        client.predict(b"video")
    assert 0.6 <= time.monotonic() - start < 10      # backoff 0.2 s then 0.4 s


def test_wait_ready_gives_up_on_a_closed_port():
    url = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match=url):
        Fv2esClient(url).wait_ready(timeout_s=1.0, poll_s=0.2)
    assert 1.0 <= time.monotonic() - start < 10


def test_missing_tls_file_is_a_clear_error(tmp_path):
    with pytest.raises(Fv2esError, match="cannot read TLS file for h:1: .*ca.pem"):
        Fv2esClient("h:1", ssl=True, root_certificates=tmp_path / "ca.pem")


@pytest.mark.parametrize("status, message, kind", [
    ("StatusCode.INVALID_ARGUMENT", "in ensemble 'fv2es', empty file", InputRejected),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'fv2es' is not found", ModelNotReady),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'fv2es' has no available versions", ModelNotReady),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnreachable),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", Timeout),
    ("StatusCode.INTERNAL", "in ensemble 'fv2es', decoder crashed", ServerError),
])
def test_server_errors_map_to_the_client_errors(status, message, kind):
    client = Fv2esClient("triton.example:8001")
    error = client._convert(InferenceServerException(message, status=status), "clip.mp4")
    assert type(error) is kind
    assert "triton.example:8001" in str(error)
    assert error.status == status
    if kind is not Timeout:
        assert error.server_message == message and message in str(error)


# ---------------------------------------------------------------- CLI

def test_cli_arguments():
    args = cli.build_parser().parse_args(
        ["predict", "a.mp4", "b.mp4", "--url", "h:9", "--transcript", "hi", "--json", "--concurrency", "2",
         "--timeout", "5", "--ssl", "--root-certificates", "ca.pem"])
    assert args.files == ["a.mp4", "b.mp4"] and args.url == "h:9" and args.transcript == "hi"
    assert args.json and args.concurrency == 2 and args.timeout == 5.0
    assert args.ssl and args.root_certificates == "ca.pem" and args.private_key is None
    args = cli.build_parser().parse_args(["health"])
    assert args.command == "health" and args.url == "localhost:8001" and args.model == contract.ENSEMBLE


@pytest.mark.parametrize("argv", [["predict"], [], ["predict", "a.mp4", "--concurrency", "0"]])
def test_cli_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2


def test_cli_text_output_shows_what_matters():
    p = Prediction.from_outputs(ensemble_outputs(WEIGHTS=[b"UNTRAINED seed 0"], AUDIO_PRESENT=[False]),
                                source="clip.mp4")
    text = cli.format_prediction(p)
    assert text.startswith("clip.mp4")
    assert "UNTRAINED WEIGHTS" in text and "(left out)" in text
    assert "fru 0.900" in text and "2 of 4 sampled frames" in text and "I can't believe it" in text


@pytest.mark.parametrize("command", ["predict", "health"])
def test_cli_fails_fast_when_the_server_is_unreachable(tmp_path, command):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really a video")
    url = f"127.0.0.1:{closed_port()}"
    argv = [sys.executable, "-m", "fv2es_client.cli", command, "--url", url]
    start = time.monotonic()
    run = subprocess.run(argv + ([str(video)] if command == "predict" else []),
                         capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert run.returncode == cli.EXIT_SERVER
    assert f"error: server not reachable at {url}" in run.stderr
    assert run.stdout == ""


def test_client_imports_without_torch():
    code = "import sys, fv2es_client, fv2es_client.client, fv2es_client.cli; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
