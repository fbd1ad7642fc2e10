"""Gemma 2: RMSNorm with the +1 offset, sqrt(hidden) embedding scale, tied head, four norms per layer, GeGLU,
alternating sliding-window layers, logit soft-capping."""

from optc.architectures.family import Family
from optc.architectures.llama import with_norms

#: llama.cpp's `gemma2` (convert_hf_to_gguf.py's Gemma2Model): four norms per layer, stored as 1 + w; NeoX rope;
#: queries scaled by 1/sqrt(head_dim), which is what `query_pre_attn_scalar` must say.
GGUF = with_norms(
    "gemma2",
    before_attention={"input_layernorm.weight": "attn_norm.weight"},
    after_attention={"post_attention_layernorm.weight": "post_attention_norm.weight",
                     "pre_feedforward_layernorm.weight": "ffn_norm.weight"},
    after_mlp={"post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
    norm_offset=1.0,
    hparams={"attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping",
             "attention.sliding_window": "sliding_window"},
    head_dim_keys=("query_pre_attn_scalar",),
)

FAMILY = Family(name="gemma2", model_types=("gemma2",), task="causal-lm", norm_offset=True, embedding_scale=True,
                tied_head=True, sliding_window=True, gguf_arch="gemma2", gguf=GGUF)
