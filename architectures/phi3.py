"""Phi-3: fused `qkv_proj` and `gate_up_proj` (llama.cpp's `phi3` keeps them fused as attn_qkv / ffn_up)."""

from optc.architectures.family import Family, GGUFLayout

#: llama.cpp's `phi3` (convert_hf_to_gguf.py's Phi3MiniModel): Q, K and V rows in one `attn_qkv`, the gate
#: and up rows in one `ffn_up` (gate first, as llama.cpp's fused SwiGLU reads them); NeoX rope, no permutation;
#: llama.cpp reads the sliding window but runs phi3 with full attention ("Phi SWA is currently disabled").
GGUF = GGUFLayout(
    "phi3",
    layer_names={
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    },
    global_names={"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"},
    layer_order=("attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                 "ffn_down.weight"),
    hparams={"attention.sliding_window": "sliding_window"},
    fixed={"hidden_act": "silu"},
    full_attention=True,
)

FAMILY = Family(name="phi3", model_types=("phi3",), task="causal-lm", fused_qkv=True, fused_gate_up=True,
                sliding_window=True, gguf_arch="phi3", gguf=GGUF, genai_type="phi3")
