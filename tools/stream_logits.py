#!/usr/bin/env python3
"""Logits of a Hugging Face causal LM checkpoint too large for memory, computed by transformers one decoder
layer at a time, with the linear weights as stored or fake-quantized in plain torch.

The model is built on the meta device; the embedding, final norm and head are loaded, and each decoder layer
is loaded from the safetensors files just before transformers runs it and dropped right after (forward
hooks), so memory holds one layer (0.8 GB in float32 at Llama-2-7B's shape) besides the embedding and head.
The arithmetic is transformers' own (its modules, its mask and rotary code), in `--dtype`.

`--weights`:

* `stored`: the checkpoint's weights (bfloat16 ones upcast exactly when `--dtype float32`);
* `rtnB` / `rtnB-clip` (e.g. `rtn8`): every decoder layer's linear weight (not the embedding, not the
  head: optc's `rtn` leaves the head float by default and the embedding is a Gather) rounded to the
  nearest of a symmetric B-bit grid per group of `--group` input channels, s = max|w| / (2^(B−1) − 1),
  in float32 and written here in plain torch (`fake_quantize_minmax`); `-clip` uses optc's own numerics
  instead (`optc.passes.lowbit.fake_quantize` with the clip search, what `rtn{bits=B}` stores).

It prints the cosine of the logits (all positions, flattened, float64) to those of `--against` files
(`.npy` logits saved by an earlier run with `--save`, or `.onnx` files run in onnxruntime on the same ids).
The prompt is `bench_scale.check_w8`'s: 16 ids drawn from [3, 1000) with numpy's generator seeded 0.

    python tools/stream_logits.py CKPT --dtype bfloat16 --save /tmp/bf16.npy
    python tools/stream_logits.py CKPT --dtype float32 --weights rtn8 --against /tmp/bf16.npy w8.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prompt(tokens: int = 16) -> np.ndarray:
    """`bench_scale.check_w8`'s prompt: [1, tokens] ids in [3, 1000), numpy's generator seeded 0."""
    return np.random.default_rng(0).integers(3, 1000, size=(1, tokens), dtype=np.int64)


def fake_quantize_minmax(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """W [N, K] (float32) after symmetric round-to-nearest in groups of `group` input channels and back:
    q = clamp(round(w / s), −2^(b−1), 2^(b−1) − 1), s = max|w_group| / (2^(b−1) − 1) (1 where the group is 0)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input channels are not a multiple of the group {group}")
    qmax = (1 << (bits - 1)) - 1
    grouped = w.float().reshape(n, k // group, group)
    scale = grouped.abs().amax(dim=2, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(grouped / scale), -qmax - 1, qmax) * scale).reshape(n, k)


def weight_transform(spec: str, group: int):
    """The function `--weights` applies to each decoder layer's 2-D linear weight (float32 in and out), or None."""
    if spec == "stored":
        return None
    clip = spec.endswith("-clip")
    bits = int(spec.removeprefix("rtn").removesuffix("-clip"))
    if clip:
        from optc.passes.lowbit import Grid, fake_quantize

        return lambda w: fake_quantize(w.float(), group, Grid(bits, True), clip=True).float()
    return lambda w: fake_quantize_minmax(w, bits, group)


class _Tensors:
    """The tensors of a checkpoint folder's safetensors files, read one at a time by name."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        self._handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self._where: dict = {}
        for handle in self._handles:
            names = handle.keys()  # a safe_open handle is not iterable
            self._where.update(dict.fromkeys(names, handle))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def _drop(module: torch.nn.Module, args: object, output: object) -> None:
    """Forward hook: move a decoder layer's weights back to the meta device once it has run."""
    module.to_empty(device="meta")


def stream_logits(folder: Path, ids: np.ndarray, dtype: torch.dtype, weights: str = "stored", group: int = 128) -> np.ndarray:
    """Logits [T, V] (float64) of the causal LM in `folder` on `ids` [1, T], one decoder layer in memory at a time."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    transform = weight_transform(weights, group)
    tensors = _Tensors(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    layers = model.model.layers

    def load(module: torch.nn.Module, prefix: str, quantize: bool) -> None:
        module.to_empty(device="cpu")
        state = {}
        for name, _ in module.named_parameters():
            tensor = tensors[prefix + name].to(torch.float32)
            if quantize and transform is not None and tensor.dim() == 2:
                tensor = transform(tensor)
            state[name] = tensor.to(dtype)
        module.load_state_dict(state, strict=True)

    for module, prefix in ((model.model.embed_tokens, "model.embed_tokens."), (model.model.norm, "model.norm."),
                           (model.lm_head, "lm_head.")):
        load(module, prefix, quantize=False)
    # Buffers (the rotary table) are computed at construction: build those modules again on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for i, layer in enumerate(layers):
        if any(True for _ in layer.buffers()):
            raise ValueError(f"decoder layer {i} has buffers, which this tool does not load")
        layer.register_forward_pre_hook(lambda mod, args, i=i: load(mod, f"model.layers.{i}.", quantize=True))
        layer.register_forward_hook(_drop)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)).logits
    return logits[0].to(torch.float64).numpy()


def onnx_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """The `logits` output [T, V] (float64) of an ONNX causal LM on `ids`, in onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0][0].astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays, flattened, in float64."""
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def save(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` (.npy) atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    parser.add_argument("--weights", default="stored", help="stored, rtnB or rtnB-clip (B = 2..8 bits)")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--save", type=Path, help="write the logits [T, V] here (.npy)")
    parser.add_argument("--against", type=Path, nargs="*", default=[], help=".npy logits or .onnx files to compare with")
    args = parser.parse_args(argv)
    if args.weights != "stored" and not (args.weights.startswith("rtn") and
                                         args.weights.removeprefix("rtn").removesuffix("-clip").isdigit()):
        parser.error(f"--weights: stored, rtnB or rtnB-clip, not {args.weights!r}")
    ids = prompt(args.tokens)
    logits = stream_logits(args.checkpoint, ids, getattr(torch, args.dtype), args.weights, args.group)
    if args.save:
        save(args.save, logits)
    for other in args.against:
        theirs = onnx_logits(other, ids) if other.suffix == ".onnx" else np.load(other)
        print(f"cosine({args.weights} in {args.dtype}, {other.name}) {cosine(logits, theirs):.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
