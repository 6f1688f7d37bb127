"""fv2es.features against independent references: librosa for the mel spectrogram,
facenet_pytorch's face extraction on a float frame (its box arithmetic written out here, its
resize being OpenCV's INTER_AREA) and the authors' crop_img_center where no face is found."""
import cv2
import librosa
import numpy as np
import pytest

import media_factory as factory
from authors_reference import authors_crop_img_center, facenet_crop, normalise
from fv2es.features import crop_faces, mel_pieces, mel_spectrogram
from fv2es_client import contract

MEAN = np.array(contract.FACE_MEAN)
STD = np.array(contract.FACE_STD)


def librosa_mel(audio):
    return librosa.feature.melspectrogram(
        y=audio.astype(np.float64), sr=16_000, n_fft=400, hop_length=200, win_length=400,
        window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=128, htk=True,
        norm=None, fmin=0.0, fmax=8000.0)


@pytest.mark.filterwarnings("ignore:Empty filters detected")   # as torchaudio: 128 mels at 16 kHz
def test_mel_matches_librosa():
    # Speech-like audio over a -60 dB noise floor, as a recording has.
    audio = factory.speech_like(2.0, 16_000)
    audio += 1e-3 * np.random.default_rng(0).standard_normal(audio.size).astype(np.float32)
    ours, reference = mel_spectrogram(audio), librosa_mel(audio)
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (128, 161)
    # Max absolute error relative to the largest value: <= 1e-4 (about 6e-8 in practice).
    assert np.abs(ours - reference).max() <= 1e-4 * reference.max()
    # Elementwise relative error <= 1e-4 wherever a value is not tiny, i.e. >= 1e-8 of the
    # max (-80 dB; below that both sides are float64 round-off, 1e-14 of the max).
    big = reference >= 1e-8 * reference.max()
    assert big.mean() > 0.9
    assert (np.abs(ours - reference)[big] / reference[big]).max() <= 1e-4


@pytest.mark.parametrize("samples,frames", [(0, 2), (1, 2), (200, 2), (201, 2), (399, 2),
                                            (400, 3), (16_000, 81), (48_000, 241)])
def test_mel_frame_count(samples, frames):
    # 1 + S // 200 frames; audio too short for reflect padding is zero-padded to 201.
    mel = mel_spectrogram(np.ones(samples, np.float32))
    assert mel.shape == (128, frames)


def test_mel_of_a_tone_peaks_at_its_band():
    tone = factory.tone(1.0, 16_000, hz=1000.0)
    # Band centres on the HTK scale: mel(f) = 2595 log10(1 + f / 700), 130 edges to 8 kHz.
    centres = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 130) / 2595) - 1)
    band = int(np.argmax(mel_spectrogram(tone)[:, 10]))
    assert centres[band] < 1000 * 1.1 and centres[band + 2] > 1000 / 1.1


def test_pieces_cut_pad_and_reshape():
    audio = factory.speech_like(1.0, 16_000)        # 81 frames: 3 pieces, 15 padding frames
    mel, pieces = mel_spectrogram(audio), mel_pieces(audio)
    assert pieces.shape == (3, 4, 32, 32) and pieces.dtype == np.float32
    # pieces[p, c, r, col] is mel bin 32 c + r at frame 32 p + col (C-order reshape).
    for p in range(3):
        for c in range(4):
            width = min(32, 81 - 32 * p)
            np.testing.assert_array_equal(pieces[p, c, :, :width],
                                          mel[32 * c:32 * c + 32, 32 * p:32 * p + width])
    assert not pieces[2, :, :, 17:].any() and pieces[2, :, :, :17].any()


def test_exact_multiple_needs_no_padding_piece():
    audio = np.random.default_rng(0).standard_normal(63 * 200).astype(np.float32)   # 64 frames
    assert mel_pieces(audio).shape == (2, 4, 32, 32)


@pytest.mark.parametrize("samples", [0, 150])
def test_empty_or_short_audio_gives_one_piece(samples):
    pieces = mel_pieces(np.zeros(samples, np.float32))
    assert pieces.shape == (1, 4, 32, 32) and not pieces.any()


def test_face_crops_match_facenet():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (4, 180, 320, 3)).astype(np.uint8)
    boxes = np.array([[100.3, 40.7, 180.9, 140.2],     # inside
                      [-12.0, -5.5, 60.0, 70.0],       # over the top-left edge
                      [280.0, 150.0, 330.0, 200.0],    # over the bottom-right edge
                      [10.0, 10.0, 30.0, 25.0]],       # smaller than 48: upsampled
                     np.float32)
    faces = crop_faces(frames, boxes, np.ones(4, np.float32))
    assert faces.shape == (4, 3, 48, 48) and faces.dtype == np.float32
    for frame, box, face in zip(frames, boxes, faces):
        np.testing.assert_allclose(face, normalise(facenet_crop(frame, box)), rtol=0, atol=1e-5)
    # Not rounded to integers before normalising (torch's area mode with .byte() was): a
    # random frame's 80x100 region averages to fractions.
    raw = faces[0] * STD[:, None, None] + MEAN[:, None, None]
    assert np.abs(raw - np.round(raw)).max() > 0.1


def test_no_face_falls_back_to_the_centre_patch():
    frames = np.random.default_rng(3).integers(0, 256, (2, 181, 320, 3)).astype(np.uint8)
    boxes = np.array([[0, 0, 0, 0], [10, 10, 100, 100]], np.float32)
    faces = crop_faces(frames, boxes, np.array([0.0, 0.9], np.float32))
    # CenterCrop offsets: round((181 - 48) / 2) = 66 (half-to-even), (320 - 48) / 2 = 136.
    patch = frames[0, 66:114, 136:184].transpose(2, 0, 1)
    np.testing.assert_allclose(faces[0], normalise(patch), rtol=0, atol=1e-5)
    np.testing.assert_allclose(faces[1], normalise(facenet_crop(frames[1], boxes[1])), atol=1e-5)


@pytest.mark.parametrize("shape", [(360, 640), (480, 640), (720, 1280), (181, 320)])
def test_no_face_falls_back_to_the_authors_region(shape):
    frames = np.random.default_rng(5).integers(0, 256, (1, *shape, 3)).astype(np.uint8)
    faces = crop_faces(frames, np.zeros((1, 4), np.float32), np.zeros(1, np.float32), "authors")
    np.testing.assert_allclose(faces[0], normalise(authors_crop_img_center(frames[0]).transpose(2, 0, 1)),
                               rtol=0, atol=1e-5)
    if shape == (360, 640):      # columns 132:180, left of the frame's centre (296:344)
        np.testing.assert_array_equal(authors_crop_img_center(frames[0]), frames[0, 156:204, 132:180])


def test_authors_region_is_clamped_into_small_frames():
    # Below 96 px high their offset - 24 is negative (they would index from the right): clamped to 0.
    frames = np.random.default_rng(6).integers(0, 256, (1, 80, 120, 3)).astype(np.uint8)
    faces = crop_faces(frames, np.zeros((1, 4), np.float32), np.zeros(1, np.float32), "authors")
    np.testing.assert_allclose(faces[0], normalise(frames[0, 16:64, 0:48].transpose(2, 0, 1)), atol=1e-5)


@pytest.mark.parametrize("no_face_crop", ["centre", "authors"])
def test_small_frame_without_face_is_resized_whole(no_face_crop):
    frame = np.random.default_rng(4).integers(0, 256, (1, 30, 40, 3)).astype(np.uint8)
    faces = crop_faces(frame, np.zeros((1, 4), np.float32), np.zeros(1, np.float32), no_face_crop)
    reference = cv2.resize(frame[0].astype(np.float32), (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(faces[0], normalise(reference.transpose(2, 0, 1)), rtol=0, atol=1e-4)


def test_mean_coloured_frame_normalises_to_zero():
    frame = np.broadcast_to(np.array(contract.FACE_MEAN, np.uint8), (1, 64, 64, 3))
    faces = crop_faces(frame, np.array([[8, 8, 56, 56]], np.float32), np.ones(1, np.float32))
    assert np.abs(faces).max() < 1e-6


def test_no_frames():
    faces = crop_faces(np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 4), np.float32),
                       np.zeros(0, np.float32))
    assert faces.shape == (0, 3, 48, 48)
