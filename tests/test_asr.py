"""Speech recognition for the text modality (fv2es.asr) on synthesised speech in mp4 clips."""
import numpy as np
import pytest

from fv2es import asr
from speech import MAX_WER, long_speech_clip, read_audio, silent_clip, speech_clip, wer


@pytest.fixture(scope="module")
def transcriber():
    return asr.Transcriber(cpu_threads=2)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return tmp_path_factory.mktemp("asr_clips")


class MustNotRecognise:
    def transcribe(self, audio):
        raise AssertionError("recognition ran although the request carried a transcript")


def test_recognises_a_spoken_sentence(transcriber, clips):
    path, spoken = speech_clip(clips)
    audio = read_audio(path)
    text, source, seconds = asr.resolve_transcript("", audio, transcriber)
    error = wer(spoken, text)
    print(f"\n{len(audio) / 16000:.1f} s clip recognised in {seconds:.2f} s, WER {error:.1%}: {text!r}")
    assert source == "recognition"
    assert 0 < seconds
    assert error < MAX_WER, text


def test_request_transcript_skips_recognition():
    audio = np.zeros(16000, np.float32)
    assert asr.resolve_transcript("  I feel fine.\n", audio, MustNotRecognise()) == ("I feel fine.", "request", 0.0)


def test_no_transcriber_or_no_audio_gives_none(transcriber):
    assert asr.resolve_transcript("", np.zeros(16000, np.float32), None) == ("", "none", 0.0)
    assert asr.resolve_transcript("", np.zeros(0, np.float32), transcriber) == ("", "none", 0.0)
    assert asr.resolve_transcript("", None, transcriber) == ("", "none", 0.0)


def test_silence_gives_empty_text(transcriber, clips):
    text, source, _ = asr.resolve_transcript("", read_audio(silent_clip(clips)), transcriber)
    assert (text, source) == ("", "recognition")


def test_repetition_loops_on_wordless_voice_are_dropped(transcriber, clips):
    # media_factory's speech-like audio: voiced babble with no words, on which Whisper
    # alone writes "Okay, okay, okay, ..." (compression ratio 3.9).
    from media_factory import make_clip

    path = make_clip(clips / "babble.mp4", "mp4", "libx264", "aac", 10.0, size=(160, 90), audio="speech")
    assert transcriber.transcribe(read_audio(path)).text == ""


def test_non_speech_sounds_give_empty_text(transcriber):
    # Without the VAD, Whisper turns this tone into "beep beep ..." and low hum into ". . .".
    t = np.arange(5 * 16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    hum = 0.05 * np.sin(2 * np.pi * 50 * t) + 0.002 * np.random.default_rng(0).standard_normal(t.size)
    for sound in (tone, hum):
        assert transcriber.transcribe(sound.astype(np.float32)).text == ""


def test_a_minute_of_speech(transcriber, clips):
    path, spoken = long_speech_clip(clips, seconds=60)
    audio = read_audio(path)
    result = transcriber.transcribe(audio)
    error = wer(spoken, result.text)
    print(f"\n{len(audio) / 16000:.1f} s clip recognised in {result.seconds:.2f} s, WER {error:.1%}")
    assert len(audio) >= 60 * 16000
    assert error < MAX_WER, result.text


def test_model_loads_once_and_decoding_is_deterministic(monkeypatch, clips):
    import faster_whisper

    loads = []
    real = faster_whisper.WhisperModel

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(faster_whisper, "WhisperModel", counting)
    transcriber = asr.Transcriber(cpu_threads=2)
    audio = read_audio(speech_clip(clips)[0])
    first, second = transcriber.transcribe(audio), transcriber.transcribe(audio)
    assert len(loads) == 1
    assert first.text == second.text != ""


def test_unavailable_models_fail_at_construction(tmp_path, monkeypatch):
    with pytest.raises(asr.ModelUnavailable, match="ASR model 'whisper-huge' is not available"):
        asr.Transcriber("whisper-huge")
    with pytest.raises(asr.ModelUnavailable, match="no model.bin"):
        asr.Transcriber(str(tmp_path))
    monkeypatch.setitem(asr.PACKAGED_MODELS, "whisper-gone", "no_such_models_package")
    with pytest.raises(asr.ModelUnavailable, match="'no_such_models_package' is not installed"):
        asr.Transcriber("whisper-gone")


def test_audio_must_be_mono(transcriber):
    with pytest.raises(ValueError, match="1-D mono"):
        transcriber.transcribe(np.zeros((2, 16000), np.float32))
