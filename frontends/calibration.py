"""Calibration data for every analysis, streamed one sample at a time.

Specs (the `--calib` flag; parsed by `optc.calibration_spec`):

* `builtin`: the calibration split of `pydoc_data.topics` (`optc.frontends.text`), tokenized;
* `random`: random inputs shaped like the model's (token ids below the vocab size);
* `text:FILE`: the file tokenized with the model's own tokenizer into
  `samples` windows of `seqlen` tokens;
* `npz:FILE`: arrays by input name, the first axis indexing samples.

`iter_samples` yields one feed dict per sample; nothing holds more than one
sample's arrays at a time, so memory does not grow with the number of samples
(the token ids of a text file are the exception: they are small).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from optc.calibration_spec import CalibrationSpec
from optc.errors import OptcError
from optc.ir import DataType, Model, model_metadata

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
    if spec.kind == "random":
        yield from _random_samples(model, samples, seqlen, seed)
    elif spec.kind == "builtin":
        from optc.frontends.text import builtin_text

        yield from _text_samples(model, builtin_text("calib"), samples, seqlen, "builtin")
    elif spec.kind == "text":
        text = spec.path.read_text(encoding="utf-8", errors="replace")
        yield from _text_samples(model, text, samples, seqlen, f"text:{spec.path}")
    else:
        yield from _npz_samples(model, spec.path, samples)


def _input_shape(value, seqlen: int) -> list[int]:
    dims = []
    for axis, dim in enumerate(value.shape or []):
        if isinstance(dim, int):
            dims.append(dim)
        else:
            dims.append(1 if axis == 0 else seqlen)
    return dims


def _vocab_size(model: Model) -> int:
    config = model_metadata(model, "hf_config") or {}
    return int(config.get("vocab_size") or 100)


def _random_samples(model: Model, samples: int, seqlen: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vocab = _vocab_size(model)
    for _ in range(samples):
        feed = {}
        for value in model.graph.inputs:
            if value.name in model.graph.initializers:
                continue
            shape = _input_shape(value, seqlen)
            dtype = _NUMPY_DTYPES.get(value.dtype)
            if dtype is None:
                raise OptcError(f"--calib random: cannot make data for input {value.name!r} of type {value.dtype}")
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
    from optc.frontends.tokenizer import tokenizer_from_model

    return tokenizer_from_model(model)


def _text_samples(model: Model, text: str, samples: int, seqlen: int, label: str) -> Iterator[dict[str, np.ndarray]]:
    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    if "input_ids" not in names:
        raise OptcError(f"--calib {label}: the model has no 'input_ids' input (inputs: {', '.join(names)})")
    tokenizer = load_tokenizer(model)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    windows = len(ids) // seqlen
    if windows == 0:
        raise OptcError(f"--calib {label}: {len(ids)} tokens, fewer than one window of {seqlen}")
    for i in range(min(samples, windows)):
        window = ids[i * seqlen:(i + 1) * seqlen][None, :]
        feed = {"input_ids": window}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(window)
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(window)
        yield feed


def _npz_samples(model: Model, path: Path, samples: int) -> Iterator[dict[str, np.ndarray]]:
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for bad files
        raise OptcError(f"--calib npz:{path}: not a readable .npz file ({exc})") from exc
    with archive:
        names = set(archive.files)
        if names != set(inputs):
            missing, extra = sorted(set(inputs) - names), sorted(names - set(inputs))
            raise OptcError(
                f"--calib npz:{path}: arrays {sorted(names)} do not match the model inputs {sorted(inputs)}"
                + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            )
        arrays = {name: archive[name] for name in sorted(names)}
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise OptcError(f"--calib npz:{path}: arrays must share a first (sample) axis; got {counts}")
    for name, array in arrays.items():
        _check_array(path, inputs[name], array)
    total = next(iter(counts.values()))
    for i in range(min(samples, total)):
        yield {name: array[i:i + 1] for name, array in arrays.items()}


def _check_array(path: Path, value, array: np.ndarray) -> None:
    expected = _NUMPY_DTYPES.get(value.dtype)
    if expected is not None and array.dtype != expected:
        raise OptcError(f"--calib npz:{path}: array {value.name!r} is {array.dtype}, the model input is {np.dtype(expected)}")
    shape = list(value.shape or [])
    if shape and array.ndim != len(shape):
        raise OptcError(
            f"--calib npz:{path}: array {value.name!r} has rank {array.ndim}, the model input has rank {len(shape)} "
            f"(shape {[d if isinstance(d, int) else str(d) for d in shape]}; axis 0 indexes samples)"
        )
    for axis, dim in enumerate(shape):
        if axis > 0 and isinstance(dim, int) and array.shape[axis] != dim:
            raise OptcError(
                f"--calib npz:{path}: array {value.name!r} has shape {list(array.shape)}, "
                f"the model input needs {dim} on axis {axis}"
            )


__all__ = ["CalibrationSpec", "iter_samples", "load_tokenizer"]
