"""The quantization error report: per-layer SQNR, end-to-end effect, JSON + self-contained HTML.

The quantized model is built by hand here (Q/DQ inserted with onnx.helper,
`optc.quant` annotations on the quantized nodes), so these tests do not depend
on the quantize pass. A scratch pass `test-hand-qdq` swaps it in, so the whole
driver path (`--report`) runs.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc.cli import main
from optc.driver import CompileOptions, compile_file, compile_model
from optc.errors import OptcError
from optc.ir import from_proto
from optc.passes import Pass, PassResult, register_pass
from optc.passes.analyses.quant_error import ErrorStats, measure_error, quantized_nodes
from optc.report import render_html, report_paths, write_reports
from tests.conftest import scratch_registry
from tests.fixtures.models import make_model

FEATURES, HIDDEN, OUT, SEQ, SAMPLES = 8, 16, 4, 5, 3


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32),
        "W2": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
        "W3": rng.standard_normal((HIDDEN, OUT)).astype(np.float32),
    }


def _io(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", width])


def float_model() -> onnx.ModelProto:
    """X → mm1 (h) → Relu (r) → mm2 (g) → lm_head (Y)."""
    w = _weights()
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["g"], name="mm2"),
        helper.make_node("MatMul", ["g", "W3"], ["Y"], name="lm_head"),
    ]
    inits = [numpy_helper.from_array(a, k) for k, a in w.items()]
    return make_model(nodes, [_io("X", FEATURES)], [_io("Y", OUT)], inits, name="float")


def _weight_q(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 (axis 1)."""
    scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def _act_scale(name: str) -> np.float32:
    return np.float32({"X": 3.0, "r": 9.0}[name] / 127.0)


def _annotate(node: onnx.NodeProto, key: str, value) -> None:
    node.metadata_props.append(onnx.StringStringEntryProto(key=f"optc.{key}", value=json.dumps(value)))


def quantized_model() -> onnx.ModelProto:
    """The same graph with int8 per-channel weights (DQ on int8 initializers) and static int8 activations (Q→DQ)."""
    w = _weights()
    inits, nodes = [numpy_helper.from_array(w["W3"], "W3")], []
    for name, src in (("W1", "W1"), ("W2", "W2")):
        q, s = _weight_q(w[src])
        inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(s, f"{name}_s"),
                  numpy_helper.from_array(np.zeros(s.shape, np.int8), f"{name}_zp")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"], axis=1))
    for act in ("X", "r"):
        inits += [numpy_helper.from_array(np.array(_act_scale(act), np.float32), f"{act}_s"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{act}_zp")]
        nodes.append(helper.make_node("QuantizeLinear", [act, f"{act}_s", f"{act}_zp"], [f"{act}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{act}_q", f"{act}_s", f"{act}_zp"], [f"{act}_dq"]))
    mm1 = helper.make_node("MatMul", ["X_dq", "W1_dq"], ["h"], name="mm1")
    relu = helper.make_node("Relu", ["h"], ["r"], name="relu")
    mm2 = helper.make_node("MatMul", ["r_dq", "W2_dq"], ["g"], name="mm2")
    head = helper.make_node("MatMul", ["g", "W3"], ["Y"], name="lm_head")
    for node in (mm1, mm2):
        _annotate(node, "quant", {"op": "MatMul", "weights": "int8", "activations": "int8"})
    _annotate(head, "quant_skipped", "excluded (exclude=lm_head)")
    # Topological order: DQ of W1, Q/DQ of X, mm1, relu, then the rest.
    order = [nodes[0], nodes[2], nodes[3], mm1, relu, nodes[1], nodes[4], nodes[5], mm2, head]
    return make_model(order, [_io("X", FEATURES)], [_io("Y", OUT)], inits, name="quantized")


def calib_feeds() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, SEQ, FEATURES)).astype(np.float32) for _ in range(SAMPLES)]


def _qdq(x: np.ndarray, scale: np.float32) -> np.ndarray:
    # QuantizeLinear: round half to even, saturate to int8; then DequantizeLinear.
    return np.clip(np.round(x / np.float64(scale)), -128, 127) * np.float64(scale)


def expected_sqnr() -> dict[str, float]:
    """SQNR of h, g and Y computed in numpy (float64) over the calibration feeds."""
    w = {k: v.astype(np.float64) for k, v in _weights().items()}
    w1q, s1 = _weight_q(_weights()["W1"])
    w2q, s2 = _weight_q(_weights()["W2"])
    dq1, dq2 = w1q.astype(np.float64) * s1, w2q.astype(np.float64) * s2
    acc = {name: [0.0, 0.0] for name in ("h", "g", "Y")}
    for x in calib_feeds():
        x = x.astype(np.float64)
        h = x @ w["W1"]
        g = np.maximum(h, 0) @ w["W2"]
        y = g @ w["W3"]
        hq = _qdq(x, _act_scale("X")) @ dq1
        gq = _qdq(np.maximum(hq, 0), _act_scale("r")) @ dq2
        yq = gq @ w["W3"]
        for name, a, b in (("h", h, hq), ("g", g, gq), ("Y", y, yq)):
            acc[name][0] += float((a * a).sum())
            acc[name][1] += float(((a - b) ** 2).sum())
        for name, a in (("X", x), ("r", np.maximum(hq, 0))):  # the activation Q/DQ alone, in the quantized model
            scale = _act_scale(name)
            acc.setdefault(f"act:{name}", [0.0, 0.0])
            acc[f"act:{name}"][0] += float((a * a).sum())
            acc[f"act:{name}"][1] += float(((a - _qdq(a, scale)) ** 2).sum())
    return {name: 10 * math.log10(s / n) for name, (s, n) in acc.items()}


# --------------------------------------------------------------------------- the measurement


def test_quantized_nodes_come_from_annotations():
    nodes = quantized_nodes(from_proto(quantized_model()))
    assert [(n.name, n.op_type, n.output) for n in nodes] == [("mm1", "MatMul", "h"), ("mm2", "MatMul", "g")]
    assert [n.activation for n in nodes] == [("X", "X_dq"), ("r", "r_dq")]
    assert [n.parameter for n in nodes] == ["W1_q", "W2_q"]  # no weight_source annotation: the initializer's name
    assert nodes[0].quant == {"op": "MatMul", "weights": "int8", "activations": "int8"}


def test_sqnr_matches_numpy():
    error = measure_error(from_proto(float_model()), from_proto(quantized_model()), ({"X": x} for x in calib_feeds()))
    expected = expected_sqnr()
    assert error.samples == SAMPLES
    measured = {stats.name: stats for _, stats in error.layers}
    assert set(measured) == {"h", "g"}
    for name in ("h", "g"):
        assert measured[name].status == "ok"
        assert measured[name].samples == SAMPLES
        assert measured[name].elements == SAMPLES * SEQ * HIDDEN
        assert measured[name].sqnr_db == pytest.approx(expected[name], abs=0.01)
    # Error accumulates: the second layer sees the first one's error too.
    assert measured["g"].sqnr_db < measured["h"].sqnr_db
    (output,) = error.outputs
    assert output.name == "Y" and output.sqnr_db == pytest.approx(expected["Y"], abs=0.01)
    # The activation quantization alone: x before QuantizeLinear against DequantizeLinear's output.
    assert set(error.activations) == {"X", "r"}
    for name in ("X", "r"):
        assert error.activations[name].sqnr_db == pytest.approx(expected[f"act:{name}"], abs=0.01)


def test_error_stats_edge_cases():
    exact = ErrorStats("a")
    exact.update(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert exact.sqnr_db == math.inf and exact.as_dict()["sqnr_db"] == "inf"

    bad = ErrorStats("b")
    bad.update(np.ones(4, np.float32), np.array([1, np.nan, 1, np.inf], np.float32))
    assert bad.nonfinite == 2 and bad.sqnr_db == -math.inf and bad.as_dict()["sqnr_db"] == "-inf"

    mismatch = ErrorStats("c")
    mismatch.update(np.ones(4, np.float32), np.ones(5, np.float32))
    assert mismatch.status.startswith("shape mismatch") and mismatch.sqnr_db is None

    # Accumulated over calls exactly like one concatenated computation (chunking is invisible).
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (3, (1 << 20) + 5)]
    ys = [x + rng.standard_normal(x.shape).astype(np.float32) * 0.01 for x in xs]
    acc = ErrorStats("d")
    for x, y in zip(xs, ys, strict=True):
        acc.update(x, y)
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    assert acc.sqnr_db == pytest.approx(10 * math.log10((x * x).sum() / ((x - y) ** 2).sum()), rel=1e-9)
    assert acc.max_abs_error == pytest.approx(np.abs(x - y).max())


def test_missing_values_are_reported_not_dropped():
    q = from_proto(quantized_model())
    f = from_proto(float_model())
    for node in f.graph:
        if node.name == "mm1":
            node.outputs[0].name = "h_renamed"
    error = measure_error(f, q, ({"X": x} for x in calib_feeds()))
    status = {stats.name: stats.status for _, stats in error.layers}
    assert status == {"h": "missing in the float model", "g": "ok"}


# --------------------------------------------------------------------------- files


class _Resources(HTMLParser):
    """Collects everything in a page that could load something from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("script", "link", "img", "iframe", "object", "embed", "audio", "video", "source"):
            self.external.append(tag)
        for key, value in attrs:
            if key in ("src", "href", "xlink:href", "srcset", "action", "data") or (value and "url(" in value):
                self.external.append(f"{tag} {key}={value}")

    def handle_data(self, data):
        if "url(" in data or "@import" in data:
            self.external.append(data[:60])


def _no_external_resources(text: str) -> _Resources:
    parser = _Resources()
    parser.feed(text)
    assert parser.external == []
    # The only URL is the SVG namespace identifier (never fetched).
    assert text.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    return parser


def test_report_paths():
    assert report_paths(Path("a/run.json")) == (Path("a/run.json"), Path("a/run.html"))
    assert report_paths(Path("run.html")) == (Path("run.json"), Path("run.html"))
    assert report_paths(Path("run")) == (Path("run"), Path("run.html"))


def test_write_reports_is_atomic(tmp_path, monkeypatch):
    data = {"output": "x.onnx", "quantization": None, "value": float("nan")}
    json_path, html_path = write_reports(tmp_path / "r.json", data)
    assert json.loads(json_path.read_text())["value"] == "nan"  # strict JSON, no NaN literal
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]

    # A failure while writing leaves the old files whole and no temporary files behind.
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    original = Path.write_text

    def failing(self, text, *args, **kwargs):
        if self.name.endswith(".tmp") and "html" in self.name:
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError):
        write_reports(tmp_path / "r.json", {"output": "changed"})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------- through the driver


class HandQDQ(Pass):
    """Replace the model by the hand-quantized one (stands in for the quantize pass)."""

    def run(self, model, am):
        return PassResult(from_proto(quantized_model()), modified=True)


@pytest.fixture(scope="module")
def hand_qdq():
    with scratch_registry():
        register_pass("test-hand-qdq")(HandQDQ)
        yield


@pytest.fixture
def workdir(tmp_path):
    onnx.save(float_model(), tmp_path / "float.onnx")
    np.savez(tmp_path / "calib.npz", X=np.concatenate(calib_feeds()))
    return tmp_path


def _options(workdir: Path, report: str, passes: str = "test-hand-qdq") -> CompileOptions:
    return CompileOptions(passes=passes, calib=f"npz:{workdir / 'calib.npz'}", calib_samples=SAMPLES, report=workdir / report)


@pytest.mark.parametrize("report", ["report.json", "report.html"])
def test_driver_writes_json_and_html(hand_qdq, workdir, report):
    compile_file(workdir / "float.onnx", workdir / "out.onnx", _options(workdir, report))
    data = json.loads((workdir / "report.json").read_text())
    page = (workdir / "report.html").read_text()
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]

    # The run info of the plain report is kept.
    assert data["pipeline"] == "test-hand-qdq" and Path(data["output"]).name == "out.onnx" and data["nodes_before"] == 4
    quant = data["quantization"]
    assert quant["calibration"]["measured_samples"] == SAMPLES
    assert Path(quant["reference"]) == workdir / "float.onnx"
    expected = expected_sqnr()
    layers = {e["name"]: e for e in quant["layers"]}
    assert set(layers) == {"mm1", "mm2"}
    assert layers["mm1"]["sqnr_db"] == pytest.approx(expected["h"], abs=0.01)
    assert layers["mm2"]["sqnr_db"] == pytest.approx(expected["g"], abs=0.01)
    assert layers["mm1"]["weights"] == "int8" and layers["mm1"]["quant"]["activations"] == "int8"
    assert layers["mm1"]["activation_sqnr_db"] == pytest.approx(expected["act:X"], abs=0.01)
    assert layers["mm2"]["activation_sqnr_db"] == pytest.approx(expected["act:r"], abs=0.01)
    assert quant["summary"]["worst_layer"] == "mm2" and quant["summary"]["worst_parameter"] == "W2_q"
    assert quant["summary"]["min_sqnr_db"] == pytest.approx(expected["g"], abs=0.01)
    (kept,) = quant["float_layers"]
    assert kept["name"] == "lm_head" and kept["reason"] == "excluded (exclude=lm_head)" and kept["parameter"] == "W3"
    (out,) = quant["end_to_end"]["outputs"]
    assert out["value"] == "Y" and out["sqnr_db"] == pytest.approx(expected["Y"], abs=0.01)
    assert quant["end_to_end"]["perplexity"]["status"].startswith("not measured: not a causal LM")

    # HTML: self-contained, one SVG with a bar per layer, table worst first.
    parser = _no_external_resources(page)
    assert parser.tags.count("svg") == 1 and parser.tags.count("rect") == 2
    table = page[page.index("Layers, worst first"):]
    assert table.index(">mm2<") < table.index(">mm1<")
    assert f"{expected['g']:.2f}" in page
    assert "worst: mm2 (W2_q). Dashed lines: 20 dB and 30 dB." in page


def test_in_memory_model_is_compared_with_a_float_copy(hand_qdq, workdir):
    compile_model(from_proto(float_model()), workdir / "out.onnx", _options(workdir, "r.json"))
    quant = json.loads((workdir / "r.json").read_text())["quantization"]
    assert quant["reference"] == "(a float copy of the input model)"
    assert {e["name"]: e["sqnr_db"] for e in quant["layers"]}["mm1"] == pytest.approx(expected_sqnr()["h"], abs=0.01)


def test_no_quantization_writes_the_plain_json_only(workdir):
    compile_file(workdir / "float.onnx", workdir / "out.onnx", _options(workdir, "r.json", passes="dce"))
    assert "quantization" not in json.loads((workdir / "r.json").read_text())
    assert not (workdir / "r.html").exists()


def test_companion_clash_is_refused_before_any_work(hand_qdq, workdir):
    (workdir / "r.html").mkdir()
    with pytest.raises(OptcError, match="companion .*r.html is a directory"):
        compile_file(workdir / "float.onnx", workdir / "out.onnx", _options(workdir, "r.json"))
    assert not (workdir / "out.onnx").exists()


def test_cli_report(hand_qdq, workdir, capsys):
    code = main([str(workdir / "float.onnx"), "-o", str(workdir / "out.onnx"), "--passes", "test-hand-qdq",
                 "--calib", f"npz:{workdir / 'calib.npz'}", "--calib-samples", "2", "--report", str(workdir / "run.html")])
    assert code == 0, capsys.readouterr().err
    data = json.loads((workdir / "run.json").read_text())
    assert data["quantization"]["calibration"]["measured_samples"] == 2
    _no_external_resources((workdir / "run.html").read_text())


def test_render_html_escapes_names():
    layer = {"name": "<script>x</script>", "op_type": "MatMul", "output": "o&", "index": 0, "weights": "int8",
             "activations": "int8", "sqnr_db": 12.5, "noise_power": 1.0, "signal_power": 2.0, "max_abs_error": 3.0,
             "status": "ok"}
    page = render_html({"output": "m.onnx", "quantization": {"layers": [layer], "float_layers": [], "summary": {},
                                                             "end_to_end": {"outputs": []}, "calibration": {}}})
    assert "<script>" not in page and "&lt;script&gt;" in page
    _no_external_resources(page)


def test_a_failed_measurement_leaves_no_output(hand_qdq, workdir, monkeypatch):
    # Bad calibration arrays are refused before the pipeline (tests/cli/test_cli_bad_calibration.py), so the
    # measurement is made to fail on its own.
    def fail(*args, **kwargs):
        raise OptcError("onnxruntime cannot run the model for calibration: boom")

    monkeypatch.setattr("optc.report.measure_error", fail)
    options = _options(workdir, "r.json")
    with pytest.raises(OptcError, match=r"--report .*r.json: cannot measure the quantization error: .*boom"):
        compile_file(workdir / "float.onnx", workdir / "out.onnx", options)
    assert sorted(p.name for p in workdir.iterdir()) == ["calib.npz", "float.onnx"]
