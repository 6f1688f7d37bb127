"""The benchmark code (benchmarks/), fast and on CPU: the eager baseline gives the product's
answer, the result writers, the perf_analyzer input file, the statistics arithmetic.

The benchmarks themselves are measurements, not tests: `make bench` runs them.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import struct

import numpy as np
import pytest
from fv2es_client.contract import ENSEMBLE, MODALITIES

from benchmarks import compare, perf_suite
from fv2es.serving.perf_analyzer import write_input_data
from fv2es.serving.tritonserver import free_ports

# The baseline runs multi-branch RepVGG and MTCNN frame by frame, the predictor fused
# blocks and batched frames: the same arithmetic up to float32 rounding.
PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def eager_and_predictor():
    from benchmarks.eager_baseline import EagerBaseline
    from fv2es.predictor import Predictor

    return EagerBaseline(), Predictor()


@pytest.mark.parametrize("clip, transcript", [
    ("face_clip", "I can't believe this happened again."),
    ("face_clip", ""),                   # no words: the text modality is left out
    ("video_only_clip", "Well, maybe."),  # no audio stream: the audio modality is left out
])
def test_eager_baseline_gives_the_predictors_answer(eager_and_predictor, clip, transcript, request):
    from fv2es.model.repvgg import RepVGGBlock

    eager, predictor = eager_and_predictor
    assert all(not block.fused for block in eager.model.modules() if isinstance(block, RepVGGBlock))
    media = request.getfixturevalue(clip).read_bytes()
    expected = predictor.predict(media, transcript).tensors
    got = eager.predict(media, transcript)
    np.testing.assert_allclose(got.probabilities, expected["PROBABILITIES"], rtol=0, atol=PROBABILITY_TOLERANCE)
    for modality in MODALITIES:
        np.testing.assert_allclose(got.modality_logits[modality], expected[f"{modality.upper()}_LOGITS"],
                                   rtol=0, atol=PROBABILITY_TOLERANCE, err_msg=modality)
    assert {"decode_video", "detect_faces", "audio_encoder", "text_encoder", "fusion"} <= set(got.timings)


def test_input_data_file_is_perf_analyzers_bytes_format(tmp_path, face_clip):
    media = face_clip.read_bytes()
    path = write_input_data(tmp_path / "input.json", [{"MEDIA": media, "TRANSCRIPT": "hello"}])
    entry, = json.loads(path.read_text())["data"]
    for name, payload in (("MEDIA", media), ("TRANSCRIPT", b"hello")):
        raw = base64.b64decode(entry[name]["b64"])
        assert entry[name]["shape"] == [1]
        # Triton's BYTES wire format: 4-byte little-endian length, then the bytes.
        assert struct.unpack("<I", raw[:4])[0] == len(payload) and raw[4:] == payload


def test_markdown_table_aligns_numbers_and_rounds():
    text = perf_suite.markdown_table(["system", "clips/s", "rss MB"], [["eager", 0.12345, 2383.4], ["served", 1.5, 9.0]])
    lines = text.splitlines()
    assert lines[0] == "| system | clips/s | rss MB |"
    assert lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| eager | 0.123 | 2383 |"


def test_csv_has_every_column_of_every_row(tmp_path):
    path = perf_suite.write_csv(tmp_path / "rows.csv", [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"a": "1", "b": "2.5", "c": ""}, {"a": "3", "b": "", "c": "x"}]


def test_perf_analyzer_report_keeps_gpu_metric_cells_as_text(tmp_path):
    path = tmp_path / "report.csv"
    path.write_text("Concurrency,Inferences/Second,p99 latency,Avg GPU Utilization\n"
                    "1,0.5,2000000,GPU-1234:0.83;\n")
    row, = perf_suite.read_report(path)
    assert row == {"Concurrency": 1.0, "Inferences/Second": 0.5, "p99 latency": 2e6, "Avg GPU Utilization": "GPU-1234:0.83;"}
    png = perf_suite.plot_throughput_latency([row], tmp_path / "plot.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _model(name, clips, executions, batch_compute_ns, queue_ns, success_ns=0):
    # Triton's JSON: uint64 as strings, zero fields left out.
    return {"name": name, "inference_count": str(clips), "execution_count": str(executions),
            "inference_stats": {"queue": {"count": str(clips), "ns": str(int(queue_ns))},
                                "success": {"count": str(clips), "ns": str(int(success_ns))}},
            "batch_stats": [{"batch_size": str(size), "compute_infer": {"count": "1", "ns": str(int(ns))}}
                            for size, ns in batch_compute_ns]}


def test_stage_breakdown_counts_a_batch_once():
    before = {"audio_encoder": _model("audio_encoder", 1, 1, [(1, 3e9)], 0)}
    after = {"audio_encoder": _model("audio_encoder", 9, 3, [(1, 3e9), (4, 8e9), (4, 8e9)], 4e9),
             "detect_faces": _model("detect_faces", 8, 8, [(1, 8e9)], 0),
             ENSEMBLE: _model(ENSEMBLE, 8, 8, [], 0, success_ns=40e9),
             "idle": _model("idle", 0, 0, [], 0)}
    rows = {r["model"]: r for r in perf_suite.stage_breakdown(before, after)}
    assert set(rows) == {"audio_encoder", "detect_faces", ENSEMBLE}
    audio = rows["audio_encoder"]
    assert (audio["clips"], audio["executions"], audio["avg_batch"]) == (8, 2, 4.0)
    assert audio["compute_ms_per_clip"] == pytest.approx(16e9 / 8 / 1e6)
    assert audio["queue_ms"] == pytest.approx(4e9 / 8 / 1e6)
    assert rows[ENSEMBLE]["compute_ms_per_clip"] == pytest.approx(5000.0)
    assert perf_suite.bottleneck(list(rows.values()))["model"] == "audio_encoder"


def test_agreement_counts_top_labels_and_largest_differences():
    logits = {m: np.array([0.0, 1.0, 0.0]) for m in MODALITIES}
    reference = [(np.array([0.1, 0.9, 0.2]), logits), (np.array([0.6, 0.5, 0.1]), logits)]
    candidate = [(np.array([0.1, 0.8, 0.2]), logits), (np.array([0.4, 0.5, 0.1]), {**logits, "audio": np.array([2.0, 1.0, 0.0])})]
    result = compare.agreement(reference, candidate)
    assert result["clips"] == 2 and result["top_label_agreement"] == 0.5
    assert result["max_abs_prob_diff"] == pytest.approx(0.2)
    assert result["audio_top_agreement"] == 0.5 and result["audio_max_abs_logit_diff"] == pytest.approx(2.0)
    assert result["text_top_agreement"] == 1.0 and result["text_max_abs_logit_diff"] == 0.0


def test_goals_are_judged_on_the_best_level_of_every_config():
    rows = [{"config": "a", "system": "served cpu fp32", "speedup_vs_eager": r} for r in (1.2, 1.6)] + \
           [{"config": "b", "system": "served cpu fp32", "speedup_vs_eager": 1.4},
            {"config": "a", "system": "served cpu int8", "speedup_vs_eager": 3.5},
            {"config": "b", "system": "served cpu int8", "speedup_vs_eager": 3.1}]
    fp32, int8 = compare.goal_lines(rows, ["served cpu fp32", "served cpu int8"],
                                    {"top_label_agreement": 0.98, "clips": 50}, {"a": 1.7, "b": 1.25})
    assert "NOT met" in fp32 and "a 1.60x" in fp32 and "b 1.40x" in fp32
    assert fp32.endswith("a 1.70x, b 1.25x") and "bound" not in int8
    assert ">= 3.0x the eager baseline's clips/s: met" in int8 and "98.0% on 50 clips" in int8
    assert int8.endswith("NOT met)")


def test_closed_loop_counts_failures(tmp_path):
    port, = free_ports(1)     # nothing listens there
    load = perf_suite.closed_loop(f"127.0.0.1:{port}", [(b"not sent", "")], 2, count=3)
    assert load.count == 3 and len(load.errors) == 3 and not load.latencies
    assert all("ServerUnreachable" in error for error in load.errors)


def test_monitor_samples_memory_and_other_load():
    with perf_suite.Monitor(os.getpid(), interval=0.05) as monitor:
        np.ones(10_000_000).sum()   # ~80 MB for a moment
    assert monitor.peak > 50e6 and monitor.samples
    assert monitor.others_cores >= 0.0
