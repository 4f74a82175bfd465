"""IDX files (the MNIST/Fashion-MNIST format), gzip or raw, read with the header checked first.

The header (magic number, dimensions) is read from the start of the (decompressed) stream, so a
file declaring an absurd size is refused before any payload is read, and exactly the declared
number of bytes is then read: a gzip bomb cannot make us inflate more than the header promised.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from latentdiff.data.limits import MAX_IDX_BYTES
from latentdiff.errors import DataError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _read_exactly(f: BinaryIO, n: int) -> bytearray:
    """Up to n bytes (fewer only at the end of the stream), into a bytearray so numpy's view is writable."""
    buf = bytearray(n)
    done = 0
    with memoryview(buf) as view:  # released on exit, so the bytearray may be shortened below
        while done < n:
            got = f.readinto(view[done:])
            if not got:
                break
            done += got
    del buf[done:]
    return buf


def _header(f: BinaryIO, path: Path) -> tuple[int, ...]:
    """Check magic and dimensions; return the dimensions."""
    head = _read_exactly(f, 4)
    if len(head) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(head)} bytes")
    magic = int.from_bytes(head, "big")
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{IDX_IMAGES_MAGIC:08x} for "
            f"images or 0x{IDX_LABELS_MAGIC:08x} for labels); not a Fashion-MNIST/MNIST IDX file"
        )
    ndim = magic & 0xFF
    raw = _read_exactly(f, 4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"{path}: IDX header truncated: {4 + len(raw)} bytes, need {4 + 4 * ndim}")
    dims = tuple(int.from_bytes(raw[4 * i: 4 * i + 4], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{path}: IDX dimensions {dims} contain a zero; the file holds no data")
    return dims


def _read_payload(f: BinaryIO, path: Path) -> np.ndarray:
    dims = _header(f, path)
    size = math.prod(dims)
    header = 4 + 4 * len(dims)
    if size > MAX_IDX_BYTES:
        raise DataError(f"{path}: IDX dimensions {dims} declare {size} bytes of data, beyond latentdiff's limit "
                        f"of {MAX_IDX_BYTES} bytes; not a Fashion-MNIST file")
    data = _read_exactly(f, size)
    if len(data) < size:
        raise DataError(f"{path}: wrong size for IDX dimensions {dims}: expected {header + size} bytes, found "
                        f"{header + len(data)} (truncated); download the file again")
    if f.read(1):  # one byte is enough to know; never read (or inflate) the rest
        raise DataError(f"{path}: wrong size for IDX dimensions {dims}: expected {header + size} bytes, but the "
                        "file has trailing bytes (longer than its header declares); download the file again")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (images 0x00000803 or labels 0x00000801), gzip or raw.

    Validates the magic number, the dimensions, the declared size against MAX_IDX_BYTES, and the
    exact byte length, reading no more than the header declares.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"  # sniff, so a misnamed file still reads
            raw.seek(0)
            if not is_gzip:
                return _read_payload(raw, path)
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                return _read_payload(f, path)
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e}); download it again") from e
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
