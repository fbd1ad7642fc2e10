"""OLMo 2: norms after attention and MLP (post-norm residual), RMSNorm on the whole Q and K projections."""

from optc.architectures.family import Family

FAMILY = Family(name="olmo2", model_types=("olmo2",), task="causal-lm", qk_norm=True, gguf_arch="olmo2")
