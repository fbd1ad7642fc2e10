"""`kquant`: assign every weight its GGUF type with llama-quantize's rules for a mix, optionally with an importance matrix.

`kquant{mix=Q4_K_M imatrix=true}` annotates each weight (the initializer that
holds it: float, or the integer codes of an earlier weight-only pass) with
`gguf_type` (`optc.ir.annotations.GGUF_TYPE`), which the GGUF backend lowers.
The rules are `llama_tensor_get_type` of llama.cpp's `src/llama-quant.cpp`
for the llama architecture (dense, not 70B):

* default type per mix: Q2_K; Q3_K for Q3_K_S/M/L; Q4_0; Q4_K for
  Q4_K_S/M; Q5_K for Q5_K_S/M; Q6_K; Q8_0;
* the output tensor (and the token embeddings when they are tied) → Q6_K
  unless the mix is Q8_0, or Q8_0 when its rows do not divide into the
  default type's blocks; untied token embeddings keep the default type;
* attn_v, and a fused attn_qkv (phi3, gpt2, gptneox: llama.cpp counts it as a V tensor): Q2_K → Q4_K if n_head/n_head_kv ≥ 4 else Q3_K; Q3_K_M → Q5_K for
  layers < 2 else Q4_K; Q3_K_L → Q5_K; Q4_K_M/Q5_K_M → Q6_K on
  `use_more_bits` layers; Q4_K_S → Q5_K for layers < 4;
* ffn_down: Q2_K → Q3_K; Q3_K_M → Q5_K for layers < n/16 else Q4_K;
  Q3_K_L → Q5_K; Q4_K_M/Q5_K_M → Q6_K on `use_more_bits` layers; Q4_K_S →
  Q5_K for layers < n/8; Q4_0 with an importance matrix → Q4_1 for layers < n/8;
* attn_output: Q2_K → Q3_K; Q3_K_M → Q4_K; Q3_K_L → Q5_K;
* `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`;
* fallbacks when a row (`ne[0]`, the input features) does not divide into
  256: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; F16 when
  the fallback does not divide either.

Weights an earlier weight-only pass quantized keep their codes when a GGUF
type holds them exactly (int4 symmetric → Q4_0, uint4 with zero point →
Q4_1, int8 symmetric → Q8_0, blocks of 32 along K): they get that type
instead of the mix's (statistic `carried-exactly`); other carried weights
get the mix's type and are encoded from their exact dequantized values.
Norms and other 1-D tensors stay F32. With `imatrix=true` the activation
input of every weighted op is measured over the calibration data (streaming,
`activation-stats`): the per-input-column mean of x², llama.cpp's importance
matrix, is stored with the weight (`gguf_imatrix`), and the encoder then
minimizes the error weighted by it (ggml's `_impl` quantizers). The pass
changes no weights, so every analysis stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from optc.errors import OptcError, PreconditionError
from optc.ir import Model, annotate, is_constant, model_metadata, set_model_metadata
from optc.ir.annotations import GGUF_IMATRIX, GGUF_PLAN, GGUF_TYPE, SOURCE_NAME, annotation
from optc.ir.patterns.ops import GEMM_OPS, WEIGHT_VIEW_OPS
from optc.ir.patterns.weights import weight_view
from optc.passes.infra.analysis import AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass

Mix = Literal["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
MIXES: tuple[str, ...] = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")

DEFAULT_TYPE = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_0": "Q4_0",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
}
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class TensorInfo:
    """What the rules look at: the GGUF name, `ne[0]` (input features), the dimension count, the layer."""

    name: str
    ne0: int
    n_dims: int
    layer: int = -1


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_qkv.weight", "attn_output.weight"):
        if key in name:
            return key.removesuffix(".weight")
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


#: Tensors llama-quantize leaves as they are: MoE routers, position embeddings, BERT's token types.
_NEVER_QUANTIZED = ("ffn_gate_inp.weight", "position_embd.weight", "token_types.weight")


def allows_quantization(info: TensorInfo) -> bool:
    return (info.n_dims >= 2 and info.name.endswith("weight") and "_norm.weight" not in info.name
            and not info.name.endswith(_NEVER_QUANTIZED))


def fallback(qtype: str, ne0: int) -> tuple[str, bool]:
    """The type a row of `ne0` elements can hold (`tensor_type_fallback`), and whether it fell back."""
    if ne0 % BLOCK[qtype] == 0:
        return qtype, False
    new = FALLBACK.get(qtype, "F16")
    if new != "F16" and ne0 % BLOCK[new]:
        new = "F16"
    return new, True


def tensor_type(
    mix: str, info: TensorInfo, *, n_layer: int, n_gqa: float, tied: bool, has_imatrix: bool,
) -> tuple[str, bool]:
    """llama-quantize's type for one tensor of a mix (llama architecture), and whether it fell back."""
    if not allows_quantization(info):
        return "F32", False
    new = DEFAULT_TYPE[mix]
    cat = _category(info.name)
    i = info.layer
    if cat == "output" or (tied and cat == "token_embd"):
        if info.ne0 % BLOCK[new]:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif cat == "token_embd":
        pass
    elif cat in ("attn_v", "attn_qkv"):  # llama.cpp counts a fused attn_qkv as a V tensor
        if mix == "Q2_K":
            new = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layer):
            new = "Q6_K"
        elif mix == "Q4_K_S" and i < 4:
            new = "Q5_K"
    elif cat == "ffn_down":
        if mix == "Q2_K":
            new = "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < n_layer // 16 else "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix == "Q4_K_M":
            if use_more_bits(i, n_layer):
                new = "Q6_K"
        elif mix == "Q5_K_M" and use_more_bits(i, n_layer):
            new = "Q6_K"
        elif mix == "Q4_K_S" and i < n_layer // 8:
            new = "Q5_K"
        elif mix == "Q4_0" and has_imatrix and i < n_layer // 8:
            new = "Q4_1"
    elif cat == "attn_output":
        if mix == "Q2_K":
            new = "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
    return fallback(new, info.ne0)


#: What a weight may pass through on its way to a linear layer in a model from GGUF or Hugging Face:
#: the weight view's ops, plus the Identity and Reshape some exporters leave in front of a weight.
_SOURCE_PATH_OPS = (*WEIGHT_VIEW_OPS, "Identity", "Reshape")


def _weight_sources(model: Model) -> dict[str, str]:
    """Source parameter name → the activation its weighted op reads (through DQ/Transpose/Cast/Reshape)."""
    initializers = model.graph.initializers
    found: dict[str, str] = {}
    for node in model.graph:
        view = weight_view(node, through=_SOURCE_PATH_OPS, ops=GEMM_OPS,
                           is_source=lambda v: is_constant(v) and v.name in initializers)
        if view is None:
            continue
        name = annotation(view.constant, SOURCE_NAME)
        if name and name not in found:
            found[name] = node.inputs[0].name
    return found


@register_pass("kquant")
class KQuant(Pass):
    """Assign GGUF types (llama-quantize's per-tensor rules for a mix); imatrix=true adds optc's importance matrix."""

    @dataclass
    class Options:
        mix: Mix = option("Q4_K_M", help="the llama-quantize mix whose per-tensor rules to follow")
        imatrix: bool = option(False, help="weight the quantization error by the calibration data's per-column mean of x² (needs --calib)")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        from optc.backends.gguf import (
            Parameter,
            collect_parameters,
            gguf_tensor_names,
            is_transposed,
            llama_config,
        )

        opts = self.options
        try:
            cfg = llama_config(model)
        except OptcError as exc:  # not a model the GGUF backend can write: the pass does not apply
            raise PreconditionError(f"kquant: {exc}") from exc
        params = collect_parameters(model)
        entries: list[tuple[TensorInfo, Parameter, str]] = []
        seen: set[int] = set()
        for param in params.values():
            if id(param.value) in seen:
                continue  # a tied alias: the embeddings' one tensor
            seen.add(id(param.value))
            for gname in gguf_tensor_names(param.name, cfg.layout):  # two for a fused parameter the file splits
                layer = int(gname.split(".")[1]) if gname.startswith("blk.") else -1
                ne0 = int(param.shape[0] if is_transposed(param.name, cfg.layout) else param.shape[-1])
                entries.append((TensorInfo(gname, ne0, len(param.shape), layer), param, param.name))
        if not entries:
            am.context.remark("missed", f"none of {len(seen)} weights has a GGUF tensor name", matched_none=True)
        elif len(entries) < len(seen):
            am.context.remark("analysis", f"{len(seen) - len(entries)} of {len(seen)} weights have no GGUF tensor name")
        names = {info.name for info, _, _ in entries}
        assigned: dict[int, tuple[str, str]] = {}
        tied = "output.weight" not in names
        n_gqa = cfg.n_head / cfg.n_head_kv

        imatrix: dict[str, object] = {}
        imatrix_info = None
        if opts.imatrix:
            imatrix, imatrix_info = self._imatrix(model, am, [hf for _, _, hf in entries])

        stats: dict[str, int | float] = {}
        for info, param, hf_name in entries:
            value = param.value
            qtype, fell_back = tensor_type(opts.mix, info, n_layer=cfg.n_layer, n_gqa=n_gqa, tied=tied, has_imatrix=opts.imatrix)
            if param.grid is not None and qtype not in ("F32", "F16"):
                qtype, fell_back = param.grid.qtype, False  # codes of an earlier pass, kept exactly
                stats["carried-exactly"] = stats.get("carried-exactly", 0) + 1
            earlier = assigned.setdefault(id(value), (info.name, qtype))
            if earlier[1] != qtype:  # one initializer, one type: the halves of a split parameter must agree
                raise OptcError(f"kquant: {earlier[0]} and {info.name} come from one parameter ({hf_name}) "
                                f"but the {opts.mix} rules give them {earlier[1]} and {qtype}")
            annotate(value, GGUF_TYPE, qtype)
            column = imatrix.get(hf_name)
            annotate(value, GGUF_IMATRIX, None if column is None or qtype in ("F32", "F16") else [float(x) for x in column])
            stats[f"tensors-{qtype}"] = stats.get(f"tensors-{qtype}", 0) + 1
            if fell_back:
                stats["fallbacks"] = stats.get("fallbacks", 0) + 1
        if stats.get("fallbacks"):
            am.context.remark("analysis", f"{stats['fallbacks']} of {len(entries)} tensors fell back to another type: "
                                          "their rows do not divide into the type's blocks (as llama-quantize does)")
        if opts.imatrix:
            stats["imatrix-entries"] = len(imatrix)
        plan = dict(model_metadata(model, GGUF_PLAN) or {})
        plan.update({"mix": opts.mix, "imatrix": imatrix_info})
        set_model_metadata(model, GGUF_PLAN, plan)
        return PassResult(model, True, PreservedAnalyses.all(), stats)

    def _imatrix(self, model: Model, am: AnalysisManager, sources: list[str]) -> tuple[dict[str, object], dict]:
        """Per weight: the mean of x² of each input column of its op over the calibration data."""
        from optc.passes.analyses.activation_stats import ActivationStats
        from optc.passes.infra.calibration import calibration_spec

        spec = calibration_spec(model, am.context)
        inputs = _weight_sources(model)
        values = sorted({inputs[s] for s in sources if s in inputs})
        if not values:
            raise OptcError("kquant imatrix=true: no weighted op reads the model's weights, so there is nothing to measure")
        measured = am.get(ActivationStats, model, values=values)
        result: dict[str, object] = {}
        chunks = 0
        for source in sources:
            value = inputs.get(source)
            if value is None:
                continue
            st = measured[value]
            column = st.channel_meansq
            if column is not None:
                result[source] = column.astype("float32")
                chunks = max(chunks, st.samples)
        return result, {"dataset": spec, "entries": len(result), "chunks": chunks}


__all__ = ["MIXES", "KQuant", "TensorInfo", "allows_quantization", "fallback", "tensor_type", "use_more_bits"]
