"""BERT-like encoders (BERT, ELECTRA): post-LayerNorm, biases everywhere, plain GELU MLP, token types."""

from optc.architectures.family import Family

FAMILY = Family(
    name="bert", model_types=("bert", "electra"), task="encoder", attention_bias=True, mlp_bias=True, gated_mlp=False,
    norm="layernorm", gguf_arch="bert", keep_float=(), embeddings=("embed", "word_embeddings"),
    position_table="max_position_embeddings",
)
