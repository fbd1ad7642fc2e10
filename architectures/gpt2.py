"""GPT-2: fused `c_attn` (Conv1D, [in, out] weights), biases everywhere, LayerNorm, plain GELU MLP, learned positions."""

from optc.architectures.family import Family, GGUFLayout

_LINEAR = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_NORMS = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}
#: llama.cpp's `gpt2` (convert_hf_to_gguf.py's GPT2Model): Conv1D weights transposed to [out, in], learned
#: positions as `position_embd`, LayerNorms with biases; the tanh GELU (`gelu_new`) and 1/sqrt(head_dim) scores.
GGUF = GGUFLayout(
    "gpt2",
    layer_names={f"{hf}.{kind}": f"{gg}.{kind}" for hf, gg in {**_NORMS, **_LINEAR}.items() for kind in ("weight", "bias")},
    global_names={"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                  "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                  "lm_head.weight": "output.weight"},
    layer_order=tuple(f"{gg}.{kind}" for gg in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
                      for kind in ("weight", "bias")),
    required=tuple(f"{gg}.bias" for gg in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")),
    layer_prefix="transformer.h.",
    config_keys={"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                 "max_position_embeddings": "n_positions", "intermediate_size": "n_inner",
                 "layer_norm_eps": "layer_norm_epsilon"},
    fixed={"activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False},
    layer_norm=True,
    transposed=tuple(f"{hf}.weight" for hf in _LINEAR),
    leading_names=("position_embd.weight",),
)

FAMILY = Family(
    name="gpt2", model_types=("gpt2",), task="causal-lm", fused_qkv=True, attention_bias=True, mlp_bias=True,
    gated_mlp=False, norm="layernorm", tied_head=True, gguf_arch="gpt2", gguf=GGUF, embeddings=("wte", "wpe"),
    position_table="n_positions",
)
