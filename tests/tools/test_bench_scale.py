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
