"""MTCNN face detection (Zhang et al. 2016), batched over the frames of a clip.

The three nets mirror facenet-pytorch 2.6.0's layer names, so the weight files shipped in
its wheel (MIT licence) load unchanged. The detection algorithm follows facenet-pytorch's
MTCNN defaults, which the FV2ES authors used (`MTCNN(image_size=48, margin=2,
post_process=False)`): minimum face 20 px, pyramid factor 0.709, thresholds 0.6/0.7/0.7,
its NMS thresholds, box calibration and squaring, crops clipped to the frame (no zero
padding), and the largest face per frame.
One deliberate difference: frames longer than `max_side` are detected on a smaller copy.

One implementation for every profile: the algorithm is torch code on the frames' device
(CPU or CUDA), and the three nets are behind one seam, `run_net(name, images) -> outputs`
(NCHW float32 tensors in, tensors in contract order out): the served steps run them as torch
modules (`torch_runner`); the tests also run them through ONNX Runtime.
Each pyramid scale of P-Net sees all frames in one batch; R-Net and O-Net each see all
candidates of all frames in one batch. On a GPU only the candidate counts of each stage and
one flag per NMS round cross to the host.

Resampling is "area" interpolation with torch's adaptive-average-pool bins (what
facenet-pytorch uses: `interpolate(mode="area")`): output pixel i of n over an input span of
m pixels averages inputs floor(i*m/n) .. ceil((i+1)*m/n) - 1. We compute it from integer
integral images, so the bin sums are exact and every device gives the same bits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

MIN_FACE_SIZE = 20
SCALE_FACTOR = 0.709
THRESHOLDS = (0.6, 0.7, 0.7)        # P-Net, R-Net, O-Net face probability
# The pyramid costs in proportion to the frame's pixels and its first scale is already
# 0.6x the frame (12 px windows / 20 px faces), so on CPU a 1280x720 frame takes ~4x the
# time of 640x360 for no gain on the large faces of interview videos. 640 keeps faces
# down to ~40 px of a 1280 px frame.
DETECT_MAX_SIDE = 640

# (net name, NCHW float32 images) -> the net's outputs in contract order, on the same device.
RunNet = Callable[[str, torch.Tensor], tuple]


class PNet(nn.Module):
    """Proposal net: fully convolutional, scores every 12x12 window at stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)     # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)     # box offsets

    def forward(self, image):
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_whc(x):
    # The weights come from Caffe via TensorFlow: dense layers read the map in (W, H, C) order.
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement net: scores and corrects 24x24 crops of P-Net's candidates."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, image):
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_whc(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net: final score, box correction and five landmarks on 48x48 crops."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, image):
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_whc(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def _nets(state_dict: Callable[[str], dict], device: str = "cpu") -> dict[str, nn.Module]:
    """P/R/O-Net in eval mode on DEVICE, each with the weights state_dict(name) gives."""
    nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    for name, net in nets.items():
        net.load_state_dict(state_dict(name))
        net.eval().requires_grad_(False).to(device)
    return nets


def load_mtcnn_nets() -> dict[str, nn.Module]:
    """P/R/O-Net with facenet-pytorch 2.6.0's pretrained weights, in eval mode."""
    from fv2es.assets import extract_wheel

    data = extract_wheel("facenet-pytorch", "2.6.0", "facenet_pytorch/data/") / "facenet_pytorch" / "data"
    return _nets(lambda name: torch.load(data / f"{name}.pt", weights_only=True))


def save_nets(nets: Mapping[str, nn.Module], folder) -> None:
    """The nets' weights as safetensors in FOLDER (a served detect_faces model's version folder)."""
    from safetensors.torch import save_file

    for name, net in nets.items():
        save_file(net.state_dict(), Path(folder) / f"{name}.safetensors")


def load_saved_nets(folder, device: str = "cpu") -> dict[str, nn.Module]:
    """What save_nets wrote, in eval mode on DEVICE."""
    from safetensors.torch import load_file

    return _nets(lambda name: load_file(Path(folder) / f"{name}.safetensors"), device)


def torch_runner(nets: Mapping[str, nn.Module]) -> RunNet:
    """A `run_net` that runs the torch modules on the images' device.

    On CPU the images go channels-last: oneDNN's NHWC convolutions and pools run these small
    nets about twice as fast as NCHW (and as ONNX Runtime), measured on 2 cores. On CUDA,
    fp32 without TF32: the stage thresholds must see the reference's scores.
    """
    def run_net(name, images):
        with torch.inference_mode():
            if images.device.type == "cpu":
                return nets[name](images.contiguous(memory_format=torch.channels_last))
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                return nets[name](images.contiguous())
    return run_net


def detect_faces(frames, run_net: RunNet, max_side: int | None = DETECT_MAX_SIDE):
    """The largest face of each frame (facenet-pytorch's select_largest default).

    frames: [F, H, W, 3] uint8 RGB, numpy or a torch tensor on any device. max_side: frames
    with a longer side are detected on an area-downscaled copy (None: never). Returns (boxes
    float32 [F, 4] x1, y1, x2, y2 in frame pixels, scores float32 [F]), as numpy for numpy
    frames and as tensors on the frames' device otherwise; boxes and scores are 0 where no
    face was found. Boxes are not clipped to the frame (as in facenet-pytorch).
    """
    as_numpy = isinstance(frames, np.ndarray)
    frames = _frames_tensor(frames)
    boxes, scores, frame_idx = _detect_all(frames, run_net, max_side)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = _group_order(frame_idx, -area)
    ordered = frame_idx[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    chosen = order[first]
    out_boxes = torch.zeros((len(frames), 4), dtype=torch.float32, device=frames.device)
    out_scores = torch.zeros(len(frames), dtype=torch.float32, device=frames.device)
    out_boxes[frame_idx[chosen]] = boxes[chosen]
    out_scores[frame_idx[chosen]] = scores[chosen]
    return (out_boxes.cpu().numpy(), out_scores.cpu().numpy()) if as_numpy else (out_boxes, out_scores)


def detect_all_faces(frames, run_net: RunNet, max_side: int | None = DETECT_MAX_SIDE):
    """Every face found, as detect_faces but unselected: (boxes float32 [K, 4], scores
    float32 [K], frame index int64 [K]) as numpy, ordered by frame, then descending score."""
    return tuple(t.cpu().numpy() for t in _detect_all(_frames_tensor(frames), run_net, max_side))


def detect_faces_per_frame(frames: np.ndarray, run_net: RunNet, max_side: int | None = DETECT_MAX_SIDE,
                           device: str = "cpu"):
    """detect_faces called one frame at a time on DEVICE: the authors' eager path, for benchmarks."""
    results = [detect_faces(torch.from_numpy(frame[None]).to(device), run_net, max_side) for frame in frames]
    if not results:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return tuple(torch.cat(parts).cpu().numpy() for parts in zip(*results))


def plain_torch_runner(nets: Mapping[str, nn.Module]) -> RunNet:
    """The nets as facenet-pytorch runs them (NCHW, default backend flags): the eager baseline's."""
    def run_net(name, images):
        with torch.inference_mode():
            return nets[name](images.contiguous())
    return run_net


def _frames_tensor(frames) -> torch.Tensor:
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames


@torch.inference_mode()
def _detect_all(frames: torch.Tensor, run_net: RunNet, max_side: int | None):
    device = frames.device
    count, height, width = frames.shape[:3]
    none = (torch.zeros((0, 4), device=device), torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.long, device=device))
    if count == 0:
        return none
    if max_side and max(height, width) > max_side:
        shrink = max_side / max(height, width)
        frames = _downscale(frames, max(1, round(height * shrink)), max(1, round(width * shrink)))
    integral = _integral_images(frames)
    boxes, frame_idx = _propose(integral, run_net)
    for stage in (_refine, _output):
        if not len(boxes):      # no batch of zero for runtimes that reject one
            return none
        boxes, frame_idx = stage(integral, boxes, frame_idx, run_net)
    to_frame = torch.tensor([width / frames.shape[2], height / frames.shape[1]] * 2, device=device)
    return boxes[:, :4] * to_frame, boxes[:, 4].clone(), frame_idx


# --- the three stages ------------------------------------------------------------------------
# Candidate boxes are float32 [K, 5+] rows (x1, y1, x2, y2, score, ...) with a frame index
# each; float32 throughout as in facenet-pytorch, so rounding and truncation agree with it.

def _propose(integral, run_net):
    """P-Net over the scale pyramid -> calibrated square candidates."""
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    found = []
    for scale in pyramid_scales(height, width):
        images = _resize_frames(integral, int(height * scale + 1), int(width * scale + 1))
        offsets, probs = run_net("pnet", _normalise(images))[:2]
        frame_idx, row, col = torch.nonzero(probs[:, 1] >= THRESHOLDS[0], as_tuple=True)
        # Each output cell is a 12x12 window at stride 2 of the scaled image.
        corner = torch.stack([col, row], dim=1).float()
        boxes = torch.cat([
            torch.floor((2 * corner + 1) / scale), torch.floor((2 * corner + 12) / scale),
            probs[frame_idx, 1, row, col][:, None], offsets[frame_idx, :, row, col],
        ], dim=1)
        keep = nms(boxes, frame_idx, 0.5)
        found.append((boxes[keep], frame_idx[keep]))
    if not found:   # frame smaller than one 12 px window at the first scale
        return (torch.zeros((0, 9), device=integral.device),
                torch.zeros(0, dtype=torch.long, device=integral.device))
    boxes = torch.cat([b for b, _ in found])
    frame_idx = torch.cat([f for _, f in found])
    keep = nms(boxes, frame_idx, 0.7)
    boxes, frame_idx = boxes[keep], frame_idx[keep]
    size = torch.cat([boxes[:, 2:4] - boxes[:, 0:2]] * 2, dim=1)
    calibrated = torch.cat([boxes[:, :4] + boxes[:, 5:9] * size, boxes[:, 4:5]], dim=1)
    return _square(calibrated), frame_idx


def _refine(integral, boxes, frame_idx, run_net):
    """R-Net on 24x24 crops of the candidates."""
    crops, ok = _crops(integral, boxes, frame_idx, 24)
    boxes, frame_idx = boxes[ok], frame_idx[ok]
    if not len(boxes):
        return boxes[:, :5], frame_idx
    offsets, probs = run_net("rnet", _normalise(crops))[:2]
    passed = probs[:, 1] > THRESHOLDS[1]
    boxes = torch.cat([boxes[passed, :4], probs[passed, 1:2]], dim=1)
    offsets, frame_idx = offsets[passed], frame_idx[passed]
    keep = nms(boxes, frame_idx, 0.7)
    return _square(_regress(boxes[keep], offsets[keep])), frame_idx[keep]


def _output(integral, boxes, frame_idx, run_net):
    """O-Net on 48x48 crops; the final NMS uses intersection over the smaller box."""
    crops, ok = _crops(integral, boxes, frame_idx, 48)
    boxes, frame_idx = boxes[ok], frame_idx[ok]
    if not len(boxes):
        return boxes[:, :5], frame_idx
    offsets, _landmarks, probs = run_net("onet", _normalise(crops))[:3]
    passed = probs[:, 1] > THRESHOLDS[2]
    boxes = torch.cat([boxes[passed, :4], probs[passed, 1:2]], dim=1)
    boxes, frame_idx = _regress(boxes, offsets[passed]), frame_idx[passed]
    keep = nms(boxes, frame_idx, 0.7, over_smaller=True)
    return boxes[keep], frame_idx[keep]


def pyramid_scales(height, width):
    # Scale so the smallest face (MIN_FACE_SIZE) fills P-Net's 12 px window, then shrink
    # until the image's short side drops below 12 px.
    scale = 12.0 / MIN_FACE_SIZE
    short_side = min(height, width) * scale
    scales = []
    while short_side >= 12:
        scales.append(scale)
        scale *= SCALE_FACTOR
        short_side *= SCALE_FACTOR
    return scales


def _regress(boxes, offsets):
    """Apply the net's box offsets, relative to the box size in MTCNN's +1 pixel convention."""
    size = boxes[:, 2:4] - boxes[:, 0:2] + 1
    corrected = boxes[:, :4] + offsets * torch.cat([size, size], dim=1)
    return torch.cat([corrected, boxes[:, 4:5]], dim=1)


def _square(boxes):
    """Grow each box to a square around its centre (the next net sees square crops)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    w, h = x2 - x1, y2 - y1
    side = torch.maximum(w, h)
    x1 = x1 + w * 0.5 - side * 0.5
    y1 = y1 + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side, boxes[:, 4]], dim=1)


def _group_order(groups: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """np.lexsort((key, groups)): by group, then ascending key, ties in input order."""
    by_key = torch.sort(key, stable=True).indices
    return by_key[torch.sort(groups[by_key], stable=True).indices]


def nms(boxes: torch.Tensor, groups: torch.Tensor, threshold: float, over_smaller: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression within each group (frame, or frame and scale).

    Overlap is IoU with areas (x2-x1)*(y2-y1), as torchvision's nms; with over_smaller,
    intersection over the smaller area with +1 pixel sizes (facenet-pytorch's "Min").
    All groups advance together, one kept box each per round (one host sync a round), so
    the rounds number the most boxes kept in one frame rather than in the whole clip.
    Returns the kept indices, ordered by group then descending score (boxes[:, 4]).
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = _group_order(groups, -boxes[:, 4])
    _, group_row, group_size = torch.unique(groups[order], return_inverse=True, return_counts=True)
    slot = torch.arange(len(order), device=boxes.device) - torch.repeat_interleave(
        torch.cumsum(group_size, 0) - group_size, group_size)
    # One padded row per group, sorted by descending score.
    padded = boxes.new_zeros((len(group_size), int(group_size.max()), 4))
    padded[group_row, slot] = boxes[order, :4]
    alive = torch.zeros(padded.shape[:2], dtype=torch.bool, device=boxes.device)
    alive[group_row, slot] = True
    kept = torch.zeros_like(alive)

    pixel = 1.0 if over_smaller else 0.0
    x1, y1, x2, y2 = padded.unbind(2)
    area = (x2 - x1 + pixel) * (y2 - y1 + pixel)
    rows = torch.arange(len(group_size), device=boxes.device)
    while alive.any():
        has = alive.any(dim=1)
        best = alive.to(torch.uint8).argmax(dim=1)      # first alive = highest score
        kept[rows, best] |= has
        alive[rows, best] = False
        bx1, by1, bx2, by2, best_area = (a[rows, best][:, None] for a in (x1, y1, x2, y2, area))
        inter = ((torch.minimum(bx2, x2) - torch.maximum(bx1, x1) + pixel).clamp(min=0)
                 * (torch.minimum(by2, y2) - torch.maximum(by1, y1) + pixel).clamp(min=0))
        if over_smaller:
            overlap = inter / torch.minimum(best_area, area)
        else:
            overlap = inter / (best_area + area - inter)
        alive &= ~(overlap > threshold)
    return order[kept[group_row, slot]]


# --- resampling ------------------------------------------------------------------------------
# Integral images are int32: 255 * 1280 * 1280 (the largest frame) fits, and every bin sum is
# an exact integer.

def _integral_images(frames):
    """[F, H+1, W+1, 3] int32 running sums of uint8 [F, H, W, 3] frames."""
    count, height, width = frames.shape[:3]
    integral = torch.zeros((count, height + 1, width + 1, 3), dtype=torch.int32, device=frames.device)
    integral[:, 1:, 1:] = frames.cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32)
    return integral


def _bins(start, span, size: int):
    """Area-resize bin edges: output pixel i of `size` covers [lo[i], hi[i]) of the span."""
    i = torch.arange(size, device=start.device)
    lo = start[:, None] + i * span[:, None] // size
    hi = start[:, None] + ((i + 1) * span[:, None] + size - 1) // size
    return lo, hi


def _resize_frames(integral, height: int, width: int):
    """Area-resize whole frames to [F, height, width, 3] float32."""
    zero = torch.zeros(1, dtype=torch.long, device=integral.device)
    lo_r, hi_r = (b[0] for b in _bins(zero, zero + integral.shape[1] - 1, height))
    lo_c, hi_c = (b[0] for b in _bins(zero, zero + integral.shape[2] - 1, width))
    rows = integral.index_select(1, hi_r) - integral.index_select(1, lo_r)
    sums = rows.index_select(2, hi_c) - rows.index_select(2, lo_c)
    counts = (hi_r - lo_r)[:, None] * (hi_c - lo_c)[None, :]
    return sums.float() / counts[None, :, :, None].float()


def _crops(integral, boxes, frame_idx, size: int):
    """Area-resized size x size crops of the boxes, clipped to the frame as facenet-pytorch
    does (no zero padding). Returns the crops and a mask of the boxes that kept any pixel."""
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    x1, y1, x2, y2 = torch.trunc(boxes[:, :4]).long().T
    left, top = x1.clamp(min=1) - 1, y1.clamp(min=1) - 1     # MTCNN's 1-based corners
    right, bottom = x2.clamp(max=width), y2.clamp(max=height)
    ok = (right > left) & (bottom > top)
    left, top, right, bottom, frame_idx = left[ok], top[ok], right[ok], bottom[ok], frame_idx[ok]
    lo_r, hi_r = _bins(top, bottom - top, size)
    lo_c, hi_c = _bins(left, right - left, size)
    f = frame_idx[:, None, None]

    def corner(r, c):
        return integral[f, r[:, :, None], c[:, None, :]]
    sums = corner(hi_r, hi_c) - corner(lo_r, hi_c) - corner(hi_r, lo_c) + corner(lo_r, lo_c)
    counts = (hi_r - lo_r)[:, :, None] * (hi_c - lo_c)[:, None, :]
    return sums.float() / counts[..., None].float(), ok


def _downscale(frames, height: int, width: int):
    # Frame by frame: a clip-wide integral image of full-size frames would be 4 bytes a subpixel.
    return torch.stack([torch.round(_resize_frames(_integral_images(frame[None]), height, width)[0])
                        .to(torch.uint8) for frame in frames])


def _normalise(images):
    """[N, h, w, 3] 0-255 -> [N, 3, h, w] as the nets were trained: (x - 127.5) / 128.

    A view of the NHWC result: channels-last memory, which torch_runner feeds oneDNN as is."""
    return ((images - 127.5) * 0.0078125).permute(0, 3, 1, 2)
