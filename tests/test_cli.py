"""`fv2es predict`: the in-process CLI on real clips and on every kind of bad input."""
import json
import subprocess
import sys

import pytest


def fv2es(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fv2es.cli", "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_predict_json_on_a_real_clip(face_clip):
    out = fv2es(face_clip, "--transcript", "what a wonderful surprise", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert len(answer["probabilities"]) == 6 and answer["labels"][0] == "ang"
    assert answer["untrained"] and "UNTRAINED" in answer["weights"]
    assert answer["transcript"] == "what a wonderful surprise" and answer["transcript_source"] == "request"
    assert all(answer["faces_found"]) and len(answer["faces_found"]) == 6
    assert set(answer["timings_s"]) >= {"decode_video", "detect_faces", "audio_encoder", "fusion"}


def test_predict_recognises_speech(tmp_path):
    from speech import MAX_WER, speech_clip, wer

    clip, spoken = speech_clip(tmp_path)
    out = fv2es(clip, "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["transcript_source"] == "recognition" and answer["modality_present"]["text"]
    assert wer(spoken, answer["transcript"]) < MAX_WER, answer["transcript"]


def test_missing_modalities_degrade_with_flags(audio_only_clip, video_only_clip):
    audio_only = fv2es(audio_only_clip, "--json", "--asr", "none")
    assert audio_only.returncode == 0, audio_only.stderr
    answer = json.loads(audio_only.stdout)
    assert answer["modality_present"] == {"visual": False, "audio": True, "text": False}
    assert any("video" in w for w in answer["warnings"])
    video_only = fv2es(video_only_clip, "--asr", "none")
    assert video_only.returncode == 0, video_only.stderr
    assert "audio" in video_only.stdout and "UNTRAINED" in video_only.stdout


@pytest.mark.parametrize("name", ["empty", "random_bytes", "subtitles_only", "truncated_mp4"])
def test_bad_input_gives_one_clear_line(bad_media, name):
    path, message = bad_media[name]
    out = fv2es(path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fv2es: error:"), out.stderr
    assert message in lines[0]


def test_missing_file_and_zero_length_stream(tmp_path):
    import media_factory

    out = fv2es(tmp_path / "nope.mp4")
    assert out.returncode != 0 and "no such file" in out.stderr
    empty_stream = media_factory.write_empty_video_stream(tmp_path / "empty_stream.mkv")
    out = fv2es(empty_stream)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "no decodable" in out.stderr
