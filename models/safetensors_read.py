"""Reads safetensors files tensor by tensor with plain file reads (no mmap).

The safetensors library maps whole files into memory; every tensor read then stays resident as page cache counted in
the process RSS, so loading a model would show a second full copy. Reading each tensor's byte range into a fresh
array keeps the host peak at the parameters plus the tensor being converted.
"""
from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header(path: pathlib.Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, byte offset where the data section starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
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
    """Name -> file map over one or more safetensors files; headers are read once per file."""

    def __init__(self, files: dict[str, pathlib.Path]):
        self.files = files
        self._headers: dict[pathlib.Path, tuple[dict, int]] = {}

    def _entry(self, name: str) -> tuple[pathlib.Path, dict, int]:
        path = self.files[name]
        if path not in self._headers:
            if not path.exists():
                raise FileNotFoundError(f"{path}: listed for tensor {name!r} but missing")
            self._headers[path] = read_header(path)
        header, data_start = self._headers[path]
        if name not in header:
            raise KeyError(f"{path}: the index lists tensor {name!r} but the file does not hold it")
        return path, header[name], data_start

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        path, info, data_start = self._entry(name)
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out = np.empty(info["shape"], DTYPES[info["dtype"]])
        if out.nbytes != end - begin:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {out.nbytes}")
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise ValueError(f"{path}: truncated data for tensor {name!r}")
        return out
