"""Which webhook URLs a key may carry: hosts checked at creation (jobs/ssrf.py, SPEC section 10)."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.jobs.ssrf import check_webhook_url, refused_literal


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.0.0.1.", "10.0.0.7", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0",
    # Other spellings of an IPv4 address: clients disagree on them, so none is taken.
    "127.1", "2130706433", "017700000001", "0x7f000001", "0x7f.0.0.1", "8.8.8", "8.8.8.8.", "1.2.3.4.5",
])
def test_internal_and_numeric_hosts_are_refused(host: str) -> None:
    url = f"http://{host}:8080/hook"
    with pytest.raises(InvalidRequest) as info:
        check_webhook_url(url, allow_private=False)
    assert info.value.status == 400 and info.value.param == "webhook_url"
    assert refused_literal(url, allow_private=False)  # a key stored before the check: its deliveries end at once


@pytest.mark.parametrize("host", ["hooks.example.com", "hooks.example.com.", "cafe.be", "1.example.com",
                                  "93.184.216.34", "[2606:4700::1111]"])
def test_names_and_public_addresses_are_taken(host: str) -> None:
    url = f"https://{host}/hook"
    assert check_webhook_url(url, allow_private=False) == url
    assert not refused_literal(url, allow_private=False)


@pytest.mark.parametrize("path", ["/\n", "/\x00", "/\t", "/ a", "/\u202e", "/\u2028", "/\u00a0"])
def test_control_format_and_space_characters_are_refused(path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_webhook_url("https://hooks.example.com" + path, allow_private=False)
    assert info.value.param == "webhook_url"


def test_private_addresses_pass_when_allowed_but_numeric_spellings_never() -> None:
    assert check_webhook_url("http://127.0.0.1:9/hook", allow_private=True) == "http://127.0.0.1:9/hook"
    with pytest.raises(InvalidRequest):
        check_webhook_url("http://127.1:9/hook", allow_private=True)
