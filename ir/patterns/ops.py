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

#: Integer-arithmetic forms (onnxruntime's QOperator and contrib ops), as opposed to Q/DQ.
INTEGER_OPS: tuple[str, ...] = (
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul",
    "MatMulNBits", "GatherBlockQuantized", "QAttention", "DynamicQuantizeLSTM",
)

#: Ops a weight may pass through between its initializer and the op that reads it.
WEIGHT_VIEW_OPS: tuple[str, ...] = ("DequantizeLinear", "Transpose", "Cast")

#: Normalizations that end in a per-channel scale a rescaling can fold into.
NORM_OPS: tuple[str, ...] = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
