"""OpenAI-compatible image-generation gateway in front of TTAPI."""

__version__ = "0.1.0"
