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
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import AlbertConfig, AlbertModel

from builders.export_onnx import dummy_inputs
from fv2es.checkpoint import CheckpointError, default_model, load_checkpoint, save_checkpoint
from fv2es.model import ModelConfig
from fv2es.model.text import encode, load_tokenizer

REPVGG = {4: (64, 64), 5: (64, 64), 6: (64, 128), 8: (128, 256), 10: (256, 512)}   # V index: in, out
NEST_DIMS, NEST_DEPTHS, NEST_BLOCKS = (128, 256, 512), (2, 2, 20), (16, 4, 1)


@pytest.fixture(scope="module")
def albert_dir(tmp_path_factory):
    """A tiny ALBERT: config.json, weights and a word-level tokenizer.json with CLS/SEP."""
    path = tmp_path_factory.mktemp("albert")
    torch.manual_seed(0)
    AlbertModel(AlbertConfig(vocab_size=40, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=48,
                             max_position_embeddings=128)).save_pretrained(path)
    vocab = {"<pad>": 0, "<unk>": 1, "[CLS]": 2, "[SEP]": 3, "i": 4, "am": 5, "happy": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def authors_state_dict(albert_dir, fused: bool, classes: int = 6, seed: int = 0) -> dict:
    """Keys and shapes of the authors' MME2E.state_dict(), values random."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def put(name, *shape):
        state[name] = torch.randn(shape, generator=g) * 0.05

    def batchnorm(prefix, n):
        put(f"{prefix}.weight", n)
        put(f"{prefix}.bias", n)
        put(f"{prefix}.running_mean", n)
        state[f"{prefix}.running_var"] = torch.rand(n, generator=g) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    def linear(prefix, out_features, in_features, bias=True):
        put(f"{prefix}.weight", out_features, in_features)
        if bias:
            put(f"{prefix}.bias", out_features)

    albert = AlbertModel.from_pretrained(albert_dir)
    for name, tensor in albert.state_dict().items():
        state[f"T.albert.{name}"] = tensor.clone()
    state["T.albert.embeddings.position_ids"] = torch.arange(128)[None]   # older transformers saved it
    put("V.0.weight", 64, 3, 5, 5)
    put("V.0.bias", 64)
    batchnorm("V.1", 64)
    for index, (cin, cout) in REPVGG.items():
        if fused:
            put(f"V.{index}.rbr_reparam.weight", cout, cin, 3, 3)
            put(f"V.{index}.rbr_reparam.bias", cout)
            continue
        put(f"V.{index}.rbr_dense.conv.weight", cout, cin, 3, 3)
        batchnorm(f"V.{index}.rbr_dense.bn", cout)
        put(f"V.{index}.rbr_1x1.conv.weight", cout, cin, 1, 1)
        batchnorm(f"V.{index}.rbr_1x1.bn", cout)
        if cin == cout:
            batchnorm(f"V.{index}.rbr_identity", cin)
    put("A.0.patch_embed.proj.weight", 128, 4, 3, 3)
    put("A.0.patch_embed.proj.bias", 128)
    for i, (dim, depth, blocks) in enumerate(zip(NEST_DIMS, NEST_DEPTHS, NEST_BLOCKS)):
        level = f"A.0.levels.{i}"
        put(f"{level}.pos_embed", 1, blocks, 64, dim)
        if i > 0:
            put(f"{level}.pool.conv.weight", dim, NEST_DIMS[i - 1], 3, 3)
            put(f"{level}.pool.conv.bias", dim)
            state[f"{level}.pool.norm.weight"] = torch.ones(dim)
            put(f"{level}.pool.norm.bias", dim)
        for j in range(depth):
            layer = f"{level}.transformer_encoder.{j}"
            for norm in ("norm1", "norm2"):
                state[f"{layer}.{norm}.weight"] = torch.ones(dim)
                put(f"{layer}.{norm}.bias", dim)
            linear(f"{layer}.attn.qkv", 3 * dim, dim)
            linear(f"{layer}.attn.proj", dim, dim)
            linear(f"{layer}.mlp.fc1", 4 * dim, dim)
            linear(f"{layer}.mlp.fc2", dim, 4 * dim)
    state["A.0.norm.weight"] = torch.ones(512)
    put("A.0.norm.bias", 512)
    linear("A.0.head", 1000, 512)                 # timm's classifier, unused by their forward
    put("mtcnn.pnet.conv1.weight", 10, 3, 3, 3)   # facenet-pytorch's MTCNN lived in their module
    put("mtcnn.onet.dense6_3.bias", 10)
    linear("v_flatten.0", 1024, 512 * 3 * 3)
    linear("v_flatten.2", 64, 1024)
    linear("a_flatten.0", 1024, 512 * 8 * 8)
    linear("a_flatten.2", 64, 1024)
    torch.manual_seed(seed)
    for branch in ("v_transformer", "a_transformer"):
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4), 4, enable_nested_tensor=False)
        state.update({f"{branch}.encoder.{k}": v for k, v in encoder.state_dict().items()})
        put(f"{branch}.cls_emb.weight", 1, 64)
    linear("v_out", classes, 64)
    linear("t_out", classes, 32)
    linear("a_out", classes, 64)
    linear("weighted_fusion", 1, 3, bias=False)
    return state


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
