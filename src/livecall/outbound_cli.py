"""`livecall call NUMBER --profile NAME [--amd]`: place an outbound call from the shell.

The call is created with Twilio's REST API straight from here (no running server is asked),
with TwiML that streams the answered call to this installation's public URL; the server
serving that URL then carries the conversation. The destination allowlist the API applies
(`OUTBOUND_ALLOWED_DESTINATIONS`, no premium-rate numbers) applies here too. Register it with
``app.command("call")(call_command)``.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["call_command"]

console = Console(stderr=True)
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")


def call_command(
    number: Annotated[str, typer.Argument(help="number to call, E.164 (+15551234567)")],
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="agent profile (default: the default)")
    ] = None,
    amd: Annotated[
        bool,
        typer.Option("--amd", help="detect answering machines and leave the profile's voicemail"),
    ] = False,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="caller ID (default: the profile number, TWILIO_CALLER_ID)"),
    ] = None,
) -> None:
    """Call NUMBER and let the profile's agent talk (the server at PUBLIC_URL takes the call)."""
    from livecall.agent.profiles import ProfileError, ProfileSet
    from livecall.log import configure_logging
    from livecall.server.outbound import OutboundError, destination_policy, place_outbound_call
    from livecall.server.twilio_routes import stream_secret_of, twilio_stream_tokens
    from livecall.settings import Settings
    from livecall.telephony.twilio_rest import TwilioCallControl, TwilioCallError

    settings = Settings()
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    if not _E164.match(number):
        console.print(f"[red]{number!r} is not an E.164 number[/red] (like +15551234567)")
        raise typer.Exit(2)
    problems = []
    if not settings.twilio_account_sid or not token:
        problems.append("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (the account to call from)")
    if not settings.public_url:
        problems.append("PUBLIC_URL (where Twilio reaches the livecall server for the audio)")
    if problems:
        console.print("[red]Cannot place the call.[/red] Set " + "; ".join(problems) + ".")
        raise typer.Exit(2)
    try:
        profiles = (
            ProfileSet.load(settings.profiles_file, settings)
            if settings.profiles_file
            else ProfileSet.default_from_settings(settings)
        )
    except ProfileError as exc:
        console.print(f"[red]The profiles file is not valid:[/red]\n{exc}")
        raise typer.Exit(2) from None

    assert settings.twilio_account_sid is not None and settings.public_url is not None
    stream_secret = stream_secret_of(settings)  # the server checks the token with the same
    assert stream_secret is not None  # (the auth token, or STREAM_TOKEN_SECRET when set)
    control = TwilioCallControl(
        settings.twilio_account_sid, token, settings.twilio_api_base_url or None
    )
    try:
        sid, chosen, caller_id = asyncio.run(
            place_outbound_call(
                control,
                profiles,
                to=number,
                profile=profile,
                public_base_url=settings.public_url,
                destinations=destination_policy(settings, profiles),
                machine_detection=amd,
                from_=from_,
                default_caller_id=settings.twilio_caller_id,
                stream_token=twilio_stream_tokens(stream_secret).for_outbound(
                    settings.twilio_account_sid or "", time.time()
                ),
            )
        )
    except (OutboundError, TwilioCallError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"Calling {number} from {caller_id} as [bold]{chosen.name}[/bold]"
        + (" (answering-machine detection on)" if amd else "")
    )
    typer.echo(sid)
