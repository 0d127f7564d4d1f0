"""The deployment manifests are valid: each Kubernetes object against the API schema
(`kubernetes-validate --strict`, offline: the schemas ship with the package) and every YAML
file in deploy/ through `yamllint` (deploy/.yamllint.yaml). Both are dev dependencies; without
them the tests skip, and fail under CI=true."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from support import service_missing

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        service_missing(f"{name} not found on PATH or in this venv (pip install -e '.[dev]')")
    assert found is not None
    return found


def _k8s_objects() -> list[Path]:
    """Manifests holding Kubernetes API objects (not kustomize's own file)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = [K8S / f for f in kustomization["resources"]]
    return [*listed, K8S / "prometheus-adapter-config.yaml"]


def test_kubernetes_objects_match_the_api_schema() -> None:
    validate = _tool("kubernetes-validate")
    files = _k8s_objects()
    assert len(files) >= 5 and all(f.exists() for f in files)
    result = subprocess.run(
        [validate, "--strict", "--no-warn", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The check above can fail: an unknown field in a container is refused."""
    validate = _tool("kubernetes-validate")
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["cpuLimit"] = "2"  # not a field
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [validate, "--strict", "--no-warn", str(bad)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "cpuLimit" in result.stdout + result.stderr


def test_yamllint_passes_on_deploy() -> None:
    yamllint = _tool("yamllint")
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 6
    result = subprocess.run(
        [yamllint, "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


PER_CORE_CALLS = 75
"""The per-core figure the settings derive from (docs/benchmarks.md, "Sizing")."""


def test_kubernetes_sizing_follows_the_per_core_figure() -> None:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    workers = int(env["LIVECALL_WORKERS"])
    assert workers == 1  # preStop's /admin/drain reaches one process: one per pod
    assert float(c["resources"]["requests"]["cpu"]) == workers
    max_calls = int(env["MAX_CONCURRENT_CALLS"])
    assert max_calls == PER_CORE_CALLS * workers
    target = float(
        docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    )
    assert 0.5 * max_calls <= target < max_calls  # scale out before pods are full


def test_cloud_run_sizing_follows_the_per_core_figure() -> None:
    import os
    import shlex

    env = {**os.environ, "DRY_RUN": "1", "PROJECT": "demo-project"}
    out = subprocess.run(
        ["bash", str(DEPLOY / "cloudrun" / "deploy.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    args = shlex.split(next(line for line in out.splitlines() if " run deploy " in line))
    plain = dict(kv.split("=", 1) for kv in args[args.index("--set-env-vars") + 1].split(","))
    cpu = int(args[args.index("--cpu") + 1])
    assert int(plain["LIVECALL_WORKERS"]) == cpu  # one worker per vCPU
    assert int(plain["MAX_CONCURRENT_CALLS"]) == PER_CORE_CALLS * cpu
    assert int(args[args.index("--concurrency") + 1]) > int(plain["MAX_CONCURRENT_CALLS"])
