"""`kquant`: llama-quantize's per-tensor type rules for every mix, and optc's importance matrix.

The rules are checked two ways: unit cases taken from `llama_tensor_get_type`
(32-layer models, GQA, fallbacks), and end to end against llama-quantize
itself (llama-cpp-python's `llama_model_quantize`) on a tiny random llama
whose rows of 256 take k-quants and whose `ffn_down` rows of 320 need the
fallbacks: every tensor must get the same type and the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optc.backends.gguf import (
    FILE_TYPES,
    GGUF_IMATRIX,
    GGUF_PLAN,
    GgufBackend,
    collect_parameters,
    gguf_tensor_name,
)
from optc.backends.gguf.kquant import (
    MIXES,
    KQuant,
    TensorInfo,
    fallback,
    tensor_type,
    use_more_bits,
)
from optc.errors import MissingCalibrationData, UsageError
from optc.ir import annotation, model_metadata
from optc.ir.annotations import GGUF_TYPE
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.context import PassContext
from optc.passes.infra.pipeline import parse_pipeline
from tests.backends.ggml_oracle import llama_quantize as oracle_quantize
from tests.fixtures.gguf_models import ir_like_frontend, tiny_hf_llama

gguf = pytest.importorskip("gguf")


def types_for(mix: str, name: str, ne0: int, layer: int, *, n_layer: int = 32, n_gqa: float = 1, tied: bool = False, imatrix: bool = False) -> str:
    return tensor_type(mix, TensorInfo(name, ne0, 2, layer), n_layer=n_layer, n_gqa=n_gqa, tied=tied, has_imatrix=imatrix)[0]


def test_use_more_bits_for_32_layers():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize(("mix", "name", "layer", "expected"), [
    ("Q4_K_M", "blk.{}.attn_v.weight", 6, "Q6_K"),
    ("Q4_K_M", "blk.{}.attn_v.weight", 7, "Q4_K"),
    ("Q4_K_M", "blk.{}.ffn_down.weight", 31, "Q6_K"),
    ("Q4_K_M", "blk.{}.attn_q.weight", 0, "Q4_K"),
    ("Q4_K_S", "blk.{}.attn_v.weight", 3, "Q5_K"),
    ("Q4_K_S", "blk.{}.attn_v.weight", 4, "Q4_K"),
    ("Q4_K_S", "blk.{}.ffn_down.weight", 3, "Q5_K"),
    ("Q3_K_M", "blk.{}.attn_v.weight", 1, "Q5_K"),
    ("Q3_K_M", "blk.{}.attn_v.weight", 2, "Q4_K"),
    ("Q3_K_M", "blk.{}.ffn_down.weight", 1, "Q5_K"),
    ("Q3_K_M", "blk.{}.ffn_down.weight", 2, "Q4_K"),
    ("Q3_K_M", "blk.{}.attn_output.weight", 9, "Q4_K"),
    ("Q3_K_M", "blk.{}.ffn_up.weight", 9, "Q3_K"),
    ("Q3_K_L", "blk.{}.attn_output.weight", 9, "Q5_K"),
    ("Q3_K_S", "blk.{}.attn_v.weight", 0, "Q3_K"),
    ("Q2_K", "blk.{}.attn_v.weight", 0, "Q3_K"),
    ("Q2_K", "blk.{}.ffn_down.weight", 0, "Q3_K"),
    ("Q2_K", "blk.{}.attn_output.weight", 0, "Q3_K"),
    ("Q2_K", "blk.{}.ffn_gate.weight", 0, "Q2_K"),
    ("Q5_K_M", "blk.{}.attn_v.weight", 0, "Q6_K"),
    ("Q5_K_S", "blk.{}.attn_v.weight", 0, "Q5_K"),
    ("Q6_K", "blk.{}.ffn_down.weight", 0, "Q6_K"),
    ("Q8_0", "blk.{}.ffn_down.weight", 0, "Q8_0"),
    ("Q4_0", "blk.{}.ffn_down.weight", 0, "Q4_0"),
    # a fused attn_qkv (phi3, gpt2, gptneox) takes attn_v's rules
    ("Q4_K_M", "blk.{}.attn_qkv.weight", 6, "Q6_K"),
    ("Q4_K_M", "blk.{}.attn_qkv.weight", 7, "Q4_K"),
    ("Q3_K_M", "blk.{}.attn_qkv.weight", 1, "Q5_K"),
    ("Q3_K_L", "blk.{}.attn_qkv.weight", 9, "Q5_K"),
    ("Q2_K", "blk.{}.attn_qkv.weight", 0, "Q3_K"),
])
def test_rules(mix, name, layer, expected):
    assert types_for(mix, name.format(layer), 4096, layer) == expected


def test_output_embeddings_gqa_and_imatrix_rules():
    assert types_for("Q4_K_M", "output.weight", 4096, -1) == "Q6_K"
    assert types_for("Q8_0", "output.weight", 4096, -1) == "Q8_0"
    assert types_for("Q4_K_M", "token_embd.weight", 4096, -1) == "Q4_K"  # untied: the default type
    assert types_for("Q4_K_M", "token_embd.weight", 4096, -1, tied=True) == "Q6_K"
    assert types_for("Q4_0", "token_embd.weight", 576, -1, tied=True) == "Q8_0"  # Q6_K, then its fallback
    assert types_for("Q2_K", "token_embd.weight", 576, -1, tied=True) == "Q8_0"  # rows not a multiple of 256
    assert types_for("Q2_K", "blk.0.attn_v.weight", 4096, 0, n_gqa=4) == "Q4_K"
    assert types_for("Q4_0", "blk.3.ffn_down.weight", 4096, 3, imatrix=True) == "Q4_1"
    assert types_for("Q4_0", "blk.4.ffn_down.weight", 4096, 4, imatrix=True) == "Q4_0"
    assert tensor_type("Q4_K_M", TensorInfo("blk.0.attn_norm.weight", 4096, 1, 0), n_layer=32, n_gqa=1, tied=False, has_imatrix=False)[0] == "F32"


def test_fallbacks():
    assert fallback("Q4_K", 576) == ("Q5_0", True)
    assert fallback("Q5_K", 576) == ("Q5_1", True)
    assert fallback("Q6_K", 576) == ("Q8_0", True)
    assert fallback("Q2_K", 576) == ("Q4_0", True)
    assert fallback("Q3_K", 576) == ("Q4_0", True)
    assert fallback("Q4_K", 1536) == ("Q4_K", False)
    assert fallback("Q6_K", 100) == ("F16", True)


def test_options_parse_and_print():
    manager = parse_pipeline("kquant{mix=Q3_K_M imatrix=true}")
    assert manager.pipeline_text() == "kquant{mix=Q3_K_M imatrix=true}"
    assert parse_pipeline("kquant").pipeline_text() == "kquant"
    with pytest.raises(UsageError, match="mix"):
        parse_pipeline("kquant{mix=Q9_K}")


# --------------------------------------------------------------------------- against llama-quantize


@pytest.fixture(scope="module")
def tiny():
    return tiny_hf_llama(layers=2)


@pytest.fixture(scope="module")
def source_f32(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kquant") / "source-f32.gguf"
    GgufBackend().lower(ir_like_frontend(*tiny), path, PassContext(config={"backend.skip_runtime_check": True}))
    return path


def llama_quantize(src: Path, dst: Path, mix: str, imatrix: dict[str, np.ndarray] | None = None) -> None:
    pytest.importorskip("llama_cpp")
    oracle_quantize(src, dst, mix, imatrix=imatrix)


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("mix", MIXES)
def test_same_types_and_bytes_as_llama_quantize(mix, tiny, source_f32, tmp_path):
    theirs = tmp_path / "llama-quantize.gguf"
    llama_quantize(source_f32, theirs, mix)
    model = ir_like_frontend(*tiny)
    result = KQuant(mix=mix)(model)
    assert result.modified and result.effective_preserved().all_preserved()
    ours = tmp_path / "optc.gguf"
    GgufBackend().lower(model, ours, PassContext(config={"backend.skip_runtime_check": True}))
    a, b = tensors(theirs), tensors(ours)
    assert a.keys() == b.keys()
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert [n for n in a if a[n][1] != b[n][1]] == []
    assert gguf.GGUFReader(str(ours)).fields["general.file_type"].contents() == FILE_TYPES[mix]
    assert model_metadata(model, GGUF_PLAN)["mix"] == mix


@pytest.fixture(scope="module")
def block_sized(tmp_path_factory):
    """An untied tiny llama whose every row (hidden 256, intermediate 512) divides into 256-element blocks,
    and its F32 GGUF: no tensor of any mix falls back, so llama-quantize's real k-quant encoders are compared."""
    hf_model, tokenizer = tiny_hf_llama(layers=2, tied=False, intermediate=512)
    path = tmp_path_factory.mktemp("kquant-256") / "source-f32.gguf"
    GgufBackend().lower(ir_like_frontend(hf_model, tokenizer), path, PassContext(config={"backend.skip_runtime_check": True}))
    return (hf_model, tokenizer), path


def test_every_mix_matches_llama_quantize_at_real_block_sizes(block_sized, tmp_path):
    """Every mix `kquant` offers, on rows of 256 and 512 elements: the same types (none a fallback) and bytes."""
    tiny, source = block_sized
    differing: dict[str, list[str]] = {}
    for mix in MIXES:
        model = ir_like_frontend(*tiny)
        result = KQuant(mix=mix)(model)
        assert "fallbacks" not in result.statistics, (mix, result.statistics)
        ours, theirs = tmp_path / f"optc-{mix}.gguf", tmp_path / f"llama-quantize-{mix}.gguf"
        GgufBackend().lower(model, ours, PassContext(config={"backend.skip_runtime_check": True}))
        llama_quantize(source, theirs, mix)
        a, b = tensors(theirs), tensors(ours)
        assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}, mix
        assert a["blk.0.ffn_down.weight"][0] not in ("Q4_0", "Q5_0", "Q5_1", "Q8_0") or mix in ("Q4_0", "Q8_0"), mix
        differing[mix] = [n for n in a if a[n][1] != b[n][1]]
    assert differing == {mix: [] for mix in MIXES}


def calibrated(samples: int = 4) -> AnalysisManager:
    return AnalysisManager(PassContext(config={"calibration.spec": "random", "calibration.samples": samples, "calibration.seqlen": 16}))


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K", "Q4_0"])
def test_imatrix_matches_llama_quantize_given_the_same_matrix(mix, tiny, source_f32, tmp_path):
    model = ir_like_frontend(*tiny)
    KQuant(mix=mix, imatrix=True)(model, calibrated())
    matrix = {}
    for param in collect_parameters(model).values():
        column = annotation(param.value, GGUF_IMATRIX)
        if column is not None:
            matrix[gguf_tensor_name(param.name)] = np.asarray(column, np.float32)
    assert "blk.1.ffn_down.weight" in matrix and matrix["blk.1.ffn_down.weight"].shape == (320,)
    assert "token_embd.weight" in matrix  # measured at the tied output head
    assert all(np.all(c >= 0) and np.any(c > 0) for c in matrix.values())
    theirs = tmp_path / "llama-quantize.gguf"
    llama_quantize(source_f32, theirs, mix, matrix)
    ours = tmp_path / "optc.gguf"
    GgufBackend().lower(model, ours, PassContext(config={"backend.skip_runtime_check": True}))
    a, b = tensors(theirs), tensors(ours)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    assert [n for n in a if a[n][1] != b[n][1]] == []
    plan = model_metadata(model, GGUF_PLAN)
    assert plan["imatrix"]["dataset"] == "random" and plan["imatrix"]["entries"] == len(matrix)


def test_imatrix_is_the_mean_square_of_the_op_input(tiny):
    """The matrix of q_proj is the per-column mean of x² of its MatMul input over every calibration token."""
    import onnxruntime as ort

    from optc.ir import save_model
    from optc.runtime.calibration import iter_samples

    model = ir_like_frontend(*tiny)
    am = calibrated(samples=3)
    KQuant(mix="Q4_K_M", imatrix=True)(model, am)
    value = next(v for v in model.graph.initializers.values() if annotation(v, "source_name") == "model.layers.0.self_attn.q_proj.weight")
    reader = next(iter(value.uses())).node
    name = reader.inputs[0].name
    fresh = ir_like_frontend(*tiny)
    fresh.graph.outputs.append(next(n for n in fresh.graph if n.outputs[0].name == name).outputs[0])
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_model(fresh, Path(folder) / "m.onnx")
        session = ort.InferenceSession(str(Path(folder) / "m.onnx"), providers=["CPUExecutionProvider"])
        total, rows = 0.0, 0
        for feed in iter_samples(fresh, "random", 3, 16):
            x = session.run([name], feed)[0].reshape(-1, 256).astype(np.float64)
            total = total + (x * x).sum(axis=0)
            rows += x.shape[0]
    np.testing.assert_allclose(np.asarray(annotation(value, GGUF_IMATRIX)), total / rows, rtol=1e-5)
    assert annotation(value, GGUF_TYPE) == "Q4_K"


def test_imatrix_needs_calibration_data(tiny):
    model = ir_like_frontend(*tiny)
    with pytest.raises(MissingCalibrationData, match="calibration data"):
        KQuant(mix="Q4_K_M", imatrix=True)(model, AnalysisManager())


def test_unsupported_architecture(tiny):
    from optc.errors import OptcError
    from optc.ir import set_model_metadata
    from optc.ir.annotations import HF_CONFIG

    model = ir_like_frontend(*tiny)
    config = dict(model_metadata(model, HF_CONFIG))
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    set_model_metadata(model, HF_CONFIG, config)
    with pytest.raises(OptcError, match="does not support architecture 'MambaForCausalLM'"):
        KQuant(mix="Q4_K_M")(model)


def test_fallbacks_are_an_analysis_remark_not_a_miss(tiny):
    am = AnalysisManager(PassContext(strict=True))
    result = parse_pipeline("kquant{mix=Q4_K_M}")(ir_like_frontend(*tiny), am)
    assert result.remarks and {r.kind for r in result.remarks} == {"analysis"}
    fell_back = [r.message for r in result.remarks if "fell back" in r.message]
    assert len(fell_back) == (1 if result.statistics.get("fallbacks") else 0)
