"""The FV2ES network: RepVGG fusion, padding invariance, fusion masking, tokenizer."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from fv2es_client.contract import MAX_TOKENS, MODALITIES, NETWORKS
from torch import nn

from builders.export_onnx import dummy_inputs
from fv2es.checkpoint import default_model
from fv2es.model import ModelConfig
from fv2es.model.fv2es import ClipTransformer, visual_cnn
from fv2es.model.repvgg import RepVGGBlock
from fv2es.model.text import encode, load_tokenizer

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return default_model()


def randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so fusion has something to fold."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
            bn.weight.data.copy_(torch.randn(n, generator=generator) * 0.5 + 1.0)
            bn.bias.data.copy_(torch.randn(n, generator=generator) * 0.5)


def assert_close_relative(actual, expected, rtol=TOL):
    """|a - e| <= rtol * max|e| elementwise: relative to the output's scale (ReLU outputs
    have many exact zeros, where a pure elementwise rtol means nothing)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@torch.no_grad()
def test_fused_repvgg_matches_branches():
    torch.manual_seed(0)
    cnn = visual_cnn().eval()
    randomise_batchnorm(cnn, torch.Generator().manual_seed(1))
    fused = copy.deepcopy(cnn)
    for block in fused:
        if isinstance(block, RepVGGBlock):
            block.fuse()
    faces = torch.randn(6, 3, 48, 48)
    expected = cnn(faces)
    assert expected.shape == (6, 512, 3, 3)
    assert_close_relative(fused(faces), expected)
    blocks = [m for m in fused if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 5
    for block in blocks:
        assert [name for name, _ in block.named_children()] == ["rbr_reparam"]
        assert block.rbr_reparam.kernel_size == (3, 3) and block.rbr_reparam.bias is not None


@torch.no_grad()
def test_model_fuse_repvgg_keeps_visual_logits(model):
    model = copy.deepcopy(model)
    randomise_batchnorm(model.V, torch.Generator().manual_seed(2))
    inputs = dummy_inputs("visual", batch=2, frames=4)
    expected = model.visual_net()(*inputs)
    assert model.fuse_repvgg() is model and model.config.fused
    model.fuse_repvgg()  # idempotent
    assert not any(".rbr_dense." in k for k in model.state_dict())
    assert_close_relative(model.visual_net()(*inputs), expected)


def test_state_dict_has_the_authors_layout(model):
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {"T", "V", "A", "v_flatten", "a_flatten", "v_transformer", "a_transformer",
                        "v_out", "t_out", "a_out", "weighted_fusion"}
    keys = model.state_dict()
    assert [i for i, m in enumerate(model.V) if isinstance(m, RepVGGBlock)] == [4, 5, 6, 8, 10]
    assert "V.5.rbr_identity.running_var" in keys and "V.6.rbr_identity.weight" not in keys
    assert keys["A.0.patch_embed.proj.weight"].shape == (128, 4, 3, 3)
    assert keys["A.0.levels.2.pos_embed"].shape == (1, 1, 64, 512)
    assert keys["v_transformer.encoder.layers.3.self_attn.in_proj_weight"].shape == (192, 64)
    assert keys["weighted_fusion.weight"].shape == (1, 3)
    assert any(k.startswith("T.bert.encoder.layer.5.") for k in keys)   # minilm under its HF prefix


@torch.no_grad()
def test_clip_transformer_is_torchs_transformer_encoder():
    """Same parameter names and math as the authors' nn.TransformerEncoder (sequence-first,
    CLS prepended, key padding mask)."""
    torch.manual_seed(0)
    ours = ClipTransformer(64, 4, 4).eval()
    theirs = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4), 4, enable_nested_tensor=False).eval()
    theirs.load_state_dict({k.removeprefix("encoder."): v for k, v in ours.state_dict().items()
                            if k.startswith("encoder.")}, strict=True)
    items = torch.randn(3, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    sequence = torch.cat([ours.cls_emb.weight.expand(3, 1, 64), items], dim=1).transpose(0, 1)
    padding = ~torch.cat([torch.ones(3, 1, dtype=torch.bool), mask], dim=1)
    expected = theirs(sequence, src_key_padding_mask=padding)[0]
    torch.testing.assert_close(ours(items, mask), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_views_follow_the_contract(model):
    sizes = {"visual": {"frames": 3}, "audio_pieces": {}, "audio_clip": {"pieces": 2}, "text": {"tokens": 6},
             "fusion": {}}
    networks = model.networks()
    assert set(networks) == set(sizes)
    for name, net in networks.items():
        output = net(*dummy_inputs(name, batch=2, **sizes[name]))
        (_dtype, axes), = NETWORKS[name]["outputs"].values()
        width = model.config.num_classes if axes[1] == "classes" else axes[1]
        assert output.shape == (2, width) and output.dtype == torch.float32, name
        assert torch.isfinite(output).all(), name
    assert model.A(torch.randn(1, 4, 32, 32)).shape == (1, 512, 8, 8)


@torch.no_grad()
def test_audio_encoder_in_two_is_the_whole_encoder(model):
    pieces, mask = torch.randn(2, 3, 4, 32, 32) ** 2, torch.tensor([[True, True, True], [True, False, False]])
    items = model.audio_pieces_net()(pieces.reshape(6, 4, 32, 32)).reshape(2, 3, -1)
    torch.testing.assert_close(model.audio_clip_net()(items, mask), model.audio_net()(pieces, mask))


def pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad axis 1 to LENGTH with large random values (padding must not matter)."""
    extra = torch.randn(x.shape[0], length - x.shape[1], *x.shape[2:]) * 100
    return torch.cat([x, extra.to(x.dtype)], dim=1)


@torch.no_grad()
def test_padding_does_not_change_a_clip(model):
    torch.manual_seed(3)
    cases = {
        "visual": (torch.randn(1, 2, 3, 48, 48), torch.randn(1, 4, 3, 48, 48)),
        "audio": (torch.randn(1, 1, 4, 32, 32), torch.randn(1, 2, 4, 32, 32)),
        "text": (torch.randint(0, 30000, (1, 5)), torch.randint(0, 30000, (1, 9))),
    }
    for name, (short, long) in cases.items():
        net = getattr(model, f"{name}_net")()
        mask_dtype = torch.bool if name != "text" else torch.int64
        alone = net(short, torch.ones(short.shape[:2], dtype=mask_dtype))
        batch = torch.cat([pad_to(short, long.shape[1]) if name != "text"
                           else torch.cat([short, torch.zeros(1, 4, dtype=torch.int64)], 1), long])
        mask = torch.ones(batch.shape[:2], dtype=mask_dtype)
        mask[0, short.shape[1]:] = 0
        padded = net(batch, mask)
        torch.testing.assert_close(padded[0], alone[0], rtol=TOL, atol=TOL, msg=name)


@torch.no_grad()
def test_absent_modality_contributes_nothing(model):
    fusion = model.fusion_net()
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 3)
    present = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])   # clip 1: no video
    fused = fusion(logits, present)
    weights = model.weighted_fusion.weight[0]
    torch.testing.assert_close(fused[0], logits[0] @ weights)
    changed = logits.clone()
    changed[1, :, MODALITIES.index("visual")] = 1e3
    torch.testing.assert_close(fusion(changed, present)[1], fused[1])
    torch.testing.assert_close(fused[1], logits[1, :, [0, 2]] @ weights[[0, 2]])


def test_default_model_is_seeded_and_labelled(model):
    a, b = model, default_model()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.weights_id == "UNTRAINED: seeded random weights (seed 0), predictions are meaningless"
    c = default_model(seed=1)
    assert not torch.equal(c.v_out.weight, a.v_out.weight)
    assert c.weights_id.startswith("UNTRAINED") and "seed 1" in c.weights_id
    assert not a.training


def test_encode_adds_special_tokens_and_truncates():
    tokenizer = load_tokenizer(ModelConfig())
    ids, mask = encode(tokenizer, "I am so happy today")
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[-1] == tokenizer.token_to_id("[SEP]")
    assert len(ids) == 7 and mask.tolist() == [1] * 7                      # no padding
    long_ids, _ = encode(tokenizer, "word " * 300)
    assert len(long_ids) == MAX_TOKENS and long_ids[-1] == tokenizer.token_to_id("[SEP]")
    assert len(encode(tokenizer, "word " * 300, max_tokens=10)[0]) == 10
    assert len(encode(tokenizer, "")[0]) == 2


def test_tokenizer_path_does_not_import_torch():
    code = ("import sys; from fv2es.model import ModelConfig; "
            "from fv2es.model.text import encode, load_tokenizer; "
            "ids, _ = encode(load_tokenizer(ModelConfig()), 'hello'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'; print(len(ids))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_encoding_never_changes_the_tokenizer():
    tokenizer = load_tokenizer(ModelConfig())
    before = tokenizer.truncation
    assert before["max_length"] == MAX_TOKENS    # set once, when it is loaded
    assert len(encode(tokenizer, "word " * 300, max_tokens=10)[0]) == 10
    assert tokenizer.truncation == before and len(encode(tokenizer, "word " * 300)[0]) == MAX_TOKENS
