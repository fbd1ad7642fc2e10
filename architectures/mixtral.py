"""Mixtral: Mistral with mixture-of-experts MLPs (a router `mlp.gate` and per-expert projections)."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.llama import GGUF as LLAMA_GGUF

_DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
#: llama.cpp runs Mixtral as `llama` with experts: the router `ffn_gate_inp`, the stacked experts `ffn_*_exps`
#: (transformers' fused `gate_up_proj` [experts, 2·ff, hidden] split into its gate and up halves).
MOE_NAMES = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight"}
MOE_SPLIT = {"mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight")}
MOE_ORDER = ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")

GGUF = replace(
    LLAMA_GGUF,
    layer_names={**{k: v for k, v in LLAMA_GGUF.layer_names.items() if k not in _DENSE_MLP}, **MOE_NAMES},
    layer_order=(*(n for n in LLAMA_GGUF.layer_order if not n.startswith("ffn_") or n == "ffn_norm.weight"), *MOE_ORDER),
    split=MOE_SPLIT,
    hparams={"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"},
)

FAMILY = Family(
    name="mixtral", model_types=("mixtral",), task="causal-lm", sliding_window=True, moe=True, gguf_arch="llama",
    gguf=GGUF, keep_float=("lm_head", "*.gate.weight"),
    notes=("the experts are one stacked weight each (gathered per token): rtn quantizes them per expert, gptq and "
           "awq round them to nearest (no per-expert calibration); quantize, sparsify and prune-ffn leave them",),
)
