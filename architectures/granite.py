"""Granite (3.x): LLaMA's layout with scalar multipliers on embeddings, residuals, attention and logits."""

from optc.architectures.family import Family

FAMILY = Family(name="granite", model_types=("granite",), task="causal-lm", embedding_scale=True, tied_head=True,
                gguf_arch="granite")
