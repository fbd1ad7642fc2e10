"""Measure every pass family on every registered model family (tiny random-weight models) and print the matrix.

    .venv/bin/python tools/coverage_matrix.py                      # every family, every cell
    .venv/bin/python tools/coverage_matrix.py --families phi3,gpt2 --cells export,prune-heads
    .venv/bin/python tools/coverage_matrix.py --json matrix.json   # also the raw figures
    .venv/bin/python tools/coverage_matrix.py --families olmo2 --cells export --pipeline 'gptq{group=16}'

Models: `tests/architectures/configs.py` (one transformers config per family, two layers, hidden
40-56, vocabulary 96; BatchNorm statistics and every weight perturbed), saved as Hugging Face
directories and loaded through optc's transformers frontend (export cached in a private folder).

Cells (each a separate `optc.compile` of the family's directory, `--calib random`, 8 samples of 16
tokens, seed 0; outputs compared in onnxruntime on a fixed batch of 2 x 9 tokens or 2 images):

* export: max |onnxruntime - transformers| over the logits (encoders: the last hidden state); ✓ at ≤ 1e-4;
* w8a8, fp8, w4a16, awq (`awq{symmetric=false ov-bits=8}`: 4-bit weights with a zero point, as AutoAWQ, each
  attention's v and o projections at 8 bits as in `w4a16`; the table's header spells the pipeline out): cosine
  of the output to the fp32 export; ✓ at ≥ 0.99;
* prune-heads{ratio=0.5}, prune-ffn{ratio=0.5}: the parameter count after / before (✓ when the pass
  removed something and the model runs in onnxruntime), or the remark that says why not;
* 2:4: `sparsify{pattern=2:4},check-sparsity` (✓ when check-sparsity passes and the model runs), with the
  output cosine;
* tensorrt: `--target tensorrt` (default pipeline), ✓ with 0 trt-check findings;
* `--pipeline TEXT` (repeatable): one more cell per pipeline, its output cosine to the fp32 export.

`--dev` adds to every cosine cell the cosine on a development batch (8 x 16 tokens, seed 1; 8 images):
the data to choose a recipe on, so that the standard batch the ✓ is judged on stays a test batch.

A cell that stops shows ✗ and the first line of optc's error (or of the remark), shortened. On
mixture-of-experts families the experts are stacked 3-D weights; each cell says what the output
holds for them: `experts int4`/`uint4` (the weight-only passes' codes) or `experts float`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CELLS = ("export", "w8a8", "fp8", "w4a16", "awq", "prune-heads", "prune-ffn", "2:4", "tensorrt")
PIPELINES = {
    "w8a8": "w8a8", "fp8": "fp8", "w4a16": "w4a16", "awq": "awq{symmetric=false ov-bits=8}",
    "prune-heads": "prune-heads{ratio=0.5}", "prune-ffn": "prune-ffn{ratio=0.5}",
    "2:4": "sparsify{pattern=2:4},check-sparsity",
}
#: Cells whose header shows the pipeline that ran (a recipe, not the pass's defaults).
SPELLED_OUT = ("awq",)
COSINE_MIN = 0.99
EXPORT_MAX = 1e-4


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _run(path: Path, feeds: dict) -> np.ndarray:
    from optc.runtime.ort import open_session

    session = open_session(path)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _parameters(path: Path) -> int:
    """Elements of every initializer of the model (weights, codes, scales) — the parameter count on disk."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    text = text.removeprefix("optc: ").removeprefix("error: ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _missed(result) -> str | None:
    missed = [r for r in result.remarks if r.kind == "missed"]
    return f"{missed[0].pass_name}: {missed[0].message}" if missed else None


def measure(family: str, cells: list[str], work: Path, dev: bool = False) -> dict[str, dict]:
    """Every requested cell of one family: {cell: {"ok": bool, "text": str, ...}}; `dev`: each cosine cell
    also on the development batch (`dev_cosine`)."""
    import optc
    from optc.architectures import lookup
    from optc.errors import OptcError
    from tests.architectures.configs import feeds as make_feeds
    from tests.architectures.configs import reference, save

    hf_model, folder = save(family, work / family)
    task = lookup(hf_model.config.model_type).task
    out: dict[str, dict] = {}
    base = work / f"{family}-fp32.onnx"
    try:
        optc.compile(str(folder), output=base, passes="cleanup")
    except OptcError as exc:
        return {cell: {"ok": False, "text": "✗ " + _short(f"export: {exc}")} for cell in cells}
    from optc.runtime.ort import open_session

    names = [i.name for i in open_session(base).get_inputs()]
    feeds = make_feeds(task, names)
    fp32 = _run(base, feeds)
    dev_feeds = make_feeds(task, names, batch=8, seq=16, seed=1) if dev else None
    dev_fp32 = _run(base, dev_feeds) if dev_feeds is not None else None
    before = _parameters(base)
    if "export" in cells:
        diff = float(np.abs(fp32 - reference(hf_model, task, feeds)).max())
        out["export"] = {"ok": diff <= EXPORT_MAX, "value": diff, "text": f"{'✓' if diff <= EXPORT_MAX else '✗'} {diff:.0e}"}
    for cell in cells:
        if cell == "export":
            continue
        path = work / f"{family}-{len(out)}.onnx"
        start = time.perf_counter()
        try:
            if cell == "tensorrt":
                result = optc.compile(str(folder), output=path, target="tensorrt")
                summary = next((c for c in result.artifact.checks if c.startswith("trt-check: ") and "finding" in c), "")
                count = int(summary.split("trt-check: ")[1].split()[0]) if summary else -1
                got = _run(path, feeds)
                cos = _cosine(got, fp32)
                ok = count == 0 and cos >= COSINE_MIN
                out[cell] = {"ok": ok, "findings": count, "cosine": cos,
                             "text": f"{'✓' if ok else '✗'} {count} findings"}
                continue
            result = optc.compile(str(folder), output=path, passes=PIPELINES[cell], calib="random",
                                  calib_samples=8, calib_seqlen=16)
        except OptcError as exc:
            out[cell] = {"ok": False, "text": "✗ " + _short(str(exc), 90)}
            continue
        except Exception as exc:  # noqa: BLE001 - a crash is a finding of the matrix, shown in its cell
            out[cell] = {"ok": False, "text": "✗ crash: " + _short(f"{type(exc).__name__}: {exc}")}
            continue
        seconds = time.perf_counter() - start
        got = _run(path, feeds)
        cos = _cosine(got, fp32) if got.shape == fp32.shape else float("nan")
        if cell in ("prune-heads", "prune-ffn"):
            after = _parameters(path)
            missed = _missed(result)
            ok = after < before and got.shape == fp32.shape
            text = f"✓ {after / before:.2f}x params" if ok else "✗ " + _short(missed or "removed nothing", 90)
            out[cell] = {"ok": ok, "params_ratio": after / before, "cosine": cos, "text": text, "seconds": seconds}
        elif cell == "2:4":
            ok = got.shape == fp32.shape
            out[cell] = {"ok": ok, "cosine": cos, "text": f"✓ cos {cos:.3f}", "seconds": seconds}
        else:
            ok = cos >= COSINE_MIN
            out[cell] = {"ok": ok, "cosine": cos, "text": f"{'✓' if ok else '✗'} {cos:.4f}", "seconds": seconds}
            if dev_feeds is not None:
                out[cell]["dev_cosine"] = _cosine(_run(path, dev_feeds), dev_fp32)
                out[cell]["text"] += f" (dev {out[cell]['dev_cosine']:.4f})"
        if lookup(hf_model.config.model_type).moe and cell not in ("prune-heads", "prune-ffn"):
            out[cell]["experts"] = _experts_storage(path)
            out[cell]["text"] += f" (experts {out[cell]['experts']})"
    return out


def _experts_storage(path: Path) -> str:
    """How the output stores a mixture of experts' stacked weights: the integer type of the codes a
    DequantizeLinear reads before the GatherND, or `float`."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in proto.graph.node for o in n.output}
    types = {i.name: i.data_type for i in proto.graph.initializer}
    found = set()
    for node in proto.graph.node:
        dq = producers.get(node.input[0]) if node.op_type == "GatherND" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in types:
            found.add(onnx.helper.tensor_dtype_to_np_dtype(types[dq.input[0]]).name)
    return "/".join(sorted(found)) or "float"


def table(results: dict[str, dict[str, dict]], cells: list[str]) -> str:
    headers = [f"{c}: `{PIPELINES[c]}`" if c in SPELLED_OUT else c for c in cells]
    lines = ["| family | " + " | ".join(headers) + " |", "|---" * (len(cells) + 1) + "|"]
    for family, row in results.items():
        lines.append(f"| {family} | " + " | ".join(row.get(c, {}).get("text", "") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated families (default: every registered one)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated cells of {', '.join(CELLS)}")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--pipeline", action="append", default=[], metavar="TEXT",
                        help="one more cell: this pipeline's output cosine to the fp32 export (repeatable)")
    parser.add_argument("--dev", action="store_true",
                        help="also each cosine on a development batch (8 x 16 tokens, seed 1), to choose recipes on")
    args = parser.parse_args(argv)

    from tests.architectures.configs import FAMILIES

    families = [f for f in args.families.split(",") if f] or list(FAMILIES)
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS] + [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family or cell: {', '.join(unknown)}")
    for text in args.pipeline:
        PIPELINES[text] = text
        cells.append(text)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="optc-matrix-") as tmp:
        work = Path(tmp)
        os.environ["OPTC_CACHE_DIR"] = str(work / "cache")
        for family in families:
            start = time.perf_counter()
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                results[family] = measure(family, cells, work, args.dev)
            print(f"{family}: {time.perf_counter() - start:.0f}s  " + "  ".join(
                f"{c}={results[family][c]['text']}" for c in cells if c in results[family]), file=sys.stderr, flush=True)
    print(table(results, cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
