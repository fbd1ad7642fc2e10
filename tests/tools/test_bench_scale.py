"""tools/bench_scale.py's synthetic checkpoints: they load in transformers with their tokenizer, and optc
exports them with lazy weights (one block repeated) and writes them as ONNX and GGUF."""

from __future__ import annotations

import gguf
import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers

from tests.fixtures.tool_modules import spy_on, tool_module


@pytest.fixture(scope="module")
def bench():
    yield from tool_module("bench_scale")


@pytest.fixture(scope="module")
def checkpoint(bench, tmp_path_factory):
    shape = bench.Shape(hidden=64, layers=3, intermediate=128, vocab=300, heads=4, kv_heads=2)
    folder = tmp_path_factory.mktemp("scale") / "checkpoint"
    bench.make_checkpoint(folder, shape)
    return shape, folder


def test_checkpoint_loads_in_transformers(checkpoint):
    shape, folder = checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == shape.parameters
    norms = [p.detach() for name, p in model.named_parameters() if name.endswith("norm.weight")]
    assert len(norms) == 2 * shape.layers + 1
    assert all(not torch.equal(norms[0], other) for other in norms[1:])  # each norm its own tensor
    assert abs(float(norms[0].float().mean()) - 1.0) < 0.01
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tokenizer) == shape.vocab
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    text = "Hello, wörld! 12345"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < shape.vocab and tokenizer.decode(ids) == text


def test_tokenizer_size_is_checked(bench, tmp_path):
    with pytest.raises(ValueError, match="byte-level vocabulary"):
        bench.write_tokenizer(tmp_path, 100)


def test_lazy_export_repeats_one_block_and_lowers_to_onnx_and_gguf(checkpoint, tmp_path, monkeypatch):
    import optc
    from optc.frontends.lazy_weights import repeat_last_block
    from optc.frontends.transformers import load_transformers

    shape, folder = checkpoint
    monkeypatch.setenv("OPTC_NO_CACHE", "1")
    monkeypatch.setenv("OPTC_LAZY_WEIGHTS", "1")
    returned = spy_on(monkeypatch, "optc.frontends.transformers.repeat_last_block", repeat_last_block)
    model = load_transformers(folder)
    assert returned == [None]
    onnx_file = optc.compile(model, output=tmp_path / "w8.onnx", passes="rtn{bits=8 group=32}").artifact.path
    ids = np.random.default_rng(0).integers(3, shape.vocab, size=(1, 9), dtype=np.int64)
    got = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(["logits"], {"input_ids": ids})[0]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        want = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    cosine = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine > 0.999, cosine
    gguf_file = optc.compile(load_transformers(folder), output=tmp_path / "f32.gguf", passes="").artifact.path
    reader = gguf.GGUFReader(str(gguf_file))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == shape.vocab
    assert sum(t.name.startswith("blk.") and t.name.endswith("attn_q.weight") for t in reader.tensors) == shape.layers


def test_checkpoint_matches_a_written_checkpoint_only(bench, checkpoint, tmp_path):
    import shutil

    shape, folder = checkpoint
    assert bench.checkpoint_matches(folder, shape)
    other = bench.Shape(hidden=64, layers=2, intermediate=128, vocab=300, heads=4, kv_heads=2)
    assert not bench.checkpoint_matches(folder, other)  # another shape's config
    assert not bench.checkpoint_matches(tmp_path / "missing", shape)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:  # a file cut short (the config still matches)
        f.truncate(weights.stat().st_size - 2)
    assert not bench.checkpoint_matches(copy, shape)


def test_reuse_keeps_a_matching_checkpoint(bench, tmp_path, monkeypatch):
    shape = bench.Shape(hidden=64, layers=2, intermediate=128, vocab=300, heads=4, kv_heads=2)
    monkeypatch.setitem(bench.SHAPES, "tiny", shape)
    folder = tmp_path / "tiny" / "checkpoint"
    bench.make_checkpoint(folder, shape)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    written = []
    monkeypatch.setattr(bench, "make_checkpoint", lambda *a, **k: written.append(a))
    monkeypatch.setattr(bench, "run_commands", lambda *a, **k: {})
    assert bench.main(["--shapes", "tiny", "--work", str(tmp_path), "--keep", "--reuse"]) == 0
    assert written == [] and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert bench.main(["--shapes", "tiny", "--work", str(tmp_path), "--keep"]) == 0
    assert len(written) == 1  # without --reuse it is written again


def test_load_sampler_samples_while_running(bench):
    import time

    with bench.LoadSampler(interval=0.01) as load:
        time.sleep(0.1)
    assert len(load.samples) >= 3
    assert "mean" in load.summary()


def _measure_without_cgroup(bench, monkeypatch, expected: str) -> list:
    """Replace the benchmark's cgroup measurement by a plain run of the command that checks its output
    holds `expected`; returns the caps it was called with."""
    import subprocess

    calls = []

    def measure(command, cap, interval, env=None):
        calls.append(cap)
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode or expected in done.stdout, done.stderr
        return done.returncode, 1.0, 2**30, 2**31

    monkeypatch.setattr(bench, "measure", measure)
    return calls


def test_run_onnx_loads_and_runs_a_prompt(bench, tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, 8])], [table])
    model_file = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_file)
    calls = _measure_without_cgroup(bench, monkeypatch, "logits (1, 16, 8)")
    assert bench.run_onnx(model_file) == "ran a 16-token prompt in 1 s, peak anon 1.00 GiB, max_usage 2.00 GiB"
    assert calls == [None]  # not under the cap
    assert bench.run_onnx(tmp_path / "missing.onnx").startswith("failed (exit 1)")


def test_run_gguf_loads_and_evaluates_a_prompt(bench, checkpoint, tmp_path, monkeypatch):

    import optc
    from optc.frontends.transformers import load_transformers

    _, folder = checkpoint
    monkeypatch.setenv("OPTC_NO_CACHE", "1")
    monkeypatch.setenv("OPTC_LAZY_WEIGHTS", "1")
    gguf_file = optc.compile(load_transformers(folder), output=tmp_path / "f32.gguf", passes="").artifact.path
    calls = _measure_without_cgroup(bench, monkeypatch, "logits (300,)")
    assert bench.run_gguf(gguf_file) == "ran a 16-token prompt in 1 s, peak anon 1.00 GiB, max_usage 2.00 GiB"
    assert calls == [None]
    assert bench.run_gguf(tmp_path / "missing.gguf").startswith("failed (exit 1)")


@pytest.fixture(scope="module")
def stream():
    yield from tool_module("stream_logits")


def test_check_w8_reports_the_codes_alone_at_accuracy_level_0(bench, stream, tmp_path, monkeypatch):
    """The w8 file's MatMulNBits run at accuracy level 4 (int8 activations) as lowered for a causal LM; at
    level 0 the same file computes the rtn codes' own numerics: plain torch's fake-quantized weights."""
    import onnx

    import optc
    from optc.frontends.transformers import load_transformers

    folder = tmp_path / "checkpoint"
    bench.make_checkpoint(folder, bench.Shape(hidden=128, layers=3, intermediate=256, vocab=1024, heads=4, kv_heads=2))
    monkeypatch.setenv("OPTC_NO_CACHE", "1")
    monkeypatch.setenv("OPTC_LAZY_WEIGHTS", "1")
    onnx_file = optc.compile(load_transformers(folder), output=tmp_path / "w8.onnx",
                             passes="rtn{bits=8 group=32}").artifact.path
    levels = {a.i for n in onnx.load(str(onnx_file), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    level0 = bench.with_accuracy_level(onnx_file, 0)
    ids = stream.prompt(16)
    simulated = stream.stream_logits(folder, ids, torch.float32, "rtn8-clip", group=32)
    assert stream.cosine(stream.onnx_logits(level0, ids), simulated) > 0.999999
    level0.unlink()
    got = bench.check_w8(folder, onnx_file)
    assert set(got) == {"as written", "accuracy level 0"}
    assert got["as written"] < got["accuracy level 0"] <= 1.0
    assert not level0.exists()  # the level-0 copy is removed after the check


def test_with_accuracy_level_needs_matmulnbits(bench, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert bench.with_accuracy_level(path, 0) is None
