"""Reads safetensors files by byte range, local or on gs:// (storage.read_range), without mmap or a local copy.

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and the tensors'
bytes, each row-major. So rows [a, b) of a tensor (along its first axis) are one contiguous byte range: a process
reads exactly the rows it needs (one seek, or one ranged GET of an object), into a fresh array. The safetensors
library instead maps whole files into memory (every tensor read then stays resident as page cache counted in the
process RSS) and opens local files only.
"""
from __future__ import annotations

import json
import math
import struct

import ml_dtypes
import numpy as np

import storage

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def read_header(path: storage.PathLike) -> tuple[dict[str, dict], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, byte offset where the data section starts)."""
    raw = storage.read_range(path, 0, 8)
    if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (size,) = struct.unpack("<Q", raw)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: not a safetensors file (header length {size} bytes)")
    try:
        header = json.loads(storage.read_range(path, 8, 8 + size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: unreadable safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
            raise ValueError(f"{path}: unreadable safetensors header: tensor {name!r} lacks dtype, shape or "
                             "data_offsets")
    return header, 8 + size


class TensorReader:
    """Name -> file map over one or more safetensors files; headers are read once per file. `bytes_read` counts the
    tensor bytes read so far (headers not included), `used` the tensors they came from."""

    def __init__(self, files: dict[str, storage.PathLike]):
        self.files = files
        self.bytes_read = 0
        self.used: set[str] = set()
        self._headers: dict[str, tuple[dict, int]] = {}

    def _entry(self, name: str) -> tuple[storage.PathLike, dict, int]:
        path = self.files[name]
        key = str(path)
        if key not in self._headers:
            try:
                self._headers[key] = read_header(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: listed for tensor {name!r} but missing") from None
        header, data_start = self._headers[key]
        if name not in header:
            raise KeyError(f"{path}: the index lists tensor {name!r} but the file does not hold it")
        return path, header[name], data_start

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self._entry(name)[1]["data_offsets"]
        return end - begin

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor along its first axis (the whole of a 0-d tensor), in its file dtype."""
        path, info, data_start = self._entry(name)
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        dtype = np.dtype(DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape {list(shape)} needs "
                             f"{math.prod(shape) * dtype.itemsize}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out_shape = (stop - start, *shape[1:]) if shape else ()
        lo = data_start + begin + (start * row_bytes if shape else 0)
        hi = lo + math.prod(out_shape) * dtype.itemsize
        data = storage.read_range(path, lo, hi)
        if len(data) != hi - lo:
            raise ValueError(f"{path}: truncated data for tensor {name!r}")
        self.bytes_read += len(data)
        self.used.add(name)
        return np.frombuffer(data, dtype).reshape(out_shape)

    def tensor(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 0)
