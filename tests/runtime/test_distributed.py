"""Several processes through torch.distributed: `torchrun --nproc-per-node 2 --no-python optc ...` writes
the same bytes as one `optc` process (tiny LLaMA block, `gptq` and `w8a8`), and the helpers' one-process
behaviour."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from optc.driver import CompileOptions, compile_file
from optc.runtime import distributed
from tests.cli.cli_support import optc_command
from tests.fixtures import quant_models as qm

TIMEOUT_S = 240


def test_one_process_is_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = distributed.init_from_env()
    assert (world.rank, world.size, world.primary, world.distributed) == (0, 1, True, False)
    assert list(distributed.shard(range(5))) == [0, 1, 2, 3, 4]
    x = torch.tensor([1.5, -2.0], dtype=torch.float32)
    assert distributed.sum_in_rank_order(x).dtype == torch.float64
    assert torch.equal(distributed.maximum(x), x) and torch.equal(distributed.sum_int(torch.tensor([3])), torch.tensor([3]))
    shared = list(distributed.share_out([1, 2, 3], lambda i: (torch.full((i,), float(i)),)))
    assert [t[0].tolist() for t in shared] == [[1.0], [2.0, 2.0], [3.0, 3.0, 3.0]]


def test_a_world_the_environment_cannot_describe_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from optc.errors import OptcError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(OptcError, match="RANK=5 and WORLD_SIZE=2"):
        distributed.requested_world()


def _torchrun() -> list[str]:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, as CI has it
    return env


@pytest.mark.parametrize(("passes", "blocks"), [("gptq", "off"), ("w8a8", "off"), ("gptq", "on")])
def test_two_processes_write_the_bytes_one_process_writes(tmp_path: Path, passes: str, blocks: str) -> None:
    """`blocks=on`: true-sequential GPTQ block by block, each rank running its samples through every block."""
    source = tmp_path / "block.onnx"
    onnx.save(qm.llama_block(hidden=128, ffn=256), str(source), save_as_external_data=True,
              location="block.onnx.data", size_threshold=0)
    calib = tmp_path / "calib.npz"  # 5 samples: rank 0 gets 3, rank 1 gets 2
    np.savez(calib, input_ids=np.random.default_rng(3).integers(0, 64, size=(5, 16), dtype=np.int64))
    args = [str(source), "--passes", passes, "--calib", f"npz:{calib}", "--no-runtime-check", "--calib-blocks", blocks]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    compile_file(source, one / "out.onnx", CompileOptions(passes=passes, calib=f"npz:{calib}", skip_runtime_check=True,
                                                          calib_blocks=blocks))
    launcher = [*_torchrun(), "--standalone", "--nproc-per-node", "2", "--no-python"]
    run = subprocess.run([*launcher, *optc_command(), *args, "-o", str(two / "out.onnx")], env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("optc: wrote") == 1, run.stdout  # rank 0 alone reports
    written = {folder.name: {p.name: p.read_bytes() for p in sorted(folder.iterdir())} for folder in (one, two)}
    assert sorted(written["one"]) == ["out.onnx", "out.onnx.data"]
    assert written["two"] == written["one"]
