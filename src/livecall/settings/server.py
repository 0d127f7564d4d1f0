"""The server: bind address, public URL, proxies and allowed hosts, admin access, logging."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from livecall.settings.section import Section


class ServerSettings(Section):
    """Where and how the process listens, who may reach it, what it logs."""

    host: str = Field("0.0.0.0", validation_alias=AliasChoices("LIVECALL_HOST", "HOST"))
    port: int = Field(8080, validation_alias=AliasChoices("PORT", "LIVECALL_PORT"))
    public_url: str | None = Field(None, validation_alias=AliasChoices("PUBLIC_URL", "SERVICE_URL"))
    log_level: str = Field("info", validation_alias="LOG_LEVEL")
    log_format: Literal["console", "json"] = Field("console", validation_alias="LOG_FORMAT")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias="TRUSTED_PROXIES",
        description="comma-separated IPs or CIDRs of the proxies in front of livecall whose "
        "X-Forwarded-* headers are believed (default: none, forwarded headers are ignored)",
    )
    metrics_token: SecretStr | None = Field(
        None,
        validation_alias="METRICS_TOKEN",
        description="when set, GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`",
    )
    docs_public: bool = Field(
        False,
        validation_alias="DOCS_PUBLIC",
        description="serve /docs, /redoc and /openapi.json to anyone; off: only /openapi.json, "
        "to holders of the API token",
    )
    log_dtmf: bool = Field(
        False,
        validation_alias="LOG_DTMF",
        description="keep keypad digits in logs, call events and traces (off: each is '•')",
    )
    log_transcripts: bool = Field(
        False,
        validation_alias="LOG_TRANSCRIPTS",
        description="put transcript text in log lines (off: its length only; the call records "
        "keep the transcript either way)",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias="ALLOWED_HOSTS",
        description="comma-separated Host names served besides PUBLIC_URL's ('*.example.com' "
        "for subdomains, '*' for any); a request for another Host gets 400",
    )
    max_body_bytes: int = Field(
        1 << 20,
        gt=0,
        validation_alias="MAX_BODY_BYTES",
        description="largest request body (Twilio's webhooks: 64 KiB); larger ones get 413 "
        "before they are read",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        validation_alias="REQUEST_TIMEOUT",
        description="a request's headers and body must arrive within this (else 408 / closed)",
    )
    ws_max_size: int = Field(
        1 << 20,
        gt=0,
        validation_alias="WS_MAX_SIZE",
        description="largest WebSocket message; a larger one closes the socket (1009)",
    )
    max_pending_per_client: int = Field(
        64,
        gt=0,
        validation_alias="MAX_PENDING_PER_CLIENT",
        description="concurrent unauthenticated connections per client address (HTTP requests "
        "not yet answered, streams before their `start`); more get 429",
    )
    admin_token: SecretStr | None = Field(
        None,
        validation_alias="ADMIN_TOKEN",
        description="bearer token for /admin/drain (unset: only over ADMIN_SOCKET)",
    )
    admin_socket: Path | None = Field(
        None,
        validation_alias="ADMIN_SOCKET",
        description="a Unix socket `livecall serve` also serves the app on; /admin/drain "
        "needs no token there (file mode 0600)",
    )

    @field_validator("trusted_proxies", "allowed_hosts", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_absolute(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("PUBLIC_URL must be an absolute http(s) URL, e.g. https://example.com")
        return value.rstrip("/")
