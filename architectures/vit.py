"""ViT: patch-embedding convolution, pre-LayerNorm encoder with biases, plain GELU MLP, a classifier head."""

from optc.architectures.family import Family

FAMILY = Family(
    name="vit", model_types=("vit",), task="vision", attention_bias=True, mlp_bias=True, gated_mlp=False,
    norm="layernorm", keep_float=("classifier",), embeddings=("embed",),
)
