"""The KV-cache decoder export and the generation-ready folder, on a tiny random LLaMA.

One export (module fixture) serves every test: logits with the cache (prefill, then
one-token decode steps) against transformers, the quantizing passes on it, and the
folder onnxruntime-genai loads and generates from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from optc.runtime.decoder import cache_names, fill_decoder_inputs, is_cache_tensor, session_inputs  # noqa: E402
from tests.fixtures.kv_models import (  # noqa: E402
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    kv_compiled,
    kv_llama,
    nocache_compiled,
)
from tests.frontends.test_transformers import VOCAB  # noqa: E402


@pytest.fixture(scope="module")
def hf_llama():
    return kv_llama()[0]


@pytest.fixture(scope="module")
def compiled():
    """`--kv-cache` outputs of the tiny model: fp32 (cleanup), w8a8 and w4a16-fast (tests/fixtures/kv_models.py)."""
    return {passes: kv_compiled(passes) for passes in ("cleanup", "w8a8", "w4a16-fast")}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _greedy_with_cache(session: ort.InferenceSession, prompt: np.ndarray, steps: int):
    """Prefill with an empty cache, then `steps` one-token decodes; yields (ids so far, logits of the step)."""
    names = [o.name for o in session.get_outputs()]
    feed = fill_decoder_inputs(session_inputs(session), {"input_ids": prompt})
    ids = prompt
    for step in range(steps + 1):
        out = dict(zip(names, session.run(names, feed), strict=True))
        yield ids, out["logits"]
        if step == steps:
            return
        nxt = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, nxt], axis=1)
        total = ids.shape[1]
        feed = {
            "input_ids": nxt,
            "attention_mask": np.ones((ids.shape[0], total), np.int64),
            "position_ids": np.full((ids.shape[0], 1), total - 1, np.int64),
        }
        for i in range(LAYERS):
            feed[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
            feed[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]


def test_signature_follows_genai(compiled):
    proto = onnx.load(str(compiled["cleanup"].before_path), load_external_data=False)
    past, present = cache_names(LAYERS)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in proto.graph.output] == ["logits", *present]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[1] == KV_HEADS and dims[3] == HEAD_DIM and isinstance(dims[2], str)


@pytest.mark.parametrize("form", ["export", "fused"])
def test_prefill_and_decode_match_transformers(compiled, hf_llama, form):
    """The export as traced, and the written model (its attention fused by the ort backend's fuse-ort)."""
    result = compiled["cleanup"]
    session = _session(result.before_path if form == "export" else result.artifact.path)
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=(2, 7), dtype=np.int64)
    steps = 0
    for ids, logits in _greedy_with_cache(session, prompt, steps=4):
        with torch.no_grad():
            reference = hf_llama(torch.from_numpy(ids)).logits.numpy()
        expected = reference if ids.shape[1] == prompt.shape[1] else reference[:, -1:]
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        steps += 1
    assert steps == 5


@pytest.mark.parametrize("passes", ["w8a8", "w4a16-fast"])
def test_quantizing_passes_keep_the_cache_float(compiled, passes):
    path = compiled[passes].artifact.path
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert ("QuantizeLinear" in ops or "DynamicQuantizeLinear" in ops) if passes == "w8a8" else "MatMulNBits" in ops
    quantizers = {"QuantizeLinear", "DynamicQuantizeLinear", "DequantizeLinear"}
    for node in proto.graph.node:
        if node.op_type in quantizers:
            assert not any(is_cache_tensor(name) for name in [*node.input, *node.output]), node.name
    # The cache is float32 on both sides.
    for value in [*proto.graph.input[3:], *proto.graph.output[1:]]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = _session(path)
    prompt = np.random.default_rng(1).integers(0, VOCAB, size=(1, 6), dtype=np.int64)
    for _, logits in _greedy_with_cache(session, prompt, steps=2):
        assert np.isfinite(logits).all()


def test_w8a8_prefill_equals_the_no_cache_export(compiled):
    """Calibration and Q/DQ placement are the same on both forms (every scale equal), both run their attention
    as GroupQueryAttention, and a prefill from an empty cache gives the no-cache logits bit for bit (the static
    int8 activation quantizers would turn two attention kernels' float roundings into different int8 steps)."""
    prompt = np.random.default_rng(2).integers(0, VOCAB, size=(2, 9), dtype=np.int64)
    cached_path, plain_path = compiled["w8a8"].artifact.path, nocache_compiled("w8a8").artifact.path
    assert _quantizer_scales(cached_path) == _quantizer_scales(plain_path)
    for path in (cached_path, plain_path):
        assert [n.op_type for n in onnx.load(str(path)).graph.node].count("GroupQueryAttention") == LAYERS
    cached = _session(cached_path)
    with_cache = cached.run(["logits"], fill_decoder_inputs(session_inputs(cached), {"input_ids": prompt}))[0]
    without = _session(plain_path).run(["logits"], {"input_ids": prompt})[0]
    np.testing.assert_array_equal(with_cache, without)


def _quantizer_scales(path: Path) -> list[list[float]]:
    """The scale of every QuantizeLinear and DequantizeLinear with a constant scale, in graph order."""
    proto = onnx.load(str(path))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [constants[n.input[1]].ravel().tolist() for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in constants]


def test_generation_folder(compiled):
    result = compiled["w4a16-fast"]
    folder = result.artifact.path.parent
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (LAYERS, KV_HEADS, HEAD_DIM)
    assert config["model"]["type"] == "llama"


def _reference_greedy(hf_llama, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        return hf_llama.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0,
        )[0, len(prompt):].tolist()


def test_genai_greedy_matches_transformers(compiled, hf_llama):
    """optc.generate through onnxruntime-genai on the folder: transformers' greedy tokens, and both speeds."""
    pytest.importorskip("onnxruntime_genai")
    from optc.generate import generate

    folder = compiled["cleanup"].artifact.path.parent
    assert any("onnxruntime-genai" in check for check in compiled["cleanup"].artifact.checks)
    prompt = [5, 17, 33, 9, 60, 41]
    result = generate(folder, prompt, 20)
    assert result.tokens == _reference_greedy(hf_llama, prompt, 20)
    assert result.runtime.startswith("onnxruntime-genai") and result.prompt_tokens == len(prompt)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    # The same tokens without the cache: the whole sequence each step.
    loop = generate(folder, prompt, 20, use_cache=False)
    assert loop.tokens == result.tokens and "no cache" in loop.runtime


def test_generate_command_line(compiled, hf_llama, capsys):
    pytest.importorskip("onnxruntime_genai")
    from optc.evaluate import main

    model = compiled["cleanup"].artifact.path
    code = main([str(model), "--generate", "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0].endswith("onnxruntime-genai 0.18.0, 1 thread(s)")
    assert out[1].startswith("w1 w2 w3")
    assert out[2].startswith("optc-eval: prefill 3 tokens: ") and out[2].endswith(" tokens/s")
    assert out[3].startswith("optc-eval: decode 4 tokens: ") and out[3].endswith(" tokens/s")


def test_generate_usage_errors(compiled, capsys):
    from optc.evaluate import main

    model = str(compiled["cleanup"].artifact.path)
    assert main([model, "--generate"]) == 2
    assert "--generate needs --prompt" in capsys.readouterr().err
    assert main([model, "--prompt", "w1"]) == 2
    assert "--prompt needs --generate" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_a_family_genai_cannot_run_is_refused_before_the_export(tmp_path, family):
    """gpt2's config names its sizes `n_head`/`n_embd` (the cache layout read them as `num_attention_heads`:
    a KeyError); mixtral was refused only after a full export. Both now stop at load, in one line."""
    from optc.errors import OptcError
    from optc.frontends import load_input
    from tests.architectures.configs import save

    _, folder = save(family, tmp_path / family)
    with pytest.raises(OptcError, match=f"onnxruntime-genai has no decoder type for '{family}' models") as info:
        load_input(folder, kv_cache=True)
    assert "\n" not in str(info.value)
    assert not any(p.suffix == ".onnx" for p in tmp_path.rglob("*"))
