"""Decode speed of optc's generation-ready ONNX against llama.cpp, on the default model (SmolLM2-135M).

    python tools/bench_decode.py [--work DIR] [--threads 1,2] [--prompt-tokens 256] [--new-tokens 128]
                                 [--parts build,speed,agreement,ppl,prefill]

Builds (once, into --work; each with the `optc` command line):

* fp32, w8a8 and w4a16 with the KV cache (`optc --kv-cache [--passes P] -o DIR/model.onnx`),
  run through onnxruntime-genai;
* the no-cache loop: the fp32 decoder run on the whole sequence at every step
  with an empty cache, which computes what the no-cache export computes;
* llama.cpp's Q4_K_M and Q8_0 of the same model (`optc --passes='kquant{mix=...}' -o x.gguf`),
  run through llama-cpp-python.

Then, in one run, greedy generation of `--new-tokens` tokens after a prompt of
`--prompt-tokens` tokens of the held-out text, at each thread count: one table
of decode (and prefill) tokens per second, every ratio taken within the run.

`agreement`: transformers' fp32 greedy generation (the GGUF read by
transformers, as optc's export reads it) of 64 tokens from 5 prompts, against
the fp32, w8a8 and w4a16 folders through onnxruntime-genai: tokens equal, position by position.

`ppl`: perplexity of the fp32, w8a8 and w4a16 KV-cache decoders (prefill with an empty cache) and
of the no-cache exports (`optc [--passes=P] -o nocache.onnx`), same text and windows: both forms
run their attention as GroupQueryAttention and their MatMulNBits at the same accuracy level, so
each pair agrees.

`prefill`: latency of one `--prompt-tokens` window through the fp32 no-cache export as written
(attention fused by `fuse-ort`) and the same export written with the ort backend's legalize
pipeline less `fuse-ort` (attention unfused), interleaved rounds at each thread count, and the
largest difference of their logits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTC = [sys.executable, "-m", "optc"]

#: name -> (optc arguments, output relative to the work folder)
BUILDS = {
    "fp32": (["--kv-cache"], "fp32/model.onnx"),
    "w8a8": (["--kv-cache", "--passes=w8a8"], "w8a8/model.onnx"),
    "w4a16": (["--kv-cache", "--passes=w4a16"], "w4a16/model.onnx"),
    "Q4_K_M": (["--kv-cache", "--passes=kquant{mix=Q4_K_M}"], "q4_k_m.gguf"),
    "Q8_0": (["--kv-cache", "--passes=kquant{mix=Q8_0}"], "q8_0.gguf"),
    "nocache": ([], "nocache/model.onnx"),
    "w8a8-nocache": (["--passes=w8a8"], "w8a8-nocache/model.onnx"),
    "w4a16-nocache": (["--passes=w4a16"], "w4a16-nocache/model.onnx"),
}
#: The fp32 no-cache export with its attention left unfused (the `prefill` part's other side).
UNFUSED = "nocache-unfused/model.onnx"
#: `python -c` code running the command line with the ort backend's legalize pipeline less `fuse-ort`.
_WITHOUT_FUSION = (
    "import sys; from optc.backends.ort import OrtBackend; from optc.cli import main; "
    "OrtBackend.legalize = ','.join(p for p in OrtBackend.legalize.split(',') if p != 'fuse-ort'); "
    "sys.exit(main(sys.argv[1:]))"
)
NOCACHE = ("nocache", "w8a8-nocache", "w4a16-nocache")
#: Table rows: label, build, use the cache.
ROWS = [
    ("optc fp32 (KV cache, onnxruntime-genai)", "fp32", True),
    ("optc fp32, no cache (whole sequence each step)", "fp32", False),
    ("optc w8a8 (KV cache)", "w8a8", True),
    ("optc w4a16 (KV cache)", "w4a16", True),
    ("llama.cpp Q4_K_M", "Q4_K_M", True),
    ("llama.cpp Q8_0", "Q8_0", True),
]
AGREEMENT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To install a Python package, you",
]


def build(work: Path, names: list[str]) -> None:
    for name in names:
        args, relative = BUILDS[name]
        output = work / relative
        if output.exists():
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        command = [*OPTC, *args, "--no-compare", "-o", str(output)]
        print(f"# building {name}: optc {' '.join(args)} -o {output}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"#   {time.perf_counter() - start:.0f} s", flush=True)


def build_unfused(work: Path) -> None:
    output = work / UNFUSED
    if output.exists():
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"# building the unfused no-cache export: optc (legalize less fuse-ort) -o {output}", flush=True)
    subprocess.run([sys.executable, "-c", _WITHOUT_FUSION, "--no-compare", "-o", str(output)], check=True, cwd=ROOT)


def prefill(work: Path, threads: list[int], prompt_tokens: int, rounds: int = 10) -> None:
    """Latency of one prompt window through the no-cache export, attention fused and unfused."""
    import numpy as np
    import onnxruntime as ort

    prompt = np.array([eval_prompt(default_tokenizer(), prompt_tokens)], dtype=np.int64)
    models = {"fused (as written)": work / BUILDS["nocache"][1], "unfused": work / UNFUSED}
    print(f"\nprefill of {prompt_tokens} tokens, fp32 no-cache export, median of {rounds} interleaved rounds\n")
    print("| attention | " + " | ".join(f"ms @{t}" for t in threads) + " |")
    print("|---|" + "---:|" * len(threads))
    medians: dict[str, list[float]] = {label: [] for label in models}
    logits: dict[str, np.ndarray] = {}
    for count in threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = count, 1
        sessions = {label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for label, path in models.items()}
        for label, session in sessions.items():
            logits[label] = session.run(["logits"], {"input_ids": prompt})[0]  # warm-up
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(rounds):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(["logits"], {"input_ids": prompt})
                times[label].append(time.perf_counter() - start)
        for label in models:
            medians[label].append(1000 * float(np.median(times[label])))
    for label, values in medians.items():
        print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    difference = float(np.abs(logits["fused (as written)"] - logits["unfused"]).max())
    print(f"\nlargest |logit difference| fused vs unfused: {difference:.2e}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)


def default_tokenizer():
    from optc.evaluate import load_tokenizer
    from optc.frontends.models import default_model_path

    return load_tokenizer(default_model_path())


def eval_prompt(tokenizer, count: int) -> list[int]:
    from optc.runtime.text import builtin_text

    ids = tokenizer(builtin_text("eval"), add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids[:count]]


def speed(work: Path, threads: list[int], prompt_tokens: int, new_tokens: int, loop_tokens: int) -> None:
    from optc.generate import generate

    prompt = eval_prompt(default_tokenizer(), prompt_tokens)
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for label, name, cache in ROWS:
        path = work / BUILDS[name][1]
        for count in threads:
            result = generate(path, prompt, new_tokens if cache else loop_tokens, threads=count, use_cache=cache)
            results[(label, count)] = (result.decode_tokens_per_s, result.prefill_tokens_per_s)
            print(f"# {label} @{count}: decode {result.decode_tokens_per_s:.1f} tok/s, "
                  f"prefill {result.prefill_tokens_per_s:.1f} tok/s", flush=True)
    reference = "llama.cpp Q4_K_M"
    header = "| model |" + "".join(
        f" decode tok/s @{t} | × Q4_K_M @{t} | prefill tok/s @{t} |" for t in threads)
    loop = f" (the no-cache loop: its first {loop_tokens}, each step costing more than the one before)" \
        if loop_tokens < new_tokens else ""
    print(f"\n{new_tokens} new tokens after a {prompt_tokens}-token prompt{loop}, greedy; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print(header)
    print("|---|" + "---:|---:|---:|" * len(threads))
    for label, _, _ in ROWS:
        cells = ""
        for count in threads:
            decode, prefill = results[(label, count)]
            cells += f" {decode:.1f} | {decode / results[(reference, count)][0]:.2f}× | {prefill:.1f} |"
        print(f"| {label} |{cells}")
    fp32 = {t: results[(ROWS[0][0], t)][0] / results[(ROWS[1][0], t)][0] for t in threads}
    print("\nfp32 with the cache / no-cache loop: " + ", ".join(f"{v:.1f}× @{t}" for t, v in fp32.items()))


def speed_of(paths: list[str], threads: int, prompt_tokens: int, new_tokens: int, rounds: int = 2) -> None:
    """Decode tokens/s of the given folders or files, interleaved over `rounds` rounds (the `--models` part)."""
    from optc.generate import generate

    prompt = eval_prompt(default_tokenizer(), prompt_tokens)
    print(f"\n{new_tokens} new tokens after {prompt_tokens}, {threads} thread(s), {rounds} interleaved rounds\n")
    print("| model | decode tok/s per round | load average |\n|---|---|---:|")
    results: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        for path in paths:
            results[path].append(generate(path, prompt, new_tokens, threads=threads).decode_tokens_per_s)
    for path, speeds in results.items():
        print(f"| {path} | {' / '.join(f'{v:.1f}' for v in speeds)} | {os.getloadavg()[0]:.1f} |", flush=True)


def agreement(work: Path, new_tokens: int = 64, names: tuple[str, ...] = ("fp32", "w8a8", "w4a16")) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from optc.frontends.models import default_model_path
    from optc.generate import generate

    tokenizer = default_tokenizer()
    gguf = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    prompts = [[int(t) for t in tokenizer(text)["input_ids"]] for text in AGREEMENT_PROMPTS]
    references = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
            references.append(out[0, len(prompt):].tolist())
    del hf
    print(f"\nagreement with transformers fp32 greedy ({len(prompts)} prompts × {new_tokens} tokens)\n")
    print("| model | tokens equal | prompts identical | first divergence (token index) |")
    print("|---|---:|---:|---|")
    for name in names:
        equal, identical, firsts = 0, 0, []
        for prompt, reference in zip(prompts, references, strict=True):
            tokens = generate(work / BUILDS[name][1], prompt, new_tokens, threads=2).tokens
            equal += sum(a == b for a, b in zip(tokens, reference, strict=True))
            identical += tokens == reference
            firsts.append(next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), None))
        shown = ", ".join("-" if f is None else str(f) for f in firsts)
        print(f"| {name} | {equal}/{len(prompts) * new_tokens} | {identical}/{len(prompts)} | {shown} |", flush=True)


def perplexity(work: Path) -> None:
    from optc.evaluate import evaluate

    tokenizer = default_tokenizer()
    print("\nperplexity, 16 windows of 256 tokens of the held-out text\n")
    print("| model | ppl |\n|---|---:|")
    rows = (("fp32, KV cache (prefill from an empty cache)", "fp32"), ("fp32, no-cache export", "nocache"),
            ("w8a8, KV cache (prefill from an empty cache)", "w8a8"), ("w8a8, no-cache export", "w8a8-nocache"),
            ("w4a16, KV cache (prefill from an empty cache)", "w4a16"), ("w4a16, no-cache export", "w4a16-nocache"))
    for label, name in rows:
        result = evaluate(work / BUILDS[name][1], None, 256, 4096, tokenizer)
        print(f"| {label} | {result.ppl:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench-decode"), help="folder for the built models")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--loop-tokens", type=int, help="new tokens of the no-cache loop (default: --new-tokens); "
                        "fewer flatter it, since its steps grow with the sequence")
    parser.add_argument("--parts", default="build,speed,agreement,ppl")
    parser.add_argument("--models", help="comma-separated folders or .gguf files: only their decode speed "
                        "(interleaved rounds at the first --threads count), nothing built")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    work = args.work.resolve()
    if args.models:
        speed_of(args.models.split(","), int(args.threads.split(",")[0]), args.prompt_tokens, args.new_tokens)
        return
    if "build" in parts:
        names = [n for n in BUILDS if n not in NOCACHE or "ppl" in parts or (n == "nocache" and "prefill" in parts)]
        build(work, names)
        if "prefill" in parts:
            build_unfused(work)
    if "speed" in parts:
        speed(work, [int(t) for t in args.threads.split(",")], args.prompt_tokens, args.new_tokens,
              args.loop_tokens or args.new_tokens)
    if "agreement" in parts:
        agreement(work)
    if "ppl" in parts:
        perplexity(work)
    if "prefill" in parts:
        prefill(work, [int(t) for t in args.threads.split(",")], args.prompt_tokens)


if __name__ == "__main__":
    main()
