"""A float-weight sentence encoder (BERT-like) through `w8a8` and `w4a16`: sentence-embedding cosines.

The encoder's weights are random floats on no quantization grid (initializer range 0.15, so every
layer matters to the output), exported from a Hugging Face directory by optc's own frontend. A
sentence embedding is the mean of the last hidden states over the tokens; each quantized model's
embeddings must point where the float model's do: cosine ≥ 0.995 for W8A8, ≥ 0.98 for 4-bit
weights (the issue's bar). Plain 4-bit round-to-nearest is shown to fall below it, so the
bar measures something.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from optc.ir import save_model
from optc.passes import AnalysisManager, PassContext, parse_pipeline
from tests.fixtures import models
from tests.fixtures.hf_folders import exported_hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
CALIB = {"calibration.spec": "random", "calibration.samples": 8, "calibration.seqlen": 24}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, type_vocab_size=2, initializer_range=0.15,
    )
    with exported_hf_folder(tmp_path_factory, "encoder",
                            lambda: transformers.BertModel(config, add_pooling_layer=False)) as folder:
        yield folder


def _embeddings(model) -> np.ndarray:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCAB, size=(8, 24), dtype=np.int64),
             "attention_mask": np.ones((8, 24), np.int64), "token_type_ids": np.zeros((8, 24), np.int64)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path)
        return models.run_ort(path, feeds)[0].mean(axis=1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(("pipeline", "bar"), [("w8a8", 0.995), ("w4a16", 0.98)])
def test_encoder_embedding_cosines(encoder_dir, pipeline, bar):
    from optc.frontends.transformers import load_transformers

    reference = _embeddings(load_transformers(encoder_dir))
    quantized = parse_pipeline(pipeline)(load_transformers(encoder_dir), AnalysisManager(PassContext(config=dict(CALIB))))
    cosines = _cosines(_embeddings(quantized.model), reference)
    assert cosines.min() >= bar, cosines  # measured: w8a8 min 0.9997, w4a16 (GPTQ) min 0.9984
    if pipeline == "w4a16":
        rtn = parse_pipeline("rtn{symmetric=false}")(load_transformers(encoder_dir), AnalysisManager(PassContext()))
        assert _cosines(_embeddings(rtn.model), reference).min() < bar  # measured 0.966: the bar is not trivial
