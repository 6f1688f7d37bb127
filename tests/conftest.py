"""Shared session fixtures: real media clips written once per test run (tests/media_factory.py),
and the cpu profile built once and served by the real tritonserver."""
import pytest
import tritonclient.grpc as grpcclient
from fv2es_client import Fv2esClient
from fv2es_client.contract import ENSEMBLE, STEPS

from builders.build_repository import build_cpu
from fv2es.serving.tritonserver import TritonServer, free_ports

import media_factory
from authors_reference import make_tiny_albert


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def albert_dir(tmp_path_factory):
    """A tiny ALBERT-base-v2 stand-in (the authors' text backbone): config, weights, tokenizer."""
    return make_tiny_albert(tmp_path_factory.mktemp("albert"))


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
                         "not a media file (format not recognised"),
        "subtitles_only": (media_factory.write_subtitles(media_dir / "subtitles.srt"),
                           "not a media file"),
        "truncated_mp4": (media_factory.write_truncated(face_clip, media_dir / "truncated.mp4"),
                          "truncated or corrupt media"),
    }


# ---------------------------------------------------------------- the served cpu profile


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    return build_cpu(tmp_path_factory.mktemp("built") / "model_repository")


@pytest.fixture(scope="session")
def server(repository):
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      model_control_mode="explicit") as triton:
        admin = grpcclient.InferenceServerClient(triton.grpc_url)
        # Every model loads on its own, in graph order, then the ensemble over them.
        for name in [s.name for s in STEPS] + [ENSEMBLE]:
            admin.load_model(name)
            assert admin.is_model_ready(name), name
        yield triton


@pytest.fixture(scope="session")
def client(server):
    with Fv2esClient(server.grpc_url, timeout_s=300) as c:
        yield c
