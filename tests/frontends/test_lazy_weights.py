"""The lazy-weights export (`optc.frontends.lazy_weights`): a Hugging Face directory whose weights are
bound to its safetensors files, not read to export; the same graph, annotations and logits as the eager
export on a tiny random Llama, and reads counted per tensor."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers

from optc.frontends import load_input
from optc.frontends.lazy_weights import READS, TEMPLATE_LAYERS, repeat_last_block, template_config
from optc.frontends.transformers import LAZY_WEIGHTS, TIED_PARAMETERS, load_transformers
from optc.ir import LazyTensor, annotations, model_metadata, save_model, source_name
from tests.fixtures.tool_modules import spy_on

VOCAB = 96


def _tiny_llama(dtype: torch.dtype, tie: bool, layers: int = 2, perturb: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms start as ones: perturb them so no two tensors are equal
        for parameter in model.parameters() if perturb else ():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(folder, hf model in float32, the eager export, the lazy export, the reads of the lazy export) of
    a tiny Llama with tied embeddings saved as bfloat16 safetensors."""
    hf_model = _tiny_llama(torch.bfloat16, tie=True)
    folder = tmp_path_factory.mktemp("lazy") / "tiny-llama"
    hf_model.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTC_CACHE_DIR", str(tmp_path_factory.mktemp("optc-cache")))
        mp.setenv("OPTC_LAZY_WEIGHTS", "0")
        eager = load_transformers(folder)
        # Unforced, the lazy path is taken when the eager export would exceed the memory budget.
        mp.delenv("OPTC_LAZY_WEIGHTS", raising=False)
        mp.setenv("OPTC_NO_CACHE", "1")  # else the eager export's cache entry answers
        mp.setattr("optc.frontends.transformers._LAZY_MARGIN", 0)  # a tiny model: no fixed margin
        eager_bytes = 8 * sum(p.numel() for p in hf_model.parameters())
        READS.clear()
        lazy = load_input(folder, memory_budget=eager_bytes // 2)
        reads = dict(READS)
    return folder, hf_model.float(), eager, lazy, reads


def _run(model, path, ids):
    save_model(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0]


def test_lazy_export_binds_every_weight(pair):
    _, _, _, lazy, _ = pair
    assert lazy.meta[LAZY_WEIGHTS] is True
    big = [v for v in lazy.graph.initializers.values() if v.const_value.size > 1024]
    assert big and all(isinstance(v.const_value, LazyTensor) for v in big)


def test_lazy_export_reads_no_large_weight(pair):
    """Exporting reads only tensors small enough for the optimizer to compare (norm weights)."""
    _, hf_model, _, _, reads = pair
    sizes = {name: p.numel() for name, p in hf_model.named_parameters()}
    assert all(sizes[key] <= 1024 for key in reads), reads


def test_lazy_graph_equals_eager(pair):
    _, _, eager, lazy, _ = pair
    assert [(n.op_type, n.domain) for n in lazy.graph] == [(n.op_type, n.domain) for n in eager.graph]
    shapes = sorted((source_name(v), tuple(v.shape)) for v in lazy.graph.initializers.values())
    assert shapes == sorted((source_name(v), tuple(v.shape)) for v in eager.graph.initializers.values())
    assert annotations(lazy) == annotations(eager)
    def optc_props(value):
        return {k: v for k, v in value.metadata_props.items() if k.startswith("optc.")}

    by_name = {(source_name(v), tuple(v.shape)): optc_props(v) for v in eager.graph.initializers.values()}
    for value in lazy.graph.initializers.values():
        assert optc_props(value) == by_name[source_name(value), tuple(value.shape)], source_name(value)
    assert model_metadata(lazy, TIED_PARAMETERS) == model_metadata(eager, TIED_PARAMETERS)


def test_lazy_logits_equal_eager_and_transformers(pair, tmp_path):
    _, hf_model, eager, lazy, _ = pair
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11), dtype=np.int64)
    got = _run(lazy, tmp_path / "lazy.onnx", ids)
    np.testing.assert_allclose(got, _run(eager, tmp_path / "eager.onnx", ids), atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_each_read_is_fresh_and_counted(pair):
    """A lazy weight is read when asked, every time (nothing keeps a copy), and only that weight."""
    _, hf_model, _, lazy, _ = pair
    value = next(v for v in lazy.graph.initializers.values() if source_name(v).endswith("layers.1.mlp.up_proj.weight"))
    READS.clear()
    first, second = value.const_value.numpy(), value.const_value.numpy()
    assert dict(READS) == {"model.layers.1.mlp.up_proj.weight": 2}
    assert first is not second
    np.testing.assert_array_equal(first, hf_model.model.layers[1].mlp.up_proj.weight.detach().numpy().T)


def test_rtn_reads_each_weight_once_per_use(pair, tmp_path):
    """A weight pass and the writer stream: rtn reads each large weight once and the ONNX writer once
    more (the rewritten weights it writes come from the spill or the pass, not from a second read).
    Last in this file: it rewrites the module's lazy model."""
    import optc

    _, hf_model, _, lazy, _ = pair
    READS.clear()
    optc.compile(lazy, output=tmp_path / "w8.onnx", passes="rtn{bits=8 group=16}")
    sizes = {name: p.numel() for name, p in hf_model.named_parameters()}
    large = {key: n for key, n in READS.items() if sizes[key] > 1024}
    assert large and max(large.values()) <= 2, large


# --------------------------------------------------------------------------- one block, repeated


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """(hf model in float32, the eager export, the lazy export, what `repeat_last_block` returned) of a
    four-layer tiny Llama in bfloat16: the lazy export traces two layers and repeats the last block."""
    hf_model = _tiny_llama(torch.bfloat16, tie=False, layers=4)
    folder = tmp_path_factory.mktemp("deep") / "tiny-llama-4"
    hf_model.save_pretrained(folder)
    returned = []

    def spy(*args, **kwargs):
        returned.append(repeat_last_block(*args, **kwargs))
        return returned[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTC_NO_CACHE", "1")
        mp.setenv("OPTC_LAZY_WEIGHTS", "0")
        eager = load_transformers(folder)
        mp.setenv("OPTC_LAZY_WEIGHTS", "1")
        mp.setattr("optc.frontends.transformers.repeat_last_block", spy)
        lazy = load_transformers(folder)
    return hf_model.float(), eager, lazy, returned


def test_repeated_block_graph_equals_eager(deep):
    _, eager, lazy, returned = deep
    assert returned == [None]  # repeated, not exported whole
    assert [(n.op_type, n.domain) for n in lazy.graph] == [(n.op_type, n.domain) for n in eager.graph]

    def weights(model):  # the checkpoint's tensors (the exporter's own constants are named by its numbering)
        return sorted((source_name(v), tuple(v.shape), v.metadata_props.get("optc.source_transposed"))
                      for v in model.graph.initializers.values() if source_name(v).startswith(("model.", "lm_head")))

    assert weights(lazy) == weights(eager)
    assert len(weights(lazy)) == 4 * 9 + 3
    assert annotations(lazy) == annotations(eager)  # the HF config says four layers
    assert all(isinstance(v.const_value, LazyTensor) for v in lazy.graph.initializers.values() if v.const_value.size > 1024)


def test_repeated_block_logits_equal_eager_and_transformers(deep, tmp_path):
    hf_model, eager, lazy, _ = deep
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11), dtype=np.int64)
    got = _run(lazy, tmp_path / "lazy.onnx", ids)
    np.testing.assert_allclose(got, _run(eager, tmp_path / "eager.onnx", ids), atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)  # onnxruntime's float32 against torch's, 4 layers


def test_merged_weights_are_not_repeated(tmp_path, monkeypatch):
    """Norms left at ones are merged by the optimizer (one tensor read by both template blocks), so which
    layer's tensor a repeated block reads is unknown: every layer is exported instead, and runs right."""
    hf_model = _tiny_llama(torch.float32, tie=False, layers=3, perturb=False)
    hf_model.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("OPTC_NO_CACHE", "1")
    monkeypatch.setenv("OPTC_LAZY_WEIGHTS", "1")
    returned = spy_on(monkeypatch, "optc.frontends.transformers.repeat_last_block", repeat_last_block)
    lazy = load_transformers(tmp_path / "tiny")
    assert len(returned) == 1 and "both blocks read" in returned[0]
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(1, 7), dtype=np.int64)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(_run(lazy, tmp_path / "lazy.onnx", ids), expected, atol=1e-5, rtol=0)


def test_template_config_needs_alike_layers():
    config = transformers.LlamaConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=4, num_key_value_heads=2)
    template = template_config(config)
    assert template.num_hidden_layers == TEMPLATE_LAYERS and config.num_hidden_layers == 6
    assert template_config(transformers.LlamaConfig(num_hidden_layers=2)) is None
    config.layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    assert template_config(config) is None
    config.layer_types = ["full_attention"] * 6
    assert template_config(config).layer_types == ["full_attention"] * TEMPLATE_LAYERS
