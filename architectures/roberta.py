"""RoBERTa and XLM-RoBERTa: BERT's layout with offset position ids and no token types."""

from optc.architectures.family import Family

FAMILY = Family(
    name="roberta", model_types=("roberta", "xlm-roberta"), task="encoder", attention_bias=True, mlp_bias=True,
    gated_mlp=False, norm="layernorm", keep_float=(), embeddings=("embed", "word_embeddings"),
    position_table="max_position_embeddings", position_offset_key="pad_token_id",
)
