"""Model inputs from decoded media: mel spectrogram pieces and normalised face crops.

One implementation, in torch, for every profile: it runs on the device of the tensor it is
given (CPU in the cpu profile and the predictor, CUDA in the gpu profile). Given a numpy
array it answers a numpy array, given a tensor a tensor on the same device.
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


def area_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 matrix [size_out, size_in] of each output cell's input span, and span lengths.

    The spans are torch's adaptive average pooling ones (interpolate mode="area"):
    floor(i * in / out) to ceil((i + 1) * in / out).
    """
    i = np.arange(size_out)
    starts = (i * size_in) // size_out
    ends = -((-(i + 1) * size_in) // size_out)
    j = np.arange(size_in)
    spans = (j[None, :] >= starts[:, None]) & (j[None, :] < ends[:, None])
    return spans.astype(np.float64), (ends - starts).astype(np.float64)


def area_resize(image, height: int, width: int):
    """Resize [H, W, C] like torch interpolate(mode="area"): float64 [height, width, C].

    Sums are taken with 0/1 weights and divided once, so a mean that is a whole number
    comes out exact (facenet truncates the result to uint8 next).
    """
    return _like(image, _area_resize(torch.as_tensor(image), height, width))


def _area_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    rows, row_counts = (torch.from_numpy(a).to(image.device) for a in area_weights(image.shape[0], height))
    cols, col_counts = (torch.from_numpy(a).to(image.device) for a in area_weights(image.shape[1], width))
    sums = torch.einsum("ih,hwc,jw->ijc", rows, image.double(), cols)
    return sums / (row_counts[:, None, None] * col_counts[None, :, None])


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


def _centre_patch(frame: torch.Tensor) -> torch.Tensor:
    """The frame's central FACE_SIZE square (torchvision CenterCrop offsets), or the
    whole frame resized when it is smaller than that."""
    size = contract.FACE_SIZE
    height, width = frame.shape[:2]
    if height < size or width < size:
        return _area_resize(frame, size, size)
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return frame[top:top + size, left:left + size].double()


def crop_faces(frames, boxes, scores):
    """Normalised 48x48 face crops: float32 [F, 3, 48, 48], on the frames' device.

    Where SCORES > 0, the crop follows facenet_pytorch.MTCNN(image_size=48, margin=2,
    post_process=False) on a tensor image: box plus margin, clamped, cut, area-resized
    to 48x48 and truncated to uint8. Where SCORES == 0 (no face) the centre patch of the
    frame stands in, as the authors do. Then (x - FACE_MEAN) / FACE_STD per channel on
    the 0-255 scale. The boxes and scores are read on the host (5 floats a frame) to plan
    the crops; the pixels stay on their device.
    """
    images = torch.as_tensor(frames)
    boxes, scores = np.asarray(torch.as_tensor(boxes).cpu()), np.asarray(torch.as_tensor(scores).cpu())
    size = contract.FACE_SIZE
    count, height, width = images.shape[:3]
    faces = torch.empty((count, size, size, 3), dtype=torch.float64, device=images.device)
    for i in range(count):
        if scores[i] > 0:
            left, top, right, bottom = face_box(boxes[i], height, width)
            faces[i] = torch.floor(_area_resize(images[i, top:bottom, left:right], size, size))
        else:
            faces[i] = _centre_patch(images[i])
    mean = torch.tensor(contract.FACE_MEAN, dtype=torch.float64, device=images.device)
    std = torch.tensor(contract.FACE_STD, dtype=torch.float64, device=images.device)
    return _like(frames, ((faces - mean) / std).permute(0, 3, 1, 2).float().contiguous())
