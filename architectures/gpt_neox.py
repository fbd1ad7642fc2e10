"""GPT-NeoX / Pythia: fused `query_key_value` (heads interleaved), parallel attention and MLP, LayerNorm, partial rope."""

from optc.architectures.family import Family, GGUFLayout

_LAYER = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
          "post_attention_layernorm": "ffn_norm", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
#: llama.cpp's `gptneox` (convert_hf_to_gguf.py's GPTNeoXModel): `query_key_value`'s per-head [q, k, v] rows
#: regrouped as all Q, all K, all V; NeoX rope on the first `rope.dimension_count` values of each head;
#: `use_parallel_residual` read from the file; its MLP is always GELU.
GGUF = GGUFLayout(
    "gptneox",
    layer_names={f"{hf}.{kind}": f"{gg}.{kind}" for hf, gg in _LAYER.items() for kind in ("weight", "bias")},
    global_names={"gpt_neox.embed_in.weight": "token_embd.weight", "gpt_neox.final_layer_norm.weight": "output_norm.weight",
                  "gpt_neox.final_layer_norm.bias": "output_norm.bias", "embed_out.weight": "output.weight",
                  "lm_head.weight": "output.weight"},  # transformers 5 names the head lm_head
    layer_order=tuple(f"{gg}.{kind}" for gg in _LAYER.values() for kind in ("weight", "bias")),
    required=tuple(f"{gg}.bias" for gg in _LAYER.values()),
    layer_prefix="gpt_neox.layers.",
    hparams={"use_parallel_residual": "use_parallel_residual"},
    fixed={"hidden_act": "gelu"},
    layer_norm=True,
    qkv_per_head=("attention.query_key_value.weight", "attention.query_key_value.bias"),
)

FAMILY = Family(
    name="gpt_neox", model_types=("gpt_neox",), task="causal-lm", fused_qkv=True, attention_bias=True, mlp_bias=True,
    parallel_blocks=True, gated_mlp=False, norm="layernorm", gguf_arch="gptneox", gguf=GGUF,
    keep_float=("lm_head", "embed_out"),
)
