"""The quantization error report that `--report FILE` writes when the pipeline quantized something.

For each quantized node (every node with the `quant` annotation) it gives the
SQNR between the float model and the quantized model on the calibration data
(`optc.passes.analyses.quant_error`), and the end-to-end effect: the SQNR of
every graph output and, for a causal LM, the held-out perplexity before and
after (`optc.evaluate`). Ops the pipeline kept in float on purpose (the
`quant_skipped` annotation) are listed with their reason and measured too.

Two files, each written atomically:

* JSON: the run information of the plain report plus a `quantization` section;
* HTML: one self-contained page (inline SVG bar chart of SQNR per layer in
  model order, table sorted worst first; no scripts, styles or images from
  anywhere else).

`--report run.json` writes `run.json` and `run.html`; `--report run.html`
writes `run.html` and `run.json`.

The driver uses `QuantReport`: `start()` before the pipeline (checks the paths;
keeps a float copy of an in-memory model), `after_pipeline()` before lowering
(collects the quantized nodes while their annotations are intact),
`measure()` after lowering and `write()`.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from optc.errors import OptcError
from optc.ir import Model, annotation, load_model, node_label, save_model
from optc.ir.annotations import QUANTIZATION, QUANTIZATION_SKIPPED
from optc.passes.analyses.quant_error import (
    QuantError,
    QuantizedNode,
    measure_error,
    quantized_nodes,
    weight_parameter,
)

#: What the report calls SQNR, stated in both files.
METRIC = (
    "SQNR = 10*log10(sum x^2 / sum (x - xq)^2) in dB, accumulated over the calibration samples; x is the float "
    "model's value, xq the quantized model's. Per layer it is cumulative: xq carries the error of every quantized "
    "layer before it."
)
#: SQNR bands used for colours (dB): below the first is poor, below the second fair.
BANDS = (20.0, 30.0)
#: Held-out text used for the perplexity comparison (tokens, window).
PPL_MAX_TOKENS = 4096
PPL_CTX = 256


def report_paths(path: Path) -> tuple[Path, Path]:
    """(JSON file, HTML file) for `--report path`."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        return path.with_suffix(".json"), path
    return path, path.with_suffix(".html")


def skipped_nodes(model: Model) -> list[QuantizedNode]:
    """Weighted ops the pipeline left in float on purpose (`quant_skipped`), with the reason."""
    found = []
    for index, node in enumerate(model.graph):
        reason = annotation(node, QUANTIZATION_SKIPPED)
        if reason is None or annotation(node, QUANTIZATION) is not None or not node.outputs or not node.outputs[0].name:
            continue
        found.append(QuantizedNode(node_label(node), node.op_type, node.outputs[0].name, {"skipped": reason}, index,
                                   weight_parameter(node, None)))
    return found


class QuantReport:
    """Driver glue for the quantization report (see the module docstring)."""

    def __init__(self, report: Path, reference: Path | None) -> None:
        self.report = Path(report)
        self.json_path, self.html_path = report_paths(self.report)
        self.reference = reference
        self.nodes: list[QuantizedNode] = []
        self.skipped: list[QuantizedNode] = []
        self._snapshot: Path | None = None
        self._reference_is_copy = False
        self._folder: tempfile.TemporaryDirectory | None = None

    @classmethod
    def start(
        cls, model: Model, report: Path | None, before_path: Path | None, output: Path, source: Path | None = None,
    ) -> QuantReport | None:
        """Before the pipeline: None without `--report`; refuses report files that would overwrite the run's files."""
        if report is None:
            return None
        self = cls(report, before_path)
        taken = {Path(output).resolve(): "the output", Path(output).resolve().with_name(Path(output).name + ".data"): "the output's data"}
        if source is not None:
            taken[Path(source).resolve()] = "the input"
        for path in (self.json_path, self.html_path):
            if path.resolve() in taken:
                raise OptcError(f"--report {report}: its companion {path} would overwrite {taken[path.resolve()]}; choose another path")
            if path.resolve().is_dir():
                raise OptcError(f"--report {report}: its companion {path} is a directory")
        if before_path is None:
            # An in-memory model: keep a float copy, the pipeline changes the IR in place.
            self._folder = tempfile.TemporaryDirectory(prefix="optc-report-")
            self.reference = save_model(model, Path(self._folder.name) / "float.onnx", external_data=True)
            self._reference_is_copy = True
        return self

    def after_pipeline(self, model: Model, output: Path) -> None:
        """Before lowering: collect the quantized nodes; keep the IR when the artifact will not be ONNX."""
        self.nodes = quantized_nodes(model)
        self.skipped = skipped_nodes(model)
        if self.nodes and Path(output).suffix.lower() != ".onnx":
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="optc-report-")
            self._snapshot = save_model(model, Path(self._folder.name) / "quantized.onnx", external_data=True)

    @property
    def quantized(self) -> bool:
        return bool(self.nodes)

    def measure(self, artifact_path: Path, context: Any) -> dict[str, Any]:
        """The `quantization` section: run the float and quantized models over the calibration data."""
        quant_path = Path(artifact_path) if self._snapshot is None else self._snapshot
        if self.reference is None:
            raise OptcError("--report: the model before the pipeline is not available as a file")
        reference = load_model(self.reference)
        quantized = load_model(quant_path)
        spec, note = _calibration_spec(quantized, context)
        samples, seqlen = int(context.get("calibration.samples", 16)), int(context.get("calibration.seqlen", 256))
        try:
            error = measure_error(reference, quantized, _samples(quantized, spec, samples, seqlen, context.seed),
                                  [*self.nodes, *self.skipped])
        except OptcError as exc:
            raise OptcError(f"--report {self.report}: cannot measure the quantization error: {exc}") from exc
        del reference, quantized
        section = quantization_section(
            error, self.nodes, self.skipped,
            reference=None if self._reference_is_copy else self.reference,
            quantized=Path(artifact_path),
            calibration={"spec": spec, "samples": samples, "seqlen": seqlen, "measured_samples": error.samples, "note": note},
        )
        section["end_to_end"]["perplexity"] = perplexity(self.reference, Path(artifact_path))
        return section

    def write(self, data: dict[str, Any]) -> tuple[Path, Path]:
        try:
            return write_reports(self.report, data)
        finally:
            self.close()

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _calibration_spec(model: Model, context: Any) -> tuple[str, str | None]:
    from optc.passes.infra.calibration import calibration_spec

    try:
        return calibration_spec(model, context), None
    except OptcError:
        return "random", "no calibration data was configured (no --calib and no tokenizer): measured on random inputs"


def _samples(model: Model, spec: str, samples: int, seqlen: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    from optc.runtime.calibration import iter_samples

    yield from iter_samples(model, spec, samples, seqlen, seed=seed)


def perplexity(reference: Path | None, quantized: Path | None) -> dict[str, Any]:
    """Held-out perplexity of both models when they are causal LMs (else why not)."""
    if reference is None or quantized is None or quantized.suffix.lower() not in (".onnx", ".gguf"):
        return {"status": "not measured: needs the float model as ONNX and the quantized model as .onnx or .gguf"}
    from optc.evaluate import evaluate, load_tokenizer
    from optc.runtime.text import describe

    model = load_model(reference)
    inputs = {v.name for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    del model
    if "input_ids" not in inputs or "logits" not in outputs:
        return {"status": "not measured: not a causal LM (needs an input_ids input and a logits output)"}
    try:
        tokenizer = load_tokenizer(quantized)
        before = evaluate(reference, None, PPL_CTX, PPL_MAX_TOKENS, tokenizer)
        after = evaluate(quantized, None, PPL_CTX, PPL_MAX_TOKENS, tokenizer)
    except OptcError as exc:
        return {"status": f"not measured: {exc}"}
    return {
        "status": "ok",
        "text": describe("eval"),
        "ctx": PPL_CTX,
        "tokens": after.tokens,
        "float": before.ppl,
        "quantized": after.ppl,
        "ratio": after.ppl / before.ppl if before.ppl else None,
        "float_latency_s": before.median_latency_s,
        "quantized_latency_s": after.median_latency_s,
    }


def _finite(value: Any) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def quantization_section(
    error: QuantError,
    nodes: list[QuantizedNode],
    skipped: list[QuantizedNode],
    *,
    reference: Path | None,
    quantized: Path | None,
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-ready `quantization` section from a measurement."""
    measured = {(node.name, node.output): stats for node, stats in error.layers}

    def row(node: QuantizedNode, kept_float: bool) -> dict[str, Any]:
        stats = measured[(node.name, node.output)]
        entry = {
            "name": node.name,
            "op_type": node.op_type,
            "output": node.output,
            "index": node.index,
            "parameter": node.parameter,
            "weights": "float" if kept_float else str(node.quant.get("weights", "?")),
            "activations": "float" if kept_float else str(node.quant.get("activations", "?")),
        }
        if kept_float:
            entry["reason"] = node.quant.get("skipped")
        else:
            entry["quant"] = node.quant
        entry.update(stats.as_dict())
        act = error.activations.get(node.activation[0]) if node.activation else None
        entry["activation_sqnr_db"] = act.as_dict()["sqnr_db"] if act is not None else None
        entry["activation_status"] = act.status if act is not None else "no static Q/DQ on the input"
        return entry

    layers = [row(n, False) for n in nodes]
    kept = [row(n, True) for n in skipped]
    values = [_finite(e["sqnr_db"]) for e in layers]
    finite = [v for v in values if v is not None]
    worst = min((e for e in layers if e["status"] == "ok"), key=_sort_key, default=None)
    return {
        "metric": METRIC,
        "reference": str(reference) if reference is not None else "(a float copy of the input model)",
        "quantized": str(quantized) if quantized is not None else None,
        "calibration": calibration,
        "summary": {
            "quantized_layers": len(layers),
            "measured_layers": sum(1 for e in layers if e["status"] == "ok"),
            "float_layers": len(kept),
            "min_sqnr_db": min(finite) if finite else None,
            "median_sqnr_db": statistics.median(finite) if finite else None,
            "worst_layer": worst["name"] if worst else None,
            "worst_parameter": worst["parameter"] if worst else None,
        },
        "layers": layers,
        "float_layers": kept,
        "end_to_end": {"outputs": [s.as_dict() for s in error.outputs]},
    }


def _sort_key(entry: dict[str, Any]) -> tuple[int, float]:
    """Worst first: unmeasured, then -inf, then ascending SQNR, then identical (inf)."""
    value = entry.get("sqnr_db")
    if value is None:
        return (0, 0.0)
    if value == "-inf":
        return (1, 0.0)
    if value == "inf":
        return (3, 0.0)
    return (2, float(value))


# --------------------------------------------------------------------------- writing


def jsonable(data: Any) -> Any:
    """`data` with non-finite floats as the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {k: jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [jsonable(v) for v in data]
    return data


def write_reports(path: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write the JSON and HTML report files atomically (each appears whole or not at all)."""
    json_path, html_path = report_paths(Path(path))
    data = jsonable(data)
    texts = {json_path: json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", html_path: render_html(data)}
    staged: list[tuple[Path, Path]] = []
    try:
        for target, text in texts.items():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.append((tmp, target))
            tmp.write_text(text, encoding="utf-8")
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return json_path, html_path


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.poor{background:#fbe3e3}.fair{background:#fdf3d8}.good{background:#e6f4e6}
.note{color:#555;font-size:.85em}svg{border:1px solid #ddd;background:#fff}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return "+∞" if value == "inf" else ("−∞" if value == "-inf" else value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def _band(sqnr: Any) -> str:
    if sqnr is None:
        return ""
    if sqnr == "-inf":
        return "poor"
    if sqnr == "inf":
        return "good"
    return "poor" if sqnr < BANDS[0] else ("fair" if sqnr < BANDS[1] else "good")


_COLOURS = {"poor": "#d9534f", "fair": "#f0ad4e", "good": "#5cb85c", "": "#bbbbbb"}


def render_svg(layers: list[dict[str, Any]], *, bar: int = 6, height: int = 260) -> str:
    """Inline SVG: one bar per layer (model order), height = SQNR in dB; hover shows the layer."""
    ordered = sorted(layers, key=lambda e: e.get("index", 0))
    bar = max(bar, min(40, 480 // max(1, len(ordered))))  # a few layers still make a readable chart
    finite = [float(e["sqnr_db"]) for e in ordered if isinstance(e.get("sqnr_db"), (int, float))]
    top = max([*finite, BANDS[1] + 10.0])
    top = math.ceil(top / 10.0) * 10.0
    bottom = min(0.0, math.floor(min(finite, default=0.0) / 10.0) * 10.0)
    left, right, pad_top, pad_bottom = 48, 12, 12, 28
    gap = 1 if bar > 3 else 0
    width = left + right + max(1, len(ordered)) * bar
    plot_h = height - pad_top - pad_bottom

    def y(v: float) -> float:
        return pad_top + (top - v) / (top - bottom) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="SQNR per quantized layer in dB, model order">'
    ]
    step = 10.0 if top - bottom <= 80 else 20.0
    tick = bottom
    while tick <= top + 1e-9:
        ty = y(tick)
        parts.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{width - right}" y2="{ty:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" font-size="11" text-anchor="end" fill="#555">{tick:g}</text>')
        tick += step
    for band, colour in zip(BANDS, ("#d9534f", "#f0ad4e"), strict=True):
        if bottom <= band <= top:
            parts.append(f'<line x1="{left}" y1="{y(band):.1f}" x2="{width - right}" y2="{y(band):.1f}" '
                         f'stroke="{colour}" stroke-dasharray="4 3"/>')
    base = y(max(bottom, 0.0))
    for i, entry in enumerate(ordered):
        value = entry.get("sqnr_db")
        x = left + i * bar
        label = f"{entry.get('parameter') or entry['name']} ({entry.get('op_type', '')}): " + ("not measured" if value is None else f"{_fmt(value)} dB")
        if value is None:
            y0 = base - 3.0
            parts.append(f'<rect x="{x}" y="{y0:.1f}" width="{bar - gap}" height="6" fill="{_COLOURS[""]}">'
                         f'<title>{_esc(label)}</title></rect>')
            continue
        if value == "-inf":
            v = bottom
        elif value == "inf":
            v = top
        else:
            v = float(value)
        y0, y1 = sorted((y(v), base))
        colour = _COLOURS[_band(value)]
        parts.append(f'<rect x="{x}" y="{y0:.1f}" width="{bar - gap}" height="{max(y1 - y0, 1.0):.1f}" fill="{colour}">'
                     f'<title>{_esc(label)}</title></rect>')
    parts.append(f'<line x1="{left}" y1="{base:.1f}" x2="{width - right}" y2="{base:.1f}" stroke="#333"/>')
    parts.append(f'<text x="{left}" y="{height - 8}" font-size="11" fill="#555">layers in model order →</text>')
    parts.append(f'<text x="12" y="{pad_top + plot_h / 2:.0f}" font-size="11" fill="#555" '
                 f'transform="rotate(-90 12 {pad_top + plot_h / 2:.0f})" text-anchor="middle">SQNR (dB)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for i, cells in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _td(value: Any, num: bool = False) -> str:
    return f'<td class="num">{_esc(_fmt(value))}</td>' if num else f"<td>{_esc(_fmt(value))}</td>"


def _tdf(value: Any, digits: int) -> str:
    return f'<td class="num">{_esc(_fmt(value, digits))}</td>'


def render_html(data: dict[str, Any]) -> str:
    """One self-contained HTML page for a report (run info + the quantization section, if any)."""
    quant = data.get("quantization") or {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>optc quantization report: {_esc(Path(str(data.get('output', ''))).name)}</title>",
           f"<style>{_CSS}</style></head><body>",
           "<h1>optc quantization report</h1>"]
    info = [
        ("output", data.get("output")), ("target", data.get("target")), ("pipeline", data.get("pipeline")),
        ("nodes", f"{data.get('nodes_before')} → {data.get('nodes_after')}"),
        ("size", _size(data.get("input_bytes"), data.get("output_bytes"))),
        ("compile time", f"{_fmt(data.get('seconds'))} s"),
    ]
    if quant:
        cal = quant.get("calibration", {})
        info += [("float reference", quant.get("reference")),
                 ("calibration", f"{cal.get('spec')}: {cal.get('measured_samples')} sample(s) of {cal.get('seqlen')} (configured {cal.get('samples')})")]
        if cal.get("note"):
            info.append(("note", cal["note"]))
    out.append(_table(["run", ""], [[_td(k), _td(v)] for k, v in info]))
    if not quant:
        out.append("<p>The pipeline quantized nothing.</p></body></html>")
        return "\n".join(out) + "\n"

    summary = quant.get("summary", {})
    out.append("<h2>End-to-end effect</h2>")
    e2e = quant.get("end_to_end", {})
    ppl = e2e.get("perplexity") or {}
    if ppl.get("status") == "ok":
        out.append(_table(
            ["held-out perplexity", "float", "quantized", "quantized / float"],
            [[_td(f"{ppl.get('text')}, {ppl.get('tokens')} predicted tokens, windows of {ppl.get('ctx')}"),
              _tdf(ppl.get("float"), 3), _tdf(ppl.get("quantized"), 3), _tdf(ppl.get("ratio"), 4)]],
        ))
    elif ppl:
        out.append(f'<p class="note">Perplexity {_esc(ppl.get("status"))}.</p>')
    rows = [[_td(o["value"]), _td(o["sqnr_db"], True), _td(o["noise_power"], True), _td(o["max_abs_error"], True), _td(o["status"])]
            for o in e2e.get("outputs", [])]
    out.append(_table(["graph output", "SQNR (dB)", "noise power", "max |error|", "status"], rows,
                      [_band(o["sqnr_db"]) for o in e2e.get("outputs", [])]))

    layers = quant.get("layers", [])
    kept = quant.get("float_layers", [])
    out.append("<h2>SQNR per quantized layer</h2>")
    out.append(f'<p class="note">{summary.get("measured_layers")} of {summary.get("quantized_layers")} quantized layers measured; '
               f'min {_esc(_fmt(summary.get("min_sqnr_db")))} dB, median {_esc(_fmt(summary.get("median_sqnr_db")))} dB, '
               f'worst: {_esc(summary.get("worst_layer"))}'
               + (f' ({_esc(summary["worst_parameter"])})' if summary.get("worst_parameter") else "") + f'. Dashed lines: {BANDS[0]:g} dB and {BANDS[1]:g} dB. '
               f"{_esc(quant.get('metric', ''))} The input Q/DQ SQNR is the activation quantization alone: the layer's input "
               "before QuantizeLinear against DequantizeLinear's output, both in the quantized model.</p>")
    out.append(render_svg(layers))
    out.append("<h2>Layers, worst first</h2>")
    ordered = sorted(layers, key=_sort_key)
    out.append(_table(
        ["#", "layer", "parameter", "op", "weights", "activations", "why this precision", "SQNR (dB)",
         "input Q/DQ SQNR (dB)", "noise power", "signal power", "max |error|", "output", "status"],
        [[_td(e.get("index"), True), _td(e["name"]), _td(e.get("parameter")), _td(e["op_type"]), _td(e["weights"]),
          _td(e["activations"]), _td((e.get("quant") or {}).get("precision_reason")), _td(e["sqnr_db"], True), _td(e.get("activation_sqnr_db"), True), _td(e["noise_power"], True),
          _td(e["signal_power"], True), _td(e["max_abs_error"], True), _td(e["output"]), _td(e["status"])] for e in ordered],
        [_band(e["sqnr_db"]) for e in ordered],
    ))
    if kept:
        out.append("<h2>Kept in float</h2>")
        out.append(_table(
            ["#", "layer", "parameter", "op", "reason", "SQNR (dB)", "output", "status"],
            [[_td(e.get("index"), True), _td(e["name"]), _td(e.get("parameter")), _td(e["op_type"]), _td(e.get("reason")),
              _td(e["sqnr_db"], True), _td(e["output"]), _td(e["status"])] for e in sorted(kept, key=lambda e: e.get("index", 0))],
        ))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _size(before: Any, after: Any) -> str:
    if not isinstance(before, int) or not isinstance(after, int) or not before:
        return "—"
    return f"{before / 1e6:.2f} MB → {after / 1e6:.2f} MB ({after / before:.2f}×)"


__all__ = ["METRIC", "QuantReport", "quantization_section", "render_html", "render_svg", "report_paths", "write_reports"]
