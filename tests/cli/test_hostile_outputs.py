"""Outputs that would damage an input, targets that do not match the output, inputs that would block, failed writes.

Every case builds its hostile input in an empty folder and checks the contract:
the documented exit code, exactly one `optc: error:` line naming the problem,
no traceback, and the folder byte for byte as it was (no output, no staging
folder, no report, the input untouched).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli.cli_support import (
    RUN_TIMEOUT_S,
    Job,
    Run,
    _env,
    assert_clean_failure,
    optc_command,
    run_in_process,
    run_many,
    run_optc,
    snapshot,
)
from tests.cli.test_cli_errors import Case
from tests.fixtures.mlp_file import build_model


def _check(case: Case, run: Run, folder: Path, files: dict[str, str]) -> None:
    """Nothing written (no output, no temporary file, no report) and nothing modified."""
    assert_clean_failure(run, folder, files, case.exit_code, case.mentions)


def _with_data(location: str, *args: str) -> Callable[[Path], list[str]]:
    """`optc model.onnx ARGS...` where model.onnx keeps its weights in the file `location`."""
    def setup(d: Path) -> list[str]:
        build_model(d / "model.onnx", external_data=location)
        return ["model.onnx", *args]
    return setup


def _hf_directory(d: Path) -> Path:
    """Enough of a Hugging Face directory to be taken for one (nothing is loaded: the guard runs first)."""
    folder = d / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(20))
    return folder


def _hf(*args: str) -> Callable[[Path], list[str]]:
    return lambda d: [_hf_directory(d).name, *args]


def _hf_blob(d: Path) -> list[str]:
    folder = _hf_directory(d)
    (d / "blobs").mkdir()
    (d / "blobs" / "0123abcd.onnx").write_bytes(b"the weights")
    (folder / "weights.safetensors").symlink_to(Path("..") / "blobs" / "0123abcd.onnx")
    return [folder.name, "-o", "blobs/0123abcd.onnx"]


def _linked(kind: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        build_model(d / "model.onnx")
        if kind == "symlink":
            (d / "link.onnx").symlink_to("model.onnx")
            return ["model.onnx", "-o", "link.onnx"]
        if kind == "hardlink":
            os.link(d / "model.onnx", d / "hard.onnx")
            return ["model.onnx", "-o", "hard.onnx"]
        (d / "alias").symlink_to(".")  # a folder link: alias/model.onnx is model.onnx
        return ["model.onnx", "-o", "alias/model.onnx"]
    return setup


#: No path a run writes may be an input file, a file the input refers to, or inside an input directory.
GUARD_CASES: dict[str, Case] = {
    # The case: the ONNX beside the engine keeps its data in x.onnx.data, the input's data file.
    "engine-onnx-data-is-input-data": Case(
        _with_data("x.onnx.data", "-o", "x.engine", "--target", "tensorrt"), 1, ["x.onnx.data", "input's data"],
    ),
    "engine-onnx-is-the-input": Case(
        lambda d: [build_model(d / "x.onnx").name, "-o", "x.engine"], 1, ["x.onnx", "overwrite the input"],
    ),
    "engine-beside-onnx-output-is-input-data": Case(
        _with_data("out.engine", "--target", "tensorrt", "-o", "out.onnx"), 1, ["its engine", "input's data"],
    ),
    "trtexec-file-is-input-data": Case(
        _with_data("out.trtexec.txt", "--target", "tensorrt", "-o", "out.onnx"), 1, ["trtexec", "input's data"],
    ),
    # The second case, and what is left of it once the suffix is right.
    "hf-file-with-explicit-target": Case(_hf("-o", "hf/model.safetensors", "--target", "ort"), 2, ["'.onnx'"]),
    "output-inside-hf-directory": Case(_hf("-o", "hf/model.onnx"), 1, ["inside the input directory"]),
    "output-replaces-a-file-of-hf-directory": Case(_hf("-o", "hf/model.gguf"), 1, ["inside the input directory"]),
    "output-in-a-subfolder-of-hf-directory": Case(_hf("-o", "hf/sub/out.onnx"), 1, ["inside the input directory"]),
    # A Hugging Face cache snapshot links its files to blobs elsewhere: the blobs are inputs too.
    "output-is-a-blob-an-hf-file-links-to": Case(_hf_blob, 1, ["a file of the input directory"]),
    "report-inside-hf-directory": Case(_hf("-o", "out.onnx", "--report", "hf/r.json"), 1, ["--report", "inside"]),
    "output-is-a-symlink-to-the-input": Case(_linked("symlink"), 1, ["link.onnx", "overwrite the input"]),
    "output-is-a-hard-link-to-the-input": Case(_linked("hardlink"), 1, ["hard.onnx", "same file"]),
    "output-through-a-folder-link": Case(_linked("folder"), 1, ["overwrite the input"]),
    "report-is-input-data": Case(
        _with_data("r.json", "-o", "out.onnx", "--report", "r.json"), 1, ["--report r.json", "input's data"],
    ),
    "report-companion-is-input-data": Case(
        _with_data("r.json", "-o", "out.onnx", "--report", "r.html"), 1, ["--report r.html", "r.json", "input's data"],
    ),
    "reproducer-is-input-data": Case(
        _with_data("out.onnx.reproducer.txt", "-o", "out.onnx"), 1, ["reproducer", "input's data"],
    ),
    "report-is-the-calibration-text": Case(
        lambda d: [_model(d), "-o", "out.onnx", "--calib", f"text:{_text(d / 'corpus.txt')}", "--report", "corpus.txt"],
        1, ["--report corpus.txt", "calibration data"],
    ),
    "output-is-the-distill-teacher": Case(
        lambda d: [_model(d), "--passes", f"distill{{steps=1 teacher={build_model(d / 'teacher.onnx').name}}}",
                   "--calib", "random", "-o", "teacher.onnx"], 1, ["teacher.onnx", "distill{teacher=...}"],
    ),
    "report-is-the-output-data": Case(
        lambda d: [build_model(d / "m.onnx").name, "-o", "out.onnx", "--report", "out.onnx.data"], 1,
        ["--report", "overwrite"],
    ),
}

#: An explicit --target writes only its own suffixes: no ONNX under a .gguf or .json name.
SUFFIX_CASES: dict[str, Case] = {
    "ort-to-gguf-name": Case(lambda d: [_model(d), "--target", "ort", "-o", "out.gguf"], 2, ["--target ort", "'.onnx'", "'.gguf'"]),
    "ort-to-json-name": Case(lambda d: [_model(d), "--target", "ort", "-o", "out.json"], 2, ["'.onnx'", "'.json'"]),
    "gguf-to-onnx-name": Case(lambda d: [_model(d), "--target", "gguf", "-o", "out.onnx"], 2, ["--target gguf", "'.gguf'"]),
    "tensorrt-to-gguf-name": Case(
        lambda d: [_model(d), "--target", "tensorrt", "-o", "out.gguf"], 2, ["'.onnx'", "'.engine'", "'.plan'"],
    ),
    "no-suffix": Case(lambda d: [_model(d), "--target", "ort", "-o", "out"], 2, ["'.onnx'"]),
}


def _model(d: Path) -> str:
    return build_model(d / "model.onnx").name


def _text(path: Path) -> str:
    path.write_text("calibration text that must survive the run\n")
    return path.name


@pytest.mark.parametrize("name", list(GUARD_CASES))
def test_no_write_touches_an_input(name: str, tmp_path: Path) -> None:
    case = GUARD_CASES[name]
    args = case.setup(tmp_path)
    files = snapshot(tmp_path)
    _check(case, run_in_process(Job(args, tmp_path)), tmp_path, files)


@pytest.mark.parametrize("name", list(SUFFIX_CASES))
def test_explicit_target_must_match_the_output_suffix(name: str, tmp_path: Path) -> None:
    case = SUFFIX_CASES[name]
    args = case.setup(tmp_path)
    files = snapshot(tmp_path)
    _check(case, run_in_process(Job(args, tmp_path)), tmp_path, files)


def test_the_api_has_the_same_guard(tmp_path: Path) -> None:
    """optc.compile on a path and on a loaded model refuses what the command line refuses."""
    import optc
    from optc.errors import OptcError, UsageError
    from optc.ir import load_model

    build_model(tmp_path / "model.onnx", external_data="x.onnx.data")
    files = snapshot(tmp_path)
    with pytest.raises(OptcError, match="input's data"):
        optc.compile(tmp_path / "model.onnx", output=tmp_path / "x.engine", target="tensorrt", passes="dce")
    with pytest.raises(OptcError, match="input's data"):
        optc.compile(load_model(tmp_path / "model.onnx"), output=tmp_path / "x.onnx", passes="dce")
    with pytest.raises(UsageError, match="'.gguf'"):
        optc.compile(tmp_path / "model.onnx", output=tmp_path / "y.onnx", target="gguf")
    assert snapshot(tmp_path) == files


# ---------------------------------------------------------------- inputs that are not files


def _fifo(d: Path, name: str) -> str:
    os.mkfifo(d / name)
    return name


#: Run as children: a regression here would block, and the child's timeout ends it.
KIND_CASES: dict[str, Case] = {
    "fifo-input": Case(lambda d: [_fifo(d, "model.onnx"), "-o", "out.onnx"], 1, ["model.onnx", "FIFO"]),
    "device-input": Case(lambda d: ["/dev/zero", "-o", "out.onnx"], 1, ["/dev/zero", "device"]),
    "fifo-calibration-text": Case(
        lambda d: [_model(d), "--calib", f"text:{_fifo(d, 'corpus.txt')}", "-o", "out.onnx"], 1, ["--calib", "FIFO"],
    ),
    "fifo-calibration-arrays": Case(
        lambda d: [_model(d), "--calib", f"npz:{_fifo(d, 'feeds.npz')}", "-o", "out.onnx"], 1, ["--calib", "FIFO"],
    ),
}


def _listing_without_reading(folder: Path) -> dict[str, str]:
    """`snapshot`, but FIFOs are named, not read (reading one blocks)."""
    return {str(p.relative_to(folder)): "fifo" if stat.S_ISFIFO(p.lstat().st_mode) else "file"
            for p in folder.rglob("*")}


def test_inputs_that_would_block_are_refused(tmp_path: Path) -> None:
    prepared = {}
    for name, case in KIND_CASES.items():
        folder = tmp_path / name
        folder.mkdir()
        prepared[name] = (Job(case.setup(folder), folder), _listing_without_reading(folder))
    runs = run_many({name: job for name, (job, _) in prepared.items()})
    for name, (job, files) in prepared.items():
        run, case = runs[name], KIND_CASES[name]
        assert run.returncode == case.exit_code, run
        assert len(run.stderr_lines) == 1 and run.stderr.startswith("optc: error: "), run
        for text in case.mentions:
            assert text.lower() in run.stderr.lower(), run
        assert _listing_without_reading(job.cwd) == files


# ---------------------------------------------------------------- writes that fail


def _big_model(path: Path) -> Path:
    """y = x @ w with a 256 KiB weight (larger than the file-size limit below)."""
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _run_child(args: list[str], cwd: Path, preexec: Callable[[], None] | None) -> Run:
    proc = subprocess.run([*optc_command(), *args], cwd=cwd, env=_env(()), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL, preexec_fn=preexec)
    return Run(args, proc.returncode, proc.stdout, proc.stderr)


def test_a_file_size_limit_is_one_line(tmp_path: Path) -> None:
    """RLIMIT_FSIZE: optc ignores SIGXFSZ (which would kill it midway) and reports EFBIG."""
    _big_model(tmp_path / "model.onnx")
    files = snapshot(tmp_path)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    run = _run_child(["model.onnx", "-o", "out.onnx"], tmp_path, limit)
    _check(Case(lambda d: [], 1, ["out.onnx", "cannot write", os.strerror(errno.EFBIG)]), run, tmp_path, files)


def test_a_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC halfway through the model file: one line, and the staging folder is gone."""
    import optc.ir.io as io

    def fill_the_disk(model, path, **kwargs) -> None:
        Path(path).write_bytes(b"\x08" * 100)  # a partial file in the staging folder
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io._oir, "save", fill_the_disk)
    build_model(tmp_path / "model.onnx", external_data="model.onnx.data")
    files = snapshot(tmp_path)
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx"], tmp_path))
    _check(Case(lambda d: [], 1, ["out.onnx", os.strerror(errno.ENOSPC), "nothing was written"]), run, tmp_path, files)


def test_a_full_disk_for_the_report_removes_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output is already in place when the report cannot be written: the failed run removes it."""
    import optc.driver

    def fill_the_disk(path, data) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(optc.driver, "write_report", fill_the_disk)
    build_model(tmp_path / "model.onnx", external_data="model.onnx.data")
    (tmp_path / "out.onnx").write_bytes(b"an older output")
    files = snapshot(tmp_path)
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--report", "r.json"], tmp_path))
    # The older output was replaced before the report failed; a failed run keeps nothing of its own.
    del files["out.onnx"]
    _check(Case(lambda d: [], 1, ["--report r.json", os.strerror(errno.ENOSPC)]), run, tmp_path, files)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_under_proc_is_one_line(tmp_path: Path) -> None:
    build_model(tmp_path / "model.onnx")
    files = snapshot(tmp_path)
    run = run_in_process(Job(["model.onnx", "-o", "/proc/out.onnx"], tmp_path))
    _check(Case(lambda d: [], 1, ["/proc/out.onnx"]), run, tmp_path, files)
    assert not Path("/proc/out.onnx").exists()


#: Linux capabilities that let root write where the permission bits say no (capability.h).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_PR_CAPBSET_DROP = 24


def _without_root_override() -> None:
    """In the child, before exec: drop root's power to ignore permission bits (from the bounding set,
    so the program it executes starts without them); it stays root and can still run this interpreter."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    """A folder the user cannot write (as root, the child runs without the capability to override it)."""
    build_model(tmp_path / "model.onnx")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        files = snapshot(tmp_path)
        drop = _without_root_override if os.geteuid() == 0 else None
        run = _run_child(["model.onnx", "-o", "ro/out.onnx"], tmp_path, drop)
        _check(Case(lambda d: [], 1, ["ro/out.onnx", "not writable"]), run, tmp_path, files)
    finally:
        (tmp_path / "ro").chmod(0o755)


# ---------------------------------------------------------------- reports, --compare, messages


def test_an_html_report_is_html_even_when_nothing_was_quantized(tmp_path: Path) -> None:
    build_model(tmp_path / "model.onnx")
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--report", "r.html"], tmp_path))
    assert run.returncode == 0, run
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert "quantized nothing" in (tmp_path / "r.html").read_text()
    assert json.loads((tmp_path / "r.json").read_text())["pipeline"] == "fixpoint(fold-constants,cse,dce),topo-sort"


def test_a_failed_compare_keeps_nothing_and_names_no_missing_flag(tmp_path: Path) -> None:
    """The tiny model has no tokenizer: --compare fails, does not suggest a flag optc lacks, and keeps no output."""
    build_model(tmp_path / "model.onnx")
    files = snapshot(tmp_path)
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--compare"], tmp_path))
    _check(Case(lambda d: [], 1, ["--compare", "tokenizer", "optc-eval"]), run, tmp_path, files)
    assert "pass --tokenizer" not in run.stderr


def test_a_runtime_rejection_names_the_output_not_the_staging_folder(tmp_path: Path, failing_plugin: Path) -> None:
    build_model(tmp_path / "model.onnx")
    files = snapshot(tmp_path)
    run = run_optc(Job(["model.onnx", "--passes=foreign-op", "-o", "out.onnx"], tmp_path, [failing_plugin]))
    _check(Case(lambda d: [], 1, ["onnxruntime rejected", "out.onnx"]), run, tmp_path, files)
    assert ".out.onnx." not in run.stderr and str(tmp_path) not in run.stderr, run


@pytest.mark.parametrize("target", ["gguf", "tensorrt"])
def test_the_other_backends_report_a_full_disk_in_one_error(target: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF writer and TensorRT's command file: ENOSPC is a `WriteError` naming the output; nothing stays."""
    from optc.backends import get_backend
    from optc.errors import WriteError
    from optc.ir import load_model
    from optc.passes.infra.context import PassContext

    def fill_the_disk(*args, **kwargs) -> None:
        for arg in args:  # a partial file where the backend stages its output
            if isinstance(arg, (str, Path)) and Path(arg).parent == tmp_path:
                Path(arg).write_bytes(b"\x00" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "gguf":
        import optc.backends.gguf as gguf

        monkeypatch.setattr(gguf, "write_gguf", fill_the_disk)
        output = tmp_path / "out.gguf"
    else:
        import optc.backends.tensorrt as trt

        monkeypatch.setattr(trt, "tensorrt_available", lambda: False)
        monkeypatch.setattr(trt.os, "fdopen", fill_the_disk)  # the trtexec command file's write
        output = tmp_path / "out.onnx"
    model = load_model(build_model(tmp_path.parent / f"{tmp_path.name}-model.onnx"))
    context = PassContext(config={"backend.skip_runtime_check": True})
    with pytest.raises(WriteError, match=os.strerror(errno.ENOSPC)) as caught:
        get_backend(target).lower(model, output, context)
    assert str(caught.value.path) == str(output.with_name("out.trtexec.txt") if target == "tensorrt" else output)
    if target == "tensorrt":
        (tmp_path / "out.onnx").unlink()  # written before the command file; the driver removes it (tested above)
    assert [p.name for p in tmp_path.iterdir()] == []
