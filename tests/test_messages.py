"""What reaches stderr is optc's one line: no Hugging Face Hub address, no onnx-ir warning line, no
llama.cpp log line (non-ASCII pass names: tests/passes/infra/test_fuzz_pipeline.py)."""

from __future__ import annotations

import contextlib
import ctypes
import io
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from optc.entry import run_command
from optc.errors import ModelLoadError
from optc.messages import without_hub_urls
from tests.cli.cli_support import Job, run_optc, sha256

#: What transformers says when a folder holds no tokenizer, a config or its files (first lines, verbatim shapes).
HUB_MESSAGES = [
    "Can't load tokenizer for 'tok'. If you were trying to load it from 'https://huggingface.co/models', make "
    "sure you don't have a local directory with the same name. Otherwise, make sure 'tok' is the correct path "
    "to a directory containing all relevant files for a LlamaTokenizerFast tokenizer.",
    "m is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'",
    "m does not appear to have a file named config.json. Checkout 'https://huggingface.co/m/tree/main' for "
    "available files.",
    "We couldn't connect to 'https://hf.co' to load the files.",
]


@pytest.mark.parametrize("message", HUB_MESSAGES)
def test_hub_addresses_are_dropped(message: str) -> None:
    cleaned = without_hub_urls(message)
    assert "http" not in cleaned and "huggingface.co" not in cleaned and cleaned
    assert without_hub_urls("a plain message. With two sentences.") == "a plain message. With two sentences."


@pytest.mark.parametrize("message", HUB_MESSAGES)
@pytest.mark.parametrize("kind", [ModelLoadError, RuntimeError])
def test_no_hub_address_reaches_stderr(message: str, kind: type[Exception]) -> None:
    """Both an optc error and an internal error (another library's exception) print without the address."""

    def run(argv: list[str]) -> int:
        raise kind(f"m: cannot read the tokenizer: {message}")

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_command("optc", run, [])
    assert code == 1
    assert len(err.getvalue().splitlines()) == 1 and "http" not in err.getvalue(), err.getvalue()
    assert "cannot read the tokenizer" in err.getvalue()


def test_an_onnx_ir_warning_is_not_a_second_line(tmp_path: Path) -> None:
    """onnx-ir logs a warning when a node reads an undefined value; the verifier's line says it, once.

    A child process: pytest's own log handlers would hide Python's last-resort handler in this one.
    """
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], "ghost",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "ghost.onnx"))
    before = sha256(tmp_path / "ghost.onnx")
    run = run_optc(Job(["ghost.onnx", "-o", "out.onnx"], tmp_path))
    assert run.returncode == 1, run
    assert run.stderr_lines == ["optc: error: IR verification failed on input ghost.onnx: node add input 1 "
                                "('ghost') is not defined"], run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ghost.onnx"] and sha256(tmp_path / "ghost.onnx") == before


def test_llama_cpp_logs_go_nowhere(capfd) -> None:
    """After optc imports llama.cpp, the callback llama.cpp logs through prints nothing, errors included."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from optc.backends.gguf import import_llama_cpp

    assert import_llama_cpp() is llama_cpp
    callback = llama_cpp.llama_log_callback()
    user_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    assert callback  # the one llama.cpp (and ggml) call for every message
    for level in (0, 2, 3):  # none, warn, error
        callback(level, b"llama_model_load: error loading model: something\n", None)
    captured = capfd.readouterr()
    assert "llama_model_load" not in captured.err + captured.out
