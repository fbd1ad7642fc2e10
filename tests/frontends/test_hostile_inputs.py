"""Hostile inputs to the loaders: one line, exit 1, nothing allocated beyond what the file holds.

* a GGUF file of a few dozen bytes that names an architecture and nothing else (transformers
  would fill in a 6.7B-parameter model), or whose header announces tensors it does not hold;
* a Hugging Face directory whose config describes a large model but holds few or no weights;
* ONNX tensors whose inline bytes or external data do not match their shape and dtype, or whose
  external data lies outside the model's folder;
* `--memory-budget`: refused before loading when the estimate exceeds it, usage error when ill-typed.
"""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optc.errors import ModelLoadError, UsageError
from optc.frontends import load_input
from optc.memory import MemoryBudgetExceeded
from tests.cli.cli_support import Job, run_in_process, snapshot
from tests.fixtures.mlp_file import build_model
from tests.frontends.hostile_support import (
    PEAK_RSS_LIMIT_KIB,
    gguf_bytes,
    gguf_string,
    run_measured,
    safetensors_bytes,
)

# --------------------------------------------------------------------------- builders


def big_llama_config(**overrides) -> dict:
    """A config.json describing a 6.7B-parameter llama (transformers' defaults, spelled out)."""
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
    }
    config.update(overrides)
    return config


def hf_dir(folder: Path, config: dict, weights: bytes | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """An empty export cache (checked for leftovers), for this test and its children."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("OPTC_CACHE_DIR", str(cache))
    monkeypatch.delenv("OPTC_NO_CACHE", raising=False)
    return cache


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- GGUF


def test_architecture_only_gguf_is_refused_before_allocating(tmp_path, private_cache):
    """The 60-byte file of the issue: exit 1, one line, the child stays far below 1 GB, nothing left anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.gguf").write_bytes(gguf_bytes({"general.architecture": "llama"}))
    before = snapshot(work)
    code, lines, peak_kib = run_measured(["model.gguf", "-o", "out.onnx"], work)
    assert code == 1, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith("optc: error: ") and "model.gguf: config describes" in lines[0], lines
    assert "parameters but the file holds 0 bytes of tensor data" in lines[0] and "refusing to allocate" in lines[0]
    assert peak_kib < PEAK_RSS_LIMIT_KIB, f"peak RSS {peak_kib} KiB"
    assert snapshot(work) == before
    assert [p for p in private_cache.rglob("*") if p.is_file()] == [], "no export staging left in the cache"


@pytest.mark.parametrize(
    ("tensors", "data", "count", "mentions"),
    [
        ([("token_embd.weight", [4096, 32000], 0, 0)], b"\0" * 64, None, ["token_embd.weight", "runs past the end"]),
        ([("w", [16], 0, 1 << 40)], b"\0" * 64, None, ["'w'", "runs past the end"]),
        ([("w", [16, 1, 1, 1, 1], 0, 0)], b"\0" * 64, None, ["'w'", "dimensions"]),
        ([("w", [16], 999, 0)], b"\0" * 64, None, ["'w'", "unknown ggml type 999"]),
        ([("w", [17], 2, 0)], b"\0" * 64, None, ["'w'", "blocks of 32"]),  # Q4_0 rows are blocks of 32
        ([], b"", 1 << 60, ["tensor count", "does not fit"]),
    ],
)
def test_gguf_header_that_lies_about_its_tensors(tmp_path, private_cache, tensors, data, count, mentions):
    path = tmp_path / "lies.gguf"
    path.write_bytes(gguf_bytes({"general.architecture": "llama"}, tensors, data, tensor_count=count))
    with pytest.raises(ModelLoadError) as info:
        load_input(path)
    message = _one_line(info)
    assert message.startswith(str(path))
    for text in mentions:
        assert text in message


@pytest.mark.parametrize(
    "data",
    [
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 62),  # a metadata count no file could hold
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"key",  # a key longer than the file
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("a") + struct.pack("<IIQ", 9, 8, 1 << 61),  # huge array
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("a") + struct.pack("<I", 77) + b"\0" * 16,  # bad type
        b"GGUF" + struct.pack("<IQQ", 1, 0, 0) + b"\0" * 8,  # version 1
    ],
)
def test_gguf_metadata_that_lies_about_its_size(tmp_path, data):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as info:
        load_input(path)
    assert _one_line(info).startswith(str(path))


def test_gguf_block_count_beyond_its_parameters(tmp_path, private_cache):
    path = tmp_path / "deep.gguf"
    path.write_bytes(gguf_bytes({"general.architecture": "llama", "llama.block_count": 4_000_000}))
    with pytest.raises(ModelLoadError) as info:
        load_input(path)
    assert "4000000 layers" in _one_line(info) and "refusing to allocate" in str(info.value)


# --------------------------------------------------------------------------- Hugging Face directories


def test_config_of_a_large_model_with_few_weights(tmp_path, private_cache):
    folder = hf_dir(tmp_path / "big", big_llama_config(), safetensors_bytes({"w": np.zeros(1024, np.float32)}))
    with pytest.raises(ModelLoadError) as info:
        load_input(folder)
    message = _one_line(info)
    assert message.startswith(f"{folder}: config describes 6.7B parameters but the files hold 4.1 kB of tensor data")
    assert "refusing to allocate" in message


def test_config_of_a_large_model_without_weights(tmp_path, private_cache):
    folder = hf_dir(tmp_path / "big", big_llama_config(), None)
    with pytest.raises(ModelLoadError) as info:
        load_input(folder)
    assert "cannot read the weights: the directory holds no weight files" in _one_line(info)


def test_config_with_absurd_depth_is_refused_unread(tmp_path, private_cache):
    """transformers builds per-layer lists while reading such a config; it is refused before."""
    folder = hf_dir(
        tmp_path / "deep", big_llama_config(num_hidden_layers=10**12), safetensors_bytes({"w": np.zeros(4, np.float32)}),
    )
    with pytest.raises(ModelLoadError) as info:
        load_input(folder)
    assert "describes 1000000000000 layers (num_hidden_layers) but the files hold 4 parameters" in _one_line(info)


@pytest.mark.parametrize(
    ("lie", "mentions"),
    [
        ({"data_offsets": [0, 1 << 40]}, ["'w'", "runs past the end"]),
        ({"shape": [1 << 20]}, ["'w'", "needs 4194304 bytes, has 64"]),
        ({"shape": "many"}, ["'w'", "lacks a dtype"]),
    ],
)
def test_safetensors_header_that_lies(tmp_path, private_cache, lie, mentions):
    weights = safetensors_bytes({"w": np.zeros(16, np.float32)}, lie={"w": lie})
    folder = hf_dir(tmp_path / "m", big_llama_config(), weights)
    with pytest.raises(ModelLoadError) as info:
        load_input(folder)
    message = _one_line(info)
    assert message.startswith(f"{folder}: cannot read the weights: model.safetensors: ")
    for text in mentions:
        assert text in message


def test_safetensors_header_longer_than_the_file(tmp_path, private_cache):
    folder = hf_dir(tmp_path / "m", big_llama_config(), struct.pack("<Q", 1 << 50) + b"{}")
    with pytest.raises(ModelLoadError) as info:
        load_input(folder)
    assert "does not fit" in _one_line(info)


# --------------------------------------------------------------------------- ONNX tensors


def _onnx_with(tmp_path: Path, weight: TensorProto, name: str = "model.onnx") -> Path:
    """x[4] + w -> y, with `weight` (named w) as the initializer."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight],
    )
    path = tmp_path / name
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString())
    return path


def _external(location: str, offset: int | None = None, length: int | None = None) -> TensorProto:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    entries = {"location": location, "offset": offset, "length": length}
    for key, value in entries.items():
        if value is not None:
            weight.external_data.add(key=key, value=str(value))
    return weight


def _raw(nbytes: int) -> TensorProto:
    return TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], raw_data=b"\0" * nbytes)


def _typed(count: int) -> TensorProto:
    return TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], float_data=[1.0] * count)


ONNX_CASES = {
    "raw-too-short": (lambda d: _raw(12), ["initializer 'w'", "needs 16 bytes but holds 12"]),
    "raw-too-long": (lambda d: _raw(20), ["needs 16 bytes but holds 20"]),
    "typed-too-short": (lambda d: _typed(3), ["needs 4 values but holds 3"]),
    "typed-too-long": (lambda d: _typed(5), ["needs 4 values but holds 5"]),
    "negative-dim": (
        lambda d: TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[-4], raw_data=b"\0" * 16), ["negative"],
    ),
    "external-length-too-short": (lambda d: _external("w.bin", 0, 8), ["has length 8", "need 16 bytes"]),
    "external-length-too-long": (lambda d: _external("w.bin", 0, 32), ["has length 32", "need 16 bytes"]),
    "external-offset-beyond-end": (lambda d: _external("w.bin", 4096), ["w.bin", "truncated", "offset 4096"]),
    "external-data-beyond-end": (lambda d: _external("w.bin", 60), ["w.bin", "truncated", "needs 76 bytes"]),
    "external-parent-folder": (lambda d: _external("../outside.bin"), ["'../outside.bin'", "outside the model's folder"]),
    "external-absolute-path": (lambda d: _external(str(d.parent / "outside.bin")), ["outside the model's folder"]),
    "external-sneaky-path": (lambda d: _external("sub/../../outside.bin"), ["outside the model's folder"]),
    "external-not-a-file": (lambda d: _external("folder"), ["'folder'", "not a regular file"]),
    # (found by the fuzzer) lexically inside, but the reader opens it as written and "sub" does not exist
    "external-through-a-missing-folder": (lambda d: _external("sub/../w.bin"), ["'sub/../w.bin'", "missing"]),
}


@pytest.mark.parametrize("name", list(ONNX_CASES))
def test_onnx_tensor_sizes_and_places_are_checked_at_load(tmp_path, name):
    """Through the command line (in process): one line, exit 1, nothing written, nothing read outside the folder."""
    build, mentions = ONNX_CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    (work / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())  # 64 bytes
    (work / "folder").mkdir()
    (tmp_path / "outside.bin").write_bytes(np.ones(4, np.float32).tobytes())
    _onnx_with(work, build(work))
    before = snapshot(work)
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--no-runtime-check"], work))
    assert run.returncode == 1, run
    assert len(run.stderr_lines) == 1 and "internal error" not in run.stderr, run
    line = run.stderr_lines[0]
    assert line.startswith("optc: error: model.onnx: "), run
    for text in mentions:
        assert text in line, line
    assert snapshot(work) == before


@pytest.mark.parametrize(("field", "text"), [("name", b"add_node"), ("op_type", b"Add")])
def test_text_that_is_not_utf8_is_refused_at_load(tmp_path, field, text):
    """(Found by the fuzzer) a node name or op type of invalid UTF-8 crashed the verifier or the writer."""
    path = _onnx_with(tmp_path, _raw(16))
    proto = onnx.load(str(path))
    proto.graph.node[0].name = "add_node"
    data = proto.SerializeToString()
    assert data.count(text) == 1
    path.write_bytes(data.replace(text, text[:-1] + b"\xff"))
    before = snapshot(tmp_path)
    run = run_in_process(Job([path.name, "-o", "out.onnx", "--no-runtime-check"], tmp_path))
    assert run.returncode == 1 and len(run.stderr_lines) == 1, run
    assert f"NodeProto.{field}" in run.stderr and "is not UTF-8 text" in run.stderr, run
    assert snapshot(tmp_path) == before


def test_attribute_without_a_type_is_refused_at_load(tmp_path):
    """(Found by the fuzzer) onnx-ir keeps an untyped attribute, then fails to write the output."""
    path = _onnx_with(tmp_path, _raw(16))
    proto = onnx.load(str(path))
    proto.graph.node[0].attribute.add(name="mystery")  # no type
    path.write_bytes(proto.SerializeToString())
    before = snapshot(tmp_path)
    run = run_in_process(Job([path.name, "-o", "out.onnx", "--no-runtime-check"], tmp_path))
    assert run.returncode == 1 and len(run.stderr_lines) == 1, run
    assert "attribute 'mystery' of node 'Add' has no type" in run.stderr, run
    assert snapshot(tmp_path) == before


def test_well_formed_external_data_still_loads(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\0" * 16 + np.arange(4, dtype=np.float32).tobytes())
    path = _onnx_with(tmp_path, _external("sub/w.bin", 16, 16))
    model = load_input(path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("suffix", [".onnx", ".gguf", ".bin"])
def test_a_pipe_is_refused_without_blocking(tmp_path, suffix):
    """Opening a FIFO blocks until a writer comes; the loader refuses it unopened."""
    import os

    pipe = tmp_path / f"model{suffix}"
    os.mkfifo(pipe)
    signal.alarm(20)  # a regression would block here: end it as a failure instead
    try:
        with pytest.raises(ModelLoadError) as info:
            load_input(pipe)
    finally:
        signal.alarm(0)
    assert "not a regular file" in _one_line(info)


# --------------------------------------------------------------------------- --memory-budget


def test_memory_budget_refuses_before_loading(tmp_path):
    build_model(tmp_path / "model.onnx")
    before = snapshot(tmp_path)
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--memory-budget", "1K"], tmp_path))
    assert run.returncode == 1, run
    assert len(run.stderr_lines) == 1, run
    assert run.stderr_lines[0].startswith("optc: error: model.onnx: loading its protobuf needs about ")
    assert "more than the budget of 1.0 kB; refusing to load it" in run.stderr_lines[0]
    assert snapshot(tmp_path) == before


def test_memory_budget_large_enough_compiles(tmp_path):
    build_model(tmp_path / "model.onnx")
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--memory-budget", "512M", "--no-runtime-check"], tmp_path))
    assert run.returncode == 0, run
    assert (tmp_path / "out.onnx").is_file()


@pytest.mark.parametrize("value", ["lots", "0", "-1G", "8X", ""])
def test_ill_typed_memory_budget_is_a_usage_error(tmp_path, value):
    build_model(tmp_path / "model.onnx")
    before = snapshot(tmp_path)
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", f"--memory-budget={value}"], tmp_path))
    assert run.returncode == 2, run
    assert len(run.stderr_lines) == 1 and "--memory-budget" in run.stderr, run
    assert snapshot(tmp_path) == before


def test_memory_budget_of_an_export(tmp_path, private_cache):
    """A Hugging Face input is refused from its parameter count, before transformers allocates it."""
    weights = safetensors_bytes({"w": np.zeros(1 << 16, np.float32)})
    config = big_llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, vocab_size=128)
    folder = hf_dir(tmp_path / "small", config, weights)
    with pytest.raises(MemoryBudgetExceeded) as info:
        load_input(folder, memory_budget=100_000)
    message = _one_line(info)
    assert message.startswith(f"{folder}: exporting it (") and "parameters in float32) needs about" in message
    assert "more than the budget of 100.0 kB" in message


def test_memory_budget_in_the_python_api(tmp_path):
    import optc

    model = build_model(tmp_path / "model.onnx")
    with pytest.raises(MemoryBudgetExceeded):
        optc.compile(model, output=tmp_path / "out.onnx", memory_budget="1K")
    with pytest.raises(UsageError, match="memory budget"):
        optc.compile(model, output=tmp_path / "out.onnx", memory_budget="plenty")
    result = optc.compile(model, output=tmp_path / "out.onnx", memory_budget=256 << 20)
    assert result.artifact.path.is_file()
    assert not (tmp_path / "out.onnx.reproducer.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]
    assert onnx.load(str(tmp_path / "out.onnx")).graph.output[0].name == "y"
