"""Tiny Hugging Face models exported by optc's own frontend, for the pruning and low-rank tests.

`load("llama")` (2 layers, 4 query heads in 2 KV groups, tied embeddings),
`load("llama-mha")` (2 layers, 4 heads, no GQA), `load("bert")` (2 layers,
4 heads) and `load("phi3")` (2 layers, 4 heads, fused `qkv_proj` and
`gate_up_proj`) return a fresh IR each call. Each model is exported once per test
process into a private cache and saved as ONNX; later calls reload that file,
so each test starts from the same weights in about a second.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from optc.ir import Model, load_model, save_model
from tests import models

VOCAB = 96
CALIB = {"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 32}


@functools.cache
def _workdir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="optc-prune-tests-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def _exported(kind: str) -> Path:
    import torch
    import transformers

    from optc.frontends.transformers import load_transformers

    torch.manual_seed(0)
    if kind in ("llama", "llama-mha"):
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2 if kind == "llama" else 4, intermediate_size=48, max_position_embeddings=128,
            tie_word_embeddings=True,
        )
        hf = transformers.LlamaForCausalLM(config)
    elif kind == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2,
        )
        hf = transformers.BertModel(config, add_pooling_layer=False)
    elif kind == "phi3":
        config = transformers.Phi3Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=48, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        hf = transformers.Phi3ForCausalLM(config)
    else:
        raise ValueError(kind)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random biases and norms, so nothing is shared by accident
        for parameter in hf.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    hf.eval()
    work = _workdir()
    source = work / f"{kind}-hf"
    hf.save_pretrained(source)
    old = os.environ.get("OPTC_CACHE_DIR")
    os.environ["OPTC_CACHE_DIR"] = str(work / "cache")
    try:
        model = load_transformers(source)
    finally:
        if old is None:
            os.environ.pop("OPTC_CACHE_DIR", None)
        else:
            os.environ["OPTC_CACHE_DIR"] = old
    path = work / f"{kind}.onnx"
    save_model(model, path)
    return path


def load(kind: str) -> Model:
    """A fresh IR of the tiny exported model `kind` ("llama", "llama-mha", "bert" or "phi3")."""
    return load_model(_exported(kind))


def feeds(model: Model, seed: int = 0, *, batch: int = 2, seq: int = 16) -> dict[str, np.ndarray]:
    """Token inputs for the model's graph inputs."""
    names = [v.name for v in model.graph.inputs]
    out = {"input_ids": np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)}
    if "attention_mask" in names:
        out["attention_mask"] = np.ones((batch, seq), np.int64)
    if "token_type_ids" in names:
        out["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return out


def outputs(model: Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of the model in onnxruntime (from a saved copy)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        return models.run_ort(path, feed)[0]


def param_count(model: Model) -> int:
    """Elements in float initializers (the model's parameters)."""
    return sum(
        int(np.prod(v.shape)) for v in model.graph.initializers.values()
        if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point()
    )
