#!/usr/bin/env python3
"""Benchmark: knowledge distillation after pruning, and the prune → distill → quantize pipeline, on SmolLM2-135M.

Models, all built by `optc` child processes from the default model (SmolLM2-135M-Instruct GGUF,
exported to ONNX by optc's frontend; the fp32 ONNX is the export itself):

* `fp32`: the unpruned model (the teacher);
* for each pruning recipe (`--prune`, default `prune-heads{ratio=0.25}` and
  `sparsify{pattern=2:4 method=magnitude}`): the pruned model, then that model
  after `distill{steps=100}` with the fp32 model as teacher
  (`optc PRUNED.onnx --passes='distill{steps=100 teacher=FP32.onnx}'`: the same
  computation as `--passes='P,distill{steps=100}'`, whose default teacher is the
  pipeline's input, without pruning twice);
* `w4`: the weight-only 4-bit model of the weight-only issue (`--passes=w4a16` on fp32);
* `p-kd-q`: the heads-pruned, distilled model quantized by `w4a16`, which is what
  the named pipeline `p-kd-q` computes step by step (`--pkdq-full` runs the pipeline
  itself in one command instead: it prunes and distills again).

Calibration data for pruning and distillation: `--samples` (64) windows of
`--seqlen` (128) tokens of the built-in text's calib split. Every model is then
scored in this process by `optc.evaluate.evaluate`: perplexity on the held-out
eval split (first `--max-tokens` 4096 tokens in windows of `--ctx` 256), size on
disk. Distillation's wall time (the whole `optc` process: load, distill, save,
the onnxruntime check) and peak RSS (`os.wait4`) are reported next to the
issue's targets: recovery ≥ 30% of the perplexity gap, at most 30 minutes;
p-kd-q smaller than w4.

    python tools/bench_distill.py                         # everything (about 40 min on 2 busy cores)
    python tools/bench_distill.py --skip-pkdq             # only the two recovery runs
    python tools/bench_distill.py --prune 'prune-heads{ratio=0.25}' --steps 20
    python tools/bench_distill.py --workdir W --reuse     # score models already built in W again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import Row as BenchRow
from _bench import add_text_options, optc_command  # noqa: E402 - the benchmarks' shared helpers (tools/_bench.py)

DEFAULT_PRUNE = ("prune-heads{ratio=0.25}", "sparsify{pattern=2:4 method=magnitude}")
RECOVERY_TARGET = 0.30
MINUTES_TARGET = 30.0


@dataclasses.dataclass
class Row(BenchRow):
    """A model of this benchmark, with the CPU time and peak RSS of the optc run that built it."""

    cpu_seconds: float | None = None
    peak_rss: int | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_optc(args: list[str], reuse: bool, output: Path) -> tuple[float | None, float | None, int | None, str]:
    """Run `optc ARGS` (unless reusing an existing output); returns wall and CPU seconds, peak RSS and the command."""
    command = [*optc_command(), *args]
    text = shlex.join(command)
    if reuse and output.exists():
        return None, None, None, text
    print(f"$ {text}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_distill: optc exited with {code}: {text}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune", action="append", help="pruning pipeline(s) to recover from (repeatable)")
    parser.add_argument("--steps", type=int, default=100, help="distill steps")
    parser.add_argument("--distill-options", default="", help="more distill options, e.g. 'lr=0.0002 threads=2'")
    add_text_options(parser, samples=64, seqlen=128)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for perplexity")
    parser.add_argument("--skip-pkdq", action="store_true", help="skip w4 and p-kd-q")
    parser.add_argument("--pkdq-full", action="store_true", help="run the p-kd-q pipeline as one command")
    parser.add_argument("--workdir", type=Path, help="where models go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse models already in --workdir")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    from optc.frontends.models import default_model_path

    source = default_model_path()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="optc-bench-distill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    calib = ["--calib", "builtin", "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen)]
    extra = f" {args.distill_options.strip()}" if args.distill_options.strip() else ""
    distill = f"distill{{steps={args.steps}{extra}}}"

    # The fp32 teacher: optc's export of the GGUF (`cleanup` leaves it numerically unchanged).
    fp32 = Row("fp32", workdir / "fp32.onnx")
    fp32.compile_s, fp32.cpu_seconds, fp32.peak_rss, fp32.command = run_optc([str(source), "--passes", "cleanup", "-o", str(fp32.path)], args.reuse, fp32.path)
    rows = [fp32]
    pairs: list[tuple[Row, Row]] = []
    for recipe in args.prune or DEFAULT_PRUNE:
        pruned = Row(recipe, workdir / f"{_slug(recipe)}.onnx")
        pruned.compile_s, pruned.cpu_seconds, pruned.peak_rss, pruned.command = run_optc(
            [str(source), "--passes", recipe, "-o", str(pruned.path), *calib], args.reuse, pruned.path)
        kd = Row(f"{recipe},{distill}", workdir / f"{_slug(recipe)}-kd.onnx")
        kd_pass = f"distill{{steps={args.steps} teacher={fp32.path}{extra}}}"
        kd.compile_s, kd.cpu_seconds, kd.peak_rss, kd.command = run_optc(
            [str(pruned.path), "--passes", kd_pass, "-o", str(kd.path), *calib], args.reuse, kd.path)
        rows += [pruned, kd]
        pairs.append((pruned, kd))
    if not args.skip_pkdq:
        w4 = Row("w4a16", workdir / "w4.onnx")
        w4.compile_s, w4.cpu_seconds, w4.peak_rss, w4.command = run_optc([str(source), "--passes", "w4a16", "-o", str(w4.path), *calib], args.reuse, w4.path)
        pkdq = Row("p-kd-q", workdir / "pkdq.onnx")
        if args.pkdq_full:
            pkdq.compile_s, pkdq.cpu_seconds, pkdq.peak_rss, pkdq.command = run_optc(
                [str(source), "--passes", "p-kd-q", "-o", str(pkdq.path), *calib], args.reuse, pkdq.path)
        else:
            heads = next((kd for pruned, kd in pairs if pruned.variant.startswith("prune-heads")), None)
            if heads is None:
                raise SystemExit("bench_distill: p-kd-q reuses the prune-heads model; keep a prune-heads recipe or use --pkdq-full")
            pkdq.compile_s, pkdq.cpu_seconds, pkdq.peak_rss, pkdq.command = run_optc(
                [str(heads.path), "--passes", "w4a16", "-o", str(pkdq.path), *calib], args.reuse, pkdq.path)
            pkdq.note = "w4a16 of the prune-heads+distill model (= the p-kd-q pipeline, staged)"
        rows += [w4, pkdq]

    from optc.evaluate import evaluate, load_tokenizer, size_on_disk

    tokenizer = load_tokenizer(fp32.path)
    for row in rows:
        result = evaluate(row.path, None, args.ctx, args.max_tokens, tokenizer, threads=args.threads)
        row.ppl, row.size_bytes = result.ppl, size_on_disk(row.path)
        print(f"scored {row.variant}: ppl {row.ppl:.3f}", file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M, held-out ppl on {args.max_tokens} tokens (ctx {args.ctx}); calibration {args.samples}x{args.seqlen} "
          f"tokens; workdir {workdir}\n")
    print(f"| {'model':<58} | {'size MB':>8} | {'ppl':>8} | {'optc wall s':>11} | {'optc CPU s':>10} | {'peak RSS':>8} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 12}|{'-' * 10}|")
    for row in rows:
        secs = f"{row.compile_s:.0f}" if row.compile_s is not None else "reused"
        cpu = f"{row.cpu_seconds:.0f}" if row.cpu_seconds is not None else "-"
        rss = f"{row.peak_rss / 2**30:.2f} GB" if row.peak_rss else "-"
        print(f"| {row.variant:<58} | {row.size_bytes / 1e6:>8.1f} | {row.ppl:>8.3f} | {secs:>11} | {cpu:>10} | {rss:>8} |")
    print("\nTargets:")
    ok = True
    for pruned, kd in pairs:
        gap = pruned.ppl - fp32.ppl
        recovered = (pruned.ppl - kd.ppl) / gap if gap > 0 else float("nan")
        minutes = kd.compile_s / 60 if kd.compile_s is not None else None
        passed = recovered >= RECOVERY_TARGET and (minutes is None or minutes <= MINUTES_TARGET)
        ok &= passed
        when = f"{minutes:.1f} min" if minutes is not None else "time not measured (reused)"
        print(f"- {pruned.variant}: ppl {fp32.ppl:.3f} -> {pruned.ppl:.3f} pruned -> {kd.ppl:.3f} distilled: "
              f"{100 * recovered:.1f}% of the gap recovered (target >= {100 * RECOVERY_TARGET:.0f}%) in {when} "
              f"(target <= {MINUTES_TARGET:.0f} min): {'PASS' if passed else 'FAIL'}")
    if not args.skip_pkdq:
        w4, pkdq = rows[-2], rows[-1]
        smaller = pkdq.size_bytes < w4.size_bytes
        ok &= smaller
        print(f"- p-kd-q {pkdq.size_bytes / 1e6:.1f} MB (ppl {pkdq.ppl:.3f}) vs w4a16 {w4.size_bytes / 1e6:.1f} MB (ppl {w4.ppl:.3f}): "
              f"{'smaller: PASS' if smaller else 'not smaller: FAIL'}")
    print("\nCommands:")
    for row in rows:
        print(f"- {row.variant}: {row.command}" + (f"  ({row.note})" if row.note else ""))
    if args.json:
        args.json.write_text(json.dumps([{**dataclasses.asdict(r), "path": str(r.path)} for r in rows], indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
