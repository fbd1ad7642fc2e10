"""LLaMA (Llama 2/3, SmolLM, TinyLlama …): the reference decoder; every other GGUF layout starts from this one."""

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from optc.architectures.family import Family, GGUFLayout

#: A decoder layer's parameters (names inside `model.layers.N.`) and their GGUF names.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
#: A block's tensors in the order convert_hf_to_gguf.py writes them.
LAYER_ORDER = (
    "attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight", "attn_v.bias",
    "attn_output.weight", "attn_output.bias", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
)

GGUF = GGUFLayout("llama", LAYER_NAMES, GLOBAL_NAMES, LAYER_ORDER, permute_qk=True)


def with_norms(arch: str, *, before_attention: Mapping[str, str] = MappingProxyType({}),
               after_attention: Mapping[str, str] = MappingProxyType({}), after_mlp: Mapping[str, str] = MappingProxyType({}),
               **changes: Any) -> GGUFLayout:
    """LLaMA's projection weights (no biases) with a family's own norms, NeoX rope (Q/K rows not permuted).

    Each slot maps a norm's parameter name to its GGUF name, in the order convert_hf_to_gguf.py writes them
    there: before the attention projections, between attention and MLP, after the MLP.
    """
    attention = {k: v for k, v in LAYER_NAMES.items() if k.startswith("self_attn.") and k.endswith("proj.weight")}
    mlp = {k: v for k, v in LAYER_NAMES.items() if k.startswith("mlp.")}
    slots = (before_attention, attention, after_attention, mlp, after_mlp)
    names = {k: v for slot in slots for k, v in slot.items()}
    return replace(GGUF, arch=arch, permute_qk=False, layer_names=names, layer_order=tuple(names.values()), **changes)


FAMILY = Family(name="llama", model_types=("llama",), task="causal-lm", gguf_arch="llama", gguf=GGUF,
                genai_type="llama")
