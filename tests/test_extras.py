"""Production without the `sim` and `bench` extras: every production module imports, and the
commands that need an extra say which one, instead of a traceback.

Each check runs in a fresh interpreter whose import system refuses the extras' packages
(a meta-path finder raising ModuleNotFoundError), as in an image built without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import livecall
from livecall.cli import EXTRA_PACKAGES

SRC = Path(livecall.__file__).resolve().parents[1]
BLOCKED = sorted({name for names in EXTRA_PACKAGES.values() for name in names})
# Only the simulators, the benchmarks and the offline demo may need the extras.
NOT_PRODUCTION = ("livecall.sim", "livecall.bench", "livecall.demo")

BLOCKER = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class RefuseExtras:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, RefuseExtras())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    """
)


def run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "240", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_the_blocker_refuses_the_extras_packages() -> None:
    result = run_without_extras(
        """
        import importlib
        for name in BLOCKED:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                continue
            raise SystemExit(f"{name} imported")
        """
    )
    assert result.returncode == 0, result.stderr


def test_every_production_module_imports_without_the_sim_and_bench_extras() -> None:
    result = run_without_extras(
        f"""
        import importlib, pkgutil
        import livecall

        skip = {NOT_PRODUCTION!r}
        names = [
            m.name
            for m in pkgutil.walk_packages(livecall.__path__, "livecall.")
            if not m.name.startswith(skip)
        ]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the app, the API, every carrier, the store: well over a hundred modules
    assert int(result.stdout.strip()) > 100


def test_demo_and_bench_without_their_extras_name_the_extra() -> None:
    for argv, extra in (["demo"], "sim"), (["bench", "load", "--quick"], "bench"):
        result = run_without_extras(
            f"""
            from livecall.cli import main
            sys.argv = ["livecall", *{argv!r}]
            main()
            """
        )
        assert result.returncode == 2, (argv, result.stderr[-2000:])
        message = " ".join(result.stderr.split())
        assert f"needs the '{extra}' extra" in message, message
        assert f"pip install 'livecall[{extra}]'" in message, message
        assert "Traceback" not in result.stderr


def test_the_cli_knows_what_each_extra_brings() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    base = " ".join(pyproject["project"]["dependencies"])

    def names(extra: str) -> set[str]:
        out: set[str] = set()
        for req in extras[extra]:
            name = req.split(">")[0].split("[")[0].strip()
            out |= names(req.split("[")[1].rstrip("]")) if name == "livecall" else {name}
        return out

    commands = {"py-spy"}  # a profiler the bench runs as a program: nothing to import
    for extra, packages in EXTRA_PACKAGES.items():
        assert set(packages) == names(extra) - commands, extra
        assert not any(p in base for p in packages), f"{extra} packages in the base install"
