"""The fake upstream process shared by the devtools tests of one module, its stats zeroed per test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.devtools.test_fake_upstream import KEY, sdk
from tests.support.procs import Service, module_fake_upstream

fake = module_fake_upstream(KEY, "--key", "tt-second,tt-third", "--refuse-key", "tt-refused")


@pytest.fixture
def upstream(fake: Service) -> Service:
    """The module's fake process with its stats zeroed."""
    httpx.post(fake.url + "/_fake/reset").raise_for_status()
    return fake


@pytest.fixture
def client(upstream: Service) -> Iterator[openai.OpenAI]:
    with sdk(upstream.url) as c:
        yield c
