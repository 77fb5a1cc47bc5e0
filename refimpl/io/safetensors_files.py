"""safetensors files: read as memory-mapped NumPy arrays, written atomically with the library.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` and a
data block. Reading checks the header with clear messages of its own, then asks the ``safetensors``
library to validate the file too (so nothing the library refuses is read: overlapping or
non-contiguous byte ranges, duplicate names, non-integer dimensions, shape products that overflow,
bytes after the last tensor), then makes every tensor a read-only view into one ``numpy.memmap`` of
the file: nothing is copied until a dtype conversion asks for it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from .atomic import fsync_dir, fsync_file, interrupt_on_signals, signals_ignored
from .base import BY_SAFETENSORS, CheckpointError, loads_json, os_error, safetensors_name_of, short_repr

__all__ = ["read_safetensors", "write_safetensors", "safetensors_metadata", "MAX_HEADER_BYTES"]

# The safetensors library refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _read_header(path: str) -> tuple[dict, int, int]:
    """-> (the header as parsed JSON, where the data block starts, its size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated?)")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} is above the {MAX_HEADER_BYTES:,}-byte limit of safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: the safetensors header names {short_repr(e.args[0])} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        loads_json(raw, path, what="the safetensors header")  # raises the one clear message
        raise  # pragma: no cover - loads_json always raises here
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n, size - 8 - n


def _entry(path: str, name: str, info: Any, data_size: int) -> tuple[str, list[int], int, int]:
    """One header entry, checked -> (safetensors dtype, shape, begin, end)."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: malformed header entry for {short_repr(name)}: {short_repr(info)}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int for d in shape) or not isinstance(offsets, list) \
            or len(offsets) != 2 or len(shape) > 64:
        raise CheckpointError(f"{path}: malformed header entry for {short_repr(name)}: {short_repr(info)}")
    begin, end = offsets
    if not all(type(v) is int for v in (begin, end)):
        raise CheckpointError(f"{path}: malformed header entry for {short_repr(name)}: data_offsets must be "
                              f"integers, got {short_repr(info)}")
    if not isinstance(dtype_name, str) or dtype_name not in BY_SAFETENSORS:
        shown = dtype_name if isinstance(dtype_name, str) and dtype_name.isidentifier() and len(dtype_name) < 20 \
            else short_repr(dtype_name)
        raise CheckpointError(f"{path}: tensor {short_repr(name)} has dtype {shown}, which refimpl cannot read")
    count = 1
    for d in shape:  # clipped just above the data size: no huge products, whatever the header says
        count = min(count * min(max(d, 0), data_size + 1), data_size + 1)
    nbytes = count * BY_SAFETENSORS[dtype_name].numpy.itemsize
    if any(d < 0 for d in shape) or not (0 <= begin <= end <= data_size) or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {short_repr(name)} (dtype {dtype_name}, shape {short_repr(shape)}) does not match its "
            f"byte range [{short_repr(begin)}, {short_repr(end)}) in a {data_size}-byte data block (truncated or "
            "corrupt file)")
    return dtype_name, shape, begin, end


def _library_check(path: str) -> None:
    """The safetensors library's own validation of the file (its header parser, not its tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: not a valid safetensors file (the safetensors library refuses it: {detail})") from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """-> (tensors as read-only memmap views, their safetensors dtype names, the file's metadata).

    Raises :class:`CheckpointError` naming the file for anything malformed; OSError if unreadable.
    """
    path = os.fspath(path)
    header, data_start, data_size = _read_header(path)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings, got {short_repr(metadata)}")
    entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != covered:
            raise CheckpointError(
                f"{path}: tensor {short_repr(name)} starts at byte {begin}, but the tensors before it end at "
                f"{covered}: byte ranges must follow each other without overlap or gap")
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{path}: the tensors cover {covered} of the {data_size} bytes of the data block "
                              "(trailing bytes: corrupt file)")
    _library_check(path)
    if data_size:
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
    else:
        mm = np.zeros(0, np.uint8)
    tensors, dtypes = {}, {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        tensors[name] = mm[begin:end].view(BY_SAFETENSORS[dtype_name].numpy).reshape(shape)
        dtypes[name] = dtype_name
    return tensors, dtypes, metadata


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_safetensors(path)[2]


_OS_ERROR = re.compile(r"os error (\d+)")


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # (not thread-safe: only where /proc is missing)
    os.umask(mask)
    return mask


def _sort_metadata(path: str) -> None:
    """Rewrite the header of the safetensors file at ``path`` with its metadata keys sorted.

    The library writes the metadata in the order of a Rust hash map, whose seed changes from process
    to process (and from call to call): the same tensors and metadata would give different bytes.
    Sorted, equal content is equal bytes (golden files and corpus outputs are compared byte for
    byte). The header keeps its length (the library pads it to 8 bytes with spaces), so only the
    header is rewritten, in place; the data block is not touched.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # (keeps its place in the header)
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:  # (JSON escaping that differs from the library's: cannot happen for str values)
            raise AssertionError(f"safetensors header of {path!r} grew when its metadata was sorted")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                      dtypes: Mapping[str, str] | None = None) -> None:
    """Write NumPy ``tensors`` as a safetensors file with the ``safetensors`` library, atomically.

    The library writes a temporary file in the same folder; it is fsynced and renamed over
    ``path`` (one step), so a reader never sees a partial file. An exception, Ctrl-C, SIGTERM or
    SIGHUP removes the temporary file and leaves ``path`` as it was; a write that fails (disk full,
    file size limit) is an ``OSError`` naming the file. ``dtypes`` gives a tensor's safetensors
    dtype where NumPy has none (``"BF16"`` for bfloat16 bits held as uint16; arrays of dtype
    :data:`refimpl.io.BF16_BITS` are recognised without it). The metadata is written with its keys
    sorted, so equal content gives equal bytes in every process.
    """
    import safetensors

    from .atomic import temp_name

    path = os.fspath(path)
    dtypes = dict(dtypes or {})
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings; not so for {bad}")
    arrays, specs = [], {}
    for name, value in tensors.items():
        a = np.asarray(value)
        st = dtypes.get(name) or safetensors_name_of(a)
        if st not in BY_SAFETENSORS:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        entry = BY_SAFETENSORS[st]
        if entry.numpy.itemsize != a.dtype.itemsize:
            raise ValueError(f"tensor {name!r}: {a.dtype} data cannot be written as {st}")
        if not a.flags.c_contiguous or a.dtype.byteorder == ">":
            a = np.array(a, dtype=a.dtype.newbyteorder("<"), order="C")  # (not ascontiguousarray: 0-d stays 0-d)
        arrays.append(a)
        if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.7: zero-copy
            specs[name] = safetensors.TensorSpec(dtype=entry.name, shape=list(a.shape), data_ptr=a.ctypes.data,
                                                 data_len=a.nbytes)
        else:  # older safetensors: the bytes
            specs[name] = {"dtype": entry.name, "shape": list(a.shape), "data": a.tobytes()}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise os_error(FileNotFoundError, errno.ENOENT,
                       f"cannot write {path!r}: the folder {os.path.dirname(path) or '.'!r} does not exist")
    if os.path.isdir(path):
        raise os_error(IsADirectoryError, errno.EISDIR, f"cannot write {path!r}: it is a folder; give a file name")
    tmp = temp_name(path)
    try:
        with interrupt_on_signals():
            try:
                safetensors.serialize_file(specs, tmp, metadata=dict(metadata) if metadata else None)
            except safetensors.SafetensorError as e:  # (disk full, a file size limit, permissions)
                detail = " ".join(str(e).split())
                m = _OS_ERROR.search(detail)
                code = int(m.group(1)) if m else None
                reason = os.strerror(code) if code else detail[:300]
                raise os_error(OSError, code, f"cannot write {path!r}: {reason}") from None
            _sort_metadata(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # the library's temporary file is owner-only
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(folder)
    except BaseException as e:
        with signals_ignored():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and tmp in str(e):  # name the file asked for, not the temporary one
            raise os_error(type(e), e.errno, f"cannot write {path!r}: {e.strerror or e}") from None
        raise
