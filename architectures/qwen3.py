"""Qwen3: Qwen2 without Q/K/V biases, with RMSNorm on each head's queries and keys (llama.cpp's `qwen3`)."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.llama import GGUF as LLAMA_GGUF

#: LLaMA's names plus the per-head Q/K norms (convert_hf_to_gguf.py: attn_q_norm / attn_k_norm); NeoX-style rope.
GGUF = replace(
    LLAMA_GGUF, arch="qwen3", permute_qk=False,
    layer_names={**LLAMA_GGUF.layer_names,
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"},
    layer_order=(*LLAMA_GGUF.layer_order[:9], "attn_q_norm.weight", "attn_k_norm.weight", *LLAMA_GGUF.layer_order[9:]),
)

FAMILY = Family(name="qwen3", model_types=("qwen3",), task="causal-lm", qk_norm=True, sliding_window=True,
                gguf_arch="qwen3", gguf=GGUF)
