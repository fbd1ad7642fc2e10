"""ModernBERT: fused `Wqkv`, GeGLU with a fused `Wi`, pre-LayerNorm without biases, rope, local/global attention."""

from optc.architectures.family import Family

FAMILY = Family(
    name="modernbert", model_types=("modernbert",), task="encoder", fused_qkv=True, fused_gate_up=True,
    norm="layernorm", sliding_window=True, keep_float=(),
)
