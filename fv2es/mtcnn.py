"""MTCNN face detection (Zhang et al. 2016), batched over the frames of a clip.

The three nets mirror facenet-pytorch 2.6.0's layer names, so the weight files shipped in
its wheel (MIT licence) load unchanged. The detection algorithm follows facenet-pytorch's
MTCNN defaults, which the FV2ES authors used (`MTCNN(image_size=48, margin=2,
post_process=False)`): minimum face 20 px, pyramid factor 0.709, thresholds 0.6/0.7/0.7,
its NMS thresholds, box calibration and squaring, crops clipped to the frame (no zero
padding), and the largest face per frame.
One deliberate difference: frames longer than `max_side` are detected on a smaller copy.

Everything except the three net calls is numpy, so the same code runs with torch in-process
or with ONNX Runtime / TensorRT in the server: `run_net(name, batch)` is the only seam.
Each pyramid scale of P-Net sees all frames in one batch; R-Net and O-Net each see all
candidates of all frames in one batch.

Resampling is "area" interpolation with torch's adaptive-average-pool bins (what
facenet-pytorch uses: `interpolate(mode="area")`): output pixel i of n over an input span of
m pixels averages inputs floor(i*m/n) .. ceil((i+1)*m/n) - 1. We compute it from integer
integral images, so the bin sums are exact and any runtime can reproduce them bit for bit.
"""
from __future__ import annotations

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

RunNet = Callable[[str, np.ndarray], tuple]


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


def load_mtcnn_nets() -> dict[str, nn.Module]:
    """P/R/O-Net with facenet-pytorch 2.6.0's pretrained weights, in eval mode."""
    from fv2es.assets import extract_wheel

    data = extract_wheel("facenet-pytorch", "2.6.0", "facenet_pytorch/data/") / "facenet_pytorch" / "data"
    nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    for name, net in nets.items():
        net.load_state_dict(torch.load(data / f"{name}.pt", weights_only=True))
        net.eval().requires_grad_(False)
    return nets


def torch_runner(nets: Mapping[str, nn.Module]) -> RunNet:
    """A `run_net` for detect_faces that runs the nets with torch on CPU."""
    def run_net(name, batch):
        with torch.inference_mode():
            outputs = nets[name](torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
        return tuple(o.numpy() for o in outputs)
    return run_net


def detect_faces(frames: np.ndarray, run_net: RunNet, max_side: int | None = DETECT_MAX_SIDE):
    """The largest face of each frame (facenet-pytorch's select_largest default).

    frames: [F, H, W, 3] uint8 RGB. max_side: frames with a longer side are detected on an
    area-downscaled copy (None: never). Returns (boxes float32 [F, 4] x1, y1, x2, y2 in
    frame pixels, scores float32 [F]); boxes and scores are 0 where no face was found.
    Boxes are not clipped to the frame (as in facenet-pytorch).
    """
    boxes, scores, frame_idx = detect_all_faces(frames, run_net, max_side)
    count = len(frames)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.lexsort((-area, frame_idx))
    found, first = np.unique(frame_idx[order], return_index=True)
    out_boxes = np.zeros((count, 4), np.float32)
    out_scores = np.zeros(count, np.float32)
    out_boxes[found] = boxes[order[first]]
    out_scores[found] = scores[order[first]]
    return out_boxes, out_scores


def detect_all_faces(frames: np.ndarray, run_net: RunNet, max_side: int | None = DETECT_MAX_SIDE):
    """Every face found, as detect_faces but unselected: (boxes float32 [K, 4], scores
    float32 [K], frame index int64 [K]), ordered by frame, then descending score."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    count, height, width = frames.shape[:3]
    if count == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)

    if max_side and max(height, width) > max_side:
        shrink = max_side / max(height, width)
        frames = _downscale(frames, max(1, round(height * shrink)), max(1, round(width * shrink)))
    integral = _integral_images(frames)

    boxes, frame_idx = _propose(integral, run_net)
    for stage in (_refine, _output):
        boxes, frame_idx = stage(integral, boxes, frame_idx, run_net)
    to_frame = np.array([width / frames.shape[2], height / frames.shape[1]] * 2, np.float32)
    return boxes[:, :4] * to_frame, boxes[:, 4].copy(), frame_idx


def detect_faces_per_frame(frames: np.ndarray, run_net: RunNet, max_side: int | None = DETECT_MAX_SIDE):
    """detect_faces called one frame at a time: the authors' eager path, for benchmarks."""
    results = [detect_faces(frame[None], run_net, max_side) for frame in np.asarray(frames)]
    if not results:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return (np.concatenate([boxes for boxes, _ in results]),
            np.concatenate([scores for _, scores in results]))


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
        frame_idx, row, col = np.nonzero(probs[:, 1] >= THRESHOLDS[0])
        # Each output cell is a 12x12 window at stride 2 of the scaled image.
        corner = np.stack([col, row], axis=1).astype(np.float32)
        boxes = np.concatenate([
            np.floor((2 * corner + 1) / scale), np.floor((2 * corner + 12) / scale),
            probs[frame_idx, 1, row, col][:, None], offsets[frame_idx, :, row, col],
        ], axis=1)
        keep = nms(boxes, frame_idx, 0.5)
        found.append((boxes[keep], frame_idx[keep]))
    if not found:   # frame smaller than one 12 px window at the first scale
        return np.zeros((0, 9), np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate([b for b, _ in found])
    frame_idx = np.concatenate([f for _, f in found])
    keep = nms(boxes, frame_idx, 0.7)
    boxes, frame_idx = boxes[keep], frame_idx[keep]
    size = np.concatenate([boxes[:, 2:4] - boxes[:, 0:2]] * 2, axis=1)
    calibrated = np.concatenate([boxes[:, :4] + boxes[:, 5:9] * size, boxes[:, 4:5]], axis=1)
    return _square(calibrated), frame_idx


def _refine(integral, boxes, frame_idx, run_net):
    """R-Net on 24x24 crops of the candidates."""
    crops, ok = _crops(integral, boxes, frame_idx, 24)
    boxes, frame_idx = boxes[ok], frame_idx[ok]
    if not len(boxes):      # no batch of zero for runtimes that reject one
        return boxes[:, :5], frame_idx
    offsets, probs = run_net("rnet", _normalise(crops))[:2]
    passed = probs[:, 1] > THRESHOLDS[1]
    boxes = np.concatenate([boxes[passed, :4], probs[passed, 1:2]], axis=1)
    offsets, frame_idx = offsets[passed], frame_idx[passed]
    keep = nms(boxes, frame_idx, 0.7)
    return _square(_regress(boxes[keep], offsets[keep])), frame_idx[keep]


def _output(integral, boxes, frame_idx, run_net):
    """O-Net on 48x48 crops; the final NMS uses intersection over the smaller box."""
    crops, ok = _crops(integral, boxes, frame_idx, 48)
    boxes, frame_idx = boxes[ok], frame_idx[ok]
    if not len(boxes):      # no batch of zero for runtimes that reject one
        return boxes[:, :5], frame_idx
    offsets, _landmarks, probs = run_net("onet", _normalise(crops))[:3]
    passed = probs[:, 1] > THRESHOLDS[2]
    boxes = np.concatenate([boxes[passed, :4], probs[passed, 1:2]], axis=1)
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
    corrected = boxes[:, :4] + offsets * np.concatenate([size, size], axis=1)
    return np.concatenate([corrected, boxes[:, 4:5]], axis=1)


def _square(boxes):
    """Grow each box to a square around its centre (the next net sees square crops)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    w, h = x2 - x1, y2 - y1
    side = np.maximum(w, h)
    x1 = x1 + w * 0.5 - side * 0.5
    y1 = y1 + h * 0.5 - side * 0.5
    return np.stack([x1, y1, x1 + side, y1 + side, boxes[:, 4]], axis=1)


def nms(boxes, groups, threshold, over_smaller=False):
    """Greedy non-maximum suppression within each group (frame, or frame and scale).

    Overlap is IoU with areas (x2-x1)*(y2-y1), as torchvision's nms; with over_smaller,
    intersection over the smaller area with +1 pixel sizes (facenet-pytorch's "Min").
    All groups advance together, one kept box each per round, so the rounds number the
    most boxes kept in one frame rather than in the whole clip. Returns the kept indices,
    ordered by group then descending score.
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-boxes[:, 4], groups))
    group_ids, group_row, group_size = np.unique(groups[order], return_inverse=True, return_counts=True)
    slot = np.arange(len(order)) - np.repeat(np.cumsum(group_size) - group_size, group_size)
    # One padded row per group, sorted by descending score.
    padded = np.zeros((len(group_ids), group_size.max(), 4), np.float32)
    padded[group_row, slot] = boxes[order, :4]
    alive = np.zeros(padded.shape[:2], bool)
    alive[group_row, slot] = True
    kept = np.zeros_like(alive)

    pixel = np.float32(1 if over_smaller else 0)
    x1, y1, x2, y2 = np.moveaxis(padded, 2, 0)
    area = (x2 - x1 + pixel) * (y2 - y1 + pixel)
    with np.errstate(divide="ignore", invalid="ignore"):   # padding slots are never alive
        while alive.any():
            rows = np.nonzero(alive.any(axis=1))[0]
            best = alive[rows].argmax(axis=1)                # first alive = highest score
            kept[rows, best] = True
            alive[rows, best] = False

            bx1, by1, bx2, by2, best_area = (a[rows, best][:, None] for a in (x1, y1, x2, y2, area))
            inter = (np.maximum(np.minimum(bx2, x2[rows]) - np.maximum(bx1, x1[rows]) + pixel, 0)
                     * np.maximum(np.minimum(by2, y2[rows]) - np.maximum(by1, y1[rows]) + pixel, 0))
            if over_smaller:
                overlap = inter / np.minimum(best_area, area[rows])
            else:
                overlap = inter / (best_area + area[rows] - inter)
            alive[rows] &= ~(overlap > threshold)
    return order[kept[group_row, slot]]


# --- resampling ------------------------------------------------------------------------------

def _integral_images(frames):
    """[F, H+1, W+1, 3] uint32 running sums. Sums past 2**32 wrap, but the four-corner
    differences stay exact for any box under 16 M pixels, far above any resize bin."""
    count, height, width = frames.shape[:3]
    integral = np.zeros((count, height + 1, width + 1, 3), np.uint32)
    sums = integral[:, 1:, 1:]
    sums[...] = frames
    sums.cumsum(axis=1, out=sums)
    sums.cumsum(axis=2, out=sums)
    return integral


def _bins(start, span, size):
    """Area-resize bin edges: output pixel i of `size` covers [lo[i], hi[i]) of the span."""
    i = np.arange(size)
    lo = start[:, None] + i * span[:, None] // size
    hi = start[:, None] + ((i + 1) * span[:, None] + size - 1) // size
    return lo, hi


def _resize_frames(integral, height, width):
    """Area-resize whole frames to [F, height, width, 3] float32."""
    zero = np.zeros(1, np.int64)
    lo_r, hi_r = (b[0] for b in _bins(zero, zero + integral.shape[1] - 1, height))
    lo_c, hi_c = (b[0] for b in _bins(zero, zero + integral.shape[2] - 1, width))
    rows = np.take(integral, hi_r, axis=1) - np.take(integral, lo_r, axis=1)
    sums = np.take(rows, hi_c, axis=2) - np.take(rows, lo_c, axis=2)
    counts = (hi_r - lo_r)[:, None] * (hi_c - lo_c)[None, :]
    return sums.astype(np.float32) / counts[None, :, :, None].astype(np.float32)


def _crops(integral, boxes, frame_idx, size):
    """Area-resized size x size crops of the boxes, clipped to the frame as facenet-pytorch
    does (no zero padding). Returns the crops and a mask of the boxes that kept any pixel."""
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    x1, y1, x2, y2 = np.trunc(boxes[:, :4]).astype(np.int64).T
    left, top = np.maximum(x1, 1) - 1, np.maximum(y1, 1) - 1   # MTCNN's 1-based corners
    right, bottom = np.minimum(x2, width), np.minimum(y2, height)
    ok = (right > left) & (bottom > top)
    left, top, right, bottom, frame_idx = left[ok], top[ok], right[ok], bottom[ok], frame_idx[ok]
    lo_r, hi_r = _bins(top, bottom - top, size)
    lo_c, hi_c = _bins(left, right - left, size)
    f = frame_idx[:, None, None]

    def corner(r, c):
        return integral[f, r[:, :, None], c[:, None, :]]
    sums = corner(hi_r, hi_c) - corner(lo_r, hi_c) - corner(hi_r, lo_c) + corner(lo_r, lo_c)
    counts = (hi_r - lo_r)[:, :, None] * (hi_c - lo_c)[:, None, :]
    return sums.astype(np.float32) / counts[..., None].astype(np.float32), ok


def _downscale(frames, height, width):
    # Frame by frame: a clip-wide integral image of full-size frames would be 4 bytes a subpixel.
    return np.stack([np.rint(_resize_frames(_integral_images(frame[None]), height, width)[0])
                     .astype(np.uint8) for frame in frames])


def _normalise(images):
    """[N, h, w, 3] 0-255 -> [N, 3, h, w] as the nets were trained: (x - 127.5) / 128."""
    return np.ascontiguousarray(((images - 127.5) * 0.0078125).transpose(0, 3, 1, 2), np.float32)
