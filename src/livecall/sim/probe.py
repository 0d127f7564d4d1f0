"""One simulated phone call against a livecall that is already running somewhere.

The tests start livecall themselves; a deployment (a container, a staging host) is started by
something else, and the question there is simply "does a call work?". This rings it the way
Twilio would (signed voice webhook, then the Media Streams socket the TwiML names), says one
sentence, waits for the agent's answer, hangs up, and prints what happened. Exit status 0
only if `/health` answered, the agent was heard, and the call ended without protocol errors.

    python -m livecall.sim.probe --url http://127.0.0.1:8080 --auth-token "$TWILIO_AUTH_TOKEN"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import httpx

from livecall.sim.clips import load_clip
from livecall.sim.twilio import (
    CallResult,
    Say,
    SimulatedCaller,
    WaitForAgentAudio,
    WaitForAgentSilence,
)

__all__ = ["main", "probe_call"]


async def probe_call(
    url: str,
    auth_token: str,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> tuple[list[str], CallResult | None]:
    """Problems found (empty: the call worked) and the call's result when one was made."""
    problems: list[str] = []
    async with httpx.AsyncClient(timeout=5.0) as client:
        try:
            health = await client.get(url.rstrip("/") + "/health")
        except httpx.HTTPError as exc:
            return [f"/health unreachable: {type(exc).__name__}"], None
        if health.status_code != 200:
            problems.append(f"/health answered {health.status_code}")
    samples, rate = load_clip("yes")
    caller = SimulatedCaller(
        base_url=url,
        auth_token=auth_token,
        script=[
            Say(samples, rate, "yes"),
            WaitForAgentAudio(timeout=timeout / 2),
            WaitForAgentSilence(silence_ms=800, timeout=timeout / 2),
        ],
        timeout=timeout,
    )
    result = await caller.run()
    if result.rejected or result.stream_started is None:
        problems.append(f"no stream (webhook {result.webhook_status}, {result.reject_reason})")
    heard_s = sum(end - start for start, end in result.agent_stretches)
    if heard_s < 0.5:
        problems.append(f"the agent was not heard (only {heard_s:.1f} s of its audio)")
    problems.extend(f"protocol: {e}" for e in result.protocol_errors)
    problems.extend(f"script: {e}" for e in result.script_errors)
    return problems, result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m livecall.sim.probe", description=__doc__)
    p.add_argument("--url", required=True, help="livecall's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("TWILIO_AUTH_TOKEN"),
        help="the Twilio auth token the server checks signatures with ($TWILIO_AUTH_TOKEN)",
    )
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    if not args.auth_token:
        p.error("--auth-token or TWILIO_AUTH_TOKEN is required")
    problems, result = asyncio.run(probe_call(args.url, args.auth_token, timeout=args.timeout))
    if result is not None:
        heard = sum(end - start for start, end in result.agent_stretches)
        print(
            f"call {result.call_sid}: stream {'opened' if result.stream_started else 'refused'}, "
            f"agent heard for {heard:.1f} s, ended by {result.ended_by or '?'}"
        )
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print("probe: OK" if not problems else "probe: FAILED")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
