"""Writing torch checkpoint files by hand: a tiny protocol-2 pickle assembler and torch's zip layout.

For pickles torch would never write (hostile, corrupt, unusual). Used by tests/test_torch_pickle.py
and the hostile-input tests.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

# A tiny protocol-2 pickle writer, for pickles torch would never write.
MARK, TUPLE, REDUCE, BINPERSID, STOP = b"(", b"t", b"R", b"Q", b"."
NONE, TRUE, FALSE = b"N", b"\x88", b"\x89"


def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def i(value: int) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # ints are not memoized


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def dict_(**items: bytes) -> bytes:
    return b"}" + MARK + b"".join(s(k) + v for k, v in items.items()) + b"u"


def dumps(expr: bytes) -> bytes:
    return b"\x80\x02" + expr + STOP


def storage(key: str, numel: int, stype: str = "FloatStorage") -> bytes:
    return tup(s("storage"), g("torch", stype), s(key), s("cpu"), i(numel)) + BINPERSID


def tensor(storage_expr: bytes, offset, size, stride) -> bytes:
    as_pickle = lambda v: v if isinstance(v, bytes) else i(v)  # noqa: E731
    return call(
        g("torch._utils", "_rebuild_tensor_v2"),
        storage_expr,
        as_pickle(offset),
        tup(*map(as_pickle, size)),
        tup(*map(as_pickle, stride)),
        FALSE,
        call(g("collections", "OrderedDict")),
    )


def write_torch_zip(
    path: Path,
    pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    byteorder: str | None = "little",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data, compress_type=compression)
        zf.writestr("archive/version", "3\n")
    return path


def rewrite_zip(src: Path, dst: Path, *, replace=None, compression=None) -> Path:
    """Copy a torch zip, replacing some records' bytes and/or compressing the storage records."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            is_data = "/data/" in info.filename
            zout.writestr(
                info.filename,
                data,
                compress_type=compression if (compression and is_data) else zipfile.ZIP_STORED,
            )
    return dst
