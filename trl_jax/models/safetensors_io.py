"""safetensors files through the ``safetensors`` package (numpy framework; bf16 as ``ml_dtypes.bfloat16``; no torch).

* :class:`SafetensorsFile` -- ``safetensors.safe_open(path, framework="numpy")``: the header is read once, and each
  ``f[name]`` reads that one tensor (so a loader placing tensors one by one onto their shardings holds at most one
  tensor on the host at a time).
* :func:`save_file` -- ``safetensors.numpy.save_file`` written to a temporary name and renamed into place, so a
  crash mid-write never leaves a truncated file under the final name.

FP8 tensors (``F8_E4M3``, ``F8_E5M2``): safetensors' numpy reader names dtypes that numpy does not have, so those
tensors are read from their byte range (given by the same header) as ``ml_dtypes`` float8 arrays.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

__all__ = ["SafetensorsFile", "save_file"]

_FP8 = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


class SafetensorsFile:
    """Lazy reader: ``keys()``, ``metadata`` (the ``__metadata__`` dict), ``name in f``, and ``f[name]`` -> one
    ``np.ndarray`` read from the file (``safe_open(..., framework="numpy").get_tensor``)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._handle = safetensors.safe_open(path, framework="numpy")
        except Exception as e:  # noqa: BLE001 - a header safetensors cannot parse: name the file
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); re-save the checkpoint with "
                "save_pretrained(safe_serialization=True) or re-download it."
            ) from e
        self._keys = list(self._handle.keys())
        self._key_set = set(self._keys)
        self.metadata = self._handle.metadata() or {}
        self._fp8_header = None

    def keys(self):
        return list(self._keys)

    def __contains__(self, name):
        return name in self._key_set

    def __getitem__(self, name) -> np.ndarray:
        if name not in self._key_set:
            raise KeyError(f"{self.path} has no tensor {name!r}.")
        dtype = self._handle.get_slice(name).get_dtype()
        if dtype in _FP8:
            return self._read_fp8(name, dtype)
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - e.g. a dtype numpy cannot represent
            raise ValueError(f"{self.path}: cannot read tensor {name!r} (dtype {dtype}): {e}") from e

    def _read_fp8(self, name, dtype) -> np.ndarray:
        if self._fp8_header is None:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._fp8_header = (8 + n, json.loads(fh.read(n)))
        offset, header = self._fp8_header
        start, end = header[name]["data_offsets"]
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - start, offset=offset + start)
        return raw.view(_FP8[dtype]).reshape(header[name]["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Write ``tensors`` (numpy arrays; ``ml_dtypes.bfloat16`` / float8 included) as one safetensors file with
    ``safetensors.numpy.save_file``; ``metadata`` defaults to ``{"format": "pt"}`` (what transformers expects)."""
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (keeps 0-d arrays 0-d)
    tmp = path + ".tmp"
    try:
        safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
    except Exception:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
