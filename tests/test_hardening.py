"""Hostile requests on the real served graph: each ends in a clear INVALID_ARGUMENT or an
answer, never a crash, a hang or a file read on the server; the server keeps serving.

Files are made in the test (tests/media_factory.py). The fuzz test mutates real clips from
a fixed seed; benchmarks/fuzz_soak.py runs the long version with memory sampled.
"""
from __future__ import annotations

import json
import struct
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from fv2es_client import InputRejected
from fv2es_client.client import build_inputs, build_outputs
from fv2es_client.contract import ENSEMBLE, ENSEMBLE_OUTPUTS

import media_factory as factory
from benchmarks.fuzzing import fuzz_sources, mutants, outcome

pytestmark = pytest.mark.server
TRANSCRIPT = "I can't believe you did that"


def http_infer(server, media: bytes, timeout=300) -> tuple[int, dict]:
    """POST MEDIA to the ensemble over HTTP with the binary tensor extension."""
    payload = struct.pack("<I", len(media)) + media
    header = json.dumps({"inputs": [{"name": "MEDIA", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(payload)}}],
                         "outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": False}}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{ENSEMBLE}/infer", data=header + payload,
                                     headers={"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def rejected(client, media, match: str):
    with pytest.raises(InputRejected, match=match) as caught:
        client.predict(media, transcript=TRANSCRIPT)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    return str(caught.value)


@pytest.fixture(scope="module")
def big_clip(tmp_path_factory):
    """A real clip over 5 MiB: 4 s of 1280x720 MJPEG (textured, so it compresses little)
    with PCM audio."""
    path = factory.make_clip(tmp_path_factory.mktemp("big") / "big.avi", "avi", "mjpeg", "pcm_s16le", 4.0,
                             size=(1280, 720), fps=30, face=False)
    assert path.stat().st_size >= 5 * 2 ** 20, path.stat().st_size
    return path


def test_http_requests_over_5_mib_are_answered(server, big_clip):
    # Triton issue 5840: HTTP requests of about 4 MiB and more crashed tritonserver 2.51.
    status, body = http_infer(server, big_clip.read_bytes())
    assert status == 200 and len(body["outputs"][0]["data"]) == 6, body
    status, body = http_infer(server, np.random.default_rng(0).bytes(6 * 2 ** 20))
    assert status == 400 and "not a media file" in body["error"]
    assert server.is_alive() and server.is_ready()


def test_ffconcat_naming_a_server_file_is_refused(client, server, repository):
    # The server runs in the repository's parent folder in production; aim at a real file.
    target = next(repository.glob("*/1/*.onnx"))
    for name in (str(target), str(target.relative_to(repository.parent)), target.name):
        rejected(client, factory.ffconcat_list(name), "decode_video: refused: an ffconcat list")


def test_sdp_description_opens_no_socket(client, server):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rejected(client, factory.sdp_description(port), "refused: an SDP session description")
    udp = [c for p in psutil.Process(server.process.pid).children(recursive=True) + [psutil.Process(server.process.pid)]
           for c in p.net_connections(kind="udp")]
    assert not udp, udp


def test_gif_bomb_is_refused_with_the_limit(client, server):
    message = rejected(client, factory.gif_bomb(), "frame 16000x16000 exceeds the 8192x8192 limit")
    assert message.endswith("in ensemble 'fv2es', decode_video: frame 16000x16000 exceeds the 8192x8192 limit")


def test_lying_duration_is_refused_while_decoding(client, tmp_path):
    clip = factory.make_lying_duration(tmp_path / "lying.mkv", seconds=660.0, declared=5.0)
    rejected(client, clip, "audio too long: more than 600 s decoded")


def test_missing_media_is_refused_and_nothing_hangs(server, face_clip):
    """Without MEDIA Triton answers itself (the ensemble requires it): a request with no
    input is named "missing required input(s) ['MEDIA']"; one with TRANSCRIPT alone gets
    INVALID_ARGUMENT from the ensemble. Each of these, repeated concurrently, once deadlocked
    2.51's gRPC server when MEDIA was optional: the server must keep answering."""
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    transcript = grpcclient.InferInput("TRANSCRIPT", [1, 1], "BYTES")
    transcript.set_data_from_numpy(np.array([[b"hello"]], dtype=object))

    def send(inputs):
        try:
            raw.infer(ENSEMBLE, inputs, client_timeout=60)
        except grpcclient.InferenceServerException as error:
            return error.status(), error.message()
        return "answered", ""

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, [[transcript], []] * 20))
    for (status, message), inputs in zip(results, [[transcript], []] * 20):
        assert status == "StatusCode.INVALID_ARGUMENT", (status, message)
        assert ("missing required input(s) ['MEDIA']" in message) if not inputs else ("ensemble" in message)
    assert raw.infer(ENSEMBLE, build_inputs(face_clip.read_bytes(), TRANSCRIPT), client_timeout=120)


@pytest.mark.parametrize("subset", [("PROBABILITIES",), ("AUDIO_STREAM", "LABELS"), ("VISUAL_LOGITS",),
                                    ("TRANSCRIPT_USED", "FACE_SCORES")])
def test_any_subset_of_the_outputs(server, face_clip, subset):
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = build_inputs(face_clip.read_bytes(), TRANSCRIPT)
    full = raw.infer(ENSEMBLE, inputs, outputs=build_outputs())
    part = raw.infer(ENSEMBLE, inputs, outputs=[grpcclient.InferRequestedOutput(name) for name in subset])
    assert {o.name for o in part.get_response().outputs} == set(subset)
    for name in subset:
        np.testing.assert_array_equal(part.as_numpy(name), full.as_numpy(name))
    assert set(ENSEMBLE_OUTPUTS) >= set(subset)


def test_the_audio_track_with_words_is_used(client, tmp_path):
    clip = factory.make_two_audio_tracks(tmp_path / "two.mkv", "silence", "speech", default=None)
    prediction = client.predict(clip, transcript=TRANSCRIPT)
    assert prediction.audio_present and prediction.audio_stream == 1


def _stub(server, model: str) -> psutil.Process:
    """The python backend stub process that runs MODEL (its command line names the model's folder)."""
    for process in psutil.Process(server.process.pid).children(recursive=True):
        if any(f"/{model}/" in part or part.endswith(f"/{model}") for part in process.cmdline()):
            return process
    raise LookupError(model)


def _peak_rss_mb(process: psutil.Process) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise LookupError("VmHWM")


@pytest.mark.slow
def test_long_audio_keeps_the_audio_encoder_bounded(client, server, tmp_path):
    # 150 s of audio: 375 mel pieces, which the unchunked NesT took ~3.3 GB for (9.5 min: 12.5 GB).
    clip = factory.make_clip(tmp_path / "long.wav", "wav", None, "pcm_s16le", 150.0, audio="speech",
                             audio_rate=16_000, audio_channels=1)
    encoder = _stub(server, "audio_encoder")
    client.predict(clip, transcript=TRANSCRIPT)
    assert _peak_rss_mb(encoder) < 1500, _peak_rss_mb(encoder)
    after = encoder.memory_info().rss / 2 ** 20
    assert after < 1000, after   # no request-sized arena kept


def test_fuzzed_files_get_answers_or_invalid_argument(client, server, face_clip, tmp_path):
    """A few hundred mutants of H.264/AAC mp4 and VP9/Opus webm, concurrency 4, each with a
    time limit: every request ends in an answer or INVALID_ARGUMENT, none hangs."""
    sources = fuzz_sources(tmp_path)
    files = list(mutants([path.read_bytes() for path in sources], count=240, seed=20261201))
    raw = grpcclient.InferenceServerClient(server.grpc_url)

    def send(media):
        return outcome(raw, media, TRANSCRIPT, timeout_s=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, files))
    kinds = {kind for kind, _ in results}
    assert kinds <= {"answer", "invalid"}, [r for r in results if r[0] not in ("answer", "invalid")][:5]
    assert "answer" in kinds and "invalid" in kinds     # the mutants reach both ends
    # Afterwards a good clip is answered over gRPC and over HTTP.
    assert client.predict(face_clip, transcript=TRANSCRIPT).labels
    status, body = http_infer(server, face_clip.read_bytes())
    assert status == 200, body
