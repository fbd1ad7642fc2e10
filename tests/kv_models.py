"""A tiny random LLaMA exported with its KV cache, built once per test process and shared by the test modules
that need it (tests/frontends/test_kv_cache.py, tests/backends/ort/test_fuse_ort.py): the export takes tens of
seconds on two cores.

Head size 16, the smallest onnxruntime's CPU GroupQueryAttention runs, so `fuse-ort` applies.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 16


@functools.lru_cache(maxsize=1)
def kv_llama() -> tuple[Any, Path]:
    """(the transformers model, its saved folder): LLaMA with grouped KV heads and perturbed weights."""
    import torch
    import transformers

    from tests.frontends.test_transformers import VOCAB, perturbed, save_dir

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=True,
    )
    model = perturbed(transformers.LlamaForCausalLM(config))
    return model, save_dir(model, _folder() / "src")


@functools.lru_cache(maxsize=4)
def kv_compiled(passes: str) -> Any:
    """`optc.compile(..., kv_cache=True)` of `kv_llama()` with `passes` (random calibration), in a folder of its own."""
    import optc

    _, source = kv_llama()
    output = _folder() / passes / "model.onnx"
    output.parent.mkdir()
    previous = os.environ.get("OPTC_CACHE_DIR")
    os.environ["OPTC_CACHE_DIR"] = str(_folder() / "cache")
    try:
        return optc.compile(str(source), output=str(output), passes=passes, calib="random", calib_samples=2,
                            calib_seqlen=8, kv_cache=True)
    finally:
        if previous is None:
            os.environ.pop("OPTC_CACHE_DIR", None)
        else:
            os.environ["OPTC_CACHE_DIR"] = previous


@functools.lru_cache(maxsize=1)
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="optc-kv-tests-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder
