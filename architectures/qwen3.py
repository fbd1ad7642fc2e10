"""Qwen3: Qwen2 without Q/K/V biases, with RMSNorm on each head's queries and keys (llama.cpp's `qwen3`)."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.llama import GGUF as LLAMA_GGUF

_ATTENTION_ORDER = tuple(n for n in LLAMA_GGUF.layer_order if not n.endswith(".bias"))
#: LLaMA's names without the biases (llama.cpp's `qwen3` loads none: a checkpoint with them is refused) plus
#: the per-head Q/K norms (convert_hf_to_gguf.py: attn_q_norm / attn_k_norm); NeoX-style rope.
GGUF = replace(
    LLAMA_GGUF, arch="qwen3", permute_qk=False,
    layer_names={**{k: v for k, v in LLAMA_GGUF.layer_names.items() if not k.endswith(".bias")},
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"},
    layer_order=(*_ATTENTION_ORDER[:5], "attn_q_norm.weight", "attn_k_norm.weight", *_ATTENTION_ORDER[5:]),
)

FAMILY = Family(name="qwen3", model_types=("qwen3",), task="causal-lm", qk_norm=True, sliding_window=True,
                gguf_arch="qwen3", gguf=GGUF, genai_type="qwen3")
