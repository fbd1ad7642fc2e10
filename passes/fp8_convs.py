"""Which Conv layers TensorRT can run in FP8 (E4M3).

TensorRT's FP8 convolution kernels need at least 16 input channels per group
and 16 output channels, and a filter of at most 32 taps (3x3 and 5x5 pass,
7x7 does not). NVIDIA's Model Optimizer leaves every other Conv out of FP8
quantization (`modelopt.onnx.quantization.graph_utils.
find_nodes_from_convs_to_exclude`, `quantize_mode="fp8"`); a strongly-typed
engine has no fallback precision for a Conv that its Q/DQ makes FP8.

`quantize` keeps such Convs float when it quantizes to FP8, and `trt-check`
reports any that a model quantizes anyway (rule `fp8-conv-shape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

#: The fewest input channels (per group) and output channels of an FP8 Conv.
FP8_CONV_MIN_CHANNELS = 16
#: The most filter taps (the product of the kernel's spatial sizes) of an FP8 Conv.
FP8_CONV_MAX_TAPS = 32


def fp8_conv_unsupported(weight_shape: Sequence[int] | None) -> str | None:
    """Why TensorRT has no FP8 kernel for a Conv of weight `[M, C/group, k...]`, or None when it has one."""
    if weight_shape is None or len(weight_shape) < 3 or any(not isinstance(d, int) for d in weight_shape):
        return "its weight shape is unknown"
    out_channels, in_channels = int(weight_shape[0]), int(weight_shape[1])
    if in_channels < FP8_CONV_MIN_CHANNELS or out_channels < FP8_CONV_MIN_CHANNELS:
        return (f"{in_channels} input channels per group and {out_channels} output channels "
                f"(FP8 convolutions need at least {FP8_CONV_MIN_CHANNELS} of each)")
    taps = prod(int(d) for d in weight_shape[2:])
    if taps > FP8_CONV_MAX_TAPS:
        return f"a {'x'.join(str(int(d)) for d in weight_shape[2:])} filter ({taps} taps; FP8 convolutions take at most {FP8_CONV_MAX_TAPS})"
    return None


__all__ = ["FP8_CONV_MAX_TAPS", "FP8_CONV_MIN_CHANNELS", "fp8_conv_unsupported"]
