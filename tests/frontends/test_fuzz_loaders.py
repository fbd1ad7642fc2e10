"""Fuzzing the loaders: mutated bytes of small valid ONNX and GGUF files (built here) always end well.

"Well" is what the command line promises: the run succeeds, or it ends in the one-line error path
(`optc.entry.run_command`, the function the CLI uses: exit 1 and one `optc: error:` line) that is
not an "internal error" (an unexpected exception type), with nothing left behind, no hang and
bounded memory. The examples run in this process, for speed, with a fixed budget and a fixed seed
(`derandomize=True`), so CI runs the same cases every time; a few mutated files also go through
the real program in a child whose peak RSS is measured.

GGUF examples stop where the torch export would start (it is replaced by a sentinel error): every
check, the config, the weights (dequantized by transformers) and the tokenizer are read for real.
"""

from __future__ import annotations

import contextlib
import io
import random
import resource
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from optc.entry import run_command
from optc.errors import OptcError
from tests.fixtures.mlp_file import build_model
from tests.frontends.hostile_support import PEAK_RSS_LIMIT_KIB, run_measured

#: Seconds one example may take before it counts as a hang.
EXAMPLE_DEADLINE_S = 60
#: In-process growth of the peak RSS allowed over the whole fuzz run (KiB).
PEAK_GROWTH_LIMIT_KIB = 1 << 20

_FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so no error path can swallow it."""


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def alarm(signum, frame):
        raise _Hang(f"an example ran for more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- seeds


def onnx_seed(folder: Path) -> bytes:
    """A small valid model with the parts loaders check: raw and typed initializers, a Constant, a subgraph."""
    build_model(folder / "seed.onnx")
    proto = onnx.load(str(folder / "seed.onnx"))
    proto.graph.initializer.append(
        TensorProto(name="typed", data_type=TensorProto.FLOAT, dims=[2], float_data=[1.0, 2.0])
    )
    proto.graph.node.append(helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.arange(3, dtype=np.int64), "k"),
    ))
    then = helper.make_graph([helper.make_node("Identity", ["typed"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["typed"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    proto.graph.node.append(helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))))
    proto.graph.node.append(helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other))
    proto.graph.output.append(helper.make_tensor_value_info("branch", TensorProto.FLOAT, [2]))
    proto.graph.output.append(helper.make_tensor_value_info("k", TensorProto.INT64, [3]))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def gguf_seed(folder: Path) -> bytes:
    from tests.fixtures.gguf_models import write_tiny_gguf

    return write_tiny_gguf(folder / "seed.gguf").read_bytes()


# --------------------------------------------------------------------------- mutations

#: Values that make counts, lengths and offsets absurd when written over one.
_EXTREMES = [0, 1, 0x7F, 0xFF, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


#: Mutations land here half of the time: the header, where counts and sizes are.
_HEADER_BYTES = 512


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few byte flips, extreme little-endian integers, cuts, insertions or deletions.

    Hypothesis draws one integer that seeds every choice, so positions are uniform over the file
    (or, half of the time, over its first `_HEADER_BYTES`) rather than biased towards its start.
    """
    data = bytearray(seed)
    rng = random.Random(draw(st.integers(0, (1 << 32) - 1)))
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "extreme", "extreme", "cut", "insert", "delete"])
        span = min(len(data), _HEADER_BYTES) if rng.random() < 0.5 else len(data)
        at = rng.randrange(max(1, span))
        if kind == "flip":
            if data:
                data[at] ^= 1 << rng.randrange(8)
        elif kind == "extreme":
            width = rng.choice([1, 4, 8])
            value = rng.choice(_EXTREMES) & ((1 << (8 * width)) - 1)
            data[at:at + width] = value.to_bytes(width, "little")
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[at:at + rng.randint(1, 16)]
    return bytes(data)


_OPS = ["ConstantOfShape", "Expand", "Tile", "Range", "Reshape", "Pad", "Resize", "Gather", "MatMul", "Concat",
        "Transpose", "Squeeze", "Identity", "Add", "NoSuchOp"]
_DIMS = [0, 1, 2, 3, 16, 1 << 20, 1 << 40, -1]
_LOCATIONS = ["w.bin", "../w.bin", "/etc/hostname", "missing.bin", "", "sub/../w.bin"]


def _tensors(proto: onnx.ModelProto) -> list[TensorProto]:
    found = list(proto.graph.initializer)
    for node in proto.graph.node:
        found += [a.t for a in node.attribute if a.HasField("t")]
    return found


@st.composite
def proto_mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed model with a few structural changes: tensors whose dims, dtype, bytes or external
    data disagree, nodes turned into other (shape-producing) ops, extreme attributes, odd opsets."""
    proto = onnx.load_from_string(seed)
    rng = random.Random(draw(st.integers(0, (1 << 32) - 1)))
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["dims", "dtype", "raw", "external", "op", "attribute", "inputs", "opset"])
        tensor = rng.choice(_tensors(proto))
        node = rng.choice(list(proto.graph.node))
        if kind == "dims":
            tensor.dims[:] = [rng.choice(_DIMS) for _ in range(rng.randint(0, 3))]
        elif kind == "dtype":
            tensor.data_type = rng.randint(0, 26)
        elif kind == "raw":
            tensor.raw_data = rng.randbytes(rng.choice([0, 1, 7, 8, 64, 4096]))
        elif kind == "external":
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            tensor.external_data.add(key="location", value=rng.choice(_LOCATIONS))
            for key in ("offset", "length"):
                if rng.random() < 0.6:
                    tensor.external_data.add(key=key, value=str(rng.choice([0, 4, 8, 64, 1 << 40, -8])))
        elif kind == "op":
            node.op_type = rng.choice(_OPS)
        elif kind == "attribute":
            node.attribute.append(helper.make_attribute(rng.choice(["axis", "perm", "value", "axes"]),
                                                        rng.choice([rng.choice(_DIMS), [rng.choice(_DIMS)] * 2])))
        elif kind == "inputs":
            names = [i for n in proto.graph.node for i in n.input] + ["x", "nowhere", ""]
            node.input[:] = [rng.choice(names) for _ in range(rng.randint(0, 3))]
        else:
            proto.opset_import[0].version = rng.choice([1, 7, 13, 17, 21, 23, 99, 1000])
    return proto.SerializeToString()


# --------------------------------------------------------------------------- the check


def _check_one(
    data: bytes, suffix: str, folder: Path, run: Callable[[list[str]], int], extra_files: dict[str, bytes] | None = None,
) -> None:
    """Run the CLI's own error path on one mutated file (beside `extra_files`) and check what it promises."""
    extra_files = extra_files or {}
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        work = Path(scratch)
        (work / f"in{suffix}").write_bytes(data)
        for name, content in extra_files.items():
            (work / name).write_bytes(content)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                _deadline(EXAMPLE_DEADLINE_S):
            code = run_command("optc", run, [str(work / f"in{suffix}"), "-o", str(work / "out.onnx")])
        lines = err.getvalue().splitlines()
        left = sorted(p.name for p in work.iterdir())
        inputs = sorted([f"in{suffix}", *extra_files])
        assert (work / f"in{suffix}").read_bytes() == data, "the input changed"
        assert all((work / name).read_bytes() == content for name, content in extra_files.items())
        if code == 0:
            assert left in (sorted([*inputs, "out.onnx"]), sorted([*inputs, "out.onnx", "out.onnx.data"])), left
            return
        assert code == 1, (code, lines)
        assert len(lines) == 1, lines
        assert lines[0].startswith("optc: error: ") and "internal error" not in lines[0], lines[0]
        assert left == inputs, left


def _compile(argv: list[str]) -> int:
    """The CLI's run without the runtime check (onnxruntime's own loader is not under test here)."""
    from optc.cli import run

    return run([*argv, "--no-runtime-check"])


class _ExportReached(OptcError):
    """Everything before the torch export passed; the example stops there."""


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    return {"onnx": onnx_seed(folder), "gguf": gguf_seed(folder)}


@pytest.fixture(scope="module")
def peak_before() -> Iterator[int]:
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    assert grown < PEAK_GROWTH_LIMIT_KIB, f"the fuzz run grew the peak RSS by {grown} KiB"


def test_onnx_seed_compiles(seeds, tmp_path):
    """The unmutated seed compiles (so mutations start from a file that works)."""
    (tmp_path / "seed.onnx").write_bytes(seeds["onnx"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_command("optc", _compile, [str(tmp_path / "seed.onnx"), "-o", str(tmp_path / "out.onnx")])
    assert code == 0, err.getvalue()


def test_onnx_loader_fuzz(seeds, tmp_path_factory, peak_before):
    folder = tmp_path_factory.mktemp("fuzz-onnx")

    @_FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        _check_one(data.draw(mutated(seeds["onnx"]), label="mutated onnx"), ".onnx", folder, _compile)

    check()


def test_onnx_structure_fuzz(seeds, tmp_path_factory, peak_before):
    """Well-formed protobufs whose tensors, nodes and opsets disagree: loaded, verified, cleaned up or refused."""
    folder = tmp_path_factory.mktemp("fuzz-onnx-structure")
    weights = {"w.bin": np.arange(16, dtype=np.float32).tobytes()}

    @_FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        mutant = data.draw(proto_mutated(seeds["onnx"]), label="mutated onnx")
        _check_one(mutant, ".onnx", folder, _compile, weights)

    check()


def test_gguf_loader_fuzz(seeds, tmp_path_factory, peak_before):
    folder = tmp_path_factory.mktemp("fuzz-gguf")
    import optc.frontends.torch as torch_frontend

    def stop(*args, **kwargs):
        raise _ExportReached("fuzz: the export was reached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_frontend, "export_module", stop)
        mp.setenv("OPTC_NO_CACHE", "1")

        @settings(_FUZZ, max_examples=60)
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            _check_one(data.draw(mutated(seeds["gguf"]), label="mutated gguf"), ".gguf", folder, _compile)

        check()


# --------------------------------------------------------------------------- the real program


def _patch(data: bytes, marker: bytes, skip: int, value: bytes) -> bytes:
    """Overwrite the bytes `skip` after the first `marker`."""
    at = data.index(marker) + len(marker) + skip
    return data[:at] + value + data[at + len(value):]


def test_mutated_files_in_a_child_stay_small(seeds, tmp_path, monkeypatch):
    """Through the real program: exit 1, one line, peak RSS under 1 GB, nothing left behind."""
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path / "cache"))
    onnx_file = onnx.load_from_string(seeds["onnx"])
    onnx_file.graph.initializer[0].dims[:] = [1 << 20, 1 << 20]  # a 4 TiB weight, 2 KiB of bytes
    gguf = seeds["gguf"]
    # token_embd.weight's first dimension (after its name and rank) becomes 2**40 elements.
    huge_gguf = _patch(gguf, b"token_embd.weight", 4, struct.pack("<Q", 1 << 40))
    cases = {
        "dims.onnx": (onnx_file.SerializeToString(), ["dims.onnx", "needs", "bytes but holds"]),
        "huge.gguf": (huge_gguf, ["huge.gguf", "token_embd.weight", "runs past the end"]),
    }
    for name, (data, mentions) in cases.items():
        work = tmp_path / name.replace(".", "-")
        work.mkdir()
        (work / name).write_bytes(data)
        code, lines, peak_kib = run_measured([name, "-o", "out.onnx"], work)
        assert code == 1, lines
        assert len(lines) == 1 and lines[0].startswith("optc: error: "), lines
        for text in mentions:
            assert text in lines[0], lines[0]
        assert peak_kib < PEAK_RSS_LIMIT_KIB, f"{name}: peak RSS {peak_kib} KiB"
        assert sorted(p.name for p in work.iterdir()) == [name]
        assert (work / name).read_bytes() == data
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
