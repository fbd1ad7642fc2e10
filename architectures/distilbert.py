"""DistilBERT: BERT's layout, six layers, no token types (`q_lin`/`k_lin`/`v_lin`, `ffn.lin1`/`lin2`)."""

from optc.architectures.family import Family

FAMILY = Family(
    name="distilbert", model_types=("distilbert",), task="encoder", attention_bias=True, mlp_bias=True,
    gated_mlp=False, norm="layernorm", keep_float=(), embeddings=("embed", "word_embeddings"),
    position_table="max_position_embeddings",
)
