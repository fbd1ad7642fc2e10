"""Built-in container passes and named pipelines."""

from optc.passes.infra.pass_manager import Fixpoint
from optc.passes.infra.registry import register_pass, register_pipeline

register_pass("fixpoint")(Fixpoint)

register_pipeline(
    "cleanup",
    "fixpoint(fold-constants,cse,dce),topo-sort",
    "fold constants, merge duplicates and remove dead code until nothing changes",
)

# 8-bit quantization (issue 4). The recipes are what measurements on SmolLM2-135M
# (held-out perplexity against fp32, `optc.evaluate`) found best; see
# passes/transforms/quantize.py and smoothquant.py for the options.
# W8A8: `min-sqnr=26` gives int16 to the activations whose int8 grid loses most, measured on the
# calibration histograms; on SmolLM2 that is exactly the 30 FFN down-projection inputs (7-25 dB;
# every other quantized activation is above 27 dB). With those in int8 too (min-sqnr=20 keeps 11
# in int16) it is 1.025x. The tied lm_head is int8 too (`exclude=""`): smoothing the final norm
# into the shared table (smoothquant keeps it tied) lifts its int8 input to 36 dB; it is the
# largest matmul, so running it on the integer kernel is most of the speed-up. `weight-pair-limit=128`
# makes onnxruntime's fast u8s8 kernel exact on AVX2 CPUs without VNNI (optc.passes.int8_pairs),
# at no measurable cost (1.012x either way). Alpha, measured with the int8 lm_head: 0.55 1.016x,
# 0.65 1.014x, 0.72 1.020x, 0.8 1.020x (tools/bench_w8a8.py, 2026-11-27).
# Issue 19 (2026-12-05): activation ranges at the 99.999th percentile of the calibration histogram
# instead of `calib=mse`, chosen on the development text (stdlib docstrings, fp32 18.299; calibration
# 32x256 of pydoc_data topics): mse 1.038x, entropy 1.022x, percentile 99.99 1.043x, 99.995 1.033x,
# 99.999 1.016x, 99.9999 1.024x; the same weights with float activations 1.010x. MSE ranges fit the
# calibration text and clip what other text reaches (code: 1.036x -> 1.013x). The same 30 int16 inputs.
W8A8 = ('smoothquant{alpha=0.65 exclude=""},'
        'quantize{calib=percentile percentile=99.999 exclude="" embeddings=true min-sqnr=26.0 weight-pair-limit=128}')
# FP8: on SmolLM2 the weights alone cost 1.022x fp32 perplexity and the activations alone 1.015x;
# both everywhere 1.038x; with the FFN down-projections (and lm_head) in float 1.018x
# (tools/quant_sweep.py). E4M3's error is the same relative error on every tensor (~31.6 dB),
# so what decides is where the model amplifies it, which only the end-to-end sweep shows.
FP8 = "quantize{weights=fp8 activations=fp8 exclude=lm_head,down_proj}"

register_pipeline(
    "w8a8",
    W8A8,
    "INT8 weights (per channel, K pairs limited for exact AVX2 kernels) and embeddings (per row), static INT8 "
    "activations after SmoothQuant (ranges at the 99.999th percentile), lm_head included; INT16 where calibration measures int8 below 26 dB SQNR",
)
register_pipeline(
    "fp8", FP8, "FP8 E4M3 weights (per channel) and static per-tensor FP8 activations; FFN down-projections in float"
)

# Weight-only low-bit (issue 5). On SmolLM2-135M at 4 bits, group 128 (held-out perplexity against
# fp32, tools/bench_w4.py): RTN symmetric 1.60x, RTN asymmetric 1.46x, GPTQ symmetric 1.17x, GPTQ
# asymmetric 1.11x. The tied embedding table (= the lm_head) is stored int8 per row: 1.107x either
# way, and the file shrinks from 0.335x to 0.182x fp32 (the float table was 113 MB of 184). A 4-bit
# table would cost quality on the head. Asymmetric grids carry a zero point, which onnxruntime's
# MatMulNBits takes; TensorRT gets them through lower-tensorrt's exact split (or use gptq{symmetric=true}).
# (Issue 19: gptq's own default is now asymmetric too; symmetric=false stays spelled out here.)
# `w4a16-h8` also runs the lm_head (the largest matmul) in W8A8 on the integer kernel, its input
# smoothed into the table (smoothquant after gptq finds only that group: the other layers no longer
# have float weights): 1.111x, 0.181x, and the only 4-bit form measured faster than fp32 on an AVX2
# CPU (0.94-0.98x; onnxruntime's MatMulNBits runs at fp32 speed for a 256-token window, 1.01-1.03x).
# Issue 19, chosen on the development text (stdlib docstrings; calibration 32x256 of pydoc_data topics,
# tools/bench_quality.py). Before gptq weighed its range search by the Hessian diagonal, rotating the
# residual stream first (`rotate`, QuaRot) helped: 1.124x -> 1.080x fp32. With `clip-hessian` (gptq's
# default) the rotation costs instead: the same recipe measures 1.074x without `rotate`, 1.080x with it
# (a rotation evens out the E[x^2] the range search weighs by); the int8 table costs 0.1% against a
# float one (1.073x), and without the untied rotated head the file is 0.182x fp32 instead of 0.233x.
# Group 64 instead of 128: 1.074x -> 1.047x, and the file is 1 MB smaller (0.180x): 64 divides
# SmolLM2's hidden size 576, where 128 leaves a half block per row that MatMulNBits pads.
# Issue 16 (2026-12-05): each attention's value path (v and o projections; a fused qkv counts as v) at 8
# bits (`ov-bits=8`), the layers that moved the coverage matrix's outputs most when quantized one at a
# time; SmolLM2 development text 19.344 -> 19.133 (-1.1%), file 130.2 -> 136.9 MB (+5.2%).
W4A16 = 'gptq{group=64 symmetric=false ov-bits=8},quantize{activations=none embeddings=true exclude=""}'
W4A16_FAST = 'rtn{symmetric=false},quantize{activations=none embeddings=true exclude=""}'
W4A16_H8 = ('gptq{symmetric=false},smoothquant{alpha=0.65 exclude=""},'
            'quantize{calib=mse exclude="" embeddings=true weight-pair-limit=128}')

register_pipeline(
    "w4a16",
    W4A16,
    "4-bit weights (GPTQ group 64 along K, asymmetric, Hessian-weighted ranges; attention v/o projections 8-bit), "
    "float activations; "
    "the tied embedding table and lm_head int8 per row",
)
register_pipeline(
    "w4a16-fast", W4A16_FAST, "4-bit weights by round-to-nearest (group 128, asymmetric), int8 embeddings, no calibration"
)
register_pipeline(
    "w4a16-h8",
    W4A16_H8,
    "w4a16 with the lm_head in W8A8 (smoothed, int8 kernel): the fastest 4-bit model on CPU",
)

# 3-bit weight-only (issue 19): the residual stream rotated by a randomized Hadamard (QuaRot), then
# GPTQ at 3 bits, group 64, asymmetric; the embedding table and the (untied, rotated) lm_head int8.
# On the development text (stdlib docstrings, calibration 32x256 of pydoc_data topics, with gptq's
# clip-hessian): group 128 1.379x fp32, without rotate 1.414x, group 64 1.364x. Group 64 divides
# SmolLM2's hidden size (576) where 128 leaves a half block that MatMulNBits pads, so the group-64
# file is even 1 MB smaller. The rotation keeps no channel out (`keep-massive=none`): leaving SmolLM2's
# massive-activation channel 507 unrotated (rotate's own default, which keeps the fp32 logits closer)
# measured 1.430x on docstrings against 1.364x (2026-12-05), code 21.572 against 20.417.
# Then (2026-12-05, docstrings, one build each, load 11-17 on 2 cores): the attention value path at 8
# bits (`ov-bits=8`, as in w4a16) 1.244x; the FFN down projections at 4 bits (`down-bits=4`, as
# llama.cpp's Q3_K mixes give ffn_down more bits) 1.282x; both 1.167x. ONNX stores 3-bit codes in
# 4-bit containers, so 4-bit down projections cost no bytes; the 8-bit v/o add 9.8 MB (127.0 ->
# 136.8 MB).
W3A16 = ('rotate{keep-massive=none},gptq{bits=3 group=64 symmetric=false ov-bits=8 down-bits=4},'
         'quantize{activations=none embeddings=true exclude=""}')

# ONNX has no 3-bit container (onnxruntime's MatMulNBits takes 2, 4 or 8 bits), so the file above
# stores 3-bit codes in 4-bit ones and is no smaller than w4a16's. A GGUF file does store them:
# for `-o x.gguf` the name stands for llama.cpp's 3-bit mix, each tensor's error weighted by the
# calibration data's per-column mean of x^2 (llama.cpp's importance matrix, computed by optc).
# SmolLM2-135M, calibration 32x256 of pydoc_data topics, perplexity x the F32 GGUF in llama.cpp
# (2026-12-05, tools/bench_quality.py): docstrings 1.200x, code 1.239x at 88.2 MB, the same bytes
# as llama-quantize's Q3_K_S (1.424x, 1.413x). Rotating first costs there (docstrings 1.432x, and the
# rotated head is a second table); not studied further.
W3A16_GGUF = "kquant{mix=Q3_K_S imatrix=true}"

register_pipeline(
    "w3a16",
    W3A16,
    "3-bit weights (Hadamard-rotated residual stream, GPTQ group 64 asymmetric; attention v/o 8-bit, FFN down 4-bit), "
    "float activations; "
    "embeddings and lm_head int8; for a GGUF output, llama.cpp's Q3_K_S mix with optc's importance matrix",
    targets={"gguf": W3A16_GGUF},
)

# Prune -> distill -> quantize (issue 9): the order a 2025 compression-ordering study found best.
# A quarter of the attention heads go, distillation from the unpruned model recovers what they
# carried (SmolLM2-135M: held-out ppl 19.6 -> 449.6 pruned -> 23.1 after 100 steps on 64x128-token
# windows, tools/bench_distill.py), then 4-bit weights as in w4a16 (179.8 MB, ppl 24.7; w4a16 alone:
# 184.2 MB, ppl 21.4).
P_KD_Q = "prune-heads{ratio=0.25},distill{steps=100},w4a16"

register_pipeline(
    "p-kd-q",
    P_KD_Q,
    "prune a quarter of the attention heads, distill from the unpruned model (100 steps), then w4a16",
)
