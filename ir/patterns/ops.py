"""Op classes: the one definition of each set of ONNX op types optc's passes match on."""

from __future__ import annotations

#: Ops whose second input is a weight (X·W or a convolution filter).
GEMM_OPS: tuple[str, ...] = ("MatMul", "Gemm")
CONV_OPS: tuple[str, ...] = ("Conv", "ConvTranspose")
WEIGHTED_OPS: tuple[str, ...] = (*GEMM_OPS, *CONV_OPS)
#: The weighted ops static INT8/FP8 quantization handles (`quantize`, and the activations its calibration
#: measures): ConvTranspose stays float.
QUANTIZED_OPS: tuple[str, ...] = (*GEMM_OPS, "Conv")

#: Standard quantize/dequantize ops, and the dynamic one TensorRT cannot import.
QDQ_OPS: tuple[str, ...] = ("QuantizeLinear", "DequantizeLinear")
DYNAMIC_QDQ_OPS: tuple[str, ...] = ("DynamicQuantizeLinear",)
#: Ops that carry quantization rather than compute a layer.
QUANTIZATION_OPS: tuple[str, ...] = (*QDQ_OPS, *DYNAMIC_QDQ_OPS)

#: Integer-arithmetic forms (onnxruntime's QOperator and contrib ops), as opposed to Q/DQ.
INTEGER_OPS: tuple[str, ...] = (
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul",
    "MatMulNBits", "GatherBlockQuantized", "QAttention", "DynamicQuantizeLSTM",
)

#: Ops a weight may pass through between its initializer and the op that reads it.
WEIGHT_VIEW_OPS: tuple[str, ...] = ("DequantizeLinear", "Transpose", "Cast")

#: Normalizations that end in a per-channel scale a rescaling can fold into.
NORM_OPS: tuple[str, ...] = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")

#: Elementwise ops a matcher may walk through between two layers (attention's mask and score math, gates).
ELEMENTWISE_OPS: frozenset[str] = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Where", "IsNaN", "Softmax", "Cast", "Sigmoid", "Tanh", "Relu",
    "Identity", "Erf", "Sqrt", "Reciprocal", "Pow", "Exp", "Max", "Min", "Clip", "Dropout",
})
#: Ops that only move data (reshape, broadcast, slice, join): the values they read pass through unchanged.
DATA_MOVEMENT_OPS: frozenset[str] = frozenset(
    {"Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Slice", "Split", "Concat"}
)
#: Ops that change only a tensor's layout (attention's head split and merge).
LAYOUT_OPS: frozenset[str] = frozenset({"Reshape", "Transpose"})
#: Ops between attention's score MatMul and its weighted-sum MatMul (scale, mask, softmax, dropout, and
#: Gemma 2's logit softcapping `cap·tanh(s / cap)`).
ATTENTION_SCORE_OPS: frozenset[str] = frozenset(
    {"Softmax", "Where", "IsNaN", "Add", "Mul", "Div", "Cast", "Sub", "Dropout", "Identity", "Tanh"}
)
#: The reductions and elementwise ops a normalization written out op by op is made of (x / sqrt(mean(x²) + eps)).
REDUCTION_OPS: frozenset[str] = frozenset({"ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum"})
NORM_PATH_OPS: frozenset[str] = frozenset({"Reciprocal", "Sqrt", "Add", "Pow", "Mul", "Div", "Cast", "Sub", "Max", "Clip"})
