"""Local stand-ins: fake upstream, demo."""
