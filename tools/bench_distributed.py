#!/usr/bin/env python3
"""Benchmark: one optc process against two under torchrun (gloo, CPU), same model, data and pipeline.

For each pipeline (default `gptq` and `w8a8`, on the embedded SmolLM2-135M with the built-in
calibration text, 16 windows of 256 tokens) it runs

* `optc --passes=P -o one/P.onnx`
* `torchrun --standalone --nproc-per-node 2 --no-python optc --passes=P -o two/P.onnx`

and prints, side by side: wall time of each, whether every file written is byte-identical, and the
held-out perplexity of both outputs (`optc.evaluate.evaluate`: 4096 tokens of the eval split, windows
of 256). On a 2-core machine two processes are no faster (each computes the same weight work, and the
cores are shared); the point here is that the output is the same.

    python tools/bench_distributed.py                      # gptq and w8a8
    python tools/bench_distributed.py --passes w8a8 --workdir W
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_distributed: {' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="gptq,w8a8", help="comma-separated pipelines (named ones or single passes)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    bindir = Path(sys.executable).parent
    optc = str(bindir / "optc")
    torchrun = shutil.which("torchrun", path=str(bindir)) or "torchrun"
    from optc.evaluate import evaluate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="optc-bench-dist-"))
    rows = []
    for passes in args.passes.split(","):
        one, two = work / passes / "one", work / passes / "two"
        for folder in (one, two):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        t_one = _run([optc, "--passes", passes, "--no-runtime-check", "--no-compare", "-o", str(one / "out.onnx")])
        t_two = _run([torchrun, "--standalone", "--nproc-per-node", str(args.nproc), "--no-python", optc,
                      "--passes", passes, "--no-runtime-check", "--no-compare", "-o", str(two / "out.onnx")])
        same = _digests(one) == _digests(two)
        ppl_one = evaluate(one / "out.onnx", max_tokens=args.max_tokens).ppl
        ppl_two = evaluate(two / "out.onnx", max_tokens=args.max_tokens).ppl
        rows.append((passes, t_one, t_two, same, ppl_one, ppl_two))
        print(f"{passes}: one {t_one:.0f} s, {args.nproc} processes {t_two:.0f} s, identical files: {same}, "
              f"ppl {ppl_one:.4f} / {ppl_two:.4f}", flush=True)
    print(f"\n| pipeline | 1 process | {args.nproc} processes (torchrun, gloo) | files byte-identical | ppl 1 / {args.nproc} |")
    print("|---|---|---|---|---|")
    for passes, t_one, t_two, same, ppl_one, ppl_two in rows:
        print(f"| `{passes}` | {t_one:.0f} s | {t_two:.0f} s | {'yes' if same else 'no'} | {ppl_one:.4f} / {ppl_two:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
