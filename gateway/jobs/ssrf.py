"""Where webhooks may go: http(s) only, and no loopback, private, link-local or other internal address
unless ``jobs.allow_private_webhooks: true``.

A URL is checked when the key is created (scheme, and a literal address), and every address a host
name resolves to is checked again each time a delivery connects (``GuardedResolver``): a name that
resolved to a public address at creation may point inside the network later (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from gateway.errors import InvalidRequest

MAX_URL_LENGTH = 2048


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


def check_webhook_url(url: Any, allow_private: bool) -> str:
    """The URL if webhooks may be sent there; else InvalidRequest (``param: webhook_url``)."""
    def refuse(reason: str) -> InvalidRequest:
        return InvalidRequest(f"Invalid 'webhook_url': {reason}.", param="webhook_url")

    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise refuse(f"must be an http(s) URL of at most {MAX_URL_LENGTH} characters")
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
    literal = _literal(host)
    if not allow_private and literal is not None and not address_allowed(literal):
        raise refuse("private, loopback and link-local addresses are not allowed")
    return url


def refused_literal(url: str, allow_private: bool) -> bool:
    """True when ``url`` names an address literal webhooks may not reach (aiohttp skips the resolver for these)."""
    literal = _literal(urlsplit(url).hostname or "")
    return not allow_private and literal is not None and not address_allowed(literal)


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
