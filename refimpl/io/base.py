"""The facts every checkpoint reader and writer shares: the error, the dtype table, bfloat16, JSON.

Nothing here reads a tensor file; :mod:`refimpl.io.safetensors_files`, :mod:`refimpl.torch_pickle`
and :mod:`refimpl.io.folders` build on it. It imports nothing else from refimpl, so that the
restricted ``.bin`` reader can use it without an import cycle.

Files are hostile input: every message that quotes file content goes through :func:`short_repr`
(bounded in time and length, whatever the object), and :func:`read_json` turns every way a JSON
file can be malformed (not UTF-8, not JSON, nested too deep, a number too long, too large, the
wrong top-level type) into one project error naming the file.
"""

from __future__ import annotations

import json
import os
import reprlib
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError", "short_repr", "os_error", "loads_json", "read_json", "MAX_JSON_BYTES",
    "DType", "DTYPES", "BY_NAME", "BY_SAFETENSORS", "FLOAT_DTYPES", "BF16_BITS", "dtype_name_of",
    "safetensors_name_of", "bf16_bits_to_float32", "float32_to_bf16_bits", "COMPUTE_DTYPES", "parse_dtype",
    "to_compute_dtype", "is_float_weight",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be; the message says why."""


# ---------------------------------------------------------------------------------------------
# Quoting file content in messages: bounded, whatever the object
# ---------------------------------------------------------------------------------------------


class _BoundedRepr(reprlib.Repr):
    """reprlib with small limits, no sorting (sorting compares attacker objects), and no call to an
    unknown type's ``__repr__`` (which could walk a shared-object graph exponentially)."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdeque = 6
        self.maxdict = self.maxset = self.maxfrozenset = 6
        self.maxstring = 80
        self.maxother = 60

    def repr_int(self, x, level):
        if x.bit_length() > 128:  # repr of a huge int is quadratic (and refused above 4300 digits)
            return f"<int of {x.bit_length()} bits>"
        return repr(x)

    def repr_bytes(self, x, level):
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_bytearray(self, x, level):
        return f"bytearray({self.repr_bytes(bytes(x[:self.maxstring]), level)})"

    def repr_dict(self, x, level):
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in islice(x.items(), self.maxdict)]
        return "{" + ", ".join(items) + (", ..." if len(x) > self.maxdict else "") + "}"

    def _repr_iterable(self, x, level, left, right, maxiter, trail=""):  # no sorting of sets
        if not x:
            return left + right
        if level <= 0:
            return left + "..." + right
        parts = [self.repr1(e, level - 1) for e in islice(x, maxiter)]
        if len(x) > maxiter:
            parts.append("...")
        return left + ", ".join(parts) + (trail if len(x) == 1 else "") + right

    def repr_set(self, x, level):
        return self._repr_iterable(x, level, "{", "}", self.maxset) if x else "set()"

    def repr_frozenset(self, x, level):
        return self._repr_iterable(x, level, "frozenset({", "})", self.maxfrozenset) if x else "frozenset()"

    def repr_instance(self, x, level):
        if isinstance(x, (float, complex, bool, type(None), np.generic, np.dtype)):
            return repr(x)[: self.maxother]
        if isinstance(x, np.ndarray):
            return f"<array {list(x.shape)} {x.dtype}>"
        if isinstance(x, dict):  # OrderedDict and other dict subclasses
            return f"{type(x).__name__}({self.repr_dict(x, level)})"
        if isinstance(x, (list, tuple)):
            return f"{type(x).__name__}({self._repr_iterable(x, level, '[', ']', self.maxlist)})"
        return f"<{type(x).__name__}>"


_REPR = _BoundedRepr()


def short_repr(obj: Any, limit: int = 200) -> str:
    """``repr(obj)`` bounded in length and in work: safe on any object read from a file."""
    try:
        text = _REPR.repr(obj)
    except Exception:  # noqa: BLE001 - a message must never fail because of what it quotes
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error(kind: type, errno: int | None, message: str) -> OSError:
    """``kind(message)`` with ``errno`` set: ``str()`` is the message alone (one line naming the file
    asked for, never a temporary one beside it)."""
    err = kind(message)
    err.errno = errno
    return err


# ---------------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------------

# The largest JSON file read (tokenizer.json of a 250k-token vocabulary is ~17 MB).
MAX_JSON_BYTES = 256 * 2**20


def loads_json(text: str | bytes, where: str, error: type[Exception] = CheckpointError, what: str = "JSON") -> Any:
    """Parse JSON text read from ``where``; every malformation is one ``error`` naming ``where``."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: {what} is not valid JSON (not UTF-8 text: byte "
                        f"{short_repr(e.object[e.start:e.start + 1])} at position {e.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: {what} is nested too deeply to be read") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer longer than Python's int/str conversion limit
        raise error(f"{where}: {what} holds a value that cannot be read ({str(e)[:160]})") from None


def read_json(path: str | os.PathLike, error: type[Exception] = CheckpointError, *, what: str = "the file",
              expect: type | None = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in the file ``path``: the one place where a malformed JSON file becomes ``error``.

    expect: the type of the top-level value (``dict`` by default; None for any). max_bytes: a file
    larger than this is refused before it is read. FileNotFoundError and other OSErrors pass through.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes:,} bytes: not a JSON file this reader accepts")
    value = loads_json(data, path, error, what=what)
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                    f"not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


# ---------------------------------------------------------------------------------------------
# The one dtype table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    """One element type: its name (torch's and NumPy's), NumPy storage dtype, safetensors name.

    bfloat16 has no NumPy dtype: it is stored as its bit pattern, ``<u2``."""

    name: str
    numpy: np.dtype
    safetensors: str | None  # None: no safetensors name (complex128)


DTYPES: tuple[DType, ...] = tuple(
    DType(name, np.dtype(np_dtype), st)
    for name, np_dtype, st in [
        ("float64", "<f8", "F64"), ("float32", "<f4", "F32"), ("float16", "<f2", "F16"), ("bfloat16", "<u2", "BF16"),
        ("int64", "<i8", "I64"), ("int32", "<i4", "I32"), ("int16", "<i2", "I16"), ("int8", "i1", "I8"),
        ("uint64", "<u8", "U64"), ("uint32", "<u4", "U32"), ("uint16", "<u2", "U16"), ("uint8", "u1", "U8"),
        ("bool", "?", "BOOL"), ("complex64", "<c8", "C64"), ("complex128", "<c16", None),
    ]
)
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES if d.safetensors}
# The dtypes a weight may be stored in (refimpl computes in the first two).
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
# NumPy dtype (native order) -> entry; bfloat16 shares uint16's storage and is told apart by metadata.
_BY_NUMPY = {d.numpy.newbyteorder("="): d for d in DTYPES if d.name != "bfloat16"}
# bfloat16 bit patterns as the readers return them when asked for bits: uint16 marked in its metadata.
BF16_BITS = np.dtype(np.uint16, metadata={"torch_dtype": "bfloat16"})


def dtype_name_of(array: Any) -> str | None:
    """The table name of an array's dtype (``bfloat16`` for :data:`BF16_BITS` arrays), None if none."""
    dt = np.dtype(array.dtype)
    if (dt.metadata or {}).get("torch_dtype") == "bfloat16":
        return "bfloat16"
    entry = _BY_NUMPY.get(dt.newbyteorder("="))
    return entry.name if entry else None


def safetensors_name_of(array: Any) -> str | None:
    """The safetensors dtype name of an array (``BF16`` for :data:`BF16_BITS` arrays), None if none."""
    name = dtype_name_of(array)
    return BY_NAME[name].safetensors if name else None


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (a bfloat16 is a float32's top half). [...] -> [...]."""
    bits = np.asarray(bits)
    if bits.dtype.kind != "u" or bits.dtype.itemsize != 2:
        raise TypeError(f"expected uint16 bfloat16 bits, got dtype {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does. [...] -> [...].

    A NaN stays a (quiet) NaN."""
    x = np.asarray(x, dtype=np.float32, order="C")  # (not ascontiguousarray: a 0-d array stays 0-d)
    bits = x.view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = np.asarray(((bits + rounding) >> np.uint32(16)).astype(np.uint16))  # (0-d: an array, not a scalar)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


# The dtypes refimpl computes in (checkpoints in other dtypes are converted on load).
COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64}


def parse_dtype(dtype) -> type:
    """``"float32"``/``"float64"`` (or the NumPy dtype) -> the NumPy scalar type refimpl computes in;
    anything else is a ``ValueError`` that says which dtypes exist."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        why = (
            " (float16/bfloat16 checkpoints are converted on load; refimpl computes in float32 or float64)"
            if name in ("float16", "bfloat16", "half") else ""
        )
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {dtype!r}{why}")
    return COMPUTE_DTYPES[name]


def to_compute_dtype(array: np.ndarray, source_dtype: str, dtype: np.dtype) -> np.ndarray:
    """A floating-point checkpoint tensor in the compute dtype; the same (mmap) array when it matches.

    source_dtype: the safetensors name the file gave (``"BF16"`` marks bit patterns), or ``""``
    when unknown (then the array's own dtype decides). Callers check :func:`is_float_weight` first.
    """
    if source_dtype == "BF16" or dtype_name_of(array) == "bfloat16":
        array = bf16_bits_to_float32(array)
    if array.dtype == dtype:
        return array
    return array.astype(dtype)


def is_float_weight(array: Any, source_dtype: str = "") -> bool:
    """True when a tensor holds floating-point numbers: F64/F32/F16/BF16 (what a weight may be)."""
    if source_dtype:
        entry = BY_SAFETENSORS.get(source_dtype)
        return entry is not None and entry.name in FLOAT_DTYPES
    return dtype_name_of(array) in FLOAT_DTYPES

