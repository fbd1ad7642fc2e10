"""OLMo 2: norms after attention and MLP (post-norm residual), RMSNorm on the whole Q and K projections."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.llama import GGUF as LLAMA_GGUF

_PROJECTIONS = {k: v for k, v in LLAMA_GGUF.layer_names.items() if k.endswith("proj.weight")}
#: llama.cpp's `olmo2`: no pre-norms; the norms after attention and MLP, and Q/K norms over the whole projection.
GGUF = replace(
    LLAMA_GGUF, arch="olmo2", permute_qk=False,
    layer_names={**_PROJECTIONS, "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
    layer_order=("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q_norm.weight",
                 "attn_k_norm.weight", "post_attention_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                 "ffn_down.weight", "post_ffw_norm.weight"),
)

FAMILY = Family(name="olmo2", model_types=("olmo2",), task="causal-lm", qk_norm=True, gguf_arch="olmo2", gguf=GGUF)
