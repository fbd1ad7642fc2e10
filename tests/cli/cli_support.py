"""Support for the command-line tests: run the real `optc` program, compare outputs, install plugins.

The tests run `optc` in a child process, exactly as a user does, so exit
codes, what reaches stderr and what is left on disk are the real ones. A child
costs a second of CPU (optc imports onnx, onnx-ir and onnxruntime), so a test
module starts its children together with `run_many`, and edge cases of logic
that children already cover go through `run_in_process`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.mlp_file import INPUT_SHAPE

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "optc-example-plugin"
RUN_TIMEOUT_S = 120


def optc_command() -> list[str]:
    """The installed `optc` console script beside this interpreter, else `python -m optc`."""
    bindir = Path(sys.executable).parent
    for name in ("optc", "optc.exe"):
        if (bindir / name).is_file():
            return [str(bindir / name)]
    return [sys.executable, "-m", "optc"]


@dataclasses.dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def __str__(self) -> str:  # shown by pytest when an assertion about a run fails
        return f"optc {' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


@dataclasses.dataclass
class Job:
    """One optc invocation: arguments, working folder, extra PYTHONPATH entries (installed plugins)."""

    args: Sequence[str | os.PathLike]
    cwd: Path
    pythonpath: Sequence[Path] = ()


def _env(pythonpath: Sequence[Path]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in pythonpath]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    env.pop("PYTHONWARNINGS", None)  # the test checks what optc itself prints
    return env


def run_optc(job: Job) -> Run:
    args = [str(a) for a in job.args]
    proc = subprocess.run(
        [*optc_command(), *args], cwd=job.cwd, env=_env(job.pythonpath),
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )
    return Run(args, proc.returncode, proc.stdout, proc.stderr)


def run_in_process(job: Job) -> Run:
    """Run `optc.cli.main` in this process: the same code path, without a process start (for edge cases).

    Only for jobs without plugins (the registry of this process is not theirs).
    """
    from optc.cli import main

    assert not job.pythonpath, "plugins are loaded once per process; run plugin jobs in a child"
    args = [str(a) for a in job.args]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(job.cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(cwd)
    return Run(args, code, out.getvalue(), err.getvalue())


def run_many(jobs: dict[str, Job]) -> dict[str, Run]:
    """Run jobs concurrently (each is its own process); results by the same keys."""
    workers = max(2, min(len(jobs), (os.cpu_count() or 2) + 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(run_optc, job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def list_passes_entries(text: str) -> dict[str, list[str]]:
    """--list-passes output as {name: [its line, its indented option lines...]}."""
    entries: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("      ") and current:
            current.append(line.strip())
        elif line.startswith("  "):
            current = entries.setdefault(line.split()[0], [line])
    return entries


# ---------------------------------------------------------------- outputs

def sample_input() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal(INPUT_SHAPE).astype(np.float32)}


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(model: Path, compiled: Path) -> None:
    """The compiled model computes what the original did (onnxruntime, the same input)."""
    feeds = sample_input()
    for want, got in zip(ort_outputs(model, feeds), ort_outputs(compiled, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every file and folder under `folder`, hidden ones included, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def snapshot(folder: Path) -> dict[str, str]:
    """`listing(folder)` with each file's SHA-256 ("folder" for folders)."""
    return {p: sha256(folder / p) if (folder / p).is_file() else "folder" for p in listing(folder)}


# ---------------------------------------------------------------- plugins


def _setuptools_builds_wheels() -> bool:
    """Can this interpreter build the plugin without fetching a build backend?"""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    # pyproject [project] tables need setuptools 61; bdist_wheel is built in from 70.1, else comes from `wheel`.
    return version >= (70, 1) or (version >= (61, 0) and importlib.util.find_spec("wheel") is not None)


def wheel_from_pyproject(src: Path, out: Path) -> Path:
    """Assemble a pure-Python wheel from the plugin's pyproject.toml (name, version, modules, entry points).

    Used where no build backend is installed (a fresh venv has setuptools without
    bdist_wheel, or none at all): the wheel is still installed by pip, so optc finds
    the plugin through the same installed metadata.
    """
    tomllib = pytest.importorskip("tomllib", reason="assembling the plugin wheel needs Python 3.11+ or setuptools>=70.1")
    meta = tomllib.loads((src / "pyproject.toml").read_text())
    project = meta["project"]
    name, version = project["name"], project["version"]
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {f"{m}.py": (src / f"{m}.py").read_bytes() for m in meta["tool"]["setuptools"]["py-modules"]}
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: optc-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/entry_points.txt"] = "".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items()) + "\n"
        for group, entries in project.get("entry-points", {}).items()
    ).encode()
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = out / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def install_plugin(source: Path, target: Path, scratch: Path) -> None:
    """`pip install` the plugin distribution at `source` into `target`, offline."""
    src = scratch / source.name
    # A copy, so the in-tree build leaves no build/ or *.egg-info in the repository.
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target)]
    if _setuptools_builds_wheels():
        command = [*pip, "--no-build-isolation", str(src)]
    else:
        command = [*pip, str(wheel_from_pyproject(src, scratch))]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(command)}\n{proc.stdout}\n{proc.stderr}"


FAILING_PASSES = '''\
"""Passes that go wrong on purpose, for optc's command-line tests."""

from optc.passes import Pass, PassResult, register_pass


@register_pass("raise-error")
class RaiseError(Pass):
    """Raise RuntimeError."""

    def run(self, model, am):
        raise RuntimeError("boom from raise-error")


@register_pass("break-ir")
class BreakIR(Pass):
    """Delete the first node but leave its consumers reading its output."""

    def run(self, model, am):
        model.graph.remove(next(iter(model.graph)))
        return PassResult(model, True)


@register_pass("foreign-op")
class ForeignOp(Pass):
    """Turn every Relu into an op of a domain no runtime implements."""

    def run(self, model, am):
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type, node.domain = "NoSuchOp", "com.example.nowhere"
        model.graph.opset_imports["com.example.nowhere"] = 1
        return PassResult(model, True)
'''


def install_module_plugin(site: Path, entry: str, module: str, source: str) -> Path:
    """Install a one-module plugin into `site` by hand: the module, and a .dist-info whose
    `optc.passes` entry point `entry` names the module (importing it registers its passes)."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[optc.passes]\n{entry} = {module}\n")
    return site


def assert_clean_failure(run: Run, folder: Path, files: dict[str, str], exit_code: int, mentions: Sequence[str]) -> None:
    """A failed run: the exit code, one `optc: error:` line naming `mentions`, no traceback, no stdout, and the
    folder exactly as `snapshot` saw it before (nothing written, nothing modified)."""
    assert run.returncode == exit_code, run
    assert "Traceback" not in run.stderr, run
    assert len(run.stderr_lines) == 1, run
    line = run.stderr_lines[0]
    assert line.startswith("optc: error: "), run
    for text in mentions:
        assert text.lower() in line.lower(), f"{text!r} not in {line!r}"
    assert run.stdout == "", run
    assert snapshot(folder) == files
