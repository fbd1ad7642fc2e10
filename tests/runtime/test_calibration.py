"""Calibration data: the four specs, their errors, and streaming with bounded memory."""

from __future__ import annotations

import tracemalloc
import types

import numpy as np
import onnx
import pytest

from optc.errors import OptcError, UsageError
from optc.ir import Shape, load_model
from optc.passes import AnalysisManager, PassContext
from optc.passes.analyses.activation_stats import ActivationStats
from optc.passes.infra.calibration import calibration_spec
from optc.runtime.calibration import iter_samples
from optc.runtime.calibration_spec import CalibrationSpec
from tests.fixtures import models
from tests.fixtures.cumsum_lm import VOCAB, build_lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(build_lm(tmp_path_factory.mktemp("lm") / "lm.onnx"))


@pytest.fixture(scope="module")
def lm_without_tokenizer(tmp_path_factory):
    return load_model(build_lm(tmp_path_factory.mktemp("lm0") / "lm.onnx", tokenizer=False))


def test_spec_parsing(tmp_path):
    assert CalibrationSpec.parse("random").kind == "random"
    assert CalibrationSpec.parse("builtin").kind == "builtin"
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert str(CalibrationSpec.parse(f"text:{text}")) == f"text:{text}"
    with pytest.raises(UsageError, match="expected builtin, random"):
        CalibrationSpec.parse("csv:x")
    with pytest.raises(OptcError, match="no such file"):
        CalibrationSpec.parse(f"npz:{tmp_path / 'missing.npz'}")


def test_random_samples_follow_the_inputs():
    model = models.to_ir(models.mlp())
    feeds = list(iter_samples(model, "random", samples=3, seqlen=5, seed=7))
    assert len(feeds) == 3
    value = model.graph.inputs[0]
    for feed in feeds:
        array = feed[value.name]
        assert array.dtype == np.float32
        assert array.shape[1:] == tuple(value.shape)[1:]
    again = list(iter_samples(model, "random", samples=3, seqlen=5, seed=7))
    assert all(np.array_equal(a[value.name], b[value.name]) for a, b in zip(feeds, again, strict=True))


def test_random_token_ids_stay_below_the_vocab(lm):
    for feed in iter_samples(lm, "random", samples=4, seqlen=16):
        assert feed["input_ids"].shape == (1, 16)
        assert feed["input_ids"].dtype == np.int64
        assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 100


def test_text_windows(lm, tmp_path):
    words = [w for w in VOCAB if not w.startswith("[")]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words[i % len(words)] for i in range(50)))
    feeds = list(iter_samples(lm, f"text:{text}", samples=10, seqlen=8))
    assert len(feeds) == 6  # 50 tokens hold 6 whole windows of 8
    ids = np.concatenate([f["input_ids"][0] for f in feeds])
    assert ids.tolist() == [VOCAB[words[i % len(words)]] for i in range(48)]
    with pytest.raises(OptcError, match="fewer than one window"):
        list(iter_samples(lm, f"text:{text}", samples=1, seqlen=1000))


def test_builtin_text(lm):
    feeds = list(iter_samples(lm, "builtin", samples=2, seqlen=32))
    assert [f["input_ids"].shape for f in feeds] == [(1, 32), (1, 32)]


def test_text_needs_a_tokenizer(lm_without_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b c")
    with pytest.raises(OptcError, match="carries no tokenizer"):
        list(iter_samples(lm_without_tokenizer, f"text:{text}", samples=1, seqlen=2))


def test_default_spec(lm, lm_without_tokenizer):
    # No data named: an error even when the model could tokenize the built-in text (ranges are never guessed).
    with pytest.raises(OptcError, match="needs calibration data.*--calib builtin"):
        calibration_spec(lm, PassContext())
    assert calibration_spec(lm, PassContext(config={"calibration.spec": "builtin"})) == "builtin"
    assert calibration_spec(lm, PassContext(config={"calibration.spec": "random"})) == "random"
    with pytest.raises(OptcError, match="needs calibration data"):
        calibration_spec(lm_without_tokenizer, PassContext())


def test_npz(tmp_path):
    model = models.to_ir(models.mlp())
    value = model.graph.inputs[0]
    value.shape = Shape(["batch", *list(value.shape)[1:]])  # one sample at a time: a dynamic batch
    shape = [4, *[d if isinstance(d, int) else 2 for d in value.shape][1:]]
    good = tmp_path / "good.npz"
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.savez(good, **{value.name: data})
    feeds = list(iter_samples(model, f"npz:{good}", samples=10, seqlen=1))
    assert len(feeds) == 4
    assert np.array_equal(feeds[2][value.name][0], data[2])

    cases = {
        "names": ({"other": data}, "do not match the model inputs"),
        "dtype": ({value.name: data.astype(np.float64)}, "is float64"),
        "rank": ({value.name: data[..., None]}, "has rank"),
        "width": ({value.name: np.zeros([4, shape[1] + 1], np.float32)}, "needs"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(OptcError, match=message):
            list(iter_samples(model, f"npz:{path}", samples=1, seqlen=1))
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    with pytest.raises(OptcError, match="not a readable .npz"):
        list(iter_samples(model, f"npz:{bad}", samples=1, seqlen=1))


def test_samples_stream_lazily(lm):
    stream = iter_samples(lm, "random", samples=10**9, seqlen=8)
    assert isinstance(stream, types.GeneratorType)
    assert next(stream)["input_ids"].shape == (1, 8)


def _peak_bytes(model, samples: int) -> int:
    am = AnalysisManager(PassContext(config={"calibration.spec": "random", "calibration.samples": samples, "calibration.seqlen": 64}))
    tracemalloc.start()
    am.get(ActivationStats, model)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_calibration_memory_does_not_grow_with_samples():
    model = models.to_ir(models.mlp())
    _peak_bytes(model, 2)  # warm caches and imports
    few, many = _peak_bytes(model, 8), _peak_bytes(model, 128)
    assert many <= 1.25 * few + 64 * 1024, (few, many)


def test_activation_stats_match_numpy(tmp_path):
    proto = models.mlp()
    model = models.to_ir(proto)
    context = PassContext(config={"calibration.spec": "random", "calibration.samples": 5, "calibration.seqlen": 3}, seed=3)
    stats = AnalysisManager(context).get(ActivationStats, model)
    name = model.graph.inputs[0].name
    arrays = [f[name] for f in iter_samples(model, "random", samples=5, seqlen=3, seed=3)]
    both = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays])
    assert stats[name].min == pytest.approx(float(both.min()))
    assert stats[name].max == pytest.approx(float(both.max()))
    np.testing.assert_allclose(stats[name].channel_absmax, np.abs(both).max(axis=0), rtol=1e-6)
    assert stats[name].samples == 5
    onnx.checker.check_model(proto)


def test_npz_token_ids_outside_the_vocabulary(tmp_path):
    """Token ids the embedding cannot gather (negative, or beyond the HF config's vocab_size) are named."""
    from optc.errors import BadCalibrationData
    from optc.runtime.calibration import check_calibration
    from tests.fixtures import quant_models as qm

    model = qm.to_ir(qm.llama_block(vocab=64), vocab=64)
    for ids, bad in (([[1, 2, 64]], "1..64, outside 0..63"), ([[-1, 2, 3]], "-1..3, outside 0..63")):
        path = tmp_path / "ids.npz"
        np.savez(path, input_ids=np.array(ids, np.int64))
        with pytest.raises(BadCalibrationData, match=rf"array 'input_ids' holds token ids {bad}"):
            check_calibration(model, f"npz:{path}")
    np.savez(path, input_ids=np.array([[0, 63]], np.int64))
    check_calibration(model, f"npz:{path}")


@pytest.mark.parametrize(("family", "positions"), [("gpt2", 64), ("roberta", 63)])
def test_windows_stop_at_a_learned_position_table(tmp_path, caplog, family, positions):
    """gpt2's 64 learned positions (roberta's 64 less the pad offset): --calib-seqlen 256 made every pass
    fail in onnxruntime's Gather; windows are now cut to the table, with a warning."""
    pytest.importorskip("transformers")
    from optc.frontends import load_input
    from optc.runtime.calibration import iter_samples
    from optc.runtime.ort import open_session
    from tests.architectures.configs import save

    _, folder = save(family, tmp_path / family)
    model = load_input(folder)
    with caplog.at_level("WARNING"):
        feeds = list(iter_samples(model, "random", 2, 256))
    assert [feed["input_ids"].shape for feed in feeds] == [(1, positions)] * 2
    assert f"the model's {positions} learned positions" in caplog.text
    path = tmp_path / "model.onnx"
    from optc.ir import save_model

    save_model(model, path)
    session = open_session(path)
    names = {i.name for i in session.get_inputs()}
    session.run(None, {k: v for k, v in feeds[0].items() if k in names})  # the longest window runs
