"""OLMo 2: norms after attention and MLP (post-norm residual), RMSNorm on the whole Q and K projections."""

from optc.architectures.family import Family
from optc.architectures.llama import with_norms

#: llama.cpp's `olmo2`: no pre-norms; the norms after attention and MLP, and Q/K norms over the whole projection.
GGUF = with_norms(
    "olmo2",
    after_attention={"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                     "post_attention_layernorm.weight": "post_attention_norm.weight"},
    after_mlp={"post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
)

FAMILY = Family(name="olmo2", model_types=("olmo2",), task="causal-lm", qk_norm=True, gguf_arch="olmo2", gguf=GGUF)
