"""Gemma 3 (text): Gemma 2's layout with QK-norm and local/global rope bases."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.gemma2 import GGUF as GEMMA2_GGUF

#: Gemma 2's tensors plus per-head Q/K norms (also 1 + w); no attention soft-capping.
GGUF = replace(
    GEMMA2_GGUF, arch="gemma3",
    layer_names={**GEMMA2_GGUF.layer_names, "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight"},
    layer_order=(*GEMMA2_GGUF.layer_order[:4], "attn_q_norm.weight", "attn_k_norm.weight", *GEMMA2_GGUF.layer_order[4:]),
    hparams={"final_logit_softcapping": "final_logit_softcapping", "attention.sliding_window": "sliding_window"},
)

FAMILY = Family(name="gemma3_text", model_types=("gemma3_text",), task="causal-lm", norm_offset=True,
                embedding_scale=True, tied_head=True, sliding_window=True, qk_norm=True, gguf_arch="gemma3", gguf=GGUF)
