"""`livecall call NUMBER --profile NAME [--carrier telnyx] [--amd]`: place an outbound call
from the shell.

The call is created with the carrier's REST API straight from here (no running server is
asked): on Twilio with TwiML that streams the answered call to this installation's public
URL, on Telnyx, Plivo and Vonage with that URL's voice webhook as the document the carrier
fetches, on Exotel (Connect Voice AI) with that URL's `/ws/exotel` as the stream;
the server serving that URL then carries the conversation (it checks the call's stream token
with the same secret: STREAM_TOKEN_SECRET, else TWILIO_AUTH_TOKEN). The destination
allowlist the API applies (`OUTBOUND_ALLOWED_DESTINATIONS`, no premium-rate numbers) applies
here too; answering-machine detection is Twilio's only. Register it with
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
        typer.Option(
            "--amd",
            help="detect answering machines and leave the profile's voicemail (Twilio only)",
        ),
    ] = False,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="caller ID (default: the profile number, TWILIO_CALLER_ID)"),
    ] = None,
    carrier: Annotated[
        str | None,
        typer.Option(
            "--carrier",
            help="twilio, telnyx, plivo, vonage or exotel (default: OUTBOUND_CARRIER, else twilio)",
        ),
    ] = None,
) -> None:
    """Call NUMBER and let the profile's agent talk (the server at PUBLIC_URL takes the call)."""
    from livecall.agent.profiles import ProfileError, ProfileSet
    from livecall.log import configure_logging
    from livecall.server.carrier_route import stream_tokens_for
    from livecall.server.outbound import (
        OutboundError,
        destination_policy,
        place_carrier_call,
        place_outbound_call,
    )
    from livecall.server.outbound_carriers import (
        AMD_ONLY_ON,
        OUTBOUND_CARRIERS,
        CarrierDialError,
        carrier_dialer,
        dialer_problem,
    )
    from livecall.server.twilio_routes import stream_secret_of, twilio_stream_tokens
    from livecall.settings import Settings
    from livecall.telephony.twilio_rest import TwilioCallControl, TwilioCallError

    settings = Settings()
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    if not _E164.match(number):
        console.print(f"[red]{number!r} is not an E.164 number[/red] (like +15551234567)")
        raise typer.Exit(2)
    carrier = carrier or settings.outbound_carrier
    if carrier not in OUTBOUND_CARRIERS:
        console.print(
            f"[red]No outbound calls on {carrier!r}[/red] ({', '.join(OUTBOUND_CARRIERS)})"
        )
        raise typer.Exit(2)
    if amd and carrier != AMD_ONLY_ON:
        console.print(f"[red]Answering-machine detection is Twilio-only[/red], not on {carrier}.")
        raise typer.Exit(2)
    problems = []
    if carrier == "twilio" and (not settings.twilio_account_sid or not token):
        problems.append("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (the account to call from)")
    if carrier != "twilio":
        problem = dialer_problem(settings, carrier)
        if problem is not None:
            problems.append(problem.removeprefix(f"outbound calls on {carrier} need "))
    if not settings.public_url:
        problems.append(f"PUBLIC_URL (where {carrier} reaches the livecall server for the audio)")
    stream_secret = stream_secret_of(settings)  # the server checks the token with the same
    if stream_secret is None:
        problems.append("STREAM_TOKEN_SECRET (as the server has it) or TWILIO_AUTH_TOKEN")
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

    assert settings.public_url is not None and stream_secret is not None
    destinations = destination_policy(settings, profiles)
    if carrier == "twilio":
        assert settings.twilio_account_sid is not None
        control = TwilioCallControl(
            settings.twilio_account_sid, token, settings.twilio_api_base_url or None
        )
        placing = place_outbound_call(
            control,
            profiles,
            to=number,
            profile=profile,
            public_base_url=settings.public_url,
            destinations=destinations,
            machine_detection=amd,
            from_=from_,
            default_caller_id=settings.twilio_caller_id,
            stream_token=twilio_stream_tokens(stream_secret).for_outbound(
                settings.twilio_account_sid or "", time.time()
            ),
        )
    else:
        placing = place_carrier_call(
            carrier_dialer(settings, carrier),
            profiles,
            to=number,
            profile=profile,
            public_base_url=settings.public_url,
            destinations=destinations,
            from_=from_,
            stream_token=stream_tokens_for(stream_secret, carrier).for_outbound("", time.time()),
        )
    try:
        sid, chosen, caller_id = asyncio.run(placing)
    except (OutboundError, TwilioCallError, CarrierDialError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"Calling {number} from {caller_id} on {carrier} as [bold]{chosen.name}[/bold]"
        + (" (answering-machine detection on)" if amd else "")
    )
    typer.echo(sid)
