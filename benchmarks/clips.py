"""The clips the benchmarks send: generated H.264 + AAC files with a face and speech-like audio.

The generator is the tests' (tests/media_factory.py), imported here rather than copied, so
benchmark clips and test clips are made the same way. Every clip is deterministic: the same
command measures the same bytes on every machine. A clip already in the folder is used as
it is, so clips written elsewhere (`python -m benchmarks.clips DIR`) can travel to a host
without the generator's dependencies (scipy, scikit-image): a bare GPU machine.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


# Spoken-style sentences; a clip's transcript cycles through them at ~2.5 words per second,
# as speech does (a 10 s clip gets ~25 words, a 60 s one is cut at 100 tokens by tokenize).
SENTENCES = (
    "I can't believe this happened again after everything we talked about.",
    "Honestly I'm really glad you came, it means a lot to me.",
    "Well, I don't know, maybe we should just wait and see what they say.",
    "That is the best news I have heard all year, thank you so much!",
    "Nobody told me anything and now it is too late to change it.",
    "It's fine, I guess. I'm just tired and I want to go home.",
)
WORDS_PER_SECOND = 2.5


@dataclass(frozen=True)
class Clip:
    name: str               # the benchmark config it belongs to, e.g. "10s-360p"
    path: Path
    seconds: float
    size: tuple[int, int]   # (width, height)
    transcript: str

    @property
    def media(self) -> bytes:
        return self.path.read_bytes()


def transcript_for(seconds: float, start: int = 0) -> str:
    words, i = [], start
    while len(words) < WORDS_PER_SECOND * seconds:
        words += SENTENCES[i % len(SENTENCES)].split()
        i += 1
    return " ".join(words)


def _media_factory():
    """tests/media_factory.py, imported only when a clip must be written (it needs scipy)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import media_factory

    return media_factory


def make(directory: Path, name: str, seconds: float, size=(640, 360), index: int = 0, **options) -> Clip:
    """One H.264 + AAC mp4 (media_factory.make_clip options pass through); kept if present."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{index}.mp4"
    if not path.exists():
        _media_factory().make_clip(path, "mp4", "libx264", "aac", seconds, size=size, **options)
    return Clip(name, path, seconds, size, transcript_for(seconds, start=index))


# The configs compare.py measures: (name, seconds, (width, height)).
BENCHMARK_CONFIGS = (("10s-360p", 10.0, (640, 360)), ("10s-720p", 10.0, (1280, 720)),
                     ("60s-360p", 60.0, (640, 360)))


def benchmark_clips(directory: Path) -> list[Clip]:
    return [make(directory, name, seconds, size) for name, seconds, size in BENCHMARK_CONFIGS]


def short_clip(directory: Path, name: str = "3s-360p") -> Clip:
    """A 3 s clip: warm-ups and the soak test."""
    return make(directory, name, 3.0)


def varied_clips(directory: Path, count: int) -> list[Clip]:
    """COUNT short, cheap clips that differ in picture, sound, size and words, so the
    networks see varied inputs (int8 vs fp32 agreement)."""
    audios = ("speech", "tone", "speech", "silence")
    sizes = ((320, 180), (480, 270), (320, 240))
    return [make(directory, "varied", 1.5 + 0.5 * (i % 3), size=sizes[i % 3], index=i,
                 face=i % 4 != 3, audio=audios[i % 4], tone_hz=220.0 + 110.0 * i, fps=20 + 5 * (i % 2))
            for i in range(count)]


if __name__ == "__main__":
    # The clips `compare --profile gpu` sends, for a host that cannot make them.
    target = Path(sys.argv[1])
    print("\n".join(str(c.path) for c in benchmark_clips(target) + [short_clip(target)]))
