"""GPT-NeoX / Pythia: fused `query_key_value` (heads interleaved), parallel attention and MLP, LayerNorm, partial rope."""

from optc.architectures.family import Family

FAMILY = Family(
    name="gpt_neox", model_types=("gpt_neox",), task="causal-lm", fused_qkv=True, attention_bias=True, mlp_bias=True,
    parallel_blocks=True, gated_mlp=False, norm="layernorm", gguf_arch="gptneox",
    keep_float=("embed_out",),
)
