"""fv2es.media on real clips: containers and codecs, the 500 ms sampling rule, variable
frame rate, rotation, scaling, audio resampling and every kind of bad input."""
import math
import re

import av
import numpy as np
import pytest

import media_factory as factory
from fv2es.media import MediaError, decode_audio, decode_video, sample_indices
from fv2es_client import contract

SIZE = (320, 180)
SECONDS = 2.0
# Mean absolute difference (0-255) allowed between a decoded frame and its source:
# lossy coding at these settings stays far below it, a colour or orientation slip far above.
CONTENT_TOLERANCE = 12.0

# container, video codec, audio codec, file suffix, audio rate, audio length tolerance in
# source samples (one codec frame for AAC; MP3 in AVI has no gapless info, so the
# encoder's delay and padding stay in: about two frames).
MATRIX = {
    "mp4-h264-aac": ("mp4", "libx264", "aac", ".mp4", 44_100, 1024),
    "mkv-h264-opus": ("matroska", "libx264", "libopus", ".mkv", 48_000, 0),
    "webm-vp9-opus": ("webm", "libvpx-vp9", "libopus", ".webm", 48_000, 0),
    "avi-mjpeg-pcm": ("avi", "mjpeg", "pcm_s16le", ".avi", 44_100, 0),
    "avi-mpeg4-mp3": ("avi", "mpeg4", "libmp3lame", ".avi", 44_100, 2 * 1152),
    "mov-h264-aac": ("mov", "libx264", "aac", ".mov", 44_100, 1024),
}


def reference_frames(path):
    """Every frame's time (from the container start) and drawn index, decoded with plain
    PyAV, and where the video stream ends: an independent account of the clip."""
    with av.open(str(path)) as container:
        start = container.start_time / 1e6 if container.start_time is not None else 0.0
        frames = list(container.decode(video=0))
    times = [float(f.time) - start for f in frames]
    indices = [factory.read_index(f.to_ndarray(format="rgb24")) for f in frames]
    end = times[-1] + float(frames[-1].duration * frames[-1].time_base)
    return times, indices, end


def expected_index(times, indices, t):
    """The frame on screen at T: the last one at or before it, else the first."""
    shown = [i for time, i in zip(times, indices) if time <= t + 1e-6]
    return shown[-1] if shown else indices[0]


def content_error(decoded, index, size=SIZE, face=True):
    source = factory.frame_image(index, size, face).astype(np.float32)
    return float(np.abs(decoded.astype(np.float32) - source).mean())


@pytest.fixture(scope="module", params=sorted(MATRIX))
def matrix_clip(request, tmp_path_factory):
    container, vcodec, acodec, suffix, rate, tolerance = MATRIX[request.param]
    path = tmp_path_factory.mktemp("matrix") / (request.param + suffix)
    factory.make_clip(path, container, vcodec, acodec, SECONDS, size=SIZE, audio_rate=rate)
    return path, tolerance * 16_000 / rate


def test_every_container_decodes_by_timestamp(matrix_clip):
    path, _ = matrix_clip
    video = decode_video(path.read_bytes())
    times, indices, end = reference_frames(path)
    # Instants k * 0.5 s while k * 0.5 < end of the video stream.
    count = math.ceil(end / contract.FRAME_INTERVAL_S - 1e-6)
    assert video.present
    assert video.frames.shape == (count, SIZE[1], SIZE[0], 3) and video.frames.dtype == np.uint8
    np.testing.assert_allclose(video.times, np.arange(count) * 0.5)
    assert video.times.dtype == np.float32
    picked = [factory.read_index(frame) for frame in video.frames]
    assert picked == [expected_index(times, indices, t) for t in video.times]
    for frame, index in zip(video.frames, picked):
        assert content_error(frame, index) < CONTENT_TOLERANCE
    assert video.duration == pytest.approx(SECONDS, abs=0.05)


def test_every_container_gives_16k_mono_audio(matrix_clip):
    path, tolerance = matrix_clip
    audio = decode_audio(path)
    assert audio.present
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(len(audio.samples) - SECONDS * 16_000) <= tolerance
    assert 0.1 < np.abs(audio.samples).max() < 1.0


def test_face_clip_samples_every_500_ms(face_clip):
    video = decode_video(face_clip)
    assert video.frames.shape == (6, 360, 640, 3)
    np.testing.assert_array_equal(video.times, [0, 0.5, 1, 1.5, 2, 2.5])
    # At 25 fps the frame on screen at t is number floor(25 t).
    assert [factory.read_index(f) for f in video.frames] == [0, 12, 25, 37, 50, 62]
    assert video.duration == pytest.approx(3.0, abs=0.01)


def test_authors_sampling_takes_every_15th_decoded_frame(face_clip):
    # The authors' rule at 25 fps: frames 0, 15, 30, ... at their own times (every 0.6 s).
    video = decode_video(face_clip, "every-15th-frame")
    assert [factory.read_index(f) for f in video.frames] == [0, 15, 30, 45, 60]
    np.testing.assert_allclose(video.times, [0, 0.6, 1.2, 1.8, 2.4], atol=1e-6)
    # The same rule on known timestamps (the NVDEC path picks frames by index).
    times = np.arange(250) / 25.0      # 10 s at 25 fps: 17 frames, where every 0.5 s gives 20
    indices, instants = sample_indices(times, 10.0, "every-15th-frame")
    assert indices.tolist() == list(range(0, 250, 15)) and len(indices) == 17
    np.testing.assert_allclose(instants, times[::15])
    assert len(sample_indices(times, 10.0)[0]) == 20


def test_sampled_frames_stop_at_the_contract_limit(face_clip, monkeypatch):
    from fv2es import media

    monkeypatch.setattr(media, "MAX_FRAMES", 3)     # a header that understates the length
    for sampling in ("every-0.5s", "every-15th-frame"):
        with pytest.raises(MediaError, match=r"video too long: more than 3 sampled frames"):
            decode_video(face_clip, sampling)


def test_noface_clip(noface_clip):
    video = decode_video(noface_clip)
    assert [factory.read_index(f) for f in video.frames] == [0, 12, 25, 37]
    for frame, index in zip(video.frames, [0, 12, 25, 37]):
        assert content_error(frame, index, face=False) < CONTENT_TOLERANCE
    assert np.abs(decode_audio(noface_clip).samples).max() < 1e-3     # silence


def test_bytes_and_path_decode_alike(face_clip):
    from_path = decode_video(face_clip)
    from_bytes = decode_video(face_clip.read_bytes())
    np.testing.assert_array_equal(from_path.frames, from_bytes.frames)
    np.testing.assert_array_equal(decode_audio(face_clip).samples,
                                  decode_audio(face_clip.read_bytes()).samples)


@pytest.mark.parametrize("container,suffix", [("mp4", ".mp4"), ("matroska", ".mkv")])
def test_variable_frame_rate_follows_timestamps(tmp_path, container, suffix):
    path = factory.make_clip(tmp_path / ("vfr" + suffix), container, "libx264", None, 3.0,
                             size=SIZE, vfr=True)
    times_ms = factory.vfr_times(3.0)
    video = decode_video(path)
    # The last frame is at 2.74 s: instants 0 .. 2.5 s, whatever its duration (< 0.26 s).
    assert times_ms[-1] == 2740 and len(video.frames) == 6
    expected = [int(np.flatnonzero(times_ms <= t * 1000)[-1]) for t in video.times]
    assert expected == [0, 5, 5, 8, 11, 13]     # long gaps repeat a frame
    assert [factory.read_index(f) for f in video.frames] == expected


def test_raw_stream_without_timestamps_counts_frame_durations(tmp_path):
    path = factory.make_clip(tmp_path / "raw.h264", "h264", "libx264", None, 2.0, size=SIZE)
    video = decode_video(path)
    assert [factory.read_index(f) for f in video.frames] == [0, 12, 25, 37]
    assert video.duration == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    path = factory.make_clip(tmp_path / f"rot{rotation}.mp4", "mp4", "libx264", None, 1.0,
                             size=SIZE, rotation=rotation)
    video = decode_video(path)
    assert video.frames.shape == (2, SIZE[0], SIZE[1], 3)     # portrait now
    for frame, index in zip(video.frames, [0, 12]):
        # Undo the player's clockwise turn; had the decoder turned the other way, this
        # would leave the picture upside down and neither check would pass.
        upright = np.rot90(frame, rotation // 90)
        assert factory.read_index(upright) == index
        assert content_error(upright, index) < CONTENT_TOLERANCE


def test_frames_are_scaled_to_max_side(face_clip):
    video = decode_video(face_clip, max_side=320)
    assert video.frames.shape == (6, 180, 320, 3)
    source = factory.frame_image(0)
    # Area scaling: each output pixel is the mean of its 2x2 footprint.
    halved = source.reshape(180, 2, 320, 2, 3).mean(axis=(1, 3))
    assert np.abs(video.frames[0] - halved).mean() < CONTENT_TOLERANCE
    assert decode_video(face_clip, max_side=2000).frames.shape == (6, 360, 640, 3)


def test_audio_is_resampled_mono_and_keeps_pitch(tmp_path):
    # 44.1 kHz stereo 1 kHz tone, right channel at half the level of the left.
    for name, container, codec in [("tone.wav", "wav", "pcm_s16le"), ("tone.m4a", "ipod", "aac")]:
        path = factory.make_clip(tmp_path / name, container, None, codec, 2.0, audio="tone",
                                 tone_hz=1000.0)
        samples = decode_audio(path).samples
        assert abs(len(samples) - 32_000) <= 1024 * 16_000 / 44_100
        segment = samples[4000:20000]
        peak_hz = np.argmax(np.abs(np.fft.rfft(segment))) * 16_000 / len(segment)
        assert peak_hz == pytest.approx(1000.0, abs=2.0)
        # Mono is the channels' mean: (0.5 + 0.25) / 2 amplitude, RMS 0.375 / sqrt(2).
        rms = np.sqrt(np.mean(samples[4000:28000] ** 2))
        assert rms == pytest.approx(0.375 / math.sqrt(2), rel=0.03)


@pytest.mark.parametrize("channel,amplitude", [("mean", 0.375), ("left", 0.5), ("right", 0.25),
                                               ("loudest", 0.5)])
def test_audio_channel_rules(tmp_path, channel, amplitude):
    # The stereo tone's right channel is at half the left's level; a mono file has one channel.
    stereo = factory.make_clip(tmp_path / "stereo.wav", "wav", None, "pcm_s16le", 2.0, audio="tone")
    mono = factory.make_clip(tmp_path / "mono.wav", "wav", None, "pcm_s16le", 2.0, audio="tone",
                             audio_channels=1)
    samples = decode_audio(stereo, channel).samples
    assert np.sqrt(np.mean(samples[4000:28000] ** 2)) == pytest.approx(amplitude / math.sqrt(2), rel=0.03)
    np.testing.assert_allclose(decode_audio(mono, channel).samples, decode_audio(mono, "mean").samples)


def test_loudest_channel_is_the_louder_over_the_whole_file(tmp_path):
    import wave

    # Left loud for the first second, right loud for the next two: right has more energy.
    t = np.arange(48_000) / 16_000
    tone = np.sin(2 * np.pi * 440 * t)
    left = np.where(t < 1, 0.6, 0.1) * tone
    right = np.where(t < 1, 0.1, 0.5) * tone
    path = tmp_path / "turns.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes((np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes())
    np.testing.assert_allclose(decode_audio(path, "loudest").samples, right, atol=1e-4)
    np.testing.assert_allclose(decode_audio(path, "left").samples, left, atol=1e-4)


def test_unknown_audio_channel_is_refused(tmp_path):
    clip = factory.make_clip(tmp_path / "mono.wav", "wav", None, "pcm_s16le", 0.5, audio="tone")
    with pytest.raises(ValueError, match="audio channel 'centre'"):
        decode_audio(clip, "centre")


def test_audio_that_changes_layout_mid_stream(tmp_path):
    # Two raw AAC (ADTS) files back to back: 1 s mono, then 1 s stereo, both at 16 kHz,
    # which the decoder gives as fltp already, so the first resampler passes frames through.
    mono = factory.make_clip(tmp_path / "mono.aac", "adts", None, "aac", 1.0, audio="tone",
                             audio_rate=16_000, audio_channels=1)
    stereo = factory.make_clip(tmp_path / "stereo.aac", "adts", None, "aac", 1.0, audio="tone",
                               audio_rate=16_000, audio_channels=2)
    samples = decode_audio(mono.read_bytes() + stereo.read_bytes()).samples
    # ADTS keeps each encoder's priming and padding: up to 2048 extra samples per file.
    assert 32_000 <= len(samples) <= 32_000 + 2 * 2048
    first, second = samples[4000:12000], samples[-12000:-4000]
    assert np.sqrt(np.mean(first ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    assert np.sqrt(np.mean(second ** 2)) == pytest.approx(0.375 / math.sqrt(2), rel=0.03)


def test_audio_only_file(audio_only_clip):
    video = decode_video(audio_only_clip)
    assert not video.present and video.frames.shape == (0, 0, 0, 3) and len(video.times) == 0
    assert video.duration == pytest.approx(3.0, abs=0.01)
    audio = decode_audio(audio_only_clip)
    assert audio.present and abs(len(audio.samples) - 48_000) <= 1024 * 16_000 / 44_100


def test_video_only_file(video_only_clip):
    assert decode_video(video_only_clip).frames.shape == (4, 180, 320, 3)
    audio = decode_audio(video_only_clip)
    assert not audio.present and audio.samples.shape == (0,) and audio.samples.dtype == np.float32


def test_cover_art_is_not_video(tmp_path):
    path = factory.make_song_with_cover(tmp_path / "song.mp3")
    with av.open(str(path)) as container:     # the ID3 tag keeps the picture as cover art
        assert container.streams.video[0].disposition & av.stream.Disposition.attached_pic
    assert not decode_video(path).present
    assert decode_audio(path).present


@pytest.mark.parametrize("name", ["empty", "random_bytes", "subtitles_only", "truncated_mp4"])
@pytest.mark.parametrize("decode", [decode_video, decode_audio])
def test_bad_inputs_raise_media_error(bad_media, name, decode):
    path, message = bad_media[name]
    for media in (path, path.read_bytes()):
        with pytest.raises(MediaError, match=re.escape(message)):
            decode(media)


def test_truncated_matroska_is_detected(tmp_path):
    good = factory.make_clip(tmp_path / "good.mkv", "matroska", "libx264", "libopus", 3.0,
                             size=SIZE, audio_rate=48_000)
    cut = factory.write_truncated(good, tmp_path / "cut.mkv", keep=0.4)
    for decode in (decode_video, decode_audio):
        with pytest.raises(MediaError, match=r"truncated or corrupt media: data ends at .* but "
                                             r"the header declares 3\.0\d s"):
            decode(cut)


def test_empty_video_stream(tmp_path):
    path = factory.write_empty_video_stream(tmp_path / "no_frames.mkv")
    with pytest.raises(MediaError, match="video stream has no decodable frames"):
        decode_video(path)
    assert len(decode_audio(path).samples) == 16_000


def test_size_limit(face_clip, monkeypatch):
    monkeypatch.setattr(contract, "MAX_MEDIA_BYTES", 1000)
    size = face_clip.stat().st_size
    for media in (face_clip, face_clip.read_bytes()):
        with pytest.raises(MediaError, match=f"file too large: {size} bytes > limit 1000"):
            decode_video(media)


def test_missing_path(tmp_path):
    with pytest.raises(MediaError, match="cannot read .*missing.mp4: No such file"):
        decode_audio(tmp_path / "missing.mp4")


def test_too_long_inputs_are_refused_before_decoding(tmp_path):
    # 130 s of tiny 1 fps video and 16 kHz audio: over the contract's 256 frames (128 s).
    clip = factory.make_clip(tmp_path / "long.mkv", "matroska", "libx264", "pcm_s16le", 130.0,
                                   size=(32, 32), fps=1, face=False, audio="silence", audio_rate=16_000,
                                   audio_channels=1)
    with pytest.raises(MediaError, match=r"video too long: 13\d\.\d s > limit 128 s"):
        decode_video(clip)
    audio = decode_audio(clip)  # audio has its own, longer limit (10 min)
    assert audio.present and len(audio.samples) == 130 * 16_000


# ---------------------------------------------------------------- hostile inputs


def test_ffconcat_list_is_refused_and_opens_nothing(tmp_path, monkeypatch):
    # Relative to the decoder's working directory, as an attacker would aim it.
    target = tmp_path / "server_side.mp4"
    factory.make_clip(target, "mp4", "libx264", None, 1.0, size=(64, 64))
    monkeypatch.chdir(tmp_path)
    for decode in (decode_video, decode_audio):
        with pytest.raises(MediaError, match="refused: an ffconcat list refers to other files"):
            decode(factory.ffconcat_list(target.name))


def test_sdp_description_is_refused_without_opening_sockets():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for decode in (decode_video, decode_audio):
        with pytest.raises(MediaError, match="refused: an SDP session description"):
            decode(factory.sdp_description(port))
    # Still free: nothing bound it (the decoder would have bound it to receive RTP).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("0.0.0.0", port))


@pytest.mark.parametrize("text", [b"#EXTM3U\n#EXTINF:10,\nclip.ts\n",
                                  b"file 'clip.mp4'\n",        # concat without its header line
                                  b"\x89PNG\r\n\x1a\n" + bytes(64)])  # an image: image2 is not on the list
def test_formats_off_the_list_are_not_opened(text):
    with pytest.raises(MediaError, match="refused|not a media file"):
        decode_video(text)


def test_gif_bomb_is_refused_from_its_header():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MediaError, match=r"^frame 16000x16000 exceeds the 8192x8192 limit$"):
        decode_video(factory.gif_bomb())
    # Refused before decoding a 16000x16000 picture (768 MB as RGB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB


def test_pixel_count_limit():
    with pytest.raises(MediaError, match=r"frame 8000x8000 has 64000000 pixels, over the 35389440 limit"):
        decode_video(factory.gif_bomb(8000, 8000))
    small = decode_video(factory.gif_bomb(64, 48))
    assert small.frames.shape[1:] == (48, 64, 3)


def test_audio_longer_than_its_header_says_stops_at_the_limit(tmp_path, monkeypatch):
    import io
    import types

    from fv2es import media

    clip = factory.make_lying_duration(tmp_path / "lying.mkv", seconds=900.0, declared=5.0)
    with av.open(str(clip)) as container:
        assert container.duration / 1e6 == pytest.approx(5.0)
    reads = []

    class Recording(io.BytesIO):
        def read(self, size=-1):
            reads.append(self.tell())
            return super().read(size)

    monkeypatch.setattr(media, "io", types.SimpleNamespace(BytesIO=Recording))
    data = clip.read_bytes()
    with pytest.raises(MediaError, match=r"audio too long: more than 600 s decoded"):
        decode_audio(data)
    # Decoding stopped near 600 of the 900 s: the last quarter of the file was never read.
    assert max(reads) < 0.75 * len(data)


@pytest.mark.parametrize("default", [None, 1])
def test_the_audio_track_with_sound_is_used(tmp_path, default):
    clip = factory.make_two_audio_tracks(tmp_path / "two.mkv", "silence", "speech", default=default)
    audio = decode_audio(clip)
    assert audio.stream == 1
    assert np.abs(audio.samples).max() > 0.1


def test_default_track_is_preferred_when_both_have_sound(tmp_path):
    clip = factory.make_two_audio_tracks(tmp_path / "two.mkv", "tone", "speech", default=1)
    assert decode_audio(clip).stream == 1
    clip = factory.make_two_audio_tracks(tmp_path / "first.mkv", "tone", "speech", default=None)
    assert decode_audio(clip).stream == 0


def test_all_silent_tracks_give_the_first_candidate(tmp_path):
    clip = factory.make_two_audio_tracks(tmp_path / "quiet.mkv", "silence", "silence", default=None)
    audio = decode_audio(clip)
    assert audio.present and audio.stream == 0 and not np.abs(audio.samples).any()


def test_fuzzed_files_raise_only_media_errors(tmp_path):
    """Mutants of H.264/AAC mp4 and VP9/Opus webm from a fixed seed (benchmarks.fuzzing):
    decoding answers or raises MediaError, never anything else (a codec FFmpeg has no
    decoder for once raised AttributeError)."""
    from benchmarks.fuzzing import fuzz_sources, mutants

    sources = [path.read_bytes() for path in fuzz_sources(tmp_path)]
    for media in mutants(sources, count=1500, seed=7):
        for decode in (decode_video, decode_audio):
            try:
                decode(media)
            except MediaError:
                pass


def test_scaled_size_rounds_halves_up_as_the_nvdec_path_does():
    from fv2es.media import scaled_size

    # DALI's resize on the NVDEC path computes floor(side * scale + 0.5).
    assert scaled_size(2560, 1441) == (1280, 721)
    assert scaled_size(1920, 1080) == (1280, 720) and scaled_size(640, 360) == (640, 360)
    assert scaled_size(100, 20000, max_side=1280) == (6, 1280) and scaled_size(1, 9000) == (1, 1280)
