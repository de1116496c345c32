"""The fake upstream process shared by the job tests of one module, its stats zeroed per test."""

from __future__ import annotations

import httpx
import pytest

from tests.support.procs import Service, module_fake_upstream

UPSTREAM_KEY = "tt-jobs-key"


fake = module_fake_upstream(UPSTREAM_KEY)


@pytest.fixture
def upstream(fake: Service) -> Service:
    """The module's fake process with its stats zeroed."""
    httpx.post(fake.url + "/_fake/reset").raise_for_status()
    return fake
