"""Cheap, bounded reads of weight-file headers, before anything large is allocated.

* `read_gguf_header(path)`: a GGUF file's metadata and tensor table, every count and size
  checked against the file's size (a 60-byte file cannot announce a 27 GB model);
* `read_safetensors_header(path)`: a safetensors file's tensor table, every tensor's
  offsets checked against its shape, its dtype and the file's size;
* `weights_held(folder)`: how many parameters (elements) the weight files of a Hugging Face
  directory hold, and in how many bytes.

Each failure is a `ModelLoadError` of one line naming the file. Nothing here reads tensor data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any

from optc.errors import ModelLoadError

#: GGUF metadata value types: struct format of the fixed-size ones.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
#: Deepest array-of-arrays accepted in GGUF metadata (real files use one level).
_GGUF_MAX_NESTING = 4
#: ggml tensors have at most this many dimensions.
_GGML_MAX_DIMS = 4
#: Metadata arrays longer than this are kept as their length only (token lists).
_KEEP_ARRAY_ITEMS = 64
#: safetensors refuses headers above 100 MB; so does this reader.
_SAFETENSORS_MAX_HEADER = 100 * 1000 * 1000
#: Bytes per element of safetensors dtypes (sub-byte and unknown ones are not size-checked).
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
#: Files of a Hugging Face directory that hold weights in formats other than safetensors.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    version: int
    #: Scalars and strings as read; arrays as lists when short, else their length (an int).
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int
    file_size: int

    @property
    def elements(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to read past its end."""

    def __init__(self, buffer: Any, label: str) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.pos = 0
        self.label = label

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.label}: cannot read the GGUF file: {what}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def unpack(self, fmt: str, what: str) -> Any:
        width = struct.calcsize("<" + fmt)
        if self.left < width:
            raise self.fail(f"truncated in {what}")
        value = struct.unpack_from("<" + fmt, self.buffer, self.pos)[0]
        self.pos += width
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A uint64 count of items that each take at least `min_item_bytes` of what is left."""
        n = self.unpack("Q", what)
        if n * min_item_bytes > self.left:
            raise self.fail(f"{what} of {n} does not fit in the {self.size}-byte file")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}", 1)
        raw = bytes(self.buffer[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8") from exc

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"truncated in {what}")
        self.pos += n


def _gguf_value(cursor: _Cursor, kind: int, key: str, depth: int = 0) -> Any:
    if kind in _GGUF_SCALARS:
        return cursor.unpack(_GGUF_SCALARS[kind], f"the value of {key!r}")
    if kind == _GGUF_STRING:
        return cursor.string(f"the value of {key!r}")
    if kind != _GGUF_ARRAY:
        raise cursor.fail(f"metadata {key!r} has unknown type {kind}")
    if depth >= _GGUF_MAX_NESTING:
        raise cursor.fail(f"metadata {key!r} nests arrays too deeply")
    item_kind = cursor.unpack("I", f"the item type of {key!r}")
    if item_kind in _GGUF_SCALARS:
        width = struct.calcsize("<" + _GGUF_SCALARS[item_kind])
        n = cursor.count(f"the length of {key!r}", width)
        if n > _KEEP_ARRAY_ITEMS:
            cursor.skip(n * width, f"the value of {key!r}")
            return n
        return [_gguf_value(cursor, item_kind, key, depth + 1) for _ in range(n)]
    min_item = 8 if item_kind == _GGUF_STRING else 12  # a string's length, an array's type and length
    n = cursor.count(f"the length of {key!r}", min_item)
    items = [_gguf_value(cursor, item_kind, key, depth + 1) for _ in range(n)]
    return items if n <= _KEEP_ARRAY_ITEMS else n


def _ggml_block(ggml_type: int) -> tuple[int, int] | None:
    """(elements per block, bytes per block) of a ggml type, None when unknown."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, each size checked against the file's."""
    path = Path(path)
    label = str(path)
    if not path.is_file():
        raise ModelLoadError(f"{label}: cannot read the GGUF file: not a regular file")
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise ModelLoadError(f"{label}: cannot read the GGUF file: only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse_gguf(buffer, label, size)
    except OSError as exc:
        raise ModelLoadError(f"{label}: cannot read ({exc.strerror or exc})") from exc


def _parse_gguf(buffer: Any, label: str, size: int) -> GGUFHeader:
    cursor = _Cursor(buffer, label)
    if bytes(buffer[:4]) != b"GGUF":
        raise cursor.fail("no GGUF magic")
    cursor.pos = 4
    version = cursor.unpack("I", "the version")
    if version not in (2, 3):
        raise ModelLoadError(f"{label}: cannot read the GGUF file: unsupported version {version} (optc reads versions 2 and 3)")
    n_tensors = cursor.unpack("Q", "the tensor count")
    n_kv = cursor.count("the metadata count", 12)
    if n_tensors * 24 > cursor.left:
        raise cursor.fail(f"a tensor count of {n_tensors} does not fit in the {size}-byte file")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string("a metadata key")
        kind = cursor.unpack("I", f"the type of {key!r}")
        metadata[key] = _gguf_value(cursor, kind, key)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")
    if n_tensors * 24 > cursor.left:
        raise cursor.fail(f"a tensor count of {n_tensors} does not fit in the {size}-byte file")
    infos = []
    for _ in range(n_tensors):
        name = cursor.string("a tensor name")
        n_dims = cursor.unpack("I", f"the rank of tensor {name!r}")
        if n_dims > _GGML_MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_GGML_MAX_DIMS})")
        dims = tuple(cursor.unpack("Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
        ggml_type = cursor.unpack("I", f"the type of tensor {name!r}")
        offset = cursor.unpack("Q", f"the offset of tensor {name!r}")
        infos.append((name, dims, ggml_type, offset))
    data_offset = -(-cursor.pos // alignment) * alignment
    room = max(0, size - data_offset)
    tensors = []
    for name, dims, ggml_type, offset in infos:
        block = _ggml_block(ggml_type)
        if block is None:
            raise cursor.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        per_block, block_bytes = block
        elements = math.prod(dims)
        if dims and dims[0] % per_block:
            raise cursor.fail(f"tensor {name!r}: its rows of {dims[0]} are not whole blocks of {per_block}")
        nbytes = elements // per_block * block_bytes
        if offset > room or nbytes > room - offset:
            raise ModelLoadError(
                f"{label}: cannot read the GGUF file: tensor {name!r} ({nbytes} bytes at offset {offset}) runs past the end "
                f"of its {room} bytes of tensor data; the file is truncated or damaged"
            )
        tensors.append(GGUFTensor(name, tuple(reversed(dims)), ggml_type, offset, nbytes))
    return GGUFHeader(version, metadata, tensors, data_offset, size)


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    #: name → (dtype, shape)
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    data_bytes: int

    @property
    def elements(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())


def read_safetensors_header(path: str | Path, label: str | None = None) -> SafetensorsHeader:
    """The tensor table of a safetensors file; offsets checked against shapes, dtypes and the file size.

    `label` starts each error line (default: the path).
    """
    path = Path(path)
    label = str(path) if label is None else label

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{label}: not a valid safetensors file ({what})")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"only {size} bytes")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
                raise bad(f"a header of {n} bytes does not fit in the {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{label}: cannot read ({exc.strerror or exc})") from exc
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad("its header is not JSON") from exc
    if not isinstance(table, dict):
        raise bad("its header is not a JSON object")
    data_bytes = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} has no description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise bad(f"tensor {name!r} lacks a dtype, a shape or two data offsets")
        begin, end = offsets
        if begin > end or end > data_bytes:
            raise ModelLoadError(
                f"{label}: tensor {name!r} (bytes {begin}..{end}) runs past the end of the file "
                f"({data_bytes} bytes of tensor data); the file is truncated or damaged"
            )
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and math.prod(shape) * itemsize != end - begin:
            raise bad(f"tensor {name!r} of {dtype} {list(shape)} needs {math.prod(shape) * itemsize} bytes, has {end - begin}")
        tensors[name] = (dtype, tuple(shape))
    return SafetensorsHeader(tensors, data_bytes)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


@dataclasses.dataclass(frozen=True)
class WeightsHeld:
    #: Elements (parameters) the files hold; for formats without a readable table, their bytes (an upper bound).
    elements: int
    #: Bytes of tensor data in the files.
    tensor_bytes: int


def weights_held(folder: Path, label: str | None = None) -> WeightsHeld:
    """What the weight files of a Hugging Face directory hold, from their headers only.

    Errors read `LABEL: cannot read the weights: FILE: ...` (`label` defaults to the folder).
    """
    label = str(folder) if label is None else label
    elements = tensor_bytes = 0
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.name.startswith("."):
            continue
        if file.suffix == ".safetensors":
            header = read_safetensors_header(file, f"{label}: cannot read the weights: {file.name}")
            elements += header.elements
            tensor_bytes += header.data_bytes
        elif file.suffix in _OTHER_WEIGHT_SUFFIXES:
            size = file.stat().st_size
            elements += size
            tensor_bytes += size
    return WeightsHeld(elements, tensor_bytes)


__all__ = [
    "GGUFHeader",
    "GGUFTensor",
    "SafetensorsHeader",
    "WeightsHeld",
    "read_gguf_header",
    "read_safetensors_header",
    "weights_held",
]
