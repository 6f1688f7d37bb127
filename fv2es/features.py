"""Model inputs from decoded media: mel spectrogram pieces and normalised face crops.

numpy only (no torch): the Triton python-backend steps and the in-process predictor share
this code.
"""
from __future__ import annotations

import numpy as np
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
# Periodic Hann, as torch.hann_window(N_FFT) gives.
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)


def mel_spectrogram(audio: np.ndarray) -> np.ndarray:
    """Power mel spectrogram of 16 kHz mono AUDIO: float32 [128, T], T = 1 + S // 200.

    torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=200, n_mels=128,
    mel_scale="htk") semantics: periodic Hann window, power 2, no filter normalisation,
    centred frames with reflect padding, no log. Audio shorter than 201 samples (reflect
    padding needs more than 200) is zero-padded to 201 first.
    """
    audio = np.asarray(audio, np.float64).reshape(-1)
    half = N_FFT // 2
    if audio.size <= half:
        audio = np.pad(audio, (0, half + 1 - audio.size))
    padded = np.pad(audio, half, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    mel = np.empty((frames.shape[0], contract.N_MELS), np.float32)
    for start in range(0, frames.shape[0], _STFT_BLOCK):
        spectrum = np.fft.rfft(frames[start:start + _STFT_BLOCK] * _WINDOW, axis=1)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        mel[start:start + _STFT_BLOCK] = power @ _FILTERBANK
    return mel.T.copy()


def mel_pieces(audio: np.ndarray) -> np.ndarray:
    """The mel spectrogram cut into 32-frame pieces: float32 [P, 4, 32, 32], P >= 1.

    The last piece is zero-padded; each [128, 32] piece is reshaped in C order to
    [4, 32, 32] (channel c holds mel bins 32c .. 32c + 31), as the authors'
    specs.reshape(B, 4, 32, 32) does.
    """
    mel = mel_spectrogram(audio)
    width = contract.PIECE_FRAMES
    count = -(-mel.shape[1] // width)
    padded = np.zeros((contract.N_MELS, count * width), np.float32)
    padded[:, :mel.shape[1]] = mel
    pieces = padded.reshape(contract.N_MELS, count, width).transpose(1, 0, 2)
    return np.ascontiguousarray(pieces).reshape(count, 4, 32, 32)


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


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize [H, W, C] like torch interpolate(mode="area"): float64 [height, width, C].

    Sums are taken with 0/1 weights and divided once, so a mean that is a whole number
    comes out exact (facenet truncates the result to uint8 next).
    """
    rows, row_counts = area_weights(image.shape[0], height)
    cols, col_counts = area_weights(image.shape[1], width)
    sums = np.einsum("ih,hwc,jw->ijc", rows, image.astype(np.float64), cols, optimize=True)
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


def _centre_patch(frame: np.ndarray) -> np.ndarray:
    """The frame's central FACE_SIZE square (torchvision CenterCrop offsets), or the
    whole frame resized when it is smaller than that."""
    size = contract.FACE_SIZE
    height, width = frame.shape[:2]
    if height < size or width < size:
        return area_resize(frame, size, size)
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return frame[top:top + size, left:left + size].astype(np.float64)


def crop_faces(frames: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Normalised 48x48 face crops: float32 [F, 3, 48, 48].

    Where SCORES > 0, the crop follows facenet_pytorch.MTCNN(image_size=48, margin=2,
    post_process=False) on a tensor image: box plus margin, clamped, cut, area-resized
    to 48x48 and truncated to uint8. Where SCORES == 0 (no face) the centre patch of the
    frame stands in, as the authors do. Then (x - FACE_MEAN) / FACE_STD per channel on
    the 0-255 scale.
    """
    size = contract.FACE_SIZE
    count, height, width = frames.shape[:3]
    faces = np.empty((count, size, size, 3), np.float64)
    for i in range(count):
        if scores[i] > 0:
            left, top, right, bottom = face_box(boxes[i], height, width)
            faces[i] = np.floor(area_resize(frames[i, top:bottom, left:right], size, size))
        else:
            faces[i] = _centre_patch(frames[i])
    mean = np.asarray(contract.FACE_MEAN)
    std = np.asarray(contract.FACE_STD)
    return ((faces - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
