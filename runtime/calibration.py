"""Calibration data for every analysis, streamed one sample at a time.

Specs (the `--calib` flag; parsed by `optc.runtime.calibration_spec`):

* `builtin`: the calibration split of `pydoc_data.topics` (`optc.runtime.text`), tokenized;
* `random`: random inputs shaped like the model's (token ids below the vocab size);
* `text:FILE`: the file tokenized with the model's own tokenizer into
  `samples` windows of `seqlen` tokens;
* `npz:FILE`: arrays by input name, the first axis indexing samples.

`iter_samples` yields one feed dict per sample; nothing holds more than one
sample's arrays at a time, so memory does not grow with the number of samples
(the token ids of a text file are the exception: they are small).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from optc.architectures import max_positions
from optc.errors import BadCalibrationData, first_line
from optc.ir import DataType, Model, model_metadata
from optc.ir.annotations import HF_CONFIG
from optc.runtime.calibration_spec import CalibrationSpec
from optc.runtime.decoder import STATE_INPUTS, fill_decoder_inputs, has_cache, is_past

_log = logging.getLogger(__name__)

_NUMPY_DTYPES = {
    DataType.FLOAT: np.float32,
    DataType.FLOAT16: np.float16,
    DataType.DOUBLE: np.float64,
    DataType.INT64: np.int64,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
}


def iter_samples(model: Model, spec: str | CalibrationSpec, samples: int, seqlen: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts for `model`, one calibration sample (batch of 1) at a time."""
    spec = spec if isinstance(spec, CalibrationSpec) else CalibrationSpec.parse(spec)
    limit = max_positions(model_metadata(model, HF_CONFIG) or {})
    if spec.kind != "npz" and limit is not None and seqlen > limit:
        _warn_capped(seqlen, limit)
        seqlen = limit
    if spec.kind == "random":
        feeds = _random_samples(model, samples, seqlen, seed)
    elif spec.kind == "builtin":
        from optc.runtime.text import builtin_text

        feeds = _text_samples(model, builtin_text("calib"), samples, seqlen, "builtin")
    elif spec.kind == "text":
        text = spec.path.read_text(encoding="utf-8", errors="replace")
        feeds = _text_samples(model, text, samples, seqlen, f"text:{spec.path}")
    else:
        feeds = _npz_samples(model, spec.path, samples)
    # A KV-cache decoder calibrates on prefills with an empty cache (`optc.runtime.decoder`).
    inputs = [(v.name, list(v.shape or []), _NUMPY_DTYPES.get(v.dtype, np.float32)) for v in model.graph.inputs
              if v.name not in model.graph.initializers]
    for feed in feeds:
        yield fill_decoder_inputs(inputs, feed)


@functools.cache
def _warn_capped(seqlen: int, limit: int) -> None:
    """Once per run (every analysis reads the samples again)."""
    _log.warning("--calib-seqlen %d is longer than the model's %d learned positions: windows of %d tokens",
                 seqlen, limit, limit)


def _input_shape(value, seqlen: int) -> list[int]:
    dims = []
    for axis, dim in enumerate(value.shape or []):
        if isinstance(dim, int):
            dims.append(dim)
        else:
            dims.append(1 if axis == 0 else seqlen)
    return dims


def _vocab_size(model: Model) -> int:
    config = model_metadata(model, HF_CONFIG) or {}
    return int(config.get("vocab_size") or 100)


def _random_samples(model: Model, samples: int, seqlen: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vocab = _vocab_size(model)
    decoder = has_cache(v.name for v in model.graph.inputs)
    for _ in range(samples):
        feed = {}
        for value in model.graph.inputs:
            if value.name in model.graph.initializers:
                continue
            if decoder and (value.name in STATE_INPUTS or is_past(value.name)):
                continue  # filled as a prefill with an empty cache
            shape = _input_shape(value, seqlen)
            dtype = _NUMPY_DTYPES.get(value.dtype)
            if dtype is None:
                raise BadCalibrationData(f"--calib random: cannot make data for input {value.name!r} of type {value.dtype}")
            if "mask" in value.name:
                feed[value.name] = np.ones(shape, dtype=dtype)
            elif value.name == "token_type_ids":
                feed[value.name] = np.zeros(shape, dtype=dtype)
            elif np.issubdtype(dtype, np.integer):
                feed[value.name] = rng.integers(0, vocab, size=shape, dtype=dtype)
            elif dtype is np.bool_:
                feed[value.name] = np.ones(shape, dtype=dtype)
            else:
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
        yield feed


def load_tokenizer(model: Model):
    """The model's own tokenizer, rebuilt from the metadata the frontend stored."""
    from optc.runtime.tokenizer import tokenizer_from_model

    return tokenizer_from_model(model)


def _text_samples(model: Model, text: str, samples: int, seqlen: int, label: str) -> Iterator[dict[str, np.ndarray]]:
    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    if "input_ids" not in names:
        raise BadCalibrationData(f"--calib {label}: the model has no 'input_ids' input (inputs: {', '.join(names)})")
    tokenizer = load_tokenizer(model)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    windows = len(ids) // seqlen
    if windows == 0:
        raise BadCalibrationData(f"--calib {label}: {len(ids)} tokens, fewer than one window of {seqlen}")
    for i in range(min(samples, windows)):
        window = ids[i * seqlen:(i + 1) * seqlen][None, :]
        feed = {"input_ids": window}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(window)
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(window)
        yield feed


#: A compressed member may expand to at most this ratio of its stored size (beyond `_BOMB_FLOOR` bytes),
#: so that a small archive cannot make optc allocate gigabytes.
_BOMB_RATIO = 100
_BOMB_FLOOR = 64 * 2**20


def check_calibration(model: Model, spec: str | CalibrationSpec | None) -> None:
    """Check calibration data against the model's inputs before any pass runs (`npz:FILE`: names, dtypes,
    ranks, shapes, sample counts, finite values); raises `BadCalibrationData`, one line naming the array."""
    if spec is None:
        return
    spec = spec if isinstance(spec, CalibrationSpec) else CalibrationSpec.parse(spec)
    if spec.kind == "npz":
        for _ in _checked_npz_arrays(model, spec.path, load=True):
            pass


def _npz_samples(model: Model, path: Path, samples: int) -> Iterator[dict[str, np.ndarray]]:
    arrays = dict(_checked_npz_arrays(model, path, load=False))
    if not arrays:  # a model without inputs: nothing to feed
        return
    total = next(iter(arrays.values())).shape[0]
    for i in range(min(samples, total)):
        yield {name: array[i:i + 1] for name, array in arrays.items()}


def _checked_npz_arrays(model: Model, path: Path, *, load: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The archive's arrays by input name, checked; `load=True` reads (and checks the values of) one at a time.

    Object arrays are never unpickled (`allow_pickle=False`): their dtype is
    read from the `.npy` header and refused before any data is.
    """
    label = f"--calib npz:{path}"
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for bad files
        raise BadCalibrationData(f"{label}: not a readable .npz file ({first_line(exc)})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise BadCalibrationData(f"{label}: not a .npz archive (a single .npy array?); save it with numpy.savez")
    with archive:
        names = set(archive.files)
        if names != set(inputs):
            missing, extra = sorted(set(inputs) - names), sorted(names - set(inputs))
            raise BadCalibrationData(
                f"{label}: arrays {sorted(names)} do not match the model inputs {sorted(inputs)}"
                + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            )
        headers = {name: _npy_header(archive, name, label) for name in sorted(names)}
        counts = {}
        for name, (shape, dtype) in headers.items():
            _check_header(label, inputs[name], shape, dtype)
            counts[name] = shape[0]
        if len(set(counts.values())) != 1:
            raise BadCalibrationData(f"{label}: arrays must share a first (sample) axis; got {counts}")
        vocab = _known_vocab_size(model)
        arrays: dict[str, np.ndarray] = {}
        for name in sorted(names):
            try:
                array = archive[name]
            except Exception as exc:  # noqa: BLE001 - a damaged member: zlib, EOF or format errors
                raise BadCalibrationData(f"{label}: array {name!r} cannot be read ({first_line(exc)})") from exc
            if load:
                _check_values(label, name, array, vocab)
                del array
            else:
                arrays[name] = array
    yield from arrays.items()


def _npy_header(archive, name: str, label: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a member's `.npy` header, without reading its data (nor unpickling anything)."""
    member = name if name in archive.zip.namelist() else name + ".npy"
    try:
        with archive.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
            info = archive.zip.getinfo(member)
            size = info.file_size - stream.tell()
    except Exception as exc:  # noqa: BLE001 - zipfile, numpy's header parser
        raise BadCalibrationData(f"{label}: array {name!r} is not a readable .npy member ({first_line(exc)})") from exc
    if dtype.hasobject:
        raise BadCalibrationData(
            f"{label}: array {name!r} holds Python objects (dtype {dtype}); optc never unpickles data: "
            "save numeric arrays"
        )
    expected = math.prod(shape) * dtype.itemsize
    if expected != size:
        raise BadCalibrationData(
            f"{label}: array {name!r} declares shape {list(shape)} ({expected:,} bytes) but holds {size:,} bytes"
        )
    if info.file_size > max(_BOMB_FLOOR, _BOMB_RATIO * info.compress_size):
        raise BadCalibrationData(
            f"{label}: array {name!r} expands from {info.compress_size:,} to {info.file_size:,} bytes (more than "
            f"{_BOMB_RATIO}:1); save the arrays uncompressed (numpy.savez)"
        )
    return tuple(shape), dtype


def _check_header(label: str, value, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The array's dtype, rank and static dimensions against the model input it feeds."""
    name = value.name
    expected = _numpy_dtype(value.dtype)
    if expected is not None and dtype != expected:
        raise BadCalibrationData(f"{label}: array {name!r} is {dtype}, the model input is {expected}")
    if not shape:
        raise BadCalibrationData(f"{label}: array {name!r} is a scalar; its first axis must index samples")
    if shape[0] == 0:
        raise BadCalibrationData(f"{label}: array {name!r} holds no samples (its first axis is 0)")
    dims = list(value.shape) if value.shape is not None else None
    if dims is None:
        return
    if len(shape) != len(dims):
        raise BadCalibrationData(
            f"{label}: array {name!r} has rank {len(shape)}, the model input has rank {len(dims)} "
            f"(shape {[d if isinstance(d, int) else str(d) for d in dims]}; axis 0 indexes samples)"
        )
    if dims and isinstance(dims[0], int) and dims[0] != 1:
        raise BadCalibrationData(
            f"{label}: the model input {name!r} has a fixed batch of {dims[0]}, and optc feeds one sample at a "
            "time (axis 0 of the arrays); give the model a batch of 1 or a dynamic one"
        )
    for axis, dim in enumerate(dims):
        if axis > 0 and isinstance(dim, int) and shape[axis] != dim:
            raise BadCalibrationData(
                f"{label}: array {name!r} has shape {list(shape)}, the model input needs {dim} on axis {axis}"
            )


def _check_values(label: str, name: str, array: np.ndarray, vocab: int | None) -> None:
    """Finite floats; token ids within the vocabulary when the model says how large it is."""
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        finite = np.isfinite(array)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise BadCalibrationData(
                f"{label}: array {name!r} holds {int((~finite).sum()):,} NaN or infinite value(s) "
                f"(the first at index {list(where)})"
            )
    elif name == "input_ids" and np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or (vocab is not None and high >= vocab):
            bound = f"0..{vocab - 1}" if vocab is not None else "non-negative"
            raise BadCalibrationData(f"{label}: array {name!r} holds token ids {low}..{high}, outside {bound}")


def _numpy_dtype(dtype: DataType | None) -> np.dtype | None:
    if dtype is None:
        return None
    known = _NUMPY_DTYPES.get(dtype)
    if known is not None:
        return np.dtype(known)
    try:
        return np.dtype(dtype.numpy())
    except Exception:  # noqa: BLE001 - a type numpy has no dtype for
        return None


def _known_vocab_size(model: Model) -> int | None:
    config = model_metadata(model, HF_CONFIG) or {}
    vocab = config.get("vocab_size")
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else None



__all__ = ["CalibrationSpec", "check_calibration", "iter_samples", "load_tokenizer"]
