"""Tiny random transformer blocks for the calibration, SmoothQuant and quantization tests.

All builders return an `onnx.ModelProto` (opset 21, checked) with seeded
weights, symbolic `batch`/`seq` axes and value names that tests look up:

* `llama_block(...)` – Gather embedding → decomposed RMSNorm (as the torch
  exporter emits it: `Mul(g, Mul(x, Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps))))`)
  → q/k/v (`q_proj`, `k_proj`, `v_proj`) → single-head attention → `o_proj`
  → residual → RMSNorm → `gate_proj`/`up_proj` → SiLU gating → `down_proj`
  → residual → final RMSNorm → tied `lm_head` (`MatMul(h, Transpose(embed))`).
  The first norm's weight has outlier channels, so activations have the
  per-channel outliers SmoothQuant is for.
* `bert_block(...)` – `LayerNormalization` → q/k/v with biases → attention →
  output projection → residual → `LayerNormalization` → fc1 (+bias) → Relu →
  fc2 (+bias) → residual; with `decomposed=True` the second norm is written
  out as `Add(Mul(normalized, gamma), beta)`; with `post_ln=True` the residual
  adds read the LayerNorm outputs (original BERT), so each norm output has a
  reader besides the linear layers.
* `conv_gemm()` – Conv (+bias) → Relu → Flatten → Gemm(transB=1, +bias).

Weight initializers are named after the Hugging Face parameters
(`model.layers.0.self_attn.q_proj.weight` …) and also carry that name as
`source_name`, as the transformers frontend records it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optc.ir import set_model_metadata, set_source_name
from tests import models

FLOAT = TensorProto.FLOAT


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32) if array.dtype.kind == "f" else array, name)


def _rms_norm(prefix: str, x: str, weight: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Pow", [x, "two"], [f"{prefix}_pow"], name=f"{prefix}_pow"),
        helper.make_node("ReduceMean", [f"{prefix}_pow", "last_axis"], [f"{prefix}_mean"], name=f"{prefix}_mean"),
        helper.make_node("Add", [f"{prefix}_mean", "eps"], [f"{prefix}_add"], name=f"{prefix}_add"),
        helper.make_node("Sqrt", [f"{prefix}_add"], [f"{prefix}_sqrt"], name=f"{prefix}_sqrt"),
        helper.make_node("Reciprocal", [f"{prefix}_sqrt"], [f"{prefix}_rsqrt"], name=f"{prefix}_rsqrt"),
        helper.make_node("Mul", [x, f"{prefix}_rsqrt"], [f"{prefix}_normed"], name=f"{prefix}_normed"),
        helper.make_node("Mul", [weight, f"{prefix}_normed"], [f"{prefix}_out"], name=f"{prefix}_scale"),
    ]


def llama_block(seed: int = 0, *, vocab: int = 64, hidden: int = 16, ffn: int = 32, outliers: float = 20.0) -> onnx.ModelProto:
    """One LLaMA-style decoder layer between a tied embedding and lm_head (see the module docstring)."""
    rng = np.random.default_rng(seed)
    layer = "model.layers.0"
    names = {
        "embed": "model.embed_tokens.weight",
        "norm1": f"{layer}.input_layernorm.weight",
        "q": f"{layer}.self_attn.q_proj.weight",
        "k": f"{layer}.self_attn.k_proj.weight",
        "v": f"{layer}.self_attn.v_proj.weight",
        "o": f"{layer}.self_attn.o_proj.weight",
        "norm2": f"{layer}.post_attention_layernorm.weight",
        "gate": f"{layer}.mlp.gate_proj.weight",
        "up": f"{layer}.mlp.up_proj.weight",
        "down": f"{layer}.mlp.down_proj.weight",
        "norm": "model.norm.weight",
    }
    norm1 = 1.0 + 0.1 * rng.standard_normal(hidden)
    norm1[[1, 5]] *= outliers
    inits = [
        _init(names["embed"], rng.standard_normal((vocab, hidden))),
        _init(names["norm1"], norm1),
        _init(names["norm2"], 1.0 + 0.1 * rng.standard_normal(hidden)),
        _init(names["norm"], 1.0 + 0.1 * rng.standard_normal(hidden)),
        _init("two", np.array(2.0)),
        _init("eps", np.array(1e-5)),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        _init("attn_scale", np.array(1.0 / np.sqrt(hidden))),
    ]
    for key, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)), ("o", (hidden, hidden)),
                       ("gate", (hidden, ffn)), ("up", (hidden, ffn)), ("down", (ffn, hidden))):
        inits.append(_init(names[key], rng.standard_normal(shape) / np.sqrt(shape[0])))
    nodes = [helper.make_node("Gather", [names["embed"], "input_ids"], ["embedding"], name="embed_tokens")]
    nodes += _rms_norm("input_layernorm", "embedding", names["norm1"])
    h = "input_layernorm_out"
    nodes += [
        helper.make_node("MatMul", [h, names["q"]], ["q"], name="q_proj"),
        helper.make_node("MatMul", [h, names["k"]], ["k"], name="k_proj"),
        helper.make_node("MatMul", [h, names["v"]], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["k_t"], name="k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores_raw"], name="scores"),
        helper.make_node("Mul", ["scores_raw", "attn_scale"], ["scores_scaled"], name="scores_scale"),
        helper.make_node("Softmax", ["scores_scaled"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["attn"], name="attn_values"),
        helper.make_node("MatMul", ["attn", names["o"]], ["o"], name="o_proj"),
        helper.make_node("Add", ["embedding", "o"], ["residual1"], name="residual1"),
    ]
    nodes += _rms_norm("post_attention_layernorm", "residual1", names["norm2"])
    h2 = "post_attention_layernorm_out"
    nodes += [
        helper.make_node("MatMul", [h2, names["gate"]], ["gate"], name="gate_proj"),
        helper.make_node("Sigmoid", ["gate"], ["gate_sigmoid"], name="gate_sigmoid"),
        helper.make_node("Mul", ["gate", "gate_sigmoid"], ["silu"], name="silu"),
        helper.make_node("MatMul", [h2, names["up"]], ["up"], name="up_proj"),
        helper.make_node("Mul", ["silu", "up"], ["gated"], name="gating"),
        helper.make_node("MatMul", ["gated", names["down"]], ["down"], name="down_proj"),
        helper.make_node("Add", ["residual1", "down"], ["residual2"], name="residual2"),
    ]
    nodes += _rms_norm("norm", "residual2", names["norm"])
    nodes += [
        helper.make_node("Transpose", [names["embed"]], ["lm_head_weight"], name="lm_head_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["norm_out", "lm_head_weight"], ["logits"], name="lm_head"),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch", "seq", vocab])]
    return models.make_model(nodes, inputs, outputs, inits, name="llama_block")


def bert_block(
    seed: int = 0, *, hidden: int = 16, ffn: int = 32, decomposed: bool = False, post_ln: bool = False, outliers: float = 10.0
) -> onnx.ModelProto:
    """One BERT-style encoder layer on float input `x` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    gamma1 = 1.0 + 0.1 * rng.standard_normal(hidden)
    gamma1[[2, 7]] *= outliers
    inits = [
        _init("ln1.weight", gamma1),
        _init("ln1.bias", 0.1 * rng.standard_normal(hidden)),
        _init("ln2.weight", 1.0 + 0.1 * rng.standard_normal(hidden)),
        _init("ln2.bias", 0.1 * rng.standard_normal(hidden)),
        _init("attn_scale", np.array(1.0 / np.sqrt(hidden))),
        _init("two", np.array(2.0)),
        _init("eps", np.array(1e-5)),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    for key, shape in (("query", (hidden, hidden)), ("key", (hidden, hidden)), ("value", (hidden, hidden)),
                       ("attention.output.dense", (hidden, hidden)), ("intermediate.dense", (hidden, ffn)),
                       ("output.dense", (ffn, hidden))):
        inits.append(_init(f"encoder.layer.0.{key}.weight", rng.standard_normal(shape) / np.sqrt(shape[0])))
        inits.append(_init(f"encoder.layer.0.{key}.bias", 0.1 * rng.standard_normal(shape[1])))
    w = "encoder.layer.0.{}.weight".format
    b = "encoder.layer.0.{}.bias".format
    nodes = [helper.make_node("LayerNormalization", ["x", "ln1.weight", "ln1.bias"], ["ln1"], name="ln1", axis=-1, epsilon=1e-5)]
    for key in ("query", "key", "value"):
        nodes += [
            helper.make_node("MatMul", ["ln1", w(key)], [f"{key}_mm"], name=f"{key}_mm"),
            helper.make_node("Add", [f"{key}_mm", b(key)], [key], name=f"{key}_bias"),
        ]
    nodes += [
        helper.make_node("Transpose", ["key"], ["key_t"], name="key_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["query", "key_t"], ["scores_raw"], name="scores"),
        helper.make_node("Mul", ["scores_raw", "attn_scale"], ["scores"], name="scores_scale"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "value"], ["context"], name="context"),
        helper.make_node("MatMul", ["context", w("attention.output.dense")], ["attn_out_mm"], name="attn_out_mm"),
        helper.make_node("Add", ["attn_out_mm", b("attention.output.dense")], ["attn_out"], name="attn_out_bias"),
        helper.make_node("Add", ["ln1" if post_ln else "x", "attn_out"], ["residual1"], name="residual1"),
    ]
    if decomposed:
        nodes += [
            helper.make_node("ReduceMean", ["residual1", "last_axis"], ["ln2_mean"], name="ln2_mean"),
            helper.make_node("Sub", ["residual1", "ln2_mean"], ["ln2_centered"], name="ln2_centered"),
            helper.make_node("Pow", ["ln2_centered", "two"], ["ln2_sq"], name="ln2_sq"),
            helper.make_node("ReduceMean", ["ln2_sq", "last_axis"], ["ln2_var"], name="ln2_var"),
            helper.make_node("Add", ["ln2_var", "eps"], ["ln2_var_eps"], name="ln2_var_eps"),
            helper.make_node("Sqrt", ["ln2_var_eps"], ["ln2_std"], name="ln2_std"),
            helper.make_node("Div", ["ln2_centered", "ln2_std"], ["ln2_normed"], name="ln2_normed"),
            helper.make_node("Mul", ["ln2_normed", "ln2.weight"], ["ln2_scaled"], name="ln2_scale"),
            helper.make_node("Add", ["ln2_scaled", "ln2.bias"], ["ln2"], name="ln2_shift"),
        ]
    else:
        nodes.append(
            helper.make_node("LayerNormalization", ["residual1", "ln2.weight", "ln2.bias"], ["ln2"], name="ln2", axis=-1, epsilon=1e-5)
        )
    nodes += [
        helper.make_node("MatMul", ["ln2", w("intermediate.dense")], ["fc1_mm"], name="fc1_mm"),
        helper.make_node("Add", ["fc1_mm", b("intermediate.dense")], ["fc1"], name="fc1_bias"),
        helper.make_node("Relu", ["fc1"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", w("output.dense")], ["fc2_mm"], name="fc2_mm"),
        helper.make_node("Add", ["fc2_mm", b("output.dense")], ["fc2"], name="fc2_bias"),
        helper.make_node("Add", ["ln2" if post_ln else "residual1", "fc2"], ["y"], name="residual2"),
    ]
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["batch", "seq", hidden])]
    outputs = [helper.make_tensor_value_info("y", FLOAT, ["batch", "seq", hidden])]
    return models.make_model(nodes, inputs, outputs, inits, name="bert_block")


def conv_gemm(seed: int = 0) -> onnx.ModelProto:
    """Conv(3→4, 3x3, pad 1) + bias → Relu → Flatten → Gemm(transB=1) to 5 outputs."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("conv.weight", rng.standard_normal((4, 3, 3, 3)) / 5),
        _init("conv.bias", 0.1 * rng.standard_normal(4)),
        _init("fc.weight", rng.standard_normal((5, 4 * 6 * 6)) / 12),
        _init("fc.bias", 0.1 * rng.standard_normal(5)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("Flatten", ["relu"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["batch", 3, 6, 6])]
    outputs = [helper.make_tensor_value_info("y", FLOAT, ["batch", 5])]
    return models.make_model(nodes, inputs, outputs, inits, name="conv_gemm")


def to_ir(proto: onnx.ModelProto, *, vocab: int | None = None):
    """The IR of a builder's proto, with `source_name` on every weight and the vocab size as HF config."""
    model = models.to_ir(proto)
    for name, value in model.graph.initializers.items():
        if name.endswith((".weight", ".bias")):
            set_source_name(value, name)
    if vocab is not None:
        set_model_metadata(model, "hf_config", {"vocab_size": vocab})
    return model


def llama_feeds(seed: int = 0, *, vocab: int = 64, batch: int = 1, seq: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)}


def float_feeds(proto: onnx.ModelProto, seed: int = 0, *, batch: int = 2, seq: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    value = proto.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else (batch if d.dim_param == "batch" else seq) for d in value.type.tensor_type.shape.dim]
    return {value.name: rng.standard_normal(shape).astype(np.float32)}


def sqnr_db(reference: np.ndarray, approximate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σ ref² / Σ (ref − approx)²)."""
    noise = float(np.sum((reference.astype(np.float64) - approximate.astype(np.float64)) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)
