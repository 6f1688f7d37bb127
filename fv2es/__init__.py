"""FV2ES: video emotion recognition from faces, voice and words (arXiv 2209.10170)."""
__version__ = "0.1.0"
