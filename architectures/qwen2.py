"""Qwen2 / Qwen2.5: LLaMA's layout with Q/K/V biases; llama.cpp's `qwen2` (NeoX-style rope, no Q/K permutation)."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.llama import GGUF as LLAMA_GGUF

GGUF = replace(LLAMA_GGUF, arch="qwen2", permute_qk=False, required=("attn_q.bias", "attn_k.bias", "attn_v.bias"))

FAMILY = Family(name="qwen2", model_types=("qwen2",), task="causal-lm", attention_bias=True, sliding_window=True,
                gguf_arch="qwen2", gguf=GGUF, genai_type="qwen2")
