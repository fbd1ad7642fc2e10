"""The model's tokenizer, carried inside the IR as model metadata.

The frontend saves the Hugging Face tokenizer's files (`tokenizer.json`,
`tokenizer_config.json`, ...) into the `tokenizer` metadata entry; anything
that needs to tokenize text later (calibration, evaluation, the GGUF backend)
rebuilds it from there, so no hub or original folder is needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from optc.errors import OptcError
from optc.ir import Model, model_metadata, set_model_metadata
from optc.ir.annotations import TOKENIZER


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The text files `save_pretrained` writes for a tokenizer, by file name."""
    with tempfile.TemporaryDirectory(prefix="optc-tok-") as folder:
        tokenizer.save_pretrained(folder)
        return {
            p.name: p.read_text(encoding="utf-8")
            for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.suffix in (".json", ".txt", ".model", ".jinja")
            and p.stat().st_size < 64 << 20
        }


def store_tokenizer(model: Model, tokenizer: Any) -> None:
    """Record the tokenizer's files in the model's metadata."""
    set_model_metadata(model, TOKENIZER, {"files": tokenizer_files(tokenizer)})


def tokenizer_from_files(files: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="optc-tok-") as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)


def tokenizer_from_model(model: Model) -> Any:
    """Rebuild the tokenizer stored by the frontend; a clear error if there is none."""
    entry = model_metadata(model, TOKENIZER)
    if not entry or not entry.get("files"):
        raise OptcError(
            "this model carries no tokenizer, which text calibration needs; "
            "start from a Hugging Face directory or GGUF file, or use --calib npz:FILE"
        )
    return tokenizer_from_files(entry["files"])
