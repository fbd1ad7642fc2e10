"""SIGTERM, SIGHUP and SIGINT run the cleanup of an error: exit 128+N, one line, nothing left anywhere.

Each case starts the real `optc` as a child with a private TMPDIR and cache,
holds it where temporary data exists (a pass holding an onnxruntime copy of the
model in TMPDIR, the backend's staging folder beside the output, the export
staging in the cache), sends the signal once the child says it is there, and
checks the exit code, the one stderr line and that the output folder, TMPDIR
and the cache hold exactly what they held before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli.cli_support import _env, install_module_plugin, optc_command, snapshot
from tests.fixtures.mlp_file import build_model

#: A plugin that stops optc where a run has temporary data, and says so in $OPTC_TEST_MARKER.
HOLD_PLUGIN = '''\
"""Hold an optc run where it has temporary data, for the signal tests."""

import os
import time
from pathlib import Path

from optc.passes import Pass, PassResult, register_pass


def hold():
    Path(os.environ["OPTC_TEST_MARKER"]).write_text("holding")
    for _ in range(1200):
        time.sleep(0.05)


@register_pass("hold")
class Hold(Pass):
    """Keep an onnxruntime copy of the model in TMPDIR and wait."""

    def run(self, model, am):
        from optc.runtime.runner import ModelRunner

        runner = ModelRunner(model)
        hold()
        runner.close()
        return PassResult(model, False)


if os.environ.get("OPTC_TEST_HOLD") == "lower":
    import optc.runtime.ort as _ort

    _open_session = _ort.open_session

    def _held_open_session(*args, **kwargs):
        hold()  # the backend's runtime check: the staged output is beside the output
        return _open_session(*args, **kwargs)

    _ort.open_session = _held_open_session

if os.environ.get("OPTC_TEST_HOLD") == "report":
    import optc.report as _report

    def _held_render_html(data):
        hold()  # the output is in place already; the report is being written
        raise AssertionError("not reached")

    _report.render_html = _held_render_html

if os.environ.get("OPTC_TEST_HOLD") == "export":
    import optc.frontends.transformers as _hf

    def _held_export(source, opset):
        hold()  # inside the export: its staging folder is in the cache
        raise AssertionError("not reached")

    _hf._export = _held_export
'''

#: Generous: six children start at once on a small shared machine (the export case imports torch).
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def hold_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("hold-plugin-site")
    return install_module_plugin(site, "hold", "optc_hold_passes", HOLD_PLUGIN)


def _start(case: Path, args: list[str], hold: str, site: Path) -> subprocess.Popen:
    env = _env([site])
    for name in ("OPTC_CACHE_DIR", "OPTC_NO_CACHE"):
        env.pop(name, None)
    env.update(TMPDIR=str(case / "tmp"), XDG_CACHE_HOME=str(case / "cache"), OPTC_TEST_HOLD=hold,
               OPTC_TEST_MARKER=str(case / "marker"))
    return subprocess.Popen([*optc_command(), *args], cwd=case / "work", env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signal_handling)


def _default_signal_handling() -> None:
    """Give the child the default handling of the signals under test.

    A test run started with `nohup`, or in the background of a shell without job control, ignores
    SIGHUP or SIGINT, and a child inherits that; optc rightly keeps an ignored signal ignored
    (tested below), so the cases here start from the defaults a terminal gives.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def _case_folder(root: Path, hf: bool = False) -> Path:
    for name in ("work", "tmp", "cache"):
        (root / name).mkdir()
    if hf:
        (root / "work" / "hf").mkdir()
        (root / "work" / "hf" / "config.json").write_text('{"model_type": "llama"}\n')
    else:
        build_model(root / "work" / "model.onnx", external_data="model.onnx.data")
    return root


CASES = {
    # name: (signal, where to hold, optc arguments)
    "sigterm-in-a-pass": (signal.SIGTERM, "pass", ["model.onnx", "--passes=hold", "-o", "out.onnx"]),
    "sighup-in-a-pass": (signal.SIGHUP, "pass", ["model.onnx", "--passes=hold", "-o", "out.onnx"]),
    "sigint-in-a-pass": (signal.SIGINT, "pass", ["model.onnx", "--passes=hold", "-o", "out.onnx"]),
    "sigterm-while-staging-the-output": (
        signal.SIGTERM, "lower", ["model.onnx", "--passes=dce", "-o", "out.onnx", "--report", "out.html"],
    ),
    "sigterm-after-the-output-is-in-place": (
        signal.SIGTERM, "report", ["model.onnx", "--passes=dce", "-o", "out.onnx", "--report", "out.html"],
    ),
    "sigterm-in-the-export": (signal.SIGTERM, "export", ["hf", "-o", "out.onnx"]),
}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, hold_plugin: Path):
    """Every case started at once; each signalled as soon as it holds; with its folders' contents before."""
    started = {}
    for name, (_signum, hold, args) in CASES.items():
        case = _case_folder(tmp_path_factory.mktemp(name), hf=hold == "export")
        before = {part: snapshot(case / part) for part in ("work", "tmp", "cache")}
        started[name] = (case, before, _start(case, args, hold, hold_plugin))
    results = {}
    deadline = time.monotonic() + TIMEOUT_S
    pending = dict(started)
    while pending and time.monotonic() < deadline:
        for name, (case, _, proc) in list(pending.items()):
            if (case / "marker").exists() or proc.poll() is not None:
                if proc.poll() is None:
                    proc.send_signal(CASES[name][0])
                del pending[name]
        time.sleep(0.05)
    for name, (case, before, proc) in started.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        (case / "marker").unlink(missing_ok=True)
        results[name] = (proc.returncode, out, err, case, before)
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_a_signal_cleans_up_like_an_error(name: str, interrupted) -> None:
    code, out, err, case, before = interrupted[name]
    signum = CASES[name][0]
    assert code == 128 + signum, (code, out, err)
    assert err.splitlines() == [f"optc: interrupted by {signal.Signals(signum).name}; nothing was written"], err
    # The output folder (no partial output, no staging folder, no report), TMPDIR (no copy of the
    # model) and the cache (no export staging) hold exactly what they held before.
    for part in ("work", "tmp", "cache"):
        after = snapshot(case / part)
        if part == "cache":  # the cache's empty folders may stay; no file may
            after = {p: h for p, h in after.items() if h != "folder"}
            assert after == {}, after
        else:
            assert after == before[part], (part, after)


def test_a_signal_the_caller_ignores_stays_ignored() -> None:
    """Under nohup (SIGHUP ignored) optc leaves SIGHUP ignored; its handlers are removed after the run."""
    from optc.entry import signals_as_exceptions

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        term = signal.getsignal(signal.SIGTERM)
        with signals_as_exceptions():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGXFSZ) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not term
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_run_survives_a_second_signal_during_its_cleanup() -> None:
    """The first signal raises; one more while the cleanup runs does not cut the cleanup short."""
    from optc.entry import Interrupted, signals_as_exceptions

    cleaned = False
    with signals_as_exceptions():
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # ignored: the cleanup goes on
                time.sleep(0.01)
                cleaned = True
        except Interrupted as exc:
            assert exc.signum == signal.SIGTERM
    assert cleaned
