"""The generation-ready folder: `genai_config.json` and the tokenizer beside a KV-cache decoder.

onnxruntime-genai (`onnxruntime_genai.Model(folder)`) reads the folder's
`genai_config.json`, which names the decoder file, its inputs and outputs
(the names of `optc.runtime.decoder`), the cache layout and the default
search options, and loads the tokenizer from the Hugging Face tokenizer files
beside it. optc writes those from the model's metadata: the Hugging Face
config and the tokenizer files the frontend recorded (for a GGUF input, the
tokenizer transformers rebuilt from the GGUF's vocabulary).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from optc.architectures import genai_refusal, genai_types
from optc.errors import OptcError, first_line
from optc.ir import Model, model_metadata
from optc.ir.annotations import HF_CONFIG, TOKENIZER
from optc.runtime.decoder import (
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    cache_shape,
    has_cache,
)

#: The configuration file onnxruntime-genai reads.
GENAI_CONFIG = "genai_config.json"
#: Tokenizer files copied beside the model when the model's metadata has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
#: Every file of the folder besides the model and its data, in the order they are written.
GENERATION_FILES = (GENAI_CONFIG, *TOKENIZER_FILES)


def is_generation_model(model: Model) -> bool:
    """A KV-cache decoder with the Hugging Face config a `genai_config.json` is written from."""
    return has_cache(v.name for v in model.graph.inputs) and bool(model_metadata(model, HF_CONFIG))


def genai_config(model: Model, filename: str) -> dict[str, Any]:
    """The `genai_config.json` of a KV-cache decoder saved as `filename`."""
    config = model_metadata(model, HF_CONFIG) or {}
    model_type = str(config.get("model_type", ""))
    refusal = genai_refusal(model_type)
    if refusal is not None:
        raise OptcError(refusal)
    layout = cache_shape(config)
    context = int(config.get("max_position_embeddings") or 2048)
    eos = config.get("eos_token_id")
    eos = eos if eos is not None else 0
    pad = config.get("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id") if config.get("bos_token_id") is not None else eos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layout.head_dim,
                "hidden_size": layout.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": layout.heads,
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": genai_types()[model_type],
            "vocab_size": int(config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # present = concat(past, new): a buffer of its own each step, not one shared with past.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def generation_files(model: Model, filename: str) -> dict[str, str]:
    """The folder's text files by name: `genai_config.json` and the tokenizer files the model carries."""
    files = {GENAI_CONFIG: json.dumps(genai_config(model, filename), indent=2, sort_keys=True) + "\n"}
    stored = (model_metadata(model, TOKENIZER) or {}).get("files") or {}
    for name in TOKENIZER_FILES:
        if name in stored:
            files[name] = stored[name]
    return files


def write_generation_files(model: Model, output: Path) -> list[Path]:
    """Write the folder's files beside `output`, each atomically; returns the paths written."""
    written = []
    for name, text in generation_files(model, output.name).items():
        path = output.with_name(name)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        written.append(path)
    return written


def generation_folder(onnx_file: Path, model: Model, folder: Path) -> Path:
    """Make `folder` a generation-ready view of an existing KV-cache ONNX file (links to it and its data)."""
    onnx_file = Path(onnx_file).resolve()
    for source in (onnx_file, onnx_file.with_name(onnx_file.name + ".data")):
        if source.exists():
            (folder / source.name).symlink_to(source)
    write_generation_files(model, folder / onnx_file.name)
    return folder / onnx_file.name


def genai_check(folder: Path) -> str | None:
    """Load the folder with onnxruntime-genai when it is installed: the report's check line (None without it)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    try:
        og.Model(str(folder))
    except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises its own types
        detail = first_line(exc, limit=None)
        raise OptcError(f"onnxruntime-genai rejected the folder {folder}: {detail}") from exc
    return f"onnxruntime-genai {og.__version__} loaded the folder {folder}"


__all__ = [
    "GENAI_CONFIG",
    "GENERATION_FILES",
    "TOKENIZER_FILES",
    "genai_check",
    "genai_config",
    "generation_files",
    "generation_folder",
    "is_generation_model",
    "write_generation_files",
]
