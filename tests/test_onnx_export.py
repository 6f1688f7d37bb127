"""ONNX export: every network of the contract, with dynamic axes, matches PyTorch at sizes
other than the ones it was exported with.

Tolerance: |onnx - torch| <= 1e-5 + 1e-4 * |torch| elementwise (atol 1e-5 for logits and
probabilities of order 1).
"""
import onnx
import pytest
import torch
from fv2es.parity import TOLERANCE
from fv2es_client.contract import NETWORKS

from builders.export_onnx import DUMMY_AXIS_SIZES, check_parity, dummy_inputs, export_network
from fv2es.checkpoint import default_model
from fv2es.mtcnn import ONet, PNet, RNet

RTOL, ATOL = 1e-4, 1e-5

# Two runs per network, each differing from the export's batch 2 and DUMMY_AXIS_SIZES.
RUNS = {
    "visual": [dict(batch=1, frames=5), dict(batch=3, frames=2)],
    "audio_pieces": [dict(batch=1), dict(batch=3)],                # NesT: ~11 GFLOP a piece
    "audio_clip": [dict(batch=1, pieces=3), dict(batch=3, pieces=1)],
    "text": [dict(batch=1, tokens=12), dict(batch=3, tokens=4)],
    "fusion": [dict(batch=1), dict(batch=5)],
    "pnet": [dict(batch=1, height=30, width=44), dict(batch=3, height=64, width=50)],
    "rnet": [dict(batch=1), dict(batch=7)],
    "onet": [dict(batch=1), dict(batch=4)],
}


@pytest.fixture(scope="module")
def networks():
    model = default_model()
    torch.manual_seed(0)
    mtcnn = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    return {**model.networks(), **{name: net.eval() for name, net in mtcnn.items()}}


def test_runs_differ_from_export_sizes():
    for runs in RUNS.values():
        for run in runs:
            assert run["batch"] != 2
            assert all(run[axis] != DUMMY_AXIS_SIZES[axis] for axis in run if axis != "batch")


def declared_dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(RUNS))
def test_export_matches_torch(networks, tmp_path, name):
    path = export_network(networks[name], name, tmp_path / f"{name}.onnx")
    graph = onnx.load(str(path)).graph
    spec = NETWORKS[name]
    declared = {**spec["inputs"], **spec["outputs"]}
    for value in [*graph.input, *graph.output]:
        assert declared_dims(value) == list(declared[value.name][1]), value.name
    for seed, sizes in enumerate(RUNS[name], start=1):
        check_parity(networks[name], path, dummy_inputs(name, seed=seed, **sizes), rtol=RTOL, atol=ATOL)


def test_export_is_deterministic(networks, tmp_path):
    first = export_network(networks["visual"], "visual", tmp_path / "a.onnx").read_bytes()
    second = export_network(networks["visual"], "visual", tmp_path / "b.onnx").read_bytes()
    assert first == second


def test_parity_check_catches_a_difference(networks, tmp_path):
    path = export_network(networks["fusion"], "fusion", tmp_path / "fusion.onnx")
    model = networks["fusion"].model
    with torch.no_grad():
        model.weighted_fusion.weight.add_(0.1)
    try:
        with pytest.raises(AssertionError, match="logits"):
            check_parity(networks["fusion"], path, dummy_inputs("fusion"))
    finally:
        with torch.no_grad():
            model.weighted_fusion.weight.sub_(0.1)


# --- the int8 build (builders.build_repository --precision int8) --------------------------------
# Dynamic int8 quantisation of the encoders' Linear weights: not fp32 parity, a stated bound
# (fv2es.parity), on random inputs and on inputs preprocessed from real media.
INT8_TOLERANCE = TOLERANCE["int8"]


def real_inputs(clip_path, model) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each encoder's inputs (batch of 1) preprocessed from a real clip, as the served steps do."""
    from fv2es import features, media
    from fv2es.model.text import encode, load_tokenizer
    from fv2es.mtcnn import detect_faces, load_mtcnn_nets, torch_runner

    data = clip_path.read_bytes()
    frames = media.decode_video(data).frames
    boxes, scores = detect_faces(frames, torch_runner(load_mtcnn_nets()))
    faces = torch.from_numpy(features.crop_faces(frames, boxes, scores)).float()[None]
    pieces = torch.from_numpy(features.mel_pieces(media.decode_audio(data).samples)).float()[None]
    ids, mask = encode(load_tokenizer(model.config), "Well, I don't know, maybe we should wait.")
    with torch.no_grad():
        items = model.audio_items(pieces[0])[None]
    return {"visual": (faces, torch.ones(faces.shape[:2], dtype=torch.bool)),
            "audio_pieces": (pieces[0],),
            "audio_clip": (items, torch.ones(items.shape[:2], dtype=torch.bool)),
            "text": (torch.from_numpy(ids)[None], torch.from_numpy(mask)[None])}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_int8_encoders_stay_close_to_torch(networks, tmp_path, face_clip):
    import numpy as np
    import onnxruntime as ort

    from builders.build_repository import INT8_NETWORKS, quantize_encoders

    paths = {name: export_network(networks[name], name, tmp_path / f"{name}.onnx") for name in INT8_NETWORKS}
    quantize_encoders(paths)
    sessions = {}
    for name, path in paths.items():
        assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(path)).graph.node), name
        sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(name, *inputs):
        return sessions[name].run(None, dict(zip(NETWORKS[name]["inputs"], (np.asarray(t) for t in inputs))))[0]

    # The bound is on the encoders' logits: the audio encoder is its two networks in a row.
    model = networks["text"].model
    real = real_inputs(face_clip, model)
    audio_real = real["audio_pieces"][0][None], real["audio_clip"][1]     # [1, P, 4, 32, 32] and its mask
    cases = {"visual": [dummy_inputs("visual", seed=1, **RUNS["visual"][0]), real["visual"]],
             "audio": [(torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)) ** 2,
                        torch.tensor([[True, True, True], [True, False, False]])), audio_real]}
    for encoder, runs in cases.items():
        for inputs in runs:
            with torch.no_grad():
                want = getattr(model, f"{encoder}_net")()(*inputs).numpy()
            if encoder == "audio":
                pieces, mask = inputs
                items = run("audio_pieces", pieces.reshape(-1, 4, 32, 32)).reshape(*mask.shape, -1)
                got = run("audio_clip", items, mask)
            else:
                got = run(encoder, *inputs)
            error = np.abs(got - want).max() / np.abs(want).max()
            assert 0 < error <= INT8_TOLERANCE, (encoder, error)

