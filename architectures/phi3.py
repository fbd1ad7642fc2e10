"""Phi-3: fused `qkv_proj` and `gate_up_proj` (llama.cpp's `phi3` keeps them fused as attn_qkv / ffn_up)."""

from optc.architectures.family import Family

FAMILY = Family(name="phi3", model_types=("phi3",), task="causal-lm", fused_qkv=True, fused_gate_up=True,
                sliding_window=True, gguf_arch="phi3")
