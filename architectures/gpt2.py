"""GPT-2: fused `c_attn` (Conv1D, [in, out] weights), biases everywhere, LayerNorm, plain GELU MLP, learned positions."""

from optc.architectures.family import Family

FAMILY = Family(
    name="gpt2", model_types=("gpt2",), task="causal-lm", fused_qkv=True, attention_bias=True, mlp_bias=True,
    gated_mlp=False, norm="layernorm", tied_head=True, gguf_arch="gpt2", embeddings=("wte", "wpe"),
)
