"""Checkpoints: the authors' state dicts (multi-branch and fused) and our safetensors format.

The authors' state dict is built here from a description of their MME2E module (key names
and shapes as their code declares them), not from our model, so a drift in our key layout
fails these tests. The ALBERT part is a tiny AlbertConfig: small and offline.
"""
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from authors_reference import authors_state_dict
from builders.export_onnx import dummy_inputs
from fv2es.checkpoint import (
    AUTHORS_TRANS_HEADS, CheckpointError, ModelSource, default_model, load_checkpoint, save_checkpoint,
    served_identity,
)
from fv2es.model import ModelConfig
from fv2es.model.text import encode, load_tokenizer
from fv2es.preprocessing import PRESETS, Preprocessing

DROPPED = ("mtcnn.", "A.0.head.", "T.albert.embeddings.position_ids")


@pytest.fixture(scope="module")
def authors_files(tmp_path_factory, albert_dir):
    """{fused: (path, state)}: a multi-branch .pt and a fused .safetensors."""
    folder = tmp_path_factory.mktemp("authors")
    branches = authors_state_dict(albert_dir, fused=False, seed=1)
    torch.save(branches, folder / "mme2e_tav_Acc_0.8477_seed0.pt")
    fused = authors_state_dict(albert_dir, fused=True, seed=2)
    save_file({k: v.contiguous() for k, v in fused.items()}, folder / "deployed.safetensors")
    return {False: (folder / "mme2e_tav_Acc_0.8477_seed0.pt", branches),
            True: (folder / "deployed.safetensors", fused)}


def assert_loaded(model, state):
    loaded = model.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    assert set(loaded) == set(kept)
    for name, tensor in kept.items():
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), name


def sha12(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("fused", [False, True])
def test_authors_state_dict_loads(authors_files, albert_dir, fused):
    path, state = authors_files[fused]
    with pytest.warns(UserWarning, match="iemocap6"):   # 6 classes fit both label sets
        model = load_checkpoint(path, text_backbone_path=albert_dir)
    assert_loaded(model, state)
    assert model.config.text_backbone == "albert" and model.config.fused == fused
    assert model.config.label_set == "iemocap6" and not model.training
    assert model.weights_id == f"checkpoint {path.name} sha256:{sha12(path)}"
    assert any(".rbr_reparam." in k for k in model.state_dict()) == fused
    with torch.no_grad():
        logits = model.visual_net()(*dummy_inputs("visual", batch=2, frames=3))
        text = model.text_net()(torch.tensor([[2, 4, 5, 6, 3]]), torch.ones(1, 5, dtype=torch.int64))
    assert logits.shape == (2, 6) and torch.isfinite(logits).all() and text.shape == (1, 6)


def text_only_file(folder, albert_dir, classes):
    """Enough of an authors' file for the checks made before the model is built."""
    state = {k: v for k, v in authors_state_dict(albert_dir, fused=False).items()
             if k.startswith("T.") or k == "v_out.weight"}
    state["v_out.weight"] = torch.zeros(classes, 64)
    torch.save(state, folder / f"{classes}.pt")
    return folder / f"{classes}.pt"


def test_authors_file_checks(tmp_path, albert_dir):
    with pytest.raises(CheckpointError, match="4 classes fit no label set"):
        load_checkpoint(text_only_file(tmp_path, albert_dir, 4), text_backbone_path=albert_dir)
    with pytest.raises(CheckpointError, match="ALBERT text encoder .*pass text_backbone_path"):
        load_checkpoint(text_only_file(tmp_path, albert_dir, 6))


def test_key_errors_name_the_keys(tmp_path, authors_files, albert_dir):
    state = dict(authors_files[False][1])
    del state["v_out.bias"]
    state["V.99.weight"] = torch.zeros(1)
    state["a_out.weight"] = torch.zeros(6, 65)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, text_backbone_path=albert_dir, label_set="iemocap6")
    message = str(error.value)
    assert "1 missing: v_out.bias" in message
    assert "1 unexpected: V.99.weight" in message
    assert "a_out.weight (6, 65) (model: (6, 64))" in message


def test_non_tensor_pickles_are_refused(tmp_path):
    path = tmp_path / "stats.pt"
    torch.save({"epoch": 3, "args": {"lr": 1e-4}}, path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_checkpoint(path)


def test_our_checkpoint_round_trip(tmp_path, authors_files, albert_dir):
    model = load_checkpoint(authors_files[False][0], text_backbone_path=albert_dir, label_set="mosei6")
    assert model.config.labels == ("anger", "disgust", "fear", "happy", "sad", "surprise")
    path = save_checkpoint(model, tmp_path / "ours")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "text_backbone"]
    assert sorted(p.name for p in (path / "text_backbone").iterdir()) == ["config.json", "tokenizer.json"]
    document = json.loads((path / "config.json").read_text())
    assert document["format"] == 1 and document["model"]["text_backbone"] == "albert"
    assert document["model"]["text_backbone_path"] is None   # the checkpoint carries its own copy

    loaded = load_checkpoint(path)
    assert_loaded(loaded, model.state_dict())
    assert loaded.config == ModelConfig(label_set="mosei6", text_backbone="albert",
                                        text_backbone_path=str(path / "text_backbone"))
    assert loaded.weights_id == f"checkpoint ours sha256:{sha12(path / 'model.safetensors')}"
    ids, _ = encode(load_tokenizer(loaded.config), "i am happy")
    assert ids.tolist() == [2, 4, 5, 6, 3]
    inputs = dummy_inputs("audio_pieces", batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.audio_pieces_net()(*inputs), model.audio_pieces_net()(*inputs),
                                   rtol=0, atol=0)

    # Same weights, same bytes (the repository manifest hashes files).
    again = save_checkpoint(loaded, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_untrained_default_stays_labelled_untrained(tmp_path, albert_dir):
    config = ModelConfig(text_backbone="albert", text_backbone_path=str(albert_dir), fused=True)
    model = default_model(config, seed=3)
    assert model.config.fused
    path = save_checkpoint(model, tmp_path / "untrained")
    loaded = load_checkpoint(path / "model.safetensors")     # the file form finds its directory
    assert loaded.weights_id == model.weights_id
    assert loaded.weights_id.startswith("UNTRAINED") and "seed 3" in loaded.weights_id
    assert_loaded(loaded, model.state_dict())


def test_authors_files_load_with_the_authors_preprocessing_and_heads(authors_files, albert_dir):
    model = load_checkpoint(authors_files[False][0], text_backbone_path=albert_dir, label_set="iemocap6")
    assert model.preprocessing == PRESETS["authors"]
    assert (model.config.trans_dim, model.config.trans_layers, model.config.trans_heads) == (64, 4, AUTHORS_TRANS_HEADS)
    identity = served_identity(model)
    assert identity.startswith(model.weights_id + " | ")
    assert "transformers 4 layers x 4 heads, width 64, text albert" in identity
    assert identity.endswith("| preprocessing: authors")


def test_heads_come_from_the_option_and_change_the_answer(authors_files, albert_dir):
    path = authors_files[False][0]
    four = load_checkpoint(path, text_backbone_path=albert_dir, label_set="iemocap6")
    eight = load_checkpoint(path, text_backbone_path=albert_dir, label_set="iemocap6", trans_heads=8)
    assert eight.config.trans_heads == 8 and "x 8 heads" in served_identity(eight)
    inputs = dummy_inputs("audio_clip", batch=2)
    with torch.no_grad():
        assert not torch.allclose(four.audio_clip_net()(*inputs), eight.audio_clip_net()(*inputs), atol=1e-4)
    with pytest.raises(CheckpointError, match="5 attention heads do not divide the transformers' width 64"):
        load_checkpoint(path, text_backbone_path=albert_dir, label_set="iemocap6", trans_heads=5)


def test_width_and_depth_come_from_the_tensors(tmp_path, albert_dir):
    path = tmp_path / "wide.pt"
    torch.save(authors_state_dict(albert_dir, fused=False, width=128, layers=2), path)
    model = load_checkpoint(path, text_backbone_path=albert_dir, label_set="iemocap6", trans_heads=8)
    assert (model.config.trans_dim, model.config.trans_layers, model.config.trans_heads) == (128, 2, 8)


def test_our_checkpoints_record_preprocessing_and_heads(tmp_path):
    model = ModelSource(trans_heads=8, preprocessing="frame_sampling=every-15th-frame,audio_channel=left").load()
    assert model.config.trans_heads == 8
    assert model.preprocessing == Preprocessing(frame_sampling="every-15th-frame", audio_channel="left")
    path = save_checkpoint(model, tmp_path / "ours")
    document = json.loads((path / "config.json").read_text())
    assert document["preprocessing"] == {"face_resize": "opencv-area", "no_face_crop": "centre",
                                         "frame_sampling": "every-15th-frame", "audio_channel": "left"}
    loaded = load_checkpoint(path)
    assert loaded.preprocessing == model.preprocessing and loaded.config.trans_heads == 8
    assert "preprocessing: face_resize=opencv-area, no_face_crop=centre, frame_sampling=every-15th-frame, " \
           "audio_channel=left" in served_identity(loaded)
    with pytest.raises(CheckpointError, match="records trans_heads=8, not the 4 asked for"):
        load_checkpoint(path, trans_heads=4)
    # A checkpoint written before preprocessing was recorded was made with our defaults.
    del document["preprocessing"]
    (path / "config.json").write_text(json.dumps(document))
    assert load_checkpoint(path).preprocessing == PRESETS["ours"]
    # The option overrides what is recorded (a preset, or fields over the recorded ones).
    assert ModelSource(str(path), preprocessing="authors").load().preprocessing == PRESETS["authors"]
    assert ModelSource(str(path), preprocessing="no_face_crop=authors").load().preprocessing == \
        Preprocessing(no_face_crop="authors")


@pytest.mark.parametrize("spec,message", [("frame_sampling=every-frame", "frame_sampling='every-frame'"),
                                          ("colour=rgb", "field=value with a field among"),
                                          ("fastest", "expected a preset")])
def test_bad_preprocessing_options_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        ModelSource(preprocessing=spec).load()
