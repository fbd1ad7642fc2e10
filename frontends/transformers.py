"""The Hugging Face frontend: a model directory or a `.gguf` file → ONNX (dynamo exporter) → IR.

Inputs:

* a Hugging Face model directory: `config.json`, safetensors or `.bin`
  weights, and (optionally) the tokenizer's files;
* a `.gguf` file, read through transformers' GGUF support (which dequantizes
  it to float32).

What comes out (`load_transformers`):

* causal LMs: input `input_ids` (int64 `[batch, seq]`), first output
  `logits` (`[batch, seq, vocab]`), no KV cache; with `kv_cache=True`, the
  decoder form onnxruntime-genai runs (`optc.runtime.decoder`): inputs
  `input_ids`, `attention_mask` (`[batch, past + seq]`), `position_ids`,
  `past_key_values.{i}.key/value` (`[batch, kv_heads, past_seq, head_dim]`,
  `past_seq` may be 0), outputs `logits` and `present.{i}.key/value`;
* encoders (BERT-like): inputs `input_ids`, `attention_mask` (and
  `token_type_ids` where the model uses token types), output
  `last_hidden_state` (`[batch, seq, hidden]`);
* vision models (image classification): input `pixel_values` (float32
  `[batch, channels, height, width]`, the config's image size, or any size
  when the config names none), output
  `logits` (`[batch, labels]`).

Which `model_type`s are accepted, and as which task, is the architecture
registry's (`optc.architectures`). Mixture-of-experts models are exported with
transformers' `batched_mm` experts (per-token gathered expert weights), which the
ONNX exporter can trace.

Batch and sequence axes are dynamic. The IR carries, as model metadata, the HF
config (`HF_CONFIG`), the exported class (`ARCHITECTURE`), the tokenizer
(`TOKENIZER`, see `optc.runtime.tokenizer`) and `TIED_PARAMETERS` (alias →
stored name, e.g. `lm_head.weight` → `model.embed_tokens.weight`); every
initializer that holds a parameter carries its state-dict name
(`optc.ir.source_name`), plus `SOURCE_TRANSPOSED` when the exporter stored
the transpose (the `[in, out]` layout MatMul wants, for `nn.Linear` weights)
and `SOURCE_ALIASES` when the one tensor stands for several parameters (tied
embeddings, or identical tensors the exporter deduplicated).

Exports are cached, because exporting even a 135M-parameter model takes
minutes: `$OPTC_CACHE_DIR/exports/<key>/model.onnx(+.data)`, `OPTC_CACHE_DIR`
defaulting to `$XDG_CACHE_HOME/optc` or `~/.cache/optc`; `OPTC_NO_CACHE=1`
turns the cache off (the export then lives in a temporary folder as long as
the model does). The key hashes the identity (path, size, mtime) of every
file of the input, optc's version, the opset, the transformers and torch
versions and the export settings. Entries are written atomically and never
modified; `cached_export_path(model)` (also `model.meta["optc.source_onnx"]`)
names the file the model was loaded from.

Lazy weights (`optc.frontends.lazy_weights`): a causal LM whose weights are all F32/F16/BF16
safetensors is exported without reading them when the eager export (8 bytes per parameter) would
exceed the memory budget, or always with `OPTC_LAZY_WEIGHTS=1` (`0`: never). Its initializers read
their checkpoint tensor when asked; such an export is not cached (`model.meta[LAZY_WEIGHTS]`), but an
existing cache entry of the same input still answers first.

No hub is ever contacted: `HF_HUB_OFFLINE=1` and `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import inspect
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from optc.architectures import genai_refusal, lookup, model_types  # noqa: E402
from optc.errors import ModelLoadError, OptcError, first_line  # noqa: E402
from optc.files import has_gguf_magic  # noqa: E402
from optc.frontends.headers import WeightsHeld, read_gguf_header, weights_held  # noqa: E402
from optc.frontends.lazy_weights import (  # noqa: E402
    CheckpointTensor,
    empty_model,
    export_lazily,
    index_checkpoint,
    repeat_last_block,
    template_config,
)
from optc.ir import (  # noqa: E402 - the offline switches must be set before transformers is imported
    DEFAULT_OPSET,
    Model,
    annotate,
    load_model,
    save_model,
    set_model_metadata,
    set_source_name,
    verify,
)
from optc.ir.annotations import (  # noqa: E402
    ARCHITECTURE,
    HF_CONFIG,
    HF_EXPORT,
    SOURCE_ALIASES,
    SOURCE_OFFSET,
    SOURCE_TRANSPOSED,
    TIED_PARAMETERS,
)
from optc.memory import available_memory, check_budget, format_size  # noqa: E402

_log = logging.getLogger("optc.frontends.transformers")


#: Model metadata (in memory only) of an export whose weights are read lazily from the input's
#: safetensors files; such an export is not cached (the cache would hold a float32 copy of every weight).
LAZY_WEIGHTS = "optc.lazy_weights"

#: Bump when the exported graph or its annotations change, to invalidate cached exports.
EXPORT_FORMAT_VERSION = 2
#: The cache key of the families whose norms hold 1 + w (gemma), since their exports record `SOURCE_OFFSET`.
_SOURCE_OFFSET_VERSION = 1

#: Bump when the KV-cache form of the export changes (a key of its own beside EXPORT_FORMAT_VERSION).
_KV_CACHE_FORMAT_VERSION = 1

#: Causal LMs the registry covers (each verified on tiny random configs in tests/architectures/).
CAUSAL_LM_TYPES: tuple[str, ...] = model_types("causal-lm")
#: Encoders the registry covers.
ENCODER_TYPES: tuple[str, ...] = model_types("encoder")
#: Image classifiers the registry covers.
VISION_TYPES: tuple[str, ...] = model_types("vision")
#: How mixture-of-experts layers run in the export (a gather and a batched MatMul the exporter can trace).
_MOE_EXPERTS = "batched_mm"

#: Example input shape used for tracing (both axes are exported as dynamic).
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 16
#: The wrapper modules' attribute holding the HF model; its prefix is stripped from parameter names.
_WRAPPED = "hf"

#: Files that hold a tokenizer, any one of which means the directory ships one.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)


@dataclasses.dataclass(frozen=True)
class _Source:
    """A Hugging Face input: a directory, or a GGUF file inside `folder`."""

    path: Path
    folder: Path
    gguf_file: str | None = None
    #: Bytes the export may use (None: unchecked); see `_check_what_the_files_hold`.
    memory_budget: int | None = None
    #: Export a causal LM with a KV cache (past inputs, present outputs).
    kv_cache: bool = False

    @property
    def label(self) -> str:
        return str(self.path)

    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    def files(self) -> list[Path]:
        """The files whose identity keys the export cache."""
        if self.gguf_file:
            return [self.path]
        return sorted(p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclasses.dataclass(frozen=True)
class _Task:
    kind: str  # "causal-lm" | "encoder" | "vision"
    model_type: str

    def auto_class(self) -> Any:
        """The transformers Auto class that builds this task's model."""
        import transformers

        return {"causal-lm": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModel,
                "vision": transformers.AutoModelForImageClassification}[self.kind]


def supported_architectures() -> str:
    """One line listing what this frontend exports."""
    return (f"causal LMs: {', '.join(CAUSAL_LM_TYPES)}; encoders: {', '.join(ENCODER_TYPES)}; "
            f"vision: {', '.join(VISION_TYPES)}")


# --------------------------------------------------------------------------- entry point


def load_transformers(
    path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, memory_budget: int | None = None,
    kv_cache: bool = False,
) -> Model:
    """Load a Hugging Face model directory or `.gguf` file into optc's IR (export cached).

    Before the weights are read, the parameter count the config implies is checked against
    what the files hold, and the export's estimated memory against `memory_budget` (bytes).
    `kv_cache=True` exports a causal LM with its KV cache (encoders ignore it).
    """
    source = dataclasses.replace(_source(Path(path)), memory_budget=memory_budget, kv_cache=kv_cache)
    settings: dict[str, Any] = {"opset": opset, "example": [_EXAMPLE_BATCH, _EXAMPLE_SEQ], "format": EXPORT_FORMAT_VERSION}
    if kv_cache:  # its own cache entry; the no-cache key stays as it was
        settings["kv_cache"] = _KV_CACHE_FORMAT_VERSION
    if _has_norm_offset(source):  # exports of these families record SOURCE_OFFSET (other keys stay as they were)
        settings["source_offsets"] = _SOURCE_OFFSET_VERSION
    use_cache = os.environ.get("OPTC_NO_CACHE", "") in ("", "0")
    if use_cache:
        entry = _cache_root() / "exports" / _cache_key(source, settings)
        model = _load_entry(entry)
        if model is not None:
            return model
        if _writable_cache(entry.parent):
            lazy = _export_entry(source, opset, entry)
            if lazy is not None:
                return lazy
            model = _load_entry(entry)
            if model is not None:
                return model
        warnings.warn(f"optc: the export cache {entry.parent} is not writable; exporting without it", stacklevel=2)
    folder = tempfile.TemporaryDirectory(prefix="optc-hf-export-")
    entry = Path(folder.name) / "entry"
    try:
        lazy = _export_entry(source, opset, entry)
        if lazy is not None:
            folder.cleanup()
            return lazy
        model = _load_entry(entry)
    except BaseException:
        folder.cleanup()
        raise
    if model is None:  # pragma: no cover - a file we just wrote must load
        folder.cleanup()
        raise ModelLoadError(f"{source.label}: the exported model did not load back")
    weakref.finalize(model, folder.cleanup)  # the weights are memory-mapped from there
    model.meta["optc.export_dir"] = folder
    return model


def cached_export_path(model: Model) -> Path | None:
    """The ONNX file this frontend loaded the model from (its cache entry), if any."""
    path = model.meta.get("optc.source_onnx")
    return Path(path) if path else None


def _source(path: Path) -> _Source:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: is a directory but not a Hugging Face model directory (no config.json)")
        return _Source(path.resolve(), path.resolve())
    if path.suffix.lower() == ".gguf" or has_gguf_magic(path):
        resolved = path.resolve()
        return _Source(resolved, resolved.parent, resolved.name)
    raise ModelLoadError(f"{path}: not a Hugging Face model directory or a .gguf file")


# --------------------------------------------------------------------------- the cache


def _cache_root() -> Path:
    explicit = os.environ.get("OPTC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "optc"


def _cache_key(source: _Source, settings: dict[str, Any]) -> str:
    import onnxscript
    import transformers

    files = []
    for file in source.files():
        stat = file.stat()
        files.append([str(file), stat.st_size, stat.st_mtime_ns])
    identity = {
        "source": str(source.path),
        "gguf_file": source.gguf_file,
        "files": files,
        "optc": importlib.metadata.version("optc"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _writable_cache(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _load_entry(entry: Path) -> Model | None:
    """A complete cache entry, loaded lazily; `None` when absent (a broken one is removed)."""
    onnx_file = entry / "model.onnx"
    if not onnx_file.is_file():
        return None
    try:
        model = load_model(onnx_file)
        verify(model, where=f"on the cached export {onnx_file}")
    except OptcError:
        shutil.rmtree(entry, ignore_errors=True)  # damaged (e.g. truncated by a full disk): export again
        return None
    model.meta["optc.source_onnx"] = str(onnx_file)
    return model


def _export_entry(source: _Source, opset: int, entry: Path) -> Model | None:
    """Export into a temporary folder beside `entry`, then rename it into place; an export whose weights
    are read lazily is returned instead (nothing is written)."""
    _log.info("exporting %s to ONNX (once; kept in %s)", source.label, entry)
    model = _export(source, opset)
    if model.meta.get(LAZY_WEIGHTS):
        return model
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        try:
            save_model(model, staging / "model.onnx", external_data=True)
            del model
            (staging / "source.json").write_text(
                json.dumps({"source": str(source.path), "opset": opset}, indent=2) + "\n", encoding="utf-8"
            )
            try:
                os.rename(staging, entry)
            except OSError:
                if not (entry / "model.onnx").is_file():  # not a concurrent writer that won the race
                    raise
        except OSError as exc:
            raise OptcError(
                f"{source.label}: cannot write the exported model to {entry.parent} ({exc.strerror or exc}); "
                "set OPTC_CACHE_DIR to another folder, or OPTC_NO_CACHE=1"
            ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


# --------------------------------------------------------------------------- loading and export


def _export(source: _Source, opset: int) -> Model:
    start = time.perf_counter()
    if not source.gguf_file:
        config_json = _check_config_json(source)
    held = _weights_held(source)
    if not source.gguf_file:
        for key in _LAYER_COUNT_KEYS:
            _check_layer_count(source, key, config_json.get(key), held)
    config = _load_config(source)
    task = _task(source, config)
    if source.kv_cache and task.kind == "causal-lm":  # before the export, not after it
        refusal = genai_refusal(str(getattr(config, "model_type", "")))
        if refusal is not None:
            raise ModelLoadError(f"{source.label}: {refusal}")
    parameters = _check_what_the_files_hold(source, config, task, held)
    checkpoint = _lazy_checkpoint(source, task, parameters)
    # Lazily, a deep model of alike layers is exported with two and its last block repeated.
    template = template_config(config) if checkpoint is not None and not source.kv_cache else None
    if checkpoint is None:
        _check_export_budget(source, parameters)
        hf_model = _load_weights(source, task)
    else:
        hf_model = _empty_model(source, task, template or config)
    tokenizer = _load_tokenizer(source)
    _log.info("loaded %s (%s) in %.1fs", source.label, type(hf_model).__name__, time.perf_counter() - start)
    wrapper, example, names, outputs, dynamic = _wrap(hf_model, task, kv_cache=source.kv_cache)

    from optc.frontends.torch import export_graph, export_module

    start = time.perf_counter()
    settings = {"input_names": names, "output_names": outputs, "dynamic_axes": dynamic, "opset": opset}
    with _quiet():
        if checkpoint is None:
            model = export_module(wrapper, example, **settings)
        else:
            model, tied = export_lazily(
                hf_model, checkpoint, source.label, lambda _: export_graph(wrapper, example, **settings))
            why = repeat_last_block(model, config.num_hidden_layers, checkpoint, source.label) if template else None
            if why is not None:
                _log.info("exporting every layer of %s: its two-layer export cannot be repeated (%s)", source.label, why)
                hf_model = _empty_model(source, task, config)
                wrapper, example, *_ = _wrap(hf_model, task, kv_cache=source.kv_cache)
                model, tied = export_lazily(
                    hf_model, checkpoint, source.label, lambda _: export_graph(wrapper, example, **settings))
            model.meta[LAZY_WEIGHTS] = True
            verify(model, where=f"after exporting {source.label} with lazy weights")
    _log.info("exported %s in %.1fs%s", source.label, time.perf_counter() - start,
              " (weights read lazily from the safetensors files)" if checkpoint is not None else "")
    if [v.name for v in model.graph.inputs] != names or [v.name for v in model.graph.outputs][:len(outputs)] != outputs:
        raise OptcError(
            f"{source.label}: the exported graph has inputs {[v.name for v in model.graph.inputs]} "
            f"and outputs {[v.name for v in model.graph.outputs]}, expected {names} and {outputs}"
        )
    if checkpoint is None:
        tied = _annotate_sources(model, hf_model, norm_offset=_norm_offset(task.model_type))
    set_model_metadata(model, HF_CONFIG, _config_dict(hf_model, config if template is not None else None))
    set_model_metadata(model, ARCHITECTURE, type(hf_model).__name__)
    set_model_metadata(model, TIED_PARAMETERS, tied)
    set_model_metadata(model, HF_EXPORT, {
        "task": task.kind,
        "model_type": task.model_type,
        "inputs": names,
        "outputs": outputs,
        "format": "gguf" if source.gguf_file else "hf",
        "source": source.path.name,
        "kv_cache": isinstance(wrapper, _CausalLMWithCache),
    })
    if tokenizer is not None:
        from optc.runtime.tokenizer import store_tokenizer

        store_tokenizer(model, tokenizer)
    return model


def _norm_offset(model_type: str) -> bool:
    family = lookup(model_type)
    return family is not None and family.norm_offset


def _has_norm_offset(source: _Source) -> bool:
    """Whether the directory's `config.json` names a family whose norms multiply by 1 + w (gemma)."""
    if source.gguf_file:
        return False
    try:
        model_type = json.loads((source.path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return _norm_offset(str(model_type))


def _load_config(source: _Source) -> Any:
    from transformers import AutoConfig

    try:
        with _quiet():
            return AutoConfig.from_pretrained(str(source.folder), **source.load_kwargs())
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad configs
        message = first_line(exc, limit=None)
        if source.gguf_file and "is not supported" in message:
            arch = _gguf_architecture(source.path) or "unknown"
            raise ModelLoadError(
                f"{source.label}: transformers cannot read GGUF architecture '{arch}' "
                f"(it reads {', '.join(_gguf_readable())}); {supported_architectures()}"
            ) from exc
        what = "GGUF file" if source.gguf_file else "config.json"
        raise ModelLoadError(f"{source.label}: cannot read the {what}: {message}") from exc


def _check_config_json(source: _Source) -> dict[str, Any]:
    """config.json as read, or an unsupported architecture rejected before transformers resolves it."""
    path = source.folder / "config.json"
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelLoadError(f"{path}: not a readable config.json (over {_MAX_CONFIG_BYTES >> 20} MiB)")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a readable config.json ({first_line(exc, limit=None)})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a readable config.json (not a JSON object)")
    model_type = config.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{path}: config.json has no 'model_type'")
    _check_supported(source, str(model_type), config.get("architectures"))
    return config


#: A config.json is a few kilobytes; one larger than this is not read.
_MAX_CONFIG_BYTES = 16 << 20
#: Config entries that count layers (transformers builds per-layer lists from them on reading the config).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "num_layers", "n_layer")


def _check_layer_count(source: _Source, key: str, layers: Any, held: WeightsHeld) -> None:
    """Every layer holds parameters: more layers than parameters in the files is refused unread."""
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > max(held.elements, 1):
        raise ModelLoadError(
            f"{source.label}: config describes {layers} layers ({key}) but the "
            f"{'file holds' if source.gguf_file else 'files hold'} {held.elements} parameters; refusing to allocate"
        )


def _weights_held(source: _Source) -> WeightsHeld:
    """What the input's weight files hold, read from their headers (each checked against the file's size)."""
    if source.gguf_file:
        header = read_gguf_header(source.path)
        arch = header.metadata.get("general.architecture")
        held = WeightsHeld(header.elements, header.tensor_bytes)
        if isinstance(arch, str):
            _check_layer_count(source, f"{arch}.block_count", header.metadata.get(f"{arch}.block_count"), held)
        return held
    held = weights_held(source.folder, source.label)
    if held.elements == 0 and held.tensor_bytes == 0:
        raise ModelLoadError(
            f"{source.label}: cannot read the weights: the directory holds no weight files "
            "(.safetensors, or .bin and other checkpoints)"
        )
    return held


#: The files must hold at least this share of the parameters the config implies
#: (a little slack for parameters a checkpoint may leave out, such as an encoder's pooler).
_MIN_SHARE_HELD = 0.5
#: Bytes per parameter the export needs at its peak: float32 weights of the model and of
#: its export; reading a GGUF file adds its dequantized float32 copy.
_EXPORT_BYTES_PER_PARAMETER = 8
_GGUF_EXTRA_BYTES_PER_PARAMETER = 4


def _check_what_the_files_hold(source: _Source, config: Any, task: _Task, held: WeightsHeld) -> int:
    """Refuse, before allocating, a config the files cannot fill; returns the parameters it implies."""
    parameters = _implied_parameters(source, config, task)
    where = "the file holds" if source.gguf_file else "the files hold"
    if held.elements < parameters * _MIN_SHARE_HELD:
        raise ModelLoadError(
            f"{source.label}: config describes {_count(parameters)} parameters but {where} "
            f"{format_size(held.tensor_bytes)} of tensor data ({_count(held.elements)} parameters); refusing to allocate"
        )
    return parameters


def _check_export_budget(source: _Source, parameters: int) -> None:
    """Refuse an eager export whose estimated memory exceeds the budget."""
    per_parameter = _EXPORT_BYTES_PER_PARAMETER + (_GGUF_EXTRA_BYTES_PER_PARAMETER if source.gguf_file else 0)
    check_budget(
        source.label, parameters * per_parameter, source.memory_budget,
        f"exporting it ({_count(parameters)} parameters in float32)",
    )


#: `OPTC_LAZY_WEIGHTS=1` reads the weights lazily whenever the input allows it, `0` never; unset: when
#: the eager export would exceed the memory budget.
_LAZY_ENV = "OPTC_LAZY_WEIGHTS"
#: Bytes per element of the largest tensor a lazy read holds at its peak (the file's tensor, its
#: float32 copy, a transposed copy), and a margin for the graph and the exporter.
_LAZY_BYTES_PER_ELEMENT = 12
_LAZY_MARGIN = 64 << 20


def _lazy_checkpoint(source: _Source, task: _Task, parameters: int) -> dict[str, CheckpointTensor] | None:
    """The checkpoint's tensors when this export reads its weights lazily, else None (read eagerly).

    Lazily: a causal LM (not mixture-of-experts, no norm offset) whose weights are all safetensors in float32, float16
    or bfloat16, when `OPTC_LAZY_WEIGHTS=1`, or unset and the eager export (8 bytes per parameter)
    would exceed the memory budget (`--memory-budget`, by default what the machine has).
    """
    choice = os.environ.get(_LAZY_ENV, "")
    family = lookup(task.model_type)
    # gemma's (1 + w) norm offset is found from the eager export's constants, which the lazy one leaves unfilled
    if choice == "0" or source.gguf_file or task.kind != "causal-lm" or family is None or family.moe or family.norm_offset:
        return None
    budget = source.memory_budget if source.memory_budget is not None else available_memory()
    if choice != "1" and (budget is None or parameters * _EXPORT_BYTES_PER_PARAMETER <= budget):
        return None
    if any(p.suffix in (".bin", ".pt", ".pth") for p in source.folder.iterdir()):
        return None
    checkpoint = index_checkpoint(source.folder, source.label)
    if checkpoint is None:
        return None
    largest = max((math.prod(t.shape) for t in checkpoint.values()), default=0)
    if budget is not None and largest * _LAZY_BYTES_PER_ELEMENT + _LAZY_MARGIN > budget:
        _check_export_budget(source, parameters)  # refused as the eager export would be
    return checkpoint


def _empty_model(source: _Source, task: _Task, config: Any) -> Any:
    """The model the config describes, its parameters not allocated (`lazy_weights.empty_model`)."""
    cls = task.auto_class()
    try:
        with _quiet():
            return empty_model(lambda: cls.from_config(config, dtype=torch.float32)).eval()
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for inconsistent configs
        raise ModelLoadError(f"{source.label}: cannot build the model: {first_line(exc, limit=None)}") from exc


def _count(n: int) -> str:
    """A parameter count as people write it: 6.7B, 135.0M, 12.3K, 950."""
    for suffix, factor in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f}{suffix}"
    return str(n)


def _implied_parameters(source: _Source, config: Any, task: _Task) -> int:
    """The parameter count of the model the config describes, built on the meta device (nothing allocated).

    Deep models are counted from one- and two-layer builds (every layer has the same
    parameters), so even a config of absurd depth costs two small builds.
    """
    cls = task.auto_class()
    layers = getattr(config, "num_hidden_layers", None)

    def count(num_layers: int | None) -> int:
        shallow = copy.deepcopy(config)
        if num_layers is not None:
            shallow.num_hidden_layers = num_layers
        with torch.device("meta"), _quiet():
            model = cls.from_config(shallow)
        return sum(p.numel() for p in model.parameters())

    try:
        if not isinstance(layers, int) or layers <= 2:
            return count(None)
        one, two = count(1), count(2)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for inconsistent configs
        what = "GGUF file" if source.gguf_file else "config.json"
        raise ModelLoadError(f"{source.label}: cannot read the {what}: {first_line(exc, limit=None)}") from exc
    return one + (layers - 1) * (two - one)


def _check_supported(source: _Source, model_type: str, architectures: Any) -> None:
    if lookup(model_type) is not None:
        return
    names = ", ".join(architectures) if isinstance(architectures, list) and architectures else model_type
    raise OptcError(
        f"{source.label}: unsupported architecture '{names}' (model_type '{model_type}'); "
        f"supported: {supported_architectures()}"
    )


def _task(source: _Source, config: Any) -> _Task:
    model_type = str(getattr(config, "model_type", ""))
    _check_supported(source, model_type, getattr(config, "architectures", None))
    family = lookup(model_type)
    assert family is not None  # checked above
    return _Task(family.task, model_type)


def _gguf_architecture(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).get_field("general.architecture")
        return None if field is None else str(field.contents())
    except Exception:  # noqa: BLE001 - best effort, for the error message only
        return None


def _gguf_readable() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    except ImportError:  # pragma: no cover
        return []


def _load_weights(source: _Source, task: _Task) -> Any:
    cls = task.auto_class()
    family = lookup(task.model_type)
    extra: dict[str, Any] = {"experts_implementation": _MOE_EXPERTS} if family is not None and family.moe else {}
    try:
        with _quiet():
            model, info = cls.from_pretrained(
                str(source.folder), dtype=torch.float32, output_loading_info=True, **extra,
                ignore_mismatched_sizes=True,  # reported below, by name, rather than as a bare error
                **source.load_kwargs(),
            )
    except Exception as exc:  # noqa: BLE001 - safetensors, torch.load and transformers raise many types
        raise ModelLoadError(f"{source.label}: cannot read the weights: {first_line(exc, limit=None)}") from exc
    problems = {
        "missing": [k for k in info.get("missing_keys", ()) if not _optional_parameter(k)],
        "mismatched": [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())],
    }
    for kind, keys in problems.items():
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            what = "its metadata" if source.gguf_file else "config.json"
            raise ModelLoadError(f"{source.label}: the weights do not match {what}: {kind} {shown}")
    return model.eval()


def _optional_parameter(key: str) -> bool:
    """Parameters an encoder export does not use (the pooler)."""
    return key.startswith("pooler.") or ".pooler." in key


def _load_tokenizer(source: _Source) -> Any | None:
    if source.gguf_file:
        if not _gguf_has_tokenizer(source.path):
            return None
    elif not any((source.folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(str(source.folder), **source.load_kwargs())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{source.label}: cannot read the tokenizer: {first_line(exc, limit=None)}") from exc


def _gguf_has_tokenizer(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return GGUFReader(str(path)).get_field("tokenizer.ggml.model") is not None
    except Exception:  # noqa: BLE001 - let transformers report an unreadable file
        return True


def _wrap(
    hf_model: Any, task: _Task, *, kv_cache: bool = False,
) -> tuple[Any, tuple[Any, ...], list[str], list[str], dict[str, dict[int, str]]]:
    """The module to export, its example inputs, input and output names and dynamic axes."""
    vocab = int(getattr(hf_model.config, "vocab_size", 0) or 100)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_SEQ), dtype=torch.int64, generator=generator)
    if task.kind == "causal-lm" and kv_cache:
        return _wrap_with_cache(hf_model, ids, generator)
    if task.kind == "vision":
        pixels = _example_pixels(hf_model.config, generator)
        # A model whose config fixes no image size (convolutional, pooled) takes any height and width.
        sized = getattr(hf_model.config, "image_size", None) is not None
        dynamic = {"pixel_values": {0: "batch"} if sized else {0: "batch", 2: "height", 3: "width"}}
        return _ImageLogits(hf_model), (pixels,), ["pixel_values"], ["logits"], dynamic
    if task.kind == "causal-lm":
        names, outputs = ["input_ids"], ["logits"]
        wrapper: torch.nn.Module = _CausalLMLogits(hf_model)
        example: tuple[Any, ...] = (ids,)
    else:
        mask = torch.ones_like(ids)
        mask[1, _EXAMPLE_SEQ // 2:] = 0  # a padded row, so the mask path is traced
        names, outputs = ["input_ids", "attention_mask"], ["last_hidden_state"]
        example = (ids, mask)
        if _uses_token_types(hf_model):
            names.append("token_type_ids")
            example = (ids, mask, torch.zeros_like(ids))
            wrapper = _EncoderWithTokenTypes(hf_model)
        else:
            wrapper = _Encoder(hf_model)
    dynamic = {name: {0: "batch", 1: "seq"} for name in names}
    return wrapper, example, names, outputs, dynamic


def _example_pixels(config: Any, generator: torch.Generator) -> torch.Tensor:
    """Example `pixel_values`: the config's channels and image size (64 when it names none)."""
    size = getattr(config, "image_size", None) or 64
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    channels = int(getattr(config, "num_channels", 3) or 3)
    return torch.randn((_EXAMPLE_BATCH, channels, height, width), generator=generator)


def _uses_token_types(hf_model: Any) -> bool:
    accepts = "token_type_ids" in inspect.signature(hf_model.forward).parameters
    return accepts and int(getattr(hf_model.config, "type_vocab_size", 0) or 0) > 1


class _CausalLMLogits(torch.nn.Module):
    """`input_ids → logits`, no KV cache, with explicit `[batch, seq]` position ids.

    Position ids expanded to the batch give the rotary cos/sin tables a real
    batch axis (opset-23 RotaryEmbedding needs it in onnxruntime).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.hf = model

    def forward(self, input_ids):
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        return self.hf(input_ids=input_ids, position_ids=positions, use_cache=False, return_dict=True).logits


class _ImageLogits(torch.nn.Module):
    """`pixel_values → logits` (image classification)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.hf = model

    def forward(self, pixel_values):
        return self.hf(pixel_values=pixel_values, return_dict=True).logits


#: Past length of the traced example (the axis is exported as dynamic; 0 works at run time).
_EXAMPLE_PAST = 3


def _wrap_with_cache(hf_model: Any, ids: Any, generator: Any) -> tuple[Any, tuple[Any, ...], list[str], list[str], dict[str, dict[int, str]]]:
    """The KV-cache decoder (onnxruntime-genai's names, `optc.runtime.decoder`) and its example inputs."""
    from optc.runtime.decoder import cache_names, cache_shape

    layout = cache_shape(_config_dict(hf_model))
    layers = layout.layers
    batch, seq = ids.shape
    mask = torch.ones(batch, _EXAMPLE_PAST + seq, dtype=torch.int64)
    mask[1, :2] = 0  # a left-padded row, so the mask path is traced
    positions = torch.arange(_EXAMPLE_PAST, _EXAMPLE_PAST + seq).unsqueeze(0).expand(batch, seq).contiguous()
    past = tuple(
        torch.randn(batch, layout.kv_heads, _EXAMPLE_PAST, layout.head_dim, generator=generator)
        for _ in range(2 * layers)
    )
    past_names, present_names = cache_names(layers)
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    outputs = ["logits", *present_names]
    dynamic = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "position_ids": {0: "batch", 1: "seq"},
        **{name: {0: "batch", 2: "past_seq"} for name in past_names},
    }
    return _CausalLMWithCache(hf_model, layers), (ids, mask, positions, *past), names, outputs, dynamic


class _CausalLMWithCache(torch.nn.Module):
    """`input_ids, attention_mask, position_ids, past key/value per layer → logits, present key/value per layer`."""

    def __init__(self, model: Any, layers: int) -> None:
        super().__init__()
        self.hf = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        # transformers 5 names the argument `cache`; earlier versions `past_key_values`.
        keyword = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        out = self.hf(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, return_dict=True, **{keyword: cache},
        )
        present = getattr(out, "cache", None) or out.past_key_values
        flat = []
        for layer in present.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


class _Encoder(torch.nn.Module):
    """`input_ids, attention_mask → last_hidden_state`."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _EncoderWithTokenTypes(_Encoder):
    """`input_ids, attention_mask, token_type_ids → last_hidden_state`."""

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state


# --------------------------------------------------------------------------- parameter names


def _annotate_sources(model: Model, hf_model: Any, *, norm_offset: bool = False) -> dict[str, str]:
    """Record each initializer's state-dict name; returns the tied aliases `{alias: stored name}`.

    The exporter names an initializer after the parameter it holds (with the
    wrapper's prefix) unless its optimizer replaced it: a folded transpose
    (`nn.Linear` weights as `[in, out]`) or one tensor for several identical
    ones gets a fresh name. Those are matched by content against the state
    dict (and its 2-D transposes). With `norm_offset` (gemma's `x·(1 + w)`
    norms, which the exporter folds into one constant) a 1-D `*norm.weight`
    is also matched as 1 + w (float32, as the model computes it) and marked
    `SOURCE_OFFSET` 1.
    """
    import numpy as np

    state = hf_model.state_dict()
    # Tied parameters share storage; the first name in state-dict order stands for the group.
    canonical: dict[str, str] = {}
    by_storage: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        first = by_storage.setdefault(ident, key)
        canonical[key] = first
        if first != key:
            tied[key] = first
    aliases_of: dict[str, list[str]] = {}
    for alias, first in tied.items():
        aliases_of.setdefault(first, []).append(alias)

    arrays = {key: state[key].detach().cpu().numpy() for key in state if canonical[key] == key}
    shapes: set[tuple[str, tuple[int, ...]]] = set()
    for array in arrays.values():
        shapes.add((array.dtype.str, array.shape))
        if array.ndim == 2:
            shapes.add((array.dtype.str, array.shape[::-1]))
    index: dict[tuple[str, tuple[int, ...], str], list[tuple[str, bool]]] = {}

    def digest(array: Any) -> str:
        return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).reshape(-1), digest_size=16).hexdigest()

    offset_index: dict[tuple[str, tuple[int, ...], str], str] = {}
    if norm_offset:
        for key, array in arrays.items():
            if array.ndim == 1 and key.endswith("norm.weight"):
                plus = (array + array.dtype.type(1)).astype(array.dtype)
                offset_index.setdefault((plus.dtype.str, plus.shape, digest(plus)), key)

    def build_index() -> None:
        for key, array in arrays.items():
            index.setdefault((array.dtype.str, array.shape, digest(array)), []).append((key, False))
            if array.ndim == 2 and array.shape[0] != 1 and array.shape[1] != 1:
                flipped = array.T
                index.setdefault((array.dtype.str, flipped.shape, digest(flipped)), []).append((key, True))

    prefix = _WRAPPED + "."
    for value in model.graph.initializers.values():
        name = value.name or ""
        stripped = name[len(prefix):] if name.startswith(prefix) else name
        matches: list[tuple[str, bool]] = []
        data = value.const_value
        if data is None:
            continue
        if stripped in canonical and tuple(data.shape) == tuple(state[stripped].shape):
            matches.append((canonical[stripped], False))
        shape = tuple(int(d) for d in data.shape)
        array = None
        if (data.dtype.numpy().str, shape) in shapes:
            if not index:
                build_index()
            array = data.numpy()
            for match in index.get((array.dtype.str, array.shape, digest(array)), []):
                if match[0] not in {m[0] for m in matches}:
                    matches.append(match)
        if not matches and offset_index and len(shape) == 1:
            array = data.numpy() if array is None else array
            key = offset_index.get((array.dtype.str, array.shape, digest(array)))
            if key is not None:
                set_source_name(value, key)
                annotate(value, SOURCE_OFFSET, 1.0)
            continue
        if not matches:
            continue
        source, transposed = matches[0]
        if transposed and array is not None and array.ndim == 2 and array.shape[0] == array.shape[1]:
            # A square tensor equal to a parameter's transpose and to another parameter as is:
            # prefer the untransposed reading.
            plain = [m for m in matches if not m[1]]
            if plain:
                source, transposed = plain[0]
        others = [m[0] for m in matches if m[0] != source and m[1] == transposed]
        aliases = [*aliases_of.get(source, [])]
        for other in others:
            aliases += [other, *aliases_of.get(other, [])]
        set_source_name(value, source)
        if transposed:
            annotate(value, SOURCE_TRANSPOSED, True)
        if aliases:
            annotate(value, SOURCE_ALIASES, aliases)
    return tied


# --------------------------------------------------------------------------- helpers


def _config_dict(hf_model: Any, full: Any = None) -> dict[str, Any]:
    """The HF config as plain JSON (dtypes and other objects become strings), describing the exported model.

    A GGUF file's config carries a `quantization_config` for the GGUF loader;
    the exported weights are dequantized float32, so it is dropped. `full`: the config whose layer
    count (and per-layer lists) the export has, when `hf_model` was its two-layer template.
    """
    config = json.loads(json.dumps(hf_model.config.to_dict(), default=str))
    if full is not None:
        layers = full.num_hidden_layers
        config.update(json.loads(json.dumps(
            {k: v for k, v in full.to_dict().items() if k == "num_hidden_layers" or (isinstance(v, list) and len(v) == layers)},
            default=str)))
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
    if not config.get("architectures"):
        config["architectures"] = [type(hf_model).__name__]
    return config



@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' and the exporter's progress output and warnings (errors still raise)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir", "transformers_modules")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # tqdm bars (GGUF dequantization)
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


__all__ = [
    "CAUSAL_LM_TYPES",
    "ENCODER_TYPES",
    "HF_EXPORT",
    "LAZY_WEIGHTS",
    "SOURCE_ALIASES",
    "SOURCE_TRANSPOSED",
    "TIED_PARAMETERS",
    "VISION_TYPES",
    "cached_export_path",
    "load_transformers",
    "supported_architectures",
]
