"""The signature checks run on the lowest twilio release pyproject.toml allows.

twilio < 9.13 has no `algorithm` argument on `RequestValidator.validate`: livecall would then
refuse every genuine request (a TypeError taken for a bad signature). So the pin says
>= 9.13, and this test installs exactly the lowest pinned release (cached for the session)
and checks real signatures against it in a subprocess, the installed release hidden.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import service_missing

ROOT = Path(__file__).resolve().parent.parent


def lowest_pinned_twilio() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"twilio>=([0-9.]+)[,"]', text)
    assert match, "pyproject.toml pins twilio with a lower bound"
    return match.group(1)


@pytest.fixture(scope="session")
def lowest_twilio(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    version = lowest_pinned_twilio()
    target = tmp_path_factory.mktemp(f"twilio-{version}")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                str(target),
                f"twilio=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        service_missing(f"pip could not install twilio=={version}: {exc}")
    if done.returncode != 0:
        service_missing(f"pip/PyPI unreachable for twilio=={version}: {done.stderr[-300:]}")
    return version, target


def _sign(secret: str, url: str, params: dict[str, str], digest: str) -> str:
    """Twilio's signature, computed here from the documented recipe (not the library)."""
    data = url + "".join(k + params[k] for k in sorted(params))
    mac = hmac.new(secret.encode(), data.encode(), getattr(hashlib, digest))
    return base64.b64encode(mac.digest()).decode()


def test_signatures_check_out_with_the_lowest_pinned_twilio(
    lowest_twilio: tuple[str, Path],
) -> None:
    version, target = lowest_twilio
    release = ".".join([*version.split("."), "0", "0"][:3])  # "9.13" is release 9.13.0
    url = "https://calls.example.com/twiml"
    ws_url = "wss://calls.example.com/ws/twilio"
    form = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222"}
    cases = {
        "sha1": _sign("auth-token", url, form, "sha1"),
        "sha256_rule": _sign("shared-key", url, form, "sha256"),
        "upgrade": _sign("auth-token", ws_url, {}, "sha1"),
    }
    script = textwrap.dedent(
        f"""
        import twilio
        from livecall.telephony.twilio import TwilioSignature

        assert twilio.__version__ == {release!r}, (twilio.__version__, twilio.__file__)
        sig = TwilioSignature("auth-token", shared_key="shared-key")
        rule = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
        url, ws_url, form, cases = {url!r}, {ws_url!r}, {form!r}, {cases!r}
        assert sig.validate_webhook(url, form, cases["sha1"])
        assert sig.validate_webhook(url, form, cases["sha256_rule"], settings_header=rule)
        assert sig.validate_websocket(ws_url, cases["upgrade"])
        assert not sig.validate_webhook(url, form, cases["sha256_rule"])
        assert not sig.validate_webhook(url, {{**form, "To": "+1"}}, cases["sha1"])
        print("ok", twilio.__file__)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT / "src")])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ") and str(target) in done.stdout
