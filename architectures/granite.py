"""Granite (3.x): LLaMA's layout with scalar multipliers on embeddings, residuals, attention and logits."""

from dataclasses import replace

from optc.architectures.family import Family
from optc.architectures.llama import GGUF as LLAMA_GGUF

#: LLaMA's tensors (and Q/K permutation); the four multipliers as llama.cpp's `granite.*` keys.
GGUF = replace(LLAMA_GGUF, arch="granite", hparams={
    "embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
    "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling",
})

FAMILY = Family(name="granite", model_types=("granite",), task="causal-lm", embedding_scale=True, tied_head=True,
                gguf_arch="granite", gguf=GGUF)
