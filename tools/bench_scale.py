#!/usr/bin/env python3
"""Benchmark: optc on Llama-shaped checkpoints larger than memory, time and peak memory under a cgroup cap.

For each shape (`--shapes`, from `SHAPES`: smoke, 135m, 0.4b, 1.1b, 3b, 7b), the tool writes a synthetic Llama
checkpoint with random bfloat16 weights (`make_checkpoint`: one tensor at a time, straight to one
safetensors file, so the model is never held; normal(0, 0.02) weights, norms 1 + normal(0, 0.02); and a
byte-level BPE tokenizer of the vocabulary's size, `write_tokenizer`), then runs, each in
a memory cgroup of its own capped at `--cap` (`tools/peak_memory.py`):

* `optc DIR --passes=w4a16-fast -o w4.onnx`
* `optc DIR --passes='kquant{mix=Q4_K_M}' -o q4km.gguf`
* `optc DIR --passes='rtn{bits=8 group=128}' -o w8.onnx`

(`OPTC_LAZY_WEIGHTS=1`, `--lazy`: weights read lazily from the checkpoint at every size;
`--no-runtime-check`: the final onnxruntime / llama.cpp load check is optional on a model bigger than
memory) and prints one table: parameters, checkpoint size, and per command the wall time, the peak
anonymous memory (sampled `total_rss`) and `memory.max_usage_in_bytes` (which also counts the page
cache the group touched; the kernel reclaims it under the cap). With `--check`, after the runs:

* the w8 ONNX file's logits on a 16-token prompt against transformers' bfloat16 logits (cosine, in
  this process and not under the cap; transformers one decoder layer at a time, `tools/stream_logits.py`),
  as written and with its `MatMulNBits` at accuracy level 0 (`check_w8`: the codes' own numerics, without
  level 4's int8 activations);
* the q4km GGUF against llama-quantize's Q4_K_M of optc's own F32 GGUF of the checkpoint
  (`tests.backends.ggml_oracle.llama_quantize`), tensor by tensor.

    python tools/bench_scale.py --shapes 135m,1.1b --cap 8G --work /tmp/scale
    python tools/bench_scale.py --shapes 7b --cap 8G --work /tmp/scale --keep
    python tools/bench_scale.py --shapes 7b --cap 8G --work /tmp/scale --keep --reuse --only kquant --check

The checkpoints are removed afterwards unless `--keep`; `--reuse` takes a kept one instead of writing it
again when it is the shape's. With `--check`, the w4 ONNX file is also loaded in onnxruntime and run
on a 16-token prompt, and the GGUF file in llama.cpp, each in a subprocess measured like the commands
(not capped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from peak_memory import measure  # noqa: E402 - the cgroup measurement, shared with tools/peak_memory.py


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """The checkpoint's tensors in the order transformers writes them."""
        head_dim = self.hidden // self.heads
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "self_attn.q_proj.weight", (self.heads * head_dim, self.hidden)),
                (p + "self_attn.k_proj.weight", (self.kv_heads * head_dim, self.hidden)),
                (p + "self_attn.v_proj.weight", (self.kv_heads * head_dim, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.heads * head_dim)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "intermediate_size": self.intermediate, "vocab_size": self.vocab,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        }


#: Llama-family shapes: a smoke test of the tool, SmolLM2-135M's, a 0.4B one, TinyLlama-1.1B's,
#: OpenLLaMA-3B's and Llama-2-7B's.
SHAPES = {
    "smoke": Shape(256, 2, 512, 1024, 4, 4),
    "135m": Shape(576, 30, 1536, 49152, 9, 3),
    "0.4b": Shape(1024, 24, 2816, 32000, 16, 16),
    "1.1b": Shape(2048, 22, 5632, 32000, 32, 4),
    "3b": Shape(3200, 26, 8640, 32000, 32, 32),
    "7b": Shape(4096, 32, 11008, 32000, 32, 32),
}

COMMANDS = {
    "w4a16-fast → .onnx": ("w4a16-fast", "w4.onnx"),
    "kquant Q4_K_M → .gguf": ("kquant{mix=Q4_K_M}", "q4km.gguf"),
    "rtn 8-bit g128 → .onnx": ("rtn{bits=8 group=128}", "w8.onnx"),
}


#: The special tokens of the synthetic tokenizer, ids 0, 1, 2 (the config's bos and eos are 1 and 2).
SPECIALS = ("<unk>", "<s>", "</s>")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (`tokenizer.json` and
    `tokenizer_config.json`), built without data or download: the three special tokens, the 256
    byte symbols of GPT-2's byte-level alphabet, then one merge per pair of symbols (in alphabet
    order) until the vocabulary is full. It encodes any text; it is not a trained vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    merges = []
    for left in alphabet:
        for right in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    if len(vocab) != vocab_size:
        raise ValueError(f"a byte-level vocabulary needs {len(SPECIALS) + len(alphabet)} to "
                         f"{len(SPECIALS) + len(alphabet) * (len(alphabet) + 1)} tokens, not {vocab_size}")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SPECIALS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    tmp = folder / ".tokenizer.json.tmp"
    tokenizer.save(str(tmp))
    os.replace(tmp, folder / "tokenizer.json")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": SPECIALS[0], "bos_token": SPECIALS[1],
                "eos_token": SPECIALS[2], "model_max_length": 4096}
    (folder / ".tokenizer_config.json.tmp").write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(folder / ".tokenizer_config.json.tmp", folder / "tokenizer_config.json")


def make_checkpoint(folder: Path, shape: Shape, seed: int = 0) -> None:
    """A Llama checkpoint of `shape` with random bfloat16 weights, written tensor by tensor (the
    safetensors layout: an 8-byte header length, the JSON header, then each tensor's bytes), and a
    tokenizer of its vocabulary (`write_tokenizer`)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    write_tokenizer(folder, shape.vocab)
    header, offset = {}, 0
    for name, dims in shape.tensors():
        size = math.prod(dims) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    tmp = folder / ".model.safetensors.tmp"
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dims in shape.tensors():
            noise = torch.randn(dims, generator=generator) * 0.02
            # norms near one, each its own (norms all ones would be one tensor to the exporter's optimizer)
            tensor = (1 + noise if name.endswith("norm.weight") else noise).to(torch.bfloat16)
            f.write(tensor.view(torch.int16).numpy().tobytes())
            del tensor
    os.replace(tmp, folder / "model.safetensors")


def checkpoint_matches(folder: Path, shape: Shape) -> bool:
    """Whether `folder` already holds `make_checkpoint`'s checkpoint of `shape`: the same config, a
    tokenizer, and a `model.safetensors` whose header lists the shape's tensors, in order, as bfloat16,
    with exactly the bytes they need (a run stopped while writing leaves only the `.tmp` file)."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not (config.is_file() and weights.is_file() and (folder / "tokenizer.json").is_file()):
        return False
    if json.loads(config.read_text()) != shape.config():
        return False
    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    offset = 0
    for (name, dims), (got, entry) in zip(shape.tensors(), header.items(), strict=False):
        size = math.prod(dims) * 2
        if got != name or entry != {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}:
            return False
        offset += size
    return len(header) == len(shape.tensors()) and weights.stat().st_size == 8 + length + offset


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _children_cpu() -> float:
    """User + system CPU seconds of this process's reaped children (the command and what it ran)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class LoadSampler:
    """The 1-minute load average, sampled every `interval` seconds in a thread while in a `with` block."""

    def __init__(self, interval: float = 5.0) -> None:
        import threading

        self.interval, self.samples = interval, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        return f"{min(self.samples):.1f}–{max(self.samples):.1f} (mean {sum(self.samples) / len(self.samples):.1f})"


def run_commands(folder: Path, work: Path, cap: int, optc: str, only: list[str], lazy: str) -> dict[str, dict]:
    results = {}
    env = dict(os.environ, OPTC_NO_CACHE="1", OPTC_LAZY_WEIGHTS=lazy)
    for label, (passes, name) in COMMANDS.items():
        if only and not any(o in label for o in only):
            continue
        out = work / name
        command = [optc, str(folder), f"--passes={passes}", "-o", str(out), "--no-runtime-check"]
        print(f"$ {' '.join(command)}  (cap {_gib(cap)})", flush=True)
        before = _children_cpu()
        with LoadSampler() as load:
            code, seconds, peak, max_usage = measure(command, cap, 0.1, env)
        cpu = _children_cpu() - before
        results[label] = {"exit": code, "seconds": seconds, "peak_anon": peak, "max_usage": max_usage,
                          "output": str(out), "load": load.summary(), "cpu": cpu}
        print(f"  exit {code}, {seconds:.0f} s ({cpu:.0f} CPU-s), peak anon {_gib(peak)}, max_usage {_gib(max_usage)}, "
              f"load average {load.summary()}", flush=True)
    return results


def with_accuracy_level(onnx_file: Path, level: int) -> Path | None:
    """A copy of `onnx_file`'s graph whose `MatMulNBits` nodes compute at `accuracy_level` `level`, written
    next to it (so it reads the same external data), or None when it has no MatMulNBits."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return None
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    out = onnx_file.with_name(f"{onnx_file.stem}.level{level}.onnx")
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out


def check_w8(folder: Path, onnx_file: Path, tokens: int = 16) -> dict[str, float]:
    """Cosine of the w8 ONNX file's logits to transformers' bfloat16 logits on one prompt of `tokens` ids
    (all positions): as written, and, when it runs MatMulNBits, with every one at `accuracy_level` 0
    (float activations: the numerics of the rtn codes alone; `lower-ort-nbits` picks 4, int8 activations
    per block, for a causal LM). transformers runs one decoder layer at a time
    (`stream_logits.stream_logits`: the same logits as the whole model, which a 7B model's 13.5 GB would
    need in memory)."""
    import torch
    from stream_logits import cosine, onnx_logits, prompt, stream_logits

    ids = prompt(tokens)
    want = stream_logits(folder, ids, torch.bfloat16)
    out = {"as written": cosine(onnx_logits(onnx_file, ids), want)}
    level0 = with_accuracy_level(onnx_file, 0)
    if level0 is not None:
        out["accuracy level 0"] = cosine(onnx_logits(level0, ids), want)
        level0.unlink()
    return out


def _run_prompt(file: Path, tokens: int, runtime: str, load: str, ids: str, run: str) -> str:
    """Run `load` (binds the runtime's model), `ids` and `run` (binds `out`, the last logits) in a
    subprocess measured by `tools/peak_memory.py` (no cap), timing the load and the run."""
    script = "\n".join((
        f"import sys, time, numpy as np, {runtime}",
        "t = time.perf_counter()",
        load,
        "load = time.perf_counter() - t",
        ids,
        "t = time.perf_counter()",
        run,
        "assert np.isfinite(out).all() and out.any(), 'no logits'",
        f"print(f'{runtime}: load {{load:.0f}} s, run {{time.perf_counter() - t:.1f}} s, logits {{out.shape}}', flush=True)",
        "",
    ))
    code, seconds, peak, max_usage = measure([sys.executable, "-c", script, str(file)], None, 0.1)
    if code:
        return f"failed (exit {code})"
    return f"ran a {tokens}-token prompt in {seconds:.0f} s, peak anon {_gib(peak)}, max_usage {_gib(max_usage)}"


def run_onnx(onnx_file: Path, tokens: int = 16) -> str:
    """Load `onnx_file` in an onnxruntime session (CPU) and run one prompt of `tokens` ids, measured:
    what it took, and the logits' shape."""
    return _run_prompt(
        onnx_file, tokens, "onnxruntime",
        "s = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])",
        f"ids = np.random.default_rng(0).integers(3, 1000, size=(1, {tokens}), dtype=np.int64)",
        "out = s.run(['logits'], {'input_ids': ids})[0]",
    )


def run_gguf(gguf_file: Path, tokens: int = 16) -> str:
    """Load `gguf_file` in llama.cpp (llama-cpp-python) and evaluate one prompt of `tokens` ids, measured
    (llama.cpp maps the file, so most of it is page cache, not anonymous memory)."""
    return _run_prompt(
        gguf_file, tokens, "llama_cpp",
        "m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, logits_all=True, verbose=False)",
        f"ids = [1] + [int(i) for i in np.random.default_rng(0).integers(3, min(1000, m.n_vocab()), size={tokens - 1})]",
        "m.eval(ids)\nout = np.asarray(m.scores[len(ids) - 1])",
    )


def check_gguf(folder: Path, work: Path, gguf_file: Path, optc: str) -> str:
    """optc's Q4_K_M against llama-quantize's Q4_K_M of optc's F32 GGUF: tensors byte-identical?"""
    import subprocess

    from tests.backends.ggml_oracle import llama_quantize

    source = work / "source-f32.gguf"
    subprocess.run([optc, str(folder), "--passes=", "-o", str(source), "--no-runtime-check"], check=True,
                   env=dict(os.environ, OPTC_NO_CACHE="1", OPTC_LAZY_WEIGHTS="1"))
    reference = work / "llama-quantize-q4km.gguf"
    llama_quantize(source, reference, "Q4_K_M", threads=2)
    from gguf import GGUFReader

    ours, theirs = GGUFReader(str(gguf_file)), GGUFReader(str(reference))
    mine = {t.name: t for t in ours.tensors}
    same = sum(1 for t in theirs.tensors if t.name in mine and mine[t.name].tensor_type == t.tensor_type
               and np.array_equal(np.asarray(mine[t.name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)))
    source.unlink(missing_ok=True)
    return f"{same}/{len(theirs.tensors)} tensors byte-identical"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="135m,1.1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--cap", default="8G", help="the cgroup memory cap of each command (default 8G)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/optc-scale"))
    parser.add_argument("--optc", default=str(Path(sys.executable).with_name("optc")))
    parser.add_argument("--only", default="", help="run only the commands whose label contains one of these (comma-separated)")
    parser.add_argument("--lazy", choices=("1", "0", ""), default="1",
                        help="OPTC_LAZY_WEIGHTS for the commands: 1 lazy weights (default), 0 eager, '' by the budget")
    parser.add_argument("--check", action="store_true", help="check the w8 logits and the GGUF bytes afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a checkpoint already in --work when it is the shape's (checkpoint_matches)")
    args = parser.parse_args(argv)
    cap = int(float(args.cap[:-1]) * 2**30) if args.cap.upper().endswith("G") else int(args.cap)
    only = [o for o in args.only.split(",") if o]
    rows = []
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        work = args.work / key
        folder = work / "checkpoint"
        start = time.perf_counter()
        reused = args.reuse and checkpoint_matches(folder, shape)
        if not reused:
            make_checkpoint(folder, shape)
        print(f"{key}: {shape.parameters / 1e9:.2f}B parameters, {_gib((folder / 'model.safetensors').stat().st_size)} "
              f"bf16, " + ("reused" if reused else f"written in {time.perf_counter() - start:.0f} s"), flush=True)
        results = run_commands(folder, work, cap, args.optc, only, args.lazy)
        checks = {}
        if args.check:
            w4 = results.get("w4a16-fast → .onnx")
            if w4 and w4["exit"] == 0:
                checks["w4 in onnxruntime"] = run_onnx(Path(w4["output"]))
                print(f"  check: w4 in onnxruntime: {checks['w4 in onnxruntime']}", flush=True)
            w8 = results.get("rtn 8-bit g128 → .onnx")
            if w8 and w8["exit"] == 0:
                for numerics, value in check_w8(folder, Path(w8["output"])).items():
                    checks[f"w8 cosine ({numerics})"] = f"{value:.4f}"
                    print(f"  check: w8 cosine ({numerics}) {value:.4f}", flush=True)
            q4 = results.get("kquant Q4_K_M → .gguf")
            if q4 and q4["exit"] == 0:
                checks["gguf in llama.cpp"] = run_gguf(Path(q4["output"]))
                print(f"  check: gguf in llama.cpp: {checks['gguf in llama.cpp']}", flush=True)
                checks["gguf vs llama-quantize"] = check_gguf(folder, work, Path(q4["output"]), args.optc)
                print(f"  check: gguf vs llama-quantize {checks['gguf vs llama-quantize']}", flush=True)
        rows.append((key, shape, (folder / "model.safetensors").stat().st_size, results, checks))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"\ncap {args.cap} per command; {os.cpu_count()} cores, load average {load:.1f}; OPTC_NO_CACHE=1 "
          f"OPTC_LAZY_WEIGHTS={args.lazy}")
    print("| shape | parameters | bf16 checkpoint | command | time | peak anon | max_usage (incl. page cache) "
          "| load average | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, shape, size, results, checks in rows:
        for label, r in results.items():
            print(f"| {key} | {shape.parameters / 1e9:.2f}B | {_gib(size)} | {label} | {r['seconds']:.0f} s "
                  f"({r['cpu']:.0f} CPU-s) | "
                  f"{_gib(r['peak_anon'])} | {_gib(r['max_usage'])} | {r['load']} | {r['exit']} |")
        for name, value in checks.items():
            print(f"| {key} | | | check: {name} | {value} | | | | |")
    return 0 if all(r["exit"] == 0 for *_, results, _ in rows for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
