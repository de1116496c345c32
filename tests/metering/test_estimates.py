"""Reservation estimates: OpenAI's published gpt-image token table, and `auto` priced as the dearest choice."""

from __future__ import annotations

import pytest

from gateway.metering.estimates import output_tokens_per_image, text_tokens


@pytest.mark.parametrize(("size", "quality", "tokens"), [
    ("1024x1024", "low", 272), ("1024x1024", "medium", 1056), ("1024x1024", "high", 4160),
    ("1024x1536", "high", 6240), ("1536x1024", "medium", 1568),
    ("1024x1024", "auto", 4160),  # auto quality reserves for high, never low
    ("1024x1024", None, 4160),
    ("auto", "low", 408), ("auto", "high", 6240), (None, None, 6240),  # auto size: the largest of the table
    ("2048x1152", "low", 612),  # free size (gpt-image-2): the square figure scaled by area, rounded up
])
def test_output_tokens_per_image(size: str | None, quality: str | None, tokens: int) -> None:
    assert output_tokens_per_image(size, quality) == tokens


def test_a_configured_override_wins_over_the_table() -> None:
    assert output_tokens_per_image("1024x1024", "low", {"low-1024x1024": 100}) == 100
    assert output_tokens_per_image("1024x1024", "high", {"low-1024x1024": 100}) == 4160


@pytest.mark.parametrize(("prompt", "tokens"), [("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 4000, 1000)])
def test_text_tokens_are_about_four_characters_each(prompt: str, tokens: int) -> None:
    assert text_tokens(prompt) == tokens
