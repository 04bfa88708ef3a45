"""The IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), read and written.

A file is a 4-byte magic `0x00 0x00 <type> <ndim>`, `ndim` big-endian uint32 sizes, then the data in
row-major order. Every length is checked against the header, so a truncated download or a damaged
copy fails here with the file's name and what is missing, not later as a mysterious reshape error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError

# IDX type codes and their big-endian numpy types.
_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(t).newbyteorder("="): code for code, t in _TYPES.items()}
_FIX = "delete it and run again to re-download, or put the official file there"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"\x1f\x8b":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is an EOFError
        raise DatasetError(f"{path} is not a valid gzip file ({e})", hint=_FIX) from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file, gzip-compressed or raw, in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        magic = data[:4].hex() or "missing"
        raise DatasetError(f"{path} is not an IDX file (magic bytes {magic})", hint=_FIX)
    dtype, ndim = np.dtype(_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: its {header}-byte header has {len(data)}", hint=_FIX)
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "corrupt: extra bytes after the data"
        raise DatasetError(f"{path} is {what}: expected {expected} bytes of data for shape {dims}, "
                           f"found {found}", hint=_FIX)
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, gz: bool = True) -> None:
    """Write `array` as an IDX file (gzip-compressed by default), e.g. small official-format test files."""
    a = np.asarray(array)
    code = _CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}; use one of {sorted(map(str, _CODES))}")
    header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    payload = header + a.astype(_TYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if gz else payload)
