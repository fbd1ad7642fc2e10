"""Qwen3-MoE: Qwen3 with mixture-of-experts MLPs (router `mlp.gate`), llama.cpp's `qwen3moe`."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.mixtral import MOE_NAMES, MOE_ORDER, MOE_SPLIT
from optc.architectures.qwen3 import GGUF as QWEN3_GGUF

_DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
#: Qwen3's attention (Q/K norms, NeoX rope) with Mixtral's expert tensors; llama.cpp always renormalizes the
#: chosen experts' weights, which is `norm_topk_prob`.
GGUF = replace(
    QWEN3_GGUF, arch="qwen3moe",
    layer_names={**{k: v for k, v in QWEN3_GGUF.layer_names.items() if k not in _DENSE_MLP}, **MOE_NAMES},
    layer_order=(*(n for n in QWEN3_GGUF.layer_order if not n.startswith("ffn_") or n == "ffn_norm.weight"), *MOE_ORDER),
    split=MOE_SPLIT,
    hparams={"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok",
             "expert_feed_forward_length": "moe_intermediate_size"},
    fixed={"norm_topk_prob": True},
)

FAMILY = Family(
    name="qwen3_moe", model_types=("qwen3_moe",), task="causal-lm", qk_norm=True, moe=True, sliding_window=True,
    gguf_arch="qwen3moe", gguf=GGUF, keep_float=("lm_head", "*.gate.weight"),
    notes=("the experts are one stacked weight each (gathered per token): rtn quantizes them per expert, gptq and "
           "awq round them to nearest (no per-expert calibration); quantize, sparsify and prune-ffn leave them",),
)
