"""The authors' side, written in the tests from the published facts, never from our code:
their checkpoint's key layout and shapes (MME2E.state_dict()), a tiny ALBERT for it, and
their preprocessing rules (facenet-pytorch's face crop on float frames, crop_img_center).
Shared by test_checkpoint, test_features and test_fidelity."""
import cv2
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import AlbertConfig, AlbertModel

from fv2es_client import contract

MEAN = np.array(contract.FACE_MEAN)
STD = np.array(contract.FACE_STD)


def make_tiny_albert(path):
    """A tiny ALBERT: config.json, weights and a word-level tokenizer.json with CLS/SEP."""
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


REPVGG = {4: (64, 64), 5: (64, 64), 6: (64, 128), 8: (128, 256), 10: (256, 512)}   # V index: in, out
NEST_DIMS, NEST_DEPTHS, NEST_BLOCKS = (128, 256, 512), (2, 2, 20), (16, 4, 1)


def authors_state_dict(albert_dir, fused: bool, classes: int = 6, seed: int = 0, width: int = 64,
                       layers: int = 4) -> dict:
    """Keys and shapes of the authors' MME2E.state_dict(), values random; WIDTH and LAYERS are
    their trans_dim and trans_layers (the heads show in no shape)."""
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
    linear("v_flatten.2", width, 1024)
    linear("a_flatten.0", 1024, 512 * 8 * 8)
    linear("a_flatten.2", width, 1024)
    torch.manual_seed(seed)
    for branch in ("v_transformer", "a_transformer"):
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4), layers, enable_nested_tensor=False)
        state.update({f"{branch}.encoder.{k}": v for k, v in encoder.state_dict().items()})
        put(f"{branch}.cls_emb.weight", 1, width)
    linear("v_out", classes, width)
    linear("t_out", classes, 32)
    linear("a_out", classes, width)
    linear("weighted_fusion", 1, 3, bias=False)
    return state


def facenet_crop(frame, box, image_size=48, margin=2):
    """facenet_pytorch's extract_face on a numpy float32 frame (the authors give it
    np.float32 frames): margin, clamp, int() box, then cv2.resize INTER_AREA in float."""
    margin_x = margin * (box[2] - box[0]) / (image_size - margin)
    margin_y = margin * (box[3] - box[1]) / (image_size - margin)
    left, top = int(max(box[0] - margin_x / 2, 0)), int(max(box[1] - margin_y / 2, 0))
    right = int(min(box[2] + margin_x / 2, frame.shape[1]))
    bottom = int(min(box[3] + margin_y / 2, frame.shape[0]))
    crop = frame.astype(np.float32)[top:bottom, left:right]
    face = cv2.resize(crop, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return face.transpose(2, 0, 1)    # post_process=False: 0-255 floats, [3, 48, 48], no rounding


def normalise(face_chw):
    return (np.asarray(face_chw, np.float64) - MEAN[:, None, None]) / STD[:, None, None]


def authors_crop_img_center(frame):
    """The authors' crop_img_center (c_e2e.py), written out: the offset from the height."""
    off = (frame.shape[0] - 48) // 2
    return frame[off:off + 48, off - 24:off + 24]
