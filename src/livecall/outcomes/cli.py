"""`livecall webhooks test URL`: send a signed sample end-of-call webhook and show the answer.

For whoever writes the receiver: it gets exactly what a real call sends (headers, signature,
body shape), with a made-up call, and sees its own answer printed.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated

import httpx
import typer
from rich.console import Console

from livecall.outcomes.webhook_payload import (
    DELIVERY_HEADER,
    encode_payload,
    new_delivery_id,
    request_headers,
    sample_payload,
)

__all__ = ["webhooks_app"]

webhooks_app = typer.Typer(help="End-of-call webhooks: send a signed sample.", no_args_is_help=True)
console = Console(highlight=False)

MAX_SHOWN = 2000


@webhooks_app.command("test")
def test_webhook(
    url: Annotated[str | None, typer.Argument(help="default: CALL_WEBHOOK_URL")] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            envvar="CALL_WEBHOOK_SECRET",
            help="default: CALL_WEBHOOK_SECRET (prefer the variable: arguments show in ps)",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 10.0,
    show_body: Annotated[bool, typer.Option("--show-body", help="print the JSON sent")] = False,
) -> None:
    """POST a signed sample payload to URL and print the response."""
    from livecall.settings import Settings

    settings = Settings()
    target = url or settings.call_webhook_url
    if not target:
        console.print("[red]No URL:[/red] pass one, or set CALL_WEBHOOK_URL.")
        raise typer.Exit(2)
    if not secret:
        value = settings.call_webhook_secret
        secret = value.get_secret_value() if value is not None else None
    if not secret:
        console.print("[red]No secret:[/red] set CALL_WEBHOOK_SECRET or pass --secret.")
        raise typer.Exit(2)
    delivery_id = new_delivery_id()
    body = encode_payload(sample_payload(delivery_id, datetime.now(UTC)))
    headers = request_headers(secret, body, delivery_id)
    if show_body:
        console.print_json(body.decode())
    code = asyncio.run(_send(target, body, headers, timeout))
    raise typer.Exit(code)


async def _send(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:  # noqa: ASYNC109
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
            response = await client.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        console.print(f"[red]no answer within {timeout:g} s[/red] (a real delivery is retried)")
        return 1
    except httpx.HTTPError as exc:
        console.print(f"[red]could not reach {url}[/red]: {type(exc).__name__}")
        return 1
    ms = (time.perf_counter() - started) * 1000
    ok = 200 <= response.status_code < 300
    colour = "green" if ok else "red"
    console.print(
        f"POST {url}  delivery {headers[DELIVERY_HEADER]}  "
        f"[{colour}]HTTP {response.status_code}[/{colour}] in {ms:.0f} ms"
    )
    for name, value in response.headers.items():
        console.print(f"  [dim]{name}:[/dim] {value}")
    text = response.text
    if text:
        console.print(text[:MAX_SHOWN] + (" …" if len(text) > MAX_SHOWN else ""))
    if not ok:
        console.print("[yellow]not a 2xx: a real delivery would be retried[/yellow]")
    return 0 if ok else 1
