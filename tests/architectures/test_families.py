"""Every registered family: the registry itself, export fidelity against transformers, and the cheap passes.

Each family's tiny random model (`tests/architectures/configs.py`) is exported once per test module
through optc's transformers frontend (a private export cache); the tests then check

* the export: logits (encoders: the last hidden state, vision: the class logits) within 1e-4 of
  transformers, on two input shapes for text models;
* w8a8 (SmoothQuant + static INT8): output cosine to the fp32 export at least 0.99;
* prune-ffn{ratio=0.5} and prune-heads{ratio=0.5}: fewer parameters and the model still runs in
  onnxruntime, or (`NO_FFN`, `NO_HEADS`) a `missed` remark saying why not;
* split-fused-projections on the families with fused projections: exactly equal outputs.

`tools/coverage_matrix.py` measures the remaining cells (fp8, w4a16, awq, 2:4, TensorRT).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx_ir as ir  # noqa: E402

import optc.architectures as registry  # noqa: E402
from optc.ir import Model, load_model, save_model  # noqa: E402
from optc.passes import AnalysisManager, PassContext, parse_pipeline  # noqa: E402
from tests.architectures import configs  # noqa: E402

CALIB = {"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 12}
#: Families whose MLP prune-ffn cannot find (a missed remark is expected instead): resnet has none.
NO_FFN = {"resnet"}
#: Families whose attention prune-heads cannot find (a missed remark is expected instead): resnet has none.
NO_HEADS = {"resnet"}


# --------------------------------------------------------------------------- the registry


def test_every_family_has_a_module_a_config_and_one_owner_per_model_type():
    names = [f.name for f in registry.families()]
    assert names == list(configs.FAMILIES)
    for family in registry.families():
        for model_type in family.model_types:
            assert registry.lookup(model_type) is family
        assert family.task in ("causal-lm", "encoder", "vision")
        assert registry.lookup(configs.CONFIGS[family.name].model_type) is family
    assert registry.lookup("no-such-family") is None
    assert len(registry.model_types()) == len(set(registry.model_types()))


def test_the_frontend_and_the_gguf_backend_read_the_registry():
    from optc.backends.gguf import ARCHITECTURES, gguf_tensor_name
    from optc.frontends import transformers as hf

    assert set(hf.CAUSAL_LM_TYPES) | set(hf.ENCODER_TYPES) | set(hf.VISION_TYPES) == set(registry.model_types())
    written = {t: f.gguf.arch for f in registry.families() if f.gguf for t in f.model_types}
    assert ARCHITECTURES == written == {
        "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2",
        "granite": "granite", "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gptneox",
    }
    layout = registry.lookup("qwen2").gguf
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.bias", layout) == "blk.3.attn_q.bias"
    assert not layout.permute_qk and registry.lookup("llama").gguf.permute_qk


def test_default_excludes_come_from_the_families():
    from optc.passes.layer_selector import DEFAULT_EXCLUDES, HEAD_AND_EMBEDDINGS, OUTPUT_HEAD

    for family in registry.families():
        assert set(family.keep_float) <= set(OUTPUT_HEAD)
        assert set(family.keep_float) | set(family.embeddings) <= set(HEAD_AND_EMBEDDINGS)
    assert DEFAULT_EXCLUDES["quantize"] == OUTPUT_HEAD and OUTPUT_HEAD[0] == "lm_head"


def test_variants_describe_the_structure():
    assert set(registry.lookup("phi3").variants) >= {"fused-qkv", "fused-gate-up"}
    assert set(registry.lookup("gpt_neox").variants) >= {"layernorm", "parallel", "plain-mlp", "fused-qkv"}
    assert set(registry.lookup("gemma2").variants) >= {"norm+1", "emb-scale", "tied"}
    assert "moe" in registry.lookup("mixtral").variants and "qk-norm" in registry.lookup("qwen3").variants


def test_an_unregistered_model_type_is_refused_in_one_line(tmp_path):
    from optc.errors import OptcError
    from optc.frontends.transformers import load_transformers

    (tmp_path / "config.json").write_text('{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}')
    with pytest.raises(OptcError) as info:
        load_transformers(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "unsupported architecture 'MambaForCausalLM'" in message and "gpt2" in message


# --------------------------------------------------------------------------- per family


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (transformers model, task, path of the exported ONNX); each family exported once."""
    folder = tmp_path_factory.mktemp("families")
    done: dict[str, tuple] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTC_CACHE_DIR", str(folder / "cache"))
        mp.delenv("OPTC_NO_CACHE", raising=False)

        def get(family: str):
            if family not in done:
                from optc.frontends.transformers import load_transformers

                hf_model, directory = configs.save(family, folder / family)
                model = load_transformers(directory)
                path = folder / f"{family}.onnx"
                save_model(model, path)
                done[family] = (hf_model, registry.lookup(hf_model.config.model_type).task, path)
            return done[family]

        yield get


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from optc.runtime.ort import open_session

    session = open_session(path)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _outputs(model: Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        return _run(path, feeds)


def _feeds(task: str, path: Path, **shape) -> dict[str, np.ndarray]:
    names = [v.name for v in load_model(path).graph.inputs]
    return configs.feeds(task, names, **shape)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pipeline(path: Path, pipeline: str):
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    return parse_pipeline(pipeline)(load_model(path), am)


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_export_matches_transformers(family, exported):
    hf_model, task, path = exported(family)
    shapes = [dict(batch=2, seq=9), dict(batch=1, seq=5, seed=1)] if task != "vision" else [dict(batch=2)]
    for shape in shapes:
        feeds = _feeds(task, path, **shape)
        got, expected = _run(path, feeds), configs.reference(hf_model, task, feeds)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_w8a8_keeps_the_output(family, exported):
    _, task, path = exported(family)
    feeds = _feeds(task, path)
    result = _pipeline(path, "w8a8")
    assert result.modified
    cosine = _cosine(_outputs(result.model, feeds), _run(path, feeds))
    assert cosine >= 0.99, cosine


#: Each pruning pass, the statistic that counts what it removed, and the families it has nothing to prune in.
PRUNING = {"prune-ffn": ("ffn-pruned", NO_FFN), "prune-heads": ("heads-removed", NO_HEADS)}


@pytest.mark.parametrize("family", configs.FAMILIES)
@pytest.mark.parametrize("prune", sorted(PRUNING))
def test_pruning_removes_parameters_or_says_why(prune, family, exported):
    _, task, path = exported(family)
    feeds = _feeds(task, path)
    result = _pipeline(path, f"{prune}{{ratio=0.5}}")
    statistic, nothing_to_prune = PRUNING[prune]
    if family in nothing_to_prune:
        assert result.statistics[statistic] == 0
        assert any(r.kind == "missed" for r in result.remarks), result.remarks
        return
    assert result.statistics[statistic] > 0, result.remarks
    assert not [r for r in result.remarks if r.kind == "missed"], result.remarks
    assert _outputs(result.model, feeds).shape == _run(path, feeds).shape
    assert _params(result.model) < _params(load_model(path))


def _params(model: Model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.graph.initializers.values())


@pytest.mark.parametrize("family", [f.name for f in registry.families() if f.fused_qkv or f.fused_gate_up])
def test_split_fused_projections_is_exact(family, exported):
    _, task, path = exported(family)
    feeds = _feeds(task, path)
    result = _pipeline(path, "split-fused-projections")
    assert result.statistics["projections-split"] >= 2, result.remarks  # one per layer at least
    assert not [r for r in result.remarks if r.kind == "missed"], result.remarks
    np.testing.assert_array_equal(_outputs(result.model, feeds), _run(path, feeds))


def test_gemma_norms_carry_their_source_name_and_offset(exported):
    """The exporter folds gemma's 1 + w into one constant; the frontend still names it, with SOURCE_OFFSET 1."""
    from optc.ir import annotation
    from optc.ir.annotations import SOURCE_NAME, SOURCE_OFFSET

    _, _, path = exported("gemma2")
    offsets = {annotation(v, SOURCE_NAME): annotation(v, SOURCE_OFFSET)
               for v in load_model(path).graph.initializers.values() if annotation(v, SOURCE_OFFSET) is not None}
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert set(offsets) == {f"model.layers.{i}.{n}.weight" for i in range(2) for n in norms} | {"model.norm.weight"}
    assert set(offsets.values()) == {1.0}


#: The families the GGUF backend writes; each test model gets the tiny tokenizer, rows of 64 (so every mix's
#: 32-element fallback types apply) and what llama.cpp assumes of the architecture (it reads no key for it).
#: One mixture of experts and gpt2 (Conv1D transposes, learned positions, LayerNorm) run by default; the others
#: (about 20-30 s each on 2 cores) are marked `slow`.
GGUF_FAMILIES = [pytest.param(f.name, marks=() if f.name in ("mixtral", "gpt2") else pytest.mark.slow)
                 for f in registry.families() if f.gguf]
GGUF_CONFIG = dict(hidden_size=64, intermediate_size=64)
LLAMA_CPP_ASSUMES = {
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(attention_bias=False),
    "qwen3_moe": dict(norm_topk_prob=True, moe_intermediate_size=32),
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3_text": dict(query_pre_attn_scalar=16),
}
#: Tokens a family's real tokenizers have and llama.cpp's vocabulary loader looks up by text: for a model whose
#: name contains "phi3" it sets attributes on Phi-3's SentencePiece tokens `<s>`, `</s>` and `<unk>`
#: (a tokenizer without them fails to load with "unordered_map::at").
TOKENIZER_ADDS = {"phi3": ["<s>", "</s>", "<unk>"]}


def _gguf_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def _gguf_test_model(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The family's tiny model for the GGUF tests, saved with the tiny tokenizer (export cache under tmp_path)."""
    from tests.fixtures.gguf_models import tiny_tokenizer

    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = tiny_tokenizer()
    if family in TOKENIZER_ADDS:
        tokenizer = copy.deepcopy(tokenizer)  # tiny_tokenizer is cached
        tokenizer.add_special_tokens({"additional_special_tokens": TOKENIZER_ADDS[family]})
    config = configs.CONFIGS[family].__class__.from_dict(
        {**configs.CONFIGS[family].to_dict(), **GGUF_CONFIG, **LLAMA_CPP_ASSUMES.get(family, {}), "vocab_size": len(tokenizer)})
    monkeypatch.setitem(configs.CONFIGS, family, config)
    _, folder = configs.save(family, tmp_path / family)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_loads_in_llama_cpp_and_kquant_matches_llama_quantize(family, tmp_path, monkeypatch):
    """F32: llama.cpp's logits within 1e-3 of onnxruntime's (F32 KV cache, so only the conversion is measured);
    Q4_K_M: the same tensor types and bytes as llama-quantize run on optc's own F32 file."""
    pytest.importorskip("llama_cpp")
    import optc
    from optc.backends.gguf import import_llama_cpp
    from tests.backends.ggml_oracle import llama_quantize

    folder = _gguf_test_model(family, tmp_path, monkeypatch)
    optc.compile(str(folder), output=tmp_path / "m.onnx", passes="cleanup")
    result = optc.compile(str(folder), output=tmp_path / "f32.gguf")
    assert any("llama.cpp" in check and "loaded it" in check for check in result.artifact.checks)
    ids = [5, 17, 33, 8, 90, 41]
    llm = import_llama_cpp().Llama(str(tmp_path / "f32.gguf"), logits_all=True, verbose=False, n_ctx=64,
                                   type_k=0, type_v=0)  # GGML_TYPE_F32
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    expected = _run(tmp_path / "m.onnx", feeds)[0]
    print(f"{family}: max |llama.cpp - onnxruntime| = {np.abs(got - expected).max():.1e}")  # the README's figure (-s)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)

    optc.compile(str(folder), output=tmp_path / "ours.gguf", passes="kquant{mix=Q4_K_M}")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "Q4_K_M")
    ours, theirs = _gguf_tensors(tmp_path / "ours.gguf"), _gguf_tensors(tmp_path / "theirs.gguf")
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    assert [n for n in ours if ours[n][1] != theirs[n][1]] == []


@pytest.mark.slow
@pytest.mark.parametrize("family", [f.name for f in registry.families() if f.gguf])
def test_gguf_every_mix_matches_llama_quantize(family, tmp_path, monkeypatch):
    """Every mix `kquant` offers, on the family's tiny model (rows of 64: the fallback types): the same tensor
    types and bytes as llama-quantize run on optc's own F32 file."""
    pytest.importorskip("llama_cpp")
    from optc.backends.gguf import GgufBackend
    from optc.backends.gguf.kquant import MIXES, KQuant
    from optc.frontends.transformers import load_transformers
    from tests.backends.ggml_oracle import llama_quantize

    folder = _gguf_test_model(family, tmp_path, monkeypatch)
    quiet = PassContext(config={"backend.skip_runtime_check": True})
    GgufBackend().lower(load_transformers(folder), tmp_path / "f32.gguf", quiet)
    differing: dict[str, list[str]] = {}
    for mix in MIXES:
        model = load_transformers(folder)
        KQuant(mix=mix)(model)
        ours, theirs = tmp_path / f"optc-{mix}.gguf", tmp_path / f"llama-quantize-{mix}.gguf"
        GgufBackend().lower(model, ours, quiet)
        llama_quantize(tmp_path / "f32.gguf", theirs, mix)
        a, b = _gguf_tensors(theirs), _gguf_tensors(ours)
        assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}, mix
        differing[mix] = [n for n in a if a[n][1] != b[n][1]]
    assert differing == {mix: [] for mix in MIXES}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_goes_through_w4a16_and_q4_k_m_gguf(family, tmp_path, monkeypatch):
    """w4a16 quantizes the experts in the IR (4-bit codes the GGUF backend reads back), kquant re-types them,
    and llama.cpp runs the file. The cosine is printed (README); the bound only catches a broken layout."""
    pytest.importorskip("llama_cpp")
    import optc
    from optc.backends.gguf import import_llama_cpp
    from tests.fixtures.gguf_models import tiny_tokenizer

    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = tiny_tokenizer()
    config = configs.CONFIGS[family].__class__.from_dict(
        {**configs.CONFIGS[family].to_dict(), **GGUF_CONFIG, **LLAMA_CPP_ASSUMES.get(family, {}), "vocab_size": len(tokenizer)})
    monkeypatch.setitem(configs.CONFIGS, family, config)
    _, folder = configs.save(family, tmp_path / family)
    tokenizer.save_pretrained(folder)
    optc.compile(str(folder), output=tmp_path / "m.onnx", passes="cleanup")
    result = optc.compile(str(folder), output=tmp_path / "q.gguf", passes="w4a16,kquant{mix=Q4_K_M}", calib="random")
    assert any("mixture-of-experts weights rounded to nearest" in r.message for r in result.remarks)
    experts = {name: kind for name, (kind, _) in _gguf_tensors(tmp_path / "q.gguf").items() if "_exps." in name}
    assert len(experts) == 6 and not {"F32", "F16"} & set(experts.values())
    ids = [5, 17, 33, 8, 90, 41]
    llm = import_llama_cpp().Llama(str(tmp_path / "q.gguf"), logits_all=True, verbose=False, n_ctx=64)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    cosine = _cosine(got, _run(tmp_path / "m.onnx", feeds)[0])
    print(f"{family}: w4a16,kquant{{mix=Q4_K_M}} in llama.cpp, cosine {cosine:.4f} to the fp32 ONNX")
    assert cosine > 0.9


def test_gguf_refuses_what_llama_cpp_would_run_differently():
    """A config value llama.cpp's architecture assumes otherwise, and a family optc does not write: one line each."""
    from optc.backends.gguf import llama_config
    from optc.errors import OptcError
    from optc.ir import set_model_metadata
    from optc.ir.annotations import HF_CONFIG

    model = Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)
    config = {**configs.CONFIGS["qwen3_moe"].to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}
    set_model_metadata(model, HF_CONFIG, config)  # norm_topk_prob=False: llama.cpp renormalizes
    with pytest.raises(OptcError, match=r"llama.cpp's 'qwen3moe' assumes norm_topk_prob=true") as info:
        llama_config(model)
    assert "\n" not in str(info.value)
    set_model_metadata(model, HF_CONFIG, {**configs.CONFIGS["gemma2"].to_dict(), "architectures": ["Gemma2ForCausalLM"]})
    with pytest.raises(OptcError, match=r"scales queries by 1/sqrt\(head_dim=16\), the config's query_pre_attn_scalar is 256"):
        llama_config(model)
    gpt2 = {**configs.CONFIGS["gpt2"].to_dict(), "architectures": ["GPT2LMHeadModel"]}
    set_model_metadata(model, HF_CONFIG, {**gpt2, "activation_function": "relu"})
    with pytest.raises(OptcError, match=r"llama.cpp's 'gpt2' assumes activation_function=\"gelu_new\", the config has \"relu\""):
        llama_config(model)
    set_model_metadata(model, HF_CONFIG, {**configs.CONFIGS["phi3"].to_dict(), "architectures": ["Phi3ForCausalLM"],
                                          "hidden_act": "gelu"})
    with pytest.raises(OptcError, match=r"llama.cpp's 'phi3' assumes hidden_act=\"silu\""):
        llama_config(model)
    set_model_metadata(model, HF_CONFIG, {**configs.CONFIGS["phi3"].to_dict(), "architectures": ["Phi3ForCausalLM"],
                                          "sliding_window": 32})
    (note,) = llama_config(model).warnings  # written as llama.cpp's converter writes it, with a warning
    assert "runs 'phi3' with full attention" in note and "sliding_window 32, context 64" in note
    set_model_metadata(model, HF_CONFIG, {**configs.CONFIGS["gpt_neox"].to_dict(), "architectures": ["GPTNeoXForCausalLM"],
                                          "hidden_act": "relu"})
    with pytest.raises(OptcError, match=r"llama.cpp's 'gptneox' assumes hidden_act=\"gelu\""):
        llama_config(model)
    set_model_metadata(model, HF_CONFIG, {**configs.CONFIGS["bert"].to_dict(), "architectures": ["BertModel"]})
    with pytest.raises(OptcError, match=r"llama.cpp runs it as 'bert' but optc does not write that layout yet"):
        llama_config(model)
