"""The GGUF backend: llama.cpp-loadable files (the registry's decoder families), with the types `kquant` assigned.

What it writes (GGUF v3, through the `gguf` package's writer, streamed tensor
by tensor so memory stays at one tensor):

* **Architecture.** The families of the architecture registry
  (`optc.architectures`) that carry a `GGUFLayout`: llama, mistral and mixtral
  as `llama`, qwen2, qwen3, qwen3_moe (`qwen3moe`), phi3, gemma2, gemma3_text
  (`gemma3`), gpt2, gpt_neox (`gptneox`), olmo2 and granite. The layout gives
  the tensor names, the Q/K permutation, fused parameters written as two
  tensors (a mixture of experts' `gate_up_proj` as `ffn_gate_exps` and
  `ffn_up_exps`) or kept fused (phi3's `attn_qkv`), Conv1D weights to
  transpose (gpt2), per-head fused qkv rows to regroup (gpt_neox), the
  config's own key names (gpt2's `n_embd`), LayerNorm or RMSNorm epsilon,
  the partial rotary dimension count, the architecture's own
  keys (experts, soft-capping, granite's multipliers), the norm offset (gemma
  stores 1 + w) and the config values llama.cpp assumes, which are checked;
  anything else stops with one line naming the architecture. Metadata keys carry the exact types llama.cpp checks
  (counts UINT32, epsilon and `rope.freq_base` FLOAT32); `llama3` rope scaling
  adds the `rope_freqs.weight` tensor, `linear` rope scaling its two keys.
* **Tensors.** Each weight is found by its original parameter name
  (`optc.ir.source_name`, recorded by the frontend), turned back into the
  Hugging Face `[out, in]` layout (MatMul weights are stored `[in, out]`) and
  renamed (`model.layers.N.self_attn.q_proj.weight` → `blk.N.attn_q.weight`).
  For `llama`, Q and K rows (and biases) get convert_hf_to_gguf's
  permutation from Hugging Face's rotate-half layout to llama.cpp's
  interleaved rope. Tied embeddings are
  written once as `token_embd.weight` (llama.cpp reuses it as the output).
  Norms and other 1-D tensors stay F32.
* **Types.** A weight's type is its `gguf_type` annotation (set by the
  `kquant` pass, with its importance matrix in `gguf_imatrix`); unannotated
  weights stay F32. Encoding is `optc.backends.gguf.quants` (ggml's
  reference algorithms, vectorized), with a progress bar.
* **Weights earlier passes changed.** Pruned weights are read as they are.
  Weights a weight-only pass quantized (integer codes + scale (+ zero point)
  → `DequantizeLinear`, any axis/block size) are dequantized exactly as
  `DequantizeLinear` computes them in float32 and then encoded into the
  assigned type (F32 keeps them exact; other types re-round them), except
  when the assigned type is the codes' own grid (`CarriedGrid`: int4
  symmetric → Q4_0, uint4 with zero point → Q4_1, int8 symmetric → Q8_0, in
  blocks of 32 along K), which `kquant` assigns to such weights: then the
  codes are written as they are and only the scales round to fp16. Nothing is
  re-derived from another copy: a parameter that no live initializer carries
  is an error.
* **Tokenizer.** `tokenizer.ggml.*` from the tokenizer the frontend stored
  (`tokenizer.json`): GPT-2 style BPE (`gpt2`, with merges and a pre-tokenizer
  name recognized from its pre-tokenizer) or SentencePiece-style BPE
  (`llama`), special token ids, `add_bos_token`, chat template.

The file is written beside the output and moved into place only after
llama.cpp (llama-cpp-python, when installed) has loaded it and evaluated a
few tokens to finite logits.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optc.architectures import GGUFLayout, families, lookup
from optc.architectures.llama import GGUF as LLAMA_LAYOUT
from optc.backends.base import Artifact, Backend, register_backend
from optc.errors import OptcError, WriteError
from optc.ir import Model, annotation, constant_array, model_metadata
from optc.ir.annotations import (
    ARCHITECTURE,
    GGUF_IMATRIX,
    GGUF_PLAN,
    GGUF_TYPE,
    HF_CONFIG,
    SOURCE_ALIASES,
    SOURCE_NAME,
    SOURCE_OFFSET,
    SOURCE_TRANSPOSED,
    TOKENIZER,
)
from optc.ir.patterns.qdq import QDQ
from optc.passes.infra.context import PassContext

#: Hugging Face model types this backend writes (the registry's families with a GGUF layout), and their layouts.
LAYOUTS: dict[str, GGUFLayout] = {t: f.gguf for f in families("causal-lm") if f.gguf for t in f.model_types}
#: Hugging Face model types this backend writes, and the GGUF architecture they become.
ARCHITECTURES = {model_type: layout.arch for model_type, layout in LAYOUTS.items()}

#: LlamaFileType of a mix name (`general.file_type`).
FILE_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
#: Elements per encoding chunk (bounds the encoder's temporaries; chunks run in parallel).
_CHUNK_ELEMENTS = 1 << 19
#: The file type named after a tensor type, for files whose types no mix assigned.
_PURE_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                    "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}


# --------------------------------------------------------------------------- the model's parameters


@dataclass
class Parameter:
    """One source parameter as the IR holds it."""

    name: str  # Hugging Face state-dict name
    value: Any  # the IR initializer (float weight, or integer codes read by a DequantizeLinear)
    read: Callable[[], np.ndarray]  # float32 in Hugging Face layout ([out, in] for Linear weights)
    shape: tuple[int, ...]  # Hugging Face layout
    carried: str = ""  # how an earlier pass stored it ("" = plain float)
    #: For integer codes on a grid a GGUF type holds exactly: `CarriedGrid`, else None.
    grid: CarriedGrid | None = None
    #: What the IR's tensor adds to the parameter (`SOURCE_OFFSET`: gemma's folded 1 + w norms).
    offset: float = 0.0


@dataclass
class CarriedGrid:
    """Integer codes of a weight-only pass that a 32-element GGUF type stores as they are (no re-rounding).

    int4 codes in blocks of 32 along K with one scale each (symmetric) → Q4_0
    (`d = scale`, `q = code + 8`); uint4 codes with a zero point → Q4_1 (`d =
    scale`, `m = -scale·zero`); int8 codes, symmetric → Q8_0 (`d = scale`).
    The codes are kept; only the scale (and offset) are rounded to fp16, as
    every GGUF block stores them.
    """

    qtype: str
    dq: Any  # the DequantizeLinear node
    transposed: bool

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """codes `[out, in]` (int32), scales and zero points `[out, in/32]` (float32, int32), HF layout."""
        codes = np.asarray(constant_array(self.dq.inputs[0])).astype(np.int32)
        scale = np.asarray(constant_array(self.dq.inputs[1])).astype(np.float32)
        zp_value = self.dq.inputs[2] if len(self.dq.inputs) > 2 else None
        zero = np.zeros(scale.shape, np.int32) if zp_value is None else np.asarray(constant_array(zp_value)).astype(np.int32)
        if self.transposed:  # stored [in, out] with blocks along axis 0
            return np.ascontiguousarray(codes.T), np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.T)
        return codes, scale, zero

    def encode(self, reorder: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The GGUF blocks, uint8 `[out, bytes_per_row]`; `reorder` permutes the rows (codes and scales alike)."""
        from optc.backends.gguf.quants import fp16_bytes

        codes, scale, zero = self.arrays()
        if reorder is not None:
            codes, scale, zero = (reorder(a) for a in (codes, scale, zero))
        rows = codes.shape[0]
        blocks = codes.reshape(-1, 32)
        d = scale.reshape(-1)
        if self.qtype == "Q8_0":
            out = np.concatenate([fp16_bytes(d), blocks.astype(np.int8).view(np.uint8)], axis=1)
        else:
            levels = (blocks + 8 if self.qtype == "Q4_0" else blocks).astype(np.uint8)
            nibbles = levels[:, :16] | (levels[:, 16:] << 4)
            head = [fp16_bytes(d)] if self.qtype == "Q4_0" else [fp16_bytes(d), fp16_bytes(-d * zero.reshape(-1).astype(np.float32))]
            out = np.concatenate([*head, nibbles], axis=1)
        return np.ascontiguousarray(out).reshape(rows, -1)


def _carried_grid(dq: Any, codes_dtype: Any, transposed: bool, shape: tuple[int, ...]) -> CarriedGrid | None:
    """The GGUF type that holds a DequantizeLinear's codes exactly, if any (blocks of 32 along K)."""
    if len(shape) != 2:
        return None
    view = QDQ(dq)
    k_axis = 0 if transposed else 1
    if view.block_size != 32 or view.axis % 2 != k_axis:
        return None
    name = np.dtype(codes_dtype).name
    zero = None if view.zero_point is None else constant_array(view.zero_point)
    symmetric = zero is None or not np.asarray(zero).astype(np.int32).any()
    if np.asarray(constant_array(view.scale)).dtype != np.float32:
        return None
    if name == "int4" and symmetric:
        return CarriedGrid("Q4_0", dq, transposed)
    if name == "uint4" and zero is not None:
        return CarriedGrid("Q4_1", dq, transposed)
    if name == "int8" and symmetric:
        return CarriedGrid("Q8_0", dq, transposed)
    return None


def _dequantize_linear(value: Any) -> tuple[Callable[[], np.ndarray], tuple[int, ...], Any] | None:
    """Integer codes read by a DequantizeLinear: its exact float32 output, the output's shape, the node."""
    from optc.passes.transforms.check_sparsity import effective_weight

    for use in value.uses():
        node = use.node if hasattr(use, "node") else use[0]
        if node.op_type == "DequantizeLinear" and node.inputs[0] is value:
            out = node.outputs[0]

            def read(out=out) -> np.ndarray:
                array = effective_weight(out)
                if array is None:
                    raise OptcError(f"the GGUF backend cannot read back the quantized weight {value.name}")
                return array.astype(np.float32)

            return read, tuple(int(d) for d in constant_array(value).shape), node
    return None


def collect_parameters(model: Model) -> dict[str, Parameter]:
    """Every live initializer that carries a source parameter name, in Hugging Face layout."""
    params: dict[str, Parameter] = {}
    for value in model.graph.initializers.values():
        name = annotation(value, SOURCE_NAME)
        if not name or name in params or not value.uses():
            continue
        transposed = bool(annotation(value, SOURCE_TRANSPOSED))
        array_dtype = constant_array(value).dtype
        if np.issubdtype(array_dtype, np.floating):
            def read(value=value, transposed=transposed) -> np.ndarray:
                array = constant_array(value).astype(np.float32)
                return np.ascontiguousarray(array.T if transposed else array)
            shape = tuple(int(d) for d in constant_array(value).shape)
            carried, grid = "", None
        else:
            found = _dequantize_linear(value)
            if found is None:
                continue  # integer data nothing dequantizes (not a weight the backend can read)
            inner, shape, dq = found
            grid = _carried_grid(dq, array_dtype, transposed, shape)

            def read(inner=inner, transposed=transposed) -> np.ndarray:
                array = inner()
                return np.ascontiguousarray(array.T if transposed else array)
            carried = f"{array_dtype} codes through DequantizeLinear"
        if transposed and len(shape) == 2:
            shape = shape[::-1]
        offset = float(annotation(value, SOURCE_OFFSET) or 0.0)
        params[name] = Parameter(name, value, read, shape, carried, grid, offset)
        for alias in annotation(value, SOURCE_ALIASES) or []:
            params.setdefault(alias, params[name])
    return params


def gguf_tensor_names(hf_name: str, layout: GGUFLayout = LLAMA_LAYOUT) -> tuple[str, ...]:
    """The GGUF names of a Hugging Face parameter in `layout`: one, two for a fused parameter the layout
    splits (`GGUFLayout.split`), none when the layout has no place for it."""
    if hf_name in layout.global_names:
        return (layout.global_names[hf_name],)
    if hf_name.startswith(layout.layer_prefix):
        index, _, rest = hf_name[len(layout.layer_prefix):].partition(".")
        if index.isdigit() and rest in layout.layer_names:
            return (f"blk.{int(index)}.{layout.layer_names[rest]}",)
        if index.isdigit() and rest in layout.split:
            return tuple(f"blk.{int(index)}.{part}" for part in layout.split[rest])
    return ()


def gguf_tensor_name(hf_name: str, layout: GGUFLayout = LLAMA_LAYOUT) -> str | None:
    """The GGUF name of a Hugging Face parameter in `layout` (default: llama's), or None if it has none
    (the first of a split parameter's)."""
    names = gguf_tensor_names(hf_name, layout)
    return names[0] if names else None


# --------------------------------------------------------------------------- configuration


@dataclass
class LlamaConfig:
    """The hyper-parameters llama.cpp needs, from the stored Hugging Face config."""

    arch: str
    layout: GGUFLayout
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    #: Values of each head that rope rotates (`rope.dimension_count`: head_dim × the partial rotary factor).
    rope_dims: int
    n_ctx: int
    n_vocab: int
    eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tied: bool = False
    name: str = "model"
    #: The architecture's own keys (`GGUFLayout.hparams`) with their values from the config.
    hparams: dict[str, float | int] = field(default_factory=dict)
    #: What llama.cpp will compute differently from the source model (printed as warnings when writing).
    warnings: tuple[str, ...] = ()


def llama_config(model: Model) -> LlamaConfig:
    """Read and check the stored HF config; one clear line for an architecture the backend cannot write."""
    config = model_metadata(model, HF_CONFIG)
    if not isinstance(config, dict):
        raise OptcError("the GGUF backend needs a model loaded from Hugging Face weights or a .gguf file (no HF config is stored in this model)")
    model_type = str(config.get("model_type", ""))
    archs = config.get("architectures") or [model_metadata(model, ARCHITECTURE) or model_type]
    arch_label = ", ".join(str(a) for a in archs)
    if model_type not in ARCHITECTURES:
        family = lookup(model_type)
        runs = (f"; llama.cpp runs it as '{family.gguf_arch}' but optc does not write that layout yet"
                if family is not None and family.gguf_arch else "")
        raise OptcError(
            f"the GGUF backend does not support architecture '{arch_label}' (model_type '{model_type or 'unknown'}'){runs}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if any(not str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):  # GPT2LMHeadModel
        raise OptcError(f"the GGUF backend writes causal LMs; this model is '{arch_label}'")
    layout = LAYOUTS[model_type]

    def get(key: str, default: Any = None) -> Any:  # optc's standard key, or the family's own name for it
        value = config.get(layout.config_keys.get(key, key))
        return default if value is None else value

    n_head = int(get("num_attention_heads"))
    n_embd = int(get("hidden_size"))
    head_dim = int(get("head_dim") or n_embd // n_head)
    for key, expected in layout.fixed.items():
        if config.get(key) != expected:
            raise OptcError(f"the GGUF backend cannot write this '{arch_label}': llama.cpp's '{layout.arch}' assumes "
                            f"{key}={json.dumps(expected)}, the config has {json.dumps(config.get(key))}")
    window, n_ctx = get("sliding_window"), int(get("max_position_embeddings", 2048))
    notes: list[str] = []
    if layout.full_attention and isinstance(window, int) and not isinstance(window, bool) and window < n_ctx:
        # As llama.cpp's own converter does, write it: the outputs agree up to `window` tokens of context.
        notes.append(f"llama.cpp runs '{layout.arch}' with full attention: this '{arch_label}' (sliding_window {window}, "
                     f"context {n_ctx}) computes as transformers does only while the context is at most {window} tokens")
    for key in layout.head_dim_keys:
        if key in config and config[key] is not None and float(config[key]) != head_dim:
            raise OptcError(f"the GGUF backend cannot write this '{arch_label}': llama.cpp's '{layout.arch}' scales "
                            f"queries by 1/sqrt(head_dim={head_dim}), the config's {key} is {config[key]}")
    hparams: dict[str, float | int] = {}
    for key, hf_key in layout.hparams.items():
        value = config.get(hf_key)
        if not isinstance(value, int | float):
            continue  # absent or null (no sliding window, no soft-capping): llama.cpp's default
        hparams[key] = value
    if "expert_count" in layout.hparams:  # llama.cpp aborts the process on a mixture of experts it cannot size
        used, count = hparams.get("expert_used_count"), hparams.get("expert_count")
        if not isinstance(used, int) or not isinstance(count, int) or not 0 < used <= count:
            raise OptcError(f"the GGUF backend cannot write this '{arch_label}': its config gives {count} experts "
                            f"with {used} used per token")
    rope = dict(config.get("rope_scaling") or {})
    params = config.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), dict):  # per layer type (gemma3): the global layers' rope
        params = params["full_attention"]
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if not rope and params.get("rope_type", "default") != "default":
        rope = dict(params)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise OptcError(f"the GGUF backend does not support rope scaling '{rope_type}' of architecture '{arch_label}'")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
    rope_dims = int(head_dim * float(1.0 if partial is None else partial))
    name = str(config.get("_model_name_or_path") or Path(str(config.get("_name_or_path") or "model")).name or "model")
    return LlamaConfig(
        arch=ARCHITECTURES[model_type], layout=layout, n_layer=int(get("num_hidden_layers")), n_embd=n_embd,
        n_ff=int(get("intermediate_size", 4 * n_embd)), n_head=n_head,
        n_head_kv=int(get("num_key_value_heads", n_head)), head_dim=head_dim, rope_dims=rope_dims,
        n_ctx=n_ctx, n_vocab=int(get("vocab_size")),
        eps=float(get("layer_norm_eps" if layout.layer_norm else "rms_norm_eps", 1e-5 if layout.layer_norm else 1e-6)),
        rope_theta=float(theta),
        rope_scaling={**rope, "rope_type": rope_type} if rope_type != "default" else {},
        tied=bool(config.get("tie_word_embeddings", False)), name=name, hparams=hparams, warnings=tuple(notes),
    )


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's row permutation from HF rotate-half to llama.cpp's interleaved rope."""
    rows = weights.shape[0]
    return np.ascontiguousarray(
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
    )


def group_qkv_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """A fused projection's rows from per-head `[head, (q, k, v), head_dim]` to all Q, then K, then V
    (convert_hf_to_gguf's GPT-NeoX `query_key_value`); works on weights, biases and per-row scales."""
    return np.ascontiguousarray(
        weights.reshape(n_head, 3, -1, *weights.shape[1:]).swapaxes(0, 1).reshape(weights.shape)
    )


def is_transposed(hf_name: str, layout: GGUFLayout) -> bool:
    """Whether Hugging Face stores this parameter `[in, out]` and the file holds it `[out, in]` (Conv1D)."""
    if not layout.transposed or not hf_name.startswith(layout.layer_prefix):
        return False
    return hf_name[len(layout.layer_prefix):].partition(".")[2] in layout.transposed


def _groups_qkv_rows(hf_name: str, layout: GGUFLayout) -> bool:
    if not layout.qkv_per_head or not hf_name.startswith(layout.layer_prefix):
        return False
    return hf_name[len(layout.layer_prefix):].partition(".")[2] in layout.qkv_per_head


def llama3_rope_factors(cfg: LlamaConfig) -> np.ndarray:
    """`rope_freqs.weight` for `rope_type == "llama3"` (one factor per frequency, as the converter writes)."""
    rope = cfg.rope_scaling
    base, dim = cfg.rope_theta, cfg.head_dim
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# --------------------------------------------------------------------------- tensor plan


@dataclass
class TensorPlan:
    """One GGUF tensor: where its data comes from and how it is encoded."""

    name: str
    source: str  # HF parameter name ("" for generated tensors)
    shape: tuple[int, ...]  # numpy order ([ne1, ne0])
    qtype: str  # GGML type name
    read: Callable[[], np.ndarray]
    imatrix: np.ndarray | None = None
    carried: str = ""
    #: Writes the carried integer codes as they are (when `qtype` is their grid's type).
    transcode: Callable[[], np.ndarray] | None = None

    @property
    def n_per_row(self) -> int:
        return int(self.shape[-1])


def tensor_plan(model: Model, cfg: LlamaConfig | None = None) -> list[TensorPlan]:
    """The file's tensors in order, with their sources and types; clear errors for anything missing."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cfg = cfg or llama_config(model)
    params = collect_parameters(model)
    by_gguf: dict[str, Parameter] = {}
    halves: dict[str, int] = {}  # GGUF name -> which half of a split parameter's rows it holds
    for hf_name, param in params.items():
        gnames = gguf_tensor_names(hf_name, cfg.layout)
        if gnames == ("output.weight",) and param.name != hf_name:
            continue  # a tied alias of the embeddings: llama.cpp reuses token_embd
        if not gnames:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise OptcError(f"the GGUF backend has no {cfg.arch} tensor for parameter '{hf_name}'")
        for half, gname in enumerate(gnames):
            by_gguf[gname] = param
            if len(gnames) > 1:
                halves[gname] = half
    order = ["token_embd.weight", *cfg.layout.leading_names]
    for layer in range(cfg.n_layer):
        order += [f"blk.{layer}.{n}" for n in cfg.layout.layer_order]
    order += ["output_norm.weight", "output_norm.bias", "output.weight"]
    required = {"token_embd.weight", "output_norm.weight", *cfg.layout.leading_names} | (
        {"output_norm.bias"} if cfg.layout.layer_norm else set()) | {
        f"blk.{i}.{n}" for i in range(cfg.n_layer) for n in cfg.layout.layer_order
        if not n.endswith(".bias") or n in cfg.layout.required
    }
    missing = sorted(required - set(by_gguf))
    if missing:
        raise OptcError(
            f"the GGUF backend cannot find weight '{missing[0]}' in the IR"
            f"{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}: no live initializer carries its source parameter name"
        )
    extra = sorted(set(by_gguf) - set(order))
    if extra:
        raise OptcError(f"the GGUF backend has no place for tensor '{extra[0]}' (layer index beyond num_hidden_layers?)")

    plans: list[TensorPlan] = []
    for gname in order:
        param = by_gguf.get(gname)
        if param is None:
            continue
        shape = param.shape
        read = param.read
        transposed = is_transposed(param.name, cfg.layout)
        if transposed:
            if len(shape) != 2:
                raise OptcError(f"{gname}: the parameter '{param.name}' of shape {shape} is not a [in, out] matrix")
            shape = shape[::-1]

            def read(inner: Callable[[], np.ndarray] = read) -> np.ndarray:
                return np.ascontiguousarray(inner().T)
        reorder: Callable[[np.ndarray], np.ndarray] | None = None  # a row permutation the file applies
        if cfg.layout.permute_qk:
            heads = cfg.n_head if ".attn_q." in gname else cfg.n_head_kv if ".attn_k." in gname else 0
            if heads:
                def reorder(rows: np.ndarray, heads: int = heads) -> np.ndarray:
                    return permute_qk(rows, heads)
        if _groups_qkv_rows(param.name, cfg.layout):
            if shape[0] != 3 * cfg.n_head * cfg.head_dim:
                raise OptcError(f"{gname}: '{param.name}' has {shape[0]} rows, not 3 × {cfg.n_head} heads × {cfg.head_dim}")

            def reorder(rows: np.ndarray, heads: int = cfg.n_head) -> np.ndarray:
                return group_qkv_rows(rows, heads)
        if reorder is not None:
            def read(inner: Callable[[], np.ndarray] = read, reorder: Callable = reorder) -> np.ndarray:
                return reorder(inner())
        if gname in halves:
            if len(shape) < 2 or shape[-2] % 2:
                raise OptcError(f"{gname}: the fused parameter '{param.name}' of shape {shape} has no two halves of rows")
            shape = (*shape[:-2], shape[-2] // 2, shape[-1])

            def read(inner: Callable[[], np.ndarray] = read, half: int = halves[gname], rows: int = shape[-2]) -> np.ndarray:
                return np.ascontiguousarray(inner()[..., half * rows:(half + 1) * rows, :])
        shift = cfg.layout.norm_offset - param.offset if len(shape) == 1 and gname.endswith("norm.weight") else -param.offset
        if shift:
            def read(inner: Callable[[], np.ndarray] = read, shift: float = shift) -> np.ndarray:
                return (inner() + np.float32(shift)).astype(np.float32)
        qtype = "F32"
        imatrix = None
        if len(shape) >= 2 and not gname.endswith("_norm.weight"):
            qtype = str(annotation(param.value, GGUF_TYPE) or "F32").upper()
            raw = annotation(param.value, GGUF_IMATRIX)
            imatrix = None if raw is None else np.asarray(raw, dtype=np.float32)
        try:
            gtype = GGMLQuantizationType[qtype]
        except KeyError:
            raise OptcError(f"{gname}: unknown GGUF type '{qtype}'") from None
        if qtype not in ("F32", "F16"):
            block = GGML_QUANT_SIZES[gtype][0]
            if shape[-1] % block:
                raise OptcError(f"{gname}: rows of {shape[-1]} elements do not divide into {qtype} blocks of {block}")
            if imatrix is not None and imatrix.shape[0] != shape[-1]:
                raise OptcError(f"{gname}: importance matrix has {imatrix.shape[0]} entries for rows of {shape[-1]}")
        transcode = None
        carried = param.carried
        if param.grid is not None and param.grid.qtype == qtype and gname not in halves and not transposed:
            def transcode(grid: CarriedGrid = param.grid, reorder: Callable | None = reorder) -> np.ndarray:
                return grid.encode(reorder)
            carried += f", codes kept as {qtype}"
        plans.append(TensorPlan(gname, param.name, tuple(shape), qtype, read, imatrix, carried, transcode))
    if cfg.rope_scaling.get("rope_type") == "llama3":
        factors = llama3_rope_factors(cfg)
        plans.append(TensorPlan("rope_freqs.weight", "", factors.shape, "F32", lambda f=factors: f))
    return plans


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for the pre-tokenizers optc recognizes (None: leave it unset)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"):
            return "qwen2"
    return None


def add_tokenizer(writer: Any, model: Model, n_vocab: int) -> str:
    """Write `tokenizer.ggml.*` from the stored tokenizer files; returns a one-line description."""
    import gguf

    entry = model_metadata(model, TOKENIZER)
    files = (entry or {}).get("files") or {}
    if "tokenizer.json" not in files:
        raise OptcError("the GGUF backend needs the model's tokenizer (tokenizer.json), which this model does not carry")
    tokenizer_json = json.loads(files["tokenizer.json"])
    with tempfile.TemporaryDirectory(prefix="optc-gguf-tok-") as folder:
        for fname, text in files.items():
            (Path(folder) / fname).write_text(text, encoding="utf-8")
        model_type = tokenizer_json.get("model", {}).get("type")
        byte_fallback = tokenizer_json.get("model", {}).get("byte_fallback", False)
        if model_type == "BPE" and not byte_fallback:
            tokens, types = _bpe_tokens(tokenizer_json)
            kind, scores = "gpt2", None
            pre = _pre_tokenizer_name(tokenizer_json)
        elif model_type == "BPE":
            vocab = gguf.vocab.LlamaHfVocab(Path(folder))
            tokens, scores, types = [], [], []
            for text, score, ttype in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(int(ttype))
            kind, pre = "llama", "default"
        else:
            raise OptcError(f"the GGUF backend cannot write a '{model_type}' tokenizer (it writes BPE tokenizers: GPT-2 style or SentencePiece style)")
        if len(tokens) > n_vocab:
            raise OptcError(f"the tokenizer has {len(tokens)} tokens but the embeddings only {n_vocab} rows")
        for i in range(len(tokens), n_vocab):  # as convert_hf_to_gguf pads a short vocabulary
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
            if scores is not None:
                scores.append(-1000.0)
        writer.add_tokenizer_model(kind)
        if pre:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        if scores is not None:
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(folder), load_merges=kind == "gpt2", n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    return f"{kind} tokenizer, {len(tokens)} tokens" + (f", pre-tokenizer {pre}" if pre else "")


def _bpe_tokens(tokenizer_json: dict[str, Any]) -> tuple[list[bytes], list[int]]:
    """Tokens by id and their types (special added tokens CONTROL, other added tokens USER_DEFINED)."""
    import gguf

    vocab: dict[str, int] = dict(tokenizer_json["model"]["vocab"])
    types_by_id: dict[int, int] = {}
    for added in tokenizer_json.get("added_tokens") or []:
        vocab.setdefault(added["content"], int(added["id"]))
        types_by_id[int(added["id"])] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    size = max(vocab.values()) + 1
    by_id: list[str | None] = [None] * size
    for text, index in vocab.items():
        by_id[index] = text
    tokens, types = [], []
    for index, text in enumerate(by_id):
        if text is None:
            tokens.append(f"[PAD{index}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(text.encode("utf-8"))
            types.append(types_by_id.get(index, int(gguf.TokenType.NORMAL)))
    return tokens, types


# --------------------------------------------------------------------------- writing


def _file_type(model: Model, plans: list[TensorPlan]) -> int:
    plan = model_metadata(model, GGUF_PLAN) or {}
    mix = str(plan.get("mix") or "").upper()
    if mix in FILE_TYPES:
        return FILE_TYPES[mix]
    counts: dict[str, int] = {}
    for p in plans:
        if len(p.shape) >= 2:
            counts[p.qtype] = counts.get(p.qtype, 0) + int(np.prod(p.shape))
    top = max(counts, key=lambda k: (counts[k], k)) if counts else "F32"
    return _PURE_FILE_TYPES.get(top, 0)


def encode(
    plan: TensorPlan, *, rows_per_chunk: int | None = None, progress: Callable[[int], None] | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """The tensor's bytes (uint8 `[rows, bytes_per_row]`) or float array, encoded in row chunks (in parallel with `executor`)."""
    from gguf import GGMLQuantizationType

    from optc.backends.gguf.quants import quantize, row_bytes

    if plan.transcode is not None:
        out = plan.transcode()
        if progress:
            progress(int(np.prod(plan.shape)))
        return out
    data = plan.read().astype(np.float32, copy=False)
    if plan.qtype in ("F32", "F16"):
        if progress:
            progress(data.size)
        return np.ascontiguousarray(data if plan.qtype == "F32" else data.astype(np.float16))
    qtype = GGMLQuantizationType[plan.qtype]
    rows = data.reshape(-1, plan.n_per_row)
    step = rows_per_chunk or max(1, _CHUNK_ELEMENTS // plan.n_per_row)
    out = np.empty((rows.shape[0], row_bytes(qtype, plan.n_per_row)), np.uint8)
    starts = range(0, rows.shape[0], step)

    def work(start: int) -> int:
        chunk = rows[start:start + step]
        out[start:start + len(chunk)] = quantize(chunk, qtype, plan.imatrix)
        return chunk.size

    for done in (executor.map(work, starts) if executor is not None else map(work, starts)):
        if progress:
            progress(done)
    return out.reshape(*plan.shape[:-1], out.shape[-1]) if len(plan.shape) > 1 else out.reshape(-1)


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def write_gguf(model: Model, path: Path, *, show_progress: bool = True, threads: int = 0) -> tuple[list[TensorPlan], str]:
    """Write the GGUF file at `path` (not atomically; `GgufBackend.lower` stages it)."""
    import gguf
    from tqdm import tqdm

    from optc.backends.gguf.quants import row_bytes

    cfg = llama_config(model)
    for note in cfg.warnings:
        print(f"optc: warning: {note}", file=sys.stderr)
    plans = tensor_plan(model, cfg)
    embd = next(p for p in plans if p.name == "token_embd.weight")
    n_vocab = int(embd.shape[0])

    writer = gguf.GGUFWriter(str(path), cfg.arch)
    writer.add_name(cfg.name)
    writer.add_quantized_by("optc")
    writer.add_context_length(cfg.n_ctx)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.n_ff)
    for key, value in cfg.hparams.items():  # the architecture's own keys (GGUFLayout.hparams)
        if isinstance(value, bool):
            writer.add_bool(f"{cfg.arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{cfg.arch}.{key}", value)
        else:
            writer.add_float32(f"{cfg.arch}.{key}", float(value))
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_rope_dimension_count(cfg.rope_dims)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.layout.layer_norm:
        writer.add_layer_norm_eps(cfg.eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.eps)
    writer.add_vocab_size(n_vocab)
    if cfg.head_dim != cfg.n_embd // cfg.n_head:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.rope_scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    writer.add_file_type(_file_type(model, plans))
    if any(p.qtype not in ("F32", "F16") for p in plans):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    info = model_metadata(model, GGUF_PLAN) or {}
    imatrix = info.get("imatrix")
    if imatrix:
        writer.add_string("quantize.imatrix.dataset", str(imatrix.get("dataset", "")) or "optc calibration")
        writer.add_uint32("quantize.imatrix.entries_count", int(imatrix.get("entries", 0)))
        writer.add_uint32("quantize.imatrix.chunks_count", int(imatrix.get("chunks", 0)))
    tokenizer_line = add_tokenizer(writer, model, n_vocab)

    for plan in plans:
        if plan.qtype in ("F32", "F16"):
            dtype = np.dtype(np.float32 if plan.qtype == "F32" else np.float16)
            writer.add_tensor_info(plan.name, plan.shape, dtype, int(np.prod(plan.shape)) * dtype.itemsize)
        else:
            qtype = gguf.GGMLQuantizationType[plan.qtype]
            byte_shape = (*plan.shape[:-1], row_bytes(qtype, plan.n_per_row))
            writer.add_tensor_info(plan.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(int(np.prod(p.shape)) for p in plans)
    with tqdm(total=total, desc="gguf encode", unit="w", unit_scale=True, leave=False, disable=None if show_progress else True) as bar, \
            ThreadPoolExecutor(max_workers=threads or _threads()) as pool:
        for plan in plans:  # numpy releases the GIL in its kernels: chunks of a tensor encode in parallel
            writer.write_tensor_data(encode(plan, progress=bar.update, executor=pool))
    writer.close()
    return plans, tokenizer_line


#: The log callback that drops llama.cpp's messages (kept referenced: llama.cpp calls it from C).
_SILENT_LOG_CALLBACK: Any = None


def silence_llama_logs(llama_cpp: Any) -> None:
    """Stop llama.cpp (and ggml) from logging to stderr in this process; optc reports failures itself.

    llama-cpp-python's own callback still prints errors with `verbose=False`
    (a file it cannot load gives several `llama_model_load: error ...` lines);
    optc's contract is one line per failure, so every log message is dropped.
    """
    global _SILENT_LOG_CALLBACK
    if _SILENT_LOG_CALLBACK is None:
        _SILENT_LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_SILENT_LOG_CALLBACK, ctypes.c_void_p(0))


def import_llama_cpp() -> Any:
    """`llama_cpp` with its logging silenced; ImportError when llama-cpp-python is not installed."""
    import llama_cpp

    silence_llama_logs(llama_cpp)
    return llama_cpp


def llama_check(path: Path, prompt_tokens: int = 4) -> str:
    """Load the file in llama.cpp and evaluate a few tokens; one line on success, OptcError otherwise."""
    try:
        llama_cpp = import_llama_cpp()
    except ImportError:
        return "llama-cpp-python is not installed: llama.cpp load check skipped"
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, n_gpu_layers=0, verbose=False)
    except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises ValueError/RuntimeError
        raise OptcError(f"llama.cpp rejected the GGUF file: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    try:
        ids = list(range(min(prompt_tokens, llm.n_vocab())))
        llm.eval(ids)
        # The last position's logits, read from llama.cpp's context itself: llama-cpp-python's `scores`
        # array is allocated uninitialized and is only a copy (a CI run once saw non-finite values there).
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, len(ids) - 1)
        logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()
        if not np.isfinite(logits).all():
            raise OptcError("llama.cpp loaded the GGUF file but its logits are not finite")
        return f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) loaded it and evaluated {len(ids)} tokens"
    finally:
        llm.close()


@register_backend
class GgufBackend(Backend):
    """GGUF for llama.cpp; the file is loaded by llama.cpp before it is kept."""

    name = "gguf"
    suffixes = (".gguf",)

    def written_files(self, output: Path, *, generation: bool = False) -> list[tuple[Path, str]]:
        return [(output, "the output")]

    def lower(self, model: Model, output: Path, context: PassContext) -> Artifact:
        output = Path(output)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            fd, staged_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        except OSError as exc:
            raise WriteError(output, exc) from exc
        os.close(fd)
        staged = Path(staged_name)
        checks: list[str] = []
        try:
            try:
                plans, tokenizer_line = write_gguf(model, staged)
            except OSError as exc:  # a full disk or a file-size limit
                raise WriteError(output, exc) from exc
            counts: dict[str, int] = {}
            for p in plans:
                counts[p.qtype] = counts.get(p.qtype, 0) + 1
            checks.append(f"{len(plans)} tensors ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); {tokenizer_line}")
            if not context.get("backend.skip_runtime_check"):
                checks.append(llama_check(staged))
            umask = os.umask(0)
            os.umask(umask)
            try:
                os.chmod(staged, 0o666 & ~umask)  # mkstemp creates it private; the output gets ordinary permissions
                os.replace(staged, output)
            except OSError as exc:
                raise WriteError(output, exc) from exc
        finally:
            if staged.exists():
                staged.unlink()
        return Artifact(output, self.name, output.stat().st_size, checks)


__all__ = [
    "ARCHITECTURES", "FILE_TYPES", "CarriedGrid", "GGUF_IMATRIX", "GGUF_PLAN", "GgufBackend", "LlamaConfig", "Parameter", "TensorPlan",
    "collect_parameters", "encode", "gguf_tensor_name", "gguf_tensor_names", "group_qkv_rows", "is_transposed", "llama_check",
    "llama_config", "permute_qk",
    "tensor_plan", "write_gguf",
]

# The target's passes register on import (after the backend, which they may use).
from optc.backends.gguf import kquant  # noqa: E402, F401
