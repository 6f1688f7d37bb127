"""Shared session fixtures: real media clips written once per test run (tests/media_factory.py)."""
import pytest

import media_factory


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def face_clip(media_dir):
    """3 s, 640x360, 25 fps H.264 + AAC (44.1 kHz stereo) mp4: the astronaut's face and
    speech-like audio. Sampled every 500 ms it gives 6 frames."""
    return media_factory.make_clip(media_dir / "face.mp4", "mp4", "libx264", "aac", 3.0)


@pytest.fixture(scope="session")
def noface_clip(media_dir):
    """2 s, 320x180 H.264 + AAC mp4: moving colour waves (no face), silent audio."""
    return media_factory.make_clip(media_dir / "noface.mp4", "mp4", "libx264", "aac", 2.0,
                                   size=(320, 180), face=False, audio="silence")


@pytest.fixture(scope="session")
def audio_only_clip(media_dir):
    """3 s AAC .m4a, speech-like, 44.1 kHz stereo: no video stream."""
    return media_factory.make_clip(media_dir / "speech.m4a", "ipod", None, "aac", 3.0)


@pytest.fixture(scope="session")
def video_only_clip(media_dir):
    """2 s, 320x180 H.264 mp4 with a face and no audio stream."""
    return media_factory.make_clip(media_dir / "video_only.mp4", "mp4", "libx264", None, 2.0,
                                   size=(320, 180))


@pytest.fixture(scope="session")
def bad_media(media_dir, face_clip):
    """Unusable files: name -> (path, a fragment of the MediaError message both decoders give)."""
    return {
        "empty": (media_factory.write_empty(media_dir / "empty.mp4"), "empty file"),
        "random_bytes": (media_factory.write_random_bytes(media_dir / "random.bin"),
                         "not a media file (format not recognised)"),
        "subtitles_only": (media_factory.write_subtitles(media_dir / "subtitles.srt"),
                           "not a media file (no audio or video stream found)"),
        "truncated_mp4": (media_factory.write_truncated(face_clip, media_dir / "truncated.mp4"),
                          "truncated or corrupt media"),
    }
