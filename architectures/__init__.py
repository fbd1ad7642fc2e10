"""The architecture registry: what optc knows about each model family, one small module per family.

`lookup(model_type)` gives the `Family` that accepts a Hugging Face `model_type`
(None when none does); `families()` every family, in the order below. The
transformers frontend accepts exactly these model types, the GGUF backend writes
the families that carry a `GGUFLayout`, and the weight passes' default excludes
are the families' `keep_float` and `embeddings` patterns.

Adding a family: a module here defining `FAMILY = Family(...)`, and its name in
`_MODULES`; see the README's "Adding a model family".
"""

from __future__ import annotations

import importlib

from optc.architectures.family import Family, GGUFLayout, Norm, Task

#: The family modules, decoders first, then encoders, then vision models.
_MODULES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text", "gpt2",
    "gpt_neox", "olmo2", "granite",
    "bert", "roberta", "distilbert", "modernbert",
    "vit", "resnet",
)


def _load() -> tuple[tuple[Family, ...], dict[str, Family]]:
    loaded = tuple(importlib.import_module(f"optc.architectures.{name}").FAMILY for name in _MODULES)
    by_type: dict[str, Family] = {}
    for family in loaded:
        for model_type in family.model_types:
            if model_type in by_type:
                raise ValueError(f"model_type '{model_type}' is claimed by {by_type[model_type].name} and {family.name}")
            by_type[model_type] = family
    return loaded, by_type


_FAMILIES, _BY_TYPE = _load()


def families(task: Task | None = None) -> tuple[Family, ...]:
    """Every registered family (those of one task when `task` is given)."""
    return tuple(f for f in _FAMILIES if task is None or f.task == task)


def lookup(model_type: str) -> Family | None:
    """The family that accepts Hugging Face `model_type`, or None."""
    return _BY_TYPE.get(model_type)


def max_positions(config: dict) -> int | None:
    """The longest input a Hugging Face config (as a dict) allows: the length of its learned position table, less
    the offset its position ids start at (roberta); None when the family has no learned table."""
    family = lookup(str(config.get("model_type", "")))
    if family is None or family.position_table is None or not config.get(family.position_table):
        return None
    offset = int(config.get(family.position_offset_key) or 0) + 1 if family.position_offset_key else 0
    return int(config[family.position_table]) - offset


def genai_types() -> dict[str, str]:
    """onnxruntime-genai's model type of each Hugging Face `model_type` whose KV-cache decoder it runs."""
    return {t: f.genai_type for f in _FAMILIES if f.genai_type for t in f.model_types}


def genai_refusal(model_type: str) -> str | None:
    """Why a `--kv-cache` export of `model_type` cannot be written for onnxruntime-genai, or None when it can."""
    known = genai_types()
    if model_type in known:
        return None
    return (f"onnxruntime-genai has no decoder type for '{model_type}' models "
            f"(it runs {', '.join(sorted(known))}); write the model without --kv-cache")


def model_types(task: Task | None = None) -> tuple[str, ...]:
    """Every accepted `model_type` (of one task when given), in registry order."""
    return tuple(t for f in families(task) for t in f.model_types)


def keep_float_patterns() -> tuple[str, ...]:
    """The union of every family's `keep_float` patterns, in registry order (the quantizers' default exclude)."""
    return _union(f.keep_float for f in _FAMILIES)


def embedding_patterns() -> tuple[str, ...]:
    """The union of every family's `embeddings` patterns, in registry order."""
    return _union(f.embeddings for f in _FAMILIES)


def _union(groups) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for pattern in group:
            seen.setdefault(pattern, None)
    return tuple(seen)


__all__ = [
    "Family", "GGUFLayout", "Norm", "Task", "embedding_patterns", "families", "keep_float_patterns", "lookup",
    "model_types",
]
