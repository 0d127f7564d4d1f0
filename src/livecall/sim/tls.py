"""A throwaway certificate authority so local simulators can speak TLS to real clients.

The google-genai SDK forces ``wss://`` for Live sessions, so a fake Gemini must serve TLS with a
certificate the client trusts. `TestCA` makes a fresh CA and one server certificate for the
loopback names; clients trust it either through `client_ssl_context()` or by pointing
``SSL_CERT_FILE`` at `write_ca_pem()`. Nothing here is meant for production.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

import trustme

__all__ = ["DEFAULT_HOSTS", "TestCA"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


class TestCA:
    """A CA plus one leaf certificate for `hosts` (IP addresses and DNS names both work)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, hosts: Iterable[str] = DEFAULT_HOSTS) -> None:
        self.hosts = tuple(hosts)
        self._ca = trustme.CA(organization_name="livecall test CA")
        self._leaf = self._ca.issue_cert(*self.hosts)

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate, PEM encoded."""
        return self._ca.cert_pem.bytes()

    def server_ssl_context(self) -> ssl.SSLContext:
        """Server side: presents the leaf certificate for `hosts`."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._leaf.configure_cert(ctx)
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """Client side: verifies hostnames and trusts only this CA."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._ca.configure_trust(ctx)
        return ctx

    def write_ca_pem(self, path: Path | str) -> Path:
        """Write the CA certificate to `path` (e.g. for ``SSL_CERT_FILE``) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.ca_pem)
        return path
