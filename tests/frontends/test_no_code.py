"""Loading a model never runs code from it: no unpickling of checkpoints, no remote code.

Each hostile model directory carries code that would create a marker file if it ever ran; the run
must fail with one line, exit 1, and the marker must never appear.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from tests.cli.cli_support import Job, run_optc

_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
    "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32,
    "max_position_embeddings": 64, "torch_dtype": "float32",
}


class _Payload:
    """Unpickling this creates the marker file (through `open`, a plain builtin)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickled_checkpoint(folder: Path, marker: Path) -> None:
    (folder / "config.json").write_text(json.dumps(_CONFIG))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker), "padding": bytes(1 << 16)}))


def _remote_code(folder: Path, marker: Path) -> None:
    config = {**_CONFIG, "model_type": "evil", "architectures": ["EvilForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)


@pytest.mark.parametrize("build", [_pickled_checkpoint, _remote_code], ids=["pickled-checkpoint", "remote-code"])
def test_no_code_from_a_model_ever_runs(tmp_path, build):
    model, marker = tmp_path / "model", tmp_path / "ran"
    model.mkdir()
    build(model, marker)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    run = run_optc(Job([model, "-o", tmp_path / "out.onnx"], tmp_path))
    assert run.returncode == 1, run
    assert len(run.stderr_lines) == 1 and run.stderr_lines[0].startswith("optc: error: "), run
    assert "Traceback" not in run.stderr
    assert not marker.exists(), "code from the model ran"
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
