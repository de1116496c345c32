"""Where webhooks may go: http(s) only, and no loopback, private, link-local or other internal address
unless ``jobs.allow_private_webhooks: true``.

A URL is checked when the key is created (scheme, and a literal address), and every address a host
name resolves to is checked again each time a delivery connects (``GuardedResolver``): a name that
resolved to a public address at creation may point inside the network later (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from gateway.errors import InvalidRequest
from gateway.validators import control_free

MAX_URL_LENGTH = 2048
_HEX_LABEL = re.compile(r"0x[0-9a-f]*")


class WebhookRefused(OSError):
    """A webhook host resolved to an address webhooks may not reach."""


def address_allowed(address: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _host_refusal(host: str, allow_private: bool) -> str | None:
    """Why webhooks may not go to ``host`` (a URL's lower-cased host name), or None.

    A host whose last label is a number (``127.1``, ``2130706433``, ``0x7f000001``, ``127.0.0.1.``)
    is an IPv4 address to URL parsers (WHATWG), in a spelling clients disagree on: only the dotted
    form is taken, and checked as an address.
    """
    literal = _literal(host)
    if literal is None:
        last = host.removesuffix(".").rsplit(".", 1)[-1]
        if (last.isascii() and last.isdigit()) or _HEX_LABEL.fullmatch(last):
            return "a numeric host must be a dotted IPv4 address (such as 203.0.113.7)"
        return None
    if not allow_private and not address_allowed(literal):
        return "private, loopback and link-local addresses are not allowed"
    return None


def check_webhook_url(url: Any, allow_private: bool) -> str:
    """The URL if webhooks may be sent there; else InvalidRequest (``param: webhook_url``)."""
    def refuse(reason: str) -> InvalidRequest:
        return InvalidRequest(f"Invalid 'webhook_url': {reason}.", param="webhook_url")

    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise refuse(f"must be an http(s) URL of at most {MAX_URL_LENGTH} characters")
    if not control_free(url) or any(c.isspace() for c in url):
        raise refuse("must not contain spaces, control or format characters (percent-encode them)")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        raise refuse("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise refuse("must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise refuse("must not carry credentials")
    reason = _host_refusal(host, allow_private)
    if reason is not None:
        raise refuse(reason)
    return url


def refused_literal(url: str, allow_private: bool) -> bool:
    """True when ``url``'s host is refused without a lookup: an address literal webhooks may not reach
    (aiohttp skips the resolver for these), or a numeric host in another spelling (a key created before
    those were refused: its deliveries end at once instead of being retried for a day)."""
    return _host_refusal(urlsplit(url).hostname or "", allow_private) is not None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names that resolve to any address webhooks may not reach."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> Any:
        hosts = await self._inner.resolve(host, port, family)
        if not self.allow_private and any(not address_allowed(h["host"]) for h in hosts):
            raise WebhookRefused(f"webhook host {host} resolves to an address webhooks may not reach")
        return hosts

    async def close(self) -> None:
        await self._inner.close()
