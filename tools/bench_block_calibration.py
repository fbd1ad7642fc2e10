#!/usr/bin/env python3
"""Benchmark: calibrated pipelines on the whole model at once against block by block (`--calib-blocks`).

For each pipeline and path it runs `optc INPUT --passes=PIPELINE --calib-blocks=off|on -o OUT` inside a
memory cgroup of its own (`tools/peak_memory.py`, optionally under `--cap`), then `optc-eval OUT` for the
held-out perplexity, and prints one table: model, pipeline, path, peak anonymous memory, the cgroup's
`max_usage` (anonymous memory plus the page cache the run touched), time, perplexity.

    python tools/bench_block_calibration.py                                  # SmolLM2, w4a16 and w8a8
    python tools/bench_block_calibration.py --pipelines w4a16 --paths blocks --text builtin:code
    python tools/bench_block_calibration.py --synthetic 1b --calib random --cap 0.95G --no-eval

`--synthetic 1b` first writes a Llama of that shape with random weights (hidden 2048, 16 layers,
intermediate 5632, vocab 32000; `--synthetic tiny` for a quick check) as a Hugging Face folder
(safetensors, fp32) and exports it to ONNX outside the cap; the runs then read that ONNX file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import markdown_table  # noqa: E402 - the benchmarks' shared helpers (tools/_bench.py)

TOOLS = Path(__file__).resolve().parent
SHAPES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 5632, "vocab_size": 32000,
           "num_attention_heads": 16, "num_key_value_heads": 16},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
             "num_attention_heads": 4, "num_key_value_heads": 4},
}


def _bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    return found or name


def synthetic(shape: str, folder: Path) -> Path:
    """A random-weight Llama of `shape` as a Hugging Face folder, exported to `folder/model.onnx`."""
    import torch
    import transformers

    hf = folder / f"llama-{shape}"
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(hf, safe_serialization=True)
    del model
    onnx_path = folder / "model.onnx"
    subprocess.run([_bin("optc"), str(hf), "--no-compare", "--no-runtime-check", "-o", str(onnx_path)], check=True)
    return onnx_path


def run(command: list[str], cap: str | None) -> tuple[int, str]:
    peak = [sys.executable, str(TOOLS / "peak_memory.py"), *(["--cap", cap] if cap else []), "--", *command]
    done = subprocess.run(peak, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("peak_memory:")), "")
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-2000:])
    return done.returncode, line


def perplexity(path: Path, text: str) -> str:
    done = subprocess.run([_bin("optc-eval"), str(path), "--text", text], capture_output=True, text=True)
    found = re.search(r"ppl=([0-9.]+)", done.stdout)
    return found.group(1) if found else "failed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", help="model (default: the default SmolLM2)")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), help="make a random-weight Llama of this shape")
    parser.add_argument("--pipelines", default="w4a16,w8a8")
    parser.add_argument("--paths", default="whole,blocks")
    parser.add_argument("--calib", default=None, help="--calib for optc (default: the default model's own)")
    parser.add_argument("--cap", default=None, help="memory cap of each run, e.g. 0.95G")
    parser.add_argument("--text", default="builtin:topics", help="held-out text of optc-eval")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-blocks-"))
    work.mkdir(parents=True, exist_ok=True)
    source = str(synthetic(args.synthetic, work)) if args.synthetic else args.input
    name = f"llama-{args.synthetic}" if args.synthetic else (Path(source).name if source else "SmolLM2-135M")
    rows = []
    for pipeline in args.pipelines.split(","):
        for path in args.paths.split(","):
            out = work / f"{pipeline}-{path}.onnx"
            command = [_bin("optc"), *([source] if source else []), f"--passes={pipeline}", "--no-compare",
                       f"--calib-blocks={'on' if path == 'blocks' else 'off'}", "-o", str(out)]
            if args.calib:
                command += ["--calib", args.calib]
            code, line = run(command, args.cap)
            figures = dict(re.findall(r"(peak_anon|max_usage) (\d+) MiB", line))
            seconds = re.search(r", ([0-9.]+) s,", line)
            ppl = perplexity(out, args.text) if code == 0 and not args.no_eval else "-"
            rows.append((name, pipeline, path, f"{figures.get('peak_anon', '?')} MiB",
                         f"{figures.get('max_usage', '?')} MiB", f"{seconds.group(1) if seconds else '?'} s",
                         ppl if code == 0 else f"exit {code}"))
    header = ("model", "pipeline", "path", "peak anon", "max_usage", "time", f"ppl ({args.text})")
    print(f"cap: {args.cap or 'none'}")
    print(markdown_table(header, rows))
    return 0 if all("exit" not in r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
