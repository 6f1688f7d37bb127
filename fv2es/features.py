"""Model inputs from decoded media: mel spectrogram pieces and normalised face crops.

One implementation for every profile: the mel spectrogram in torch, on the device of the
tensor it is given (CPU in the cpu profile and the predictor, CUDA in the gpu profile); the
face crops cut on that device and resized on the host by OpenCV, as the authors' MTCNN does.
Given a numpy array each answers a numpy array, given a tensor a tensor on the same device.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from fv2es_client import contract

N_FFT = 400
HOP = 200
# MTCNN(image_size=48, margin=2) as the authors configure it.
FACE_MARGIN = 2
# Frames per block when computing the STFT, to bound memory on long audio.
_STFT_BLOCK = 4096


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate=contract.SAMPLE_RATE, n_fft=N_FFT, n_mels=contract.N_MELS,
                   f_min=0.0, f_max=None) -> np.ndarray:
    """HTK-scale triangular filters, unnormalised: float64 [n_fft // 2 + 1, n_mels]."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)
    # Distance from every band edge to every FFT bin; each triangle rises from edge i to
    # i + 1 and falls to i + 2.
    offsets = edges[None, :] - bins[:, None]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


_FILTERBANK = mel_filterbank()


def _like(given, result: torch.Tensor):
    """RESULT as numpy when GIVEN was numpy, else as it is (on GIVEN's device)."""
    return result.cpu().numpy() if isinstance(given, np.ndarray) else result


def mel_spectrogram(audio):
    """Power mel spectrogram of 16 kHz mono AUDIO: float32 [128, T], T = 1 + S // 200.

    torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=200, n_mels=128,
    mel_scale="htk") semantics: periodic Hann window, power 2, no filter normalisation,
    centred frames with reflect padding, no log; float64 inside. Audio shorter than 201
    samples (reflect padding needs more than 200) is zero-padded to 201 first.
    """
    return _like(audio, _mel(torch.as_tensor(audio)))


@functools.lru_cache(maxsize=4)
def _mel_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The periodic Hann window and the filterbank on DEVICE, made once (not per clip)."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64, device=device)
    return window, torch.from_numpy(_FILTERBANK).to(device)


def _mel(audio: torch.Tensor) -> torch.Tensor:
    audio = audio.reshape(-1).double()
    half = N_FFT // 2
    if audio.numel() <= half:
        audio = torch.nn.functional.pad(audio, (0, half + 1 - audio.numel()))
    padded = torch.nn.functional.pad(audio[None], (half, half), mode="reflect")[0]
    frames = padded.unfold(0, N_FFT, HOP)        # a view: no copy
    window, filterbank = _mel_constants(audio.device)
    mel = torch.empty((frames.shape[0], contract.N_MELS), dtype=torch.float32, device=audio.device)
    for start in range(0, frames.shape[0], _STFT_BLOCK):    # blocks bound the memory on long audio
        spectrum = torch.fft.rfft(frames[start:start + _STFT_BLOCK] * window, dim=1)
        mel[start:start + _STFT_BLOCK] = ((spectrum.real ** 2 + spectrum.imag ** 2) @ filterbank).float()
    return mel.T.contiguous()


def mel_pieces(audio):
    """The mel spectrogram cut into 32-frame pieces: float32 [P, 4, 32, 32], P >= 1.

    The last piece is zero-padded; each [128, 32] piece is reshaped in C order to
    [4, 32, 32] (channel c holds mel bins 32c .. 32c + 31), as the authors'
    specs.reshape(B, 4, 32, 32) does.
    """
    mel = _mel(torch.as_tensor(audio))
    width = contract.PIECE_FRAMES
    count = -(-mel.shape[1] // width)
    mel = torch.nn.functional.pad(mel, (0, count * width - mel.shape[1]))
    pieces = mel.reshape(contract.N_MELS, count, width).permute(1, 0, 2)
    return _like(audio, pieces.reshape(count, 4, 32, 32).contiguous())


def face_box(box, frame_height: int, frame_width: int) -> tuple[int, int, int, int]:
    """facenet_pytorch's extract_face box: margin, clamp, int(); at least one pixel."""
    size = contract.FACE_SIZE
    x1, y1, x2, y2 = (float(v) for v in box)
    # margin * box size / (image_size - margin) in all, half on each side.
    margin_x = FACE_MARGIN * (x2 - x1) / (size - FACE_MARGIN)
    margin_y = FACE_MARGIN * (y2 - y1) / (size - FACE_MARGIN)
    left = int(max(x1 - margin_x / 2, 0))
    top = int(max(y1 - margin_y / 2, 0))
    right = int(min(x2 + margin_x / 2, frame_width))
    bottom = int(min(y2 + margin_y / 2, frame_height))
    # A degenerate box would crop nothing; keep one pixel instead of failing the clip.
    left, top = min(left, frame_width - 1), min(top, frame_height - 1)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def centre_region(height: int, width: int) -> tuple[int, int]:
    """"centre": the top-left corner of the frame's central square (torchvision CenterCrop)."""
    size = contract.FACE_SIZE
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def authors_region(height: int, width: int) -> tuple[int, int]:
    """"authors": their crop_img_center's corner, offset (height - 48) // 2 down and 24 px
    less than that across; clamped into the frame (they index out of it below 96 px high)."""
    size = contract.FACE_SIZE
    offset = (height - size) // 2
    return offset, offset - size // 2


# fv2es.preprocessing.NO_FACE_CROPS: the top-left corner of the 48x48 stand-in for a face.
NO_FACE_REGIONS = {"centre": centre_region, "authors": authors_region}


def resize_face(region: np.ndarray) -> np.ndarray:
    """A [h, w, 3] crop to float32 [48, 48, 3] with OpenCV's INTER_AREA in float, as
    facenet_pytorch's MTCNN does on the float frames the authors give it (no rounding)."""
    import cv2

    size = contract.FACE_SIZE
    region = np.ascontiguousarray(region, dtype=np.float32)
    if region.shape[:2] == (size, size):
        return region
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)


def crop_faces(frames, boxes, scores, no_face_crop: str = "centre"):
    """Normalised 48x48 face crops: float32 [F, 3, 48, 48], on the frames' device.

    Where SCORES > 0, the crop follows facenet_pytorch.MTCNN(image_size=48, margin=2,
    post_process=False) on a float image: box plus margin, clamped, cut, resized to 48x48
    (resize_face). Where SCORES == 0 (no face), the NO_FACE_CROP region stands in
    (NO_FACE_REGIONS; the whole frame, resized, when it is smaller than 48 px). Then
    (x - FACE_MEAN) / FACE_STD per channel on the 0-255 scale, in float32 as torchvision's
    Normalize. The crops are cut on the frames' device and resized on the host (a crop is a
    few kB: OpenCV's INTER_AREA is the reference, so it does the resizing).
    """
    on_host = isinstance(frames, np.ndarray)
    device = torch.device("cpu") if on_host else frames.device
    boxes, scores = np.asarray(torch.as_tensor(boxes).cpu()), np.asarray(torch.as_tensor(scores).cpu())
    region_corner = NO_FACE_REGIONS[no_face_crop]
    size = contract.FACE_SIZE
    count, height, width = frames.shape[:3]
    faces = np.empty((count, size, size, 3), dtype=np.float32)
    for i in range(count):
        if scores[i] > 0:
            left, top, right, bottom = face_box(boxes[i], height, width)
        else:
            top, left = region_corner(height, width)
            top, left = min(max(top, 0), max(height - size, 0)), min(max(left, 0), max(width - size, 0))
            bottom, right = top + size, left + size
        region = frames[i, top:bottom, left:right]
        faces[i] = resize_face(region if on_host else region.cpu().numpy())
    faces = torch.from_numpy(faces).to(device)
    mean = torch.tensor(contract.FACE_MEAN, dtype=torch.float32, device=device)
    std = torch.tensor(contract.FACE_STD, dtype=torch.float32, device=device)
    return _like(frames, ((faces - mean) / std).permute(0, 3, 1, 2).contiguous())
