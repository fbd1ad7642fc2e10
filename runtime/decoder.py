"""The KV-cache decoder form: onnxruntime-genai's input and output names, and feeds for it.

A decoder exported with its cache (`load_transformers(..., kv_cache=True)`) takes
`input_ids` and `position_ids` (`[batch, seq]`), `attention_mask`
(`[batch, past_seq + seq]`) and `past_key_values.{i}.key/value`
(`[batch, kv_heads, past_seq, head_dim]`) and returns `logits` and
`present.{i}.key/value` (`[batch, kv_heads, past_seq + seq, head_dim]`), the
names onnxruntime-genai's `genai_config.json` declares for its decoders.

A prefill with an empty cache (`past_seq` = 0) computes what the no-cache
export computes; `fill_decoder_inputs` completes a feed that has only
`input_ids` that way, so calibration, perplexity and latency need nothing else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from optc.architectures import lookup

PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
#: The inputs besides `input_ids` and the cache.
STATE_INPUTS = ("attention_mask", "position_ids")

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)")


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """Layers, key/value heads and head size of a decoder's cache."""

    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    hidden: int


def cache_shape(config: dict[str, Any]) -> CacheShape:
    """The cache layout a Hugging Face config (as a dict) describes."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return CacheShape(
        layers=int(config["num_hidden_layers"]),
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        heads=heads,
        hidden=hidden,
    )


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The past input names and the present output names, key then value for each layer."""
    past = [name % i for i in range(layers) for name in (PAST_KEY, PAST_VALUE)]
    present = [name % i for i in range(layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    return past, present


def is_past(name: str) -> bool:
    return _PAST.fullmatch(name) is not None


def is_present(name: str) -> bool:
    return _PRESENT.fullmatch(name) is not None


def is_cache_tensor(name: str) -> bool:
    """A past input or present output: the cache, which optc never quantizes."""
    return is_past(name) or is_present(name)


def has_cache(input_names: Iterable[str]) -> bool:
    """True for a decoder with past inputs."""
    return any(is_past(name) for name in input_names)


def is_causal_lm(config: dict[str, Any] | None, input_names: Iterable[str]) -> bool:
    """True for a causal LM, with its cache or exported without one (`input_ids -> logits`)."""
    names = set(input_names)
    if has_cache(names):
        return True
    family = lookup(str(config.get("model_type", ""))) if config else None
    return "input_ids" in names and family is not None and family.task == "causal-lm"


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}


def session_inputs(session: Any) -> list[tuple[str, list[Any], Any]]:
    """An onnxruntime session's inputs as `fill_decoder_inputs` takes them: (name, shape, numpy dtype)."""
    return [(i.name, list(i.shape), _ORT_TYPES.get(i.type, np.float32)) for i in session.get_inputs()]


def fill_decoder_inputs(
    inputs: Sequence[tuple[str, Sequence[Any], Any]], feed: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """`feed` completed for a prefill with an empty cache: what a no-cache model computes from `input_ids`.

    `inputs` are the model's (name, shape, numpy dtype); names already in `feed` are kept,
    a model without a cache gets `feed` back unchanged.
    """
    names = [name for name, _, _ in inputs]
    if not has_cache(names) or "input_ids" not in feed:
        return feed
    ids = feed["input_ids"]
    batch, seq = ids.shape
    done = dict(feed)
    for name, shape, dtype in inputs:
        if name in done:
            continue
        if name == "attention_mask":
            done[name] = np.ones((batch, seq), dtype=dtype)
        elif name == "position_ids":
            done[name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif is_past(name):
            kv_heads, head_dim = shape[1], shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise ValueError(f"input {name!r} has no static head count and size (shape {list(shape)})")
            done[name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
    return done


__all__ = [
    "PAST_KEY",
    "PAST_VALUE",
    "PRESENT_KEY",
    "PRESENT_VALUE",
    "STATE_INPUTS",
    "CacheShape",
    "cache_names",
    "cache_shape",
    "fill_decoder_inputs",
    "has_cache",
    "is_cache_tensor",
    "is_past",
    "is_present",
    "session_inputs",
]
