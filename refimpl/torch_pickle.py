"""Read torch checkpoint files with NumPy only: no torch, and no code from the file is ever run.

What it reads
-------------
* The zip format that ``torch.save`` has written since torch 1.6 (``pytorch_model.bin``, fairseq
  ``.pt``): ``<prefix>/data.pkl`` (the pickled object tree), ``<prefix>/data/<key>`` (one raw
  record per storage), ``<prefix>/byteorder`` (``little``/``big``; absent in old files, meaning
  little) and ``<prefix>/version``.
* The legacy pre-zip format (``torch.save(..., _use_new_zipfile_serialization=False)``, torch
  < 1.6): a magic-number pickle, a protocol-version pickle, a system-info pickle, the object
  pickle, a pickle listing the storage keys, then each storage as an int64 element count followed
  by its raw bytes. The very old tar format (torch < 0.4) is refused with a message.

How it stays safe
-----------------
``data.pkl`` is run by a restricted unpickler (a subclass of the pure-Python
``pickle._Unpickler``). Every global the pickle names goes through ``find_class``, which only
answers from ``_ALLOWED_GLOBALS``: a table of this module's *own* stand-ins (a tensor rebuild
function that makes a NumPy view, marker objects for storage types and dtypes, a plain
``Namespace`` for ``argparse.Namespace``, ...). Nothing named in the file is imported. Anything
else raises :class:`UnsafeCheckpointError` naming ``module.name`` and the file.
The opcodes that call or mutate objects are overridden too, so that they only act on objects this
module created: REDUCE/NEWOBJ/INST/OBJ call only allow-listed stand-ins, BUILD sets state only on
a ``Namespace``/``OrderedDict``/``OpaqueObject``, APPEND/SETITEM/ADDITEMS only touch real
lists/dicts/sets, and the copyreg extension opcodes (EXT1/2/4) are refused.

The work a file can cause is bounded by its size, not by what it claims:
* dict keys and set elements may only be what state dicts and fairseq args use (str, bytes, int,
  float, bool, None, and flat tuples of those), so hashing is linear: a memo DAG of nested tuples
  used as a key (2^64 paths from 1 KB) is refused before it is hashed;
* the objects, memo entries and marks a pickle creates are counted: at most
  :data:`MAX_PICKLE_OBJECTS` plus 32 per record of the archive (torch writes ~20 per tensor);
* a compressed ``data.pkl`` may inflate to at most the size of the whole file (1 MiB for small
  files), and compressed storage records together to at most :data:`MAX_INFLATION` times the file
  size plus 32 MiB (torch itself never compresses);
* a tensor must fit in its storage (offset, sizes and strides reach no element beyond it); the
  conj/neg bits are applied to the storage's elements, not to the (possibly much larger) strided
  view; identical views share one array; and the distinct views of a file together may hold at
  most twice its storage bytes plus 16 MiB, so that zero strides cannot turn a few bytes into
  gigabytes once a caller materialises the tensors (a dtype cast, a copy);
* every message that quotes file content quotes it through :func:`refimpl.io.short_repr`;
* no codec is looked up by name from a file (``bytearray(s, enc)`` and ``_codecs.encode`` accept
  only latin-1, ASCII and UTF-8, which CPython encodes without a registry lookup or import).

Tensors
-------
Each tensor becomes a read-only ``numpy.ndarray`` with the tensor's shape, dtype and element
strides, viewing its storage. With ``mmap=True`` (default) every uncompressed storage record
(torch always writes ZIP_STORED) is a slice of one ``numpy.memmap`` of the whole file, so
loading costs no tensor memory until pages are touched, tensors that share a storage share
memory, and the file stays mapped while any array is alive. A compressed record, or
``mmap=False``, is read into memory instead (zipfile then checks its CRC; the mmap path does not).
Offsets, shapes and strides are bounds-checked against the storage before a view is made.

Some dtypes cost a copy of their storage (each storage is converted once, views keep sharing it):
* bfloat16: NumPy has no bfloat16, so by default it becomes float32 *exactly* (bits << 16).
  ``bfloat16="bits"`` returns the raw bits instead, as uint16 arrays whose dtype carries
  ``dtype.metadata == {"torch_dtype": "bfloat16"}``; :func:`bf16_bits_to_float32` converts later.
* big-endian files (``byteorder`` == ``big``): byteswapped to native order.
* bool storages holding bytes other than 0/1: normalised to 0/1.
* tensors saved with the conj or neg bit set (complex views): materialised.
* legacy-format storages whose offset is not aligned for their dtype: copied to aligned memory.

Public API: :func:`load_torch_file`, :func:`load_state_dict`, :func:`bf16_bits_to_float32`,
:class:`Namespace`, :class:`OpaqueObject`, :class:`TorchCheckpointError`,
:class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import types
import zipfile
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from .io.base import BF16_BITS, DTYPES, CheckpointError, bf16_bits_to_float32, short_repr

__all__ = [
    "load_torch_file",
    "load_state_dict",
    "bf16_bits_to_float32",
    "Namespace",
    "OpaqueObject",
    "TorchCheckpointError",
    "UnsafeCheckpointError",
]

BFloat16Mode = Literal["float32", "bits"]
UnknownGlobals = Literal["error", "opaque"]

# NumPy's largest array is bounded by intp; keep a margin so that n * itemsize cannot overflow.
_MAX_ARRAY_BYTES = 2**62
_MAX_NDIM = 64
# Deflate cannot expand data by more than ~1032x: a larger claimed size is a zip bomb or a lie.
_MAX_DEFLATE_RATIO = 1100
# Objects, memo entries and marks one pickle may create, plus _OBJECTS_PER_RECORD per record of a zip
# archive (torch.save writes ~20 per tensor, and every tensor has a record).
MAX_PICKLE_OBJECTS = 2**20
_OBJECTS_PER_RECORD = 32
# Compressed storage records may inflate to MAX_INFLATION x the file size + 32 MiB in all.
MAX_INFLATION = 4
_INFLATION_SLACK = 32 * 2**20
# Distinct tensor views may hold 2 x the storage bytes + 16 MiB (a tied weight is one shared view).
_VIEW_RATIO = 2
_VIEW_SLACK = 16 * 2**20
# Encodings a pickle may name: CPython encodes these without looking a codec up (no import).
_SAFE_ENCODINGS = ("latin1", "latin-1", "latin_1", "ascii", "utf-8", "utf8")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


# ----------------------------------------------------------------------------------------------
# Errors


class TorchCheckpointError(CheckpointError):
    """The file is not a readable torch checkpoint (corrupt, truncated, unsupported, wrong kind)."""


class UnsafeCheckpointError(TorchCheckpointError):
    """The pickle asks for a global or an operation outside the allow-list; nothing was run."""


# ----------------------------------------------------------------------------------------------
# Plain-data stand-ins for what pickles may contain


class Namespace(types.SimpleNamespace):
    """Stand-in for ``argparse.Namespace`` (fairseq's ``args`` / ``cfg["model"]``): attributes only.

    ``ns.encoder_embed_dim``, ``vars(ns)`` and ``ns["encoder_embed_dim"]`` all work.
    """

    def __getitem__(self, name: str) -> Any:
        return self.__dict__[name]

    def __contains__(self, name: object) -> bool:
        return name in self.__dict__

    def __repr__(self) -> str:  # bounded: the attributes come from a file
        return f"Namespace({short_repr(self.__dict__, 400)[1:-1]})"


class OpaqueObject:
    """Inert record of an object whose class was not on the allow-list.

    Only produced with ``unknown_globals="opaque"``. ``global_name`` is the refused
    ``module.name``; ``args``/``kwargs`` what the pickle would have called it with; ``state`` what
    BUILD would have set; ``list_items``/``dict_items`` what APPEND/SETITEM would have added.
    Nothing of the named class is imported or called.
    """

    def __init__(self, global_name: str, args: tuple = (), kwargs: dict | None = None):
        self.global_name = global_name
        self.args = args
        self.kwargs = kwargs or {}
        self.state: Any = None
        self.list_items: list = []
        self.dict_items: dict = {}

    def __repr__(self) -> str:  # bounded: everything here comes from a file
        return (f"OpaqueObject({short_repr(self.global_name)}, args={short_repr(self.args)}, "
                f"state={short_repr(self.state)})")


class _OpaqueGlobal:
    """What ``find_class`` returns for a refused global in ``unknown_globals="opaque"`` mode."""

    def __init__(self, global_name: str):
        self.global_name = global_name

    def __repr__(self) -> str:
        return f"<opaque global {short_repr(self.global_name)}>"


class _TorchDtype:
    """Marker for a torch dtype: its name, the NumPy dtype of its elements and byte size."""

    def __init__(self, name: str, np_dtype: np.dtype | None):
        self.name = name
        self.np_dtype = np_dtype
        self.itemsize = self.np_dtype.itemsize if self.np_dtype is not None else 0

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _StorageType:
    """Marker for ``torch.FloatStorage`` & co. (``dtype`` None: ``torch.storage.UntypedStorage``)."""

    def __init__(self, global_name: str, dtype: _TorchDtype | None):
        self.global_name = global_name
        self.dtype = dtype

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize if self.dtype is not None else 1

    def __repr__(self) -> str:
        return self.global_name


class _Storage:
    """A storage resolved from a persistent id: raw bytes (uint8, read-only) plus its type."""

    def __init__(self, loader: _ArchiveLoader, key: str, stype: _StorageType, raw: np.ndarray):
        self.loader = loader
        self.key = key
        self.stype = stype
        self.raw = raw


class _TensorTypeMarker:
    """Marker for ``torch.Tensor`` / ``torch.nn.parameter.Parameter`` used as a type argument."""

    def __init__(self, global_name: str):
        self.global_name = global_name


# torch.<dtype> markers, from the one dtype table (bfloat16's NumPy dtype "<u2" is its bit pattern).
_DTYPES = {d.name: _TorchDtype(d.name, d.numpy) for d in DTYPES}
_STORAGE_DTYPE = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


# ----------------------------------------------------------------------------------------------
# The allowed callables: each checks its arguments and touches nothing but plain data.


def _check_hooks(backward_hooks: Any) -> None:
    if not isinstance(backward_hooks, (dict, OpaqueObject)) or (
        isinstance(backward_hooks, dict) and backward_hooks
    ):
        raise TorchCheckpointError(
            f"tensor has backward hooks {short_repr(backward_hooks)}; only an empty mapping is accepted"
        )


def _check_bool(value: Any, what: str) -> None:
    if type(value) is not bool:
        raise TorchCheckpointError(f"{what} must be a bool, got {type(value).__name__}")


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(
            f"tensor rebuild got {type(storage).__name__} where a storage was expected"
        )
    return storage.loader.make_tensor(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(
            f"tensor rebuild got {type(storage).__name__} where a storage was expected"
        )
    _check_bool(requires_grad, "requires_grad")
    _check_hooks(backward_hooks)
    return storage.loader.make_tensor(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(
            f"tensor rebuild got {type(storage).__name__} where a storage was expected"
        )
    if not isinstance(dtype, _TorchDtype):
        raise TorchCheckpointError(f"tensor rebuild got dtype {short_repr(dtype)}, not a torch dtype")
    _check_bool(requires_grad, "requires_grad")
    _check_hooks(backward_hooks)
    return storage.loader.make_tensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, np.ndarray):
        raise TorchCheckpointError(f"parameter rebuild got {type(data).__name__}, not a tensor")
    _check_bool(requires_grad, "requires_grad")
    _check_hooks(backward_hooks)
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # `state` holds Python attributes set on the Parameter; a NumPy array cannot carry them.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_TENSOR_MARKER = _TensorTypeMarker("torch.Tensor")
_PARAMETER_MARKER = _TensorTypeMarker("torch.nn.parameter.Parameter")
_REBUILD_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch uses this for tensors carrying Python attributes (`t.foo = 1`): the attributes
    # (`state`) are dropped, the tensor is kept.
    if not any(func is f for f in _REBUILD_FUNCTIONS):
        raise UnsafeCheckpointError(f"_rebuild_from_type_v2 called with {short_repr(func)}")
    if not isinstance(new_type, _TensorTypeMarker) or type(args) is not tuple:
        raise TorchCheckpointError(f"_rebuild_from_type_v2 got type {short_repr(new_type)}")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell `bytes` as _codecs.encode(str, "latin1").
    if type(text) is not str or type(encoding) is not str or encoding.lower() not in ("latin1", "latin-1"):
        raise TorchCheckpointError(
            f"_codecs.encode only accepted as (str, 'latin1'), got encoding {short_repr(encoding)}")
    return text.encode("latin1")


def _bytearray(*args):
    # bytearray(bytes) (protocol 3+) or bytearray(str, 'latin-1') (protocol 2). A codec named by the
    # file would be looked up in the codec registry, which imports modules: only built-in ones pass.
    if len(args) == 0:
        return bytearray()
    if type(args[0]) is bytes and len(args) == 1:
        return bytearray(args[0])
    if type(args[0]) is str and len(args) == 2 and type(args[1]) is str and args[1].lower() in _SAFE_ENCODINGS:
        return bytearray(args[0], args[1].lower())
    raise TorchCheckpointError(
        f"bytearray only accepted from bytes, or from str with one of {', '.join(_SAFE_ENCODINGS)}; "
        f"got {short_repr(args)}")


def _complex(*args):
    if len(args) > 2 or not all(type(a) in (int, float) for a in args):
        raise TorchCheckpointError(f"complex only accepted from numbers, got {short_repr(args)}")
    return complex(*args)


# Dict keys and set elements: what state dicts and fairseq args use. Flat tuples of these too.
_KEY_ATOMS = (str, bytes, int, float, bool, type(None))
_MAX_KEY_TUPLE = 16


def _check_key(key: Any) -> Any:
    """``key`` if it may be hashed in linear time (an atom or a flat tuple of atoms), else an error.

    A tuple of tuples from the memo can share its parts (a DAG): hashing it walks every path,
    2^depth of them, so such keys are refused before they are hashed."""
    kind = type(key)
    if kind in _KEY_ATOMS or (kind is tuple and len(key) <= _MAX_KEY_TUPLE and all(type(k) in _KEY_ATOMS for k in key)):
        return key
    raise TorchCheckpointError(
        f"a dict key or set element is a {kind.__name__} ({short_repr(key)}); checkpoints only use strings, "
        "numbers, None and flat tuples of them")


def _checked_items(items: Any) -> list:
    if type(items) not in (list, tuple, set, frozenset):
        raise TorchCheckpointError(f"set/frozenset built from a {type(items).__name__}")
    return [_check_key(k) for k in items]


def _set(*args):
    if len(args) > 1:
        raise TorchCheckpointError("set takes at most one argument")
    return set(_checked_items(args[0])) if args else set()


def _frozenset(*args):
    if len(args) > 1:
        raise TorchCheckpointError("frozenset takes at most one argument")
    return frozenset(_checked_items(args[0])) if args else frozenset()


def _ordered_dict(*args):
    if len(args) > 1:
        raise TorchCheckpointError("OrderedDict takes at most one argument")
    result = collections.OrderedDict()
    if args:
        if type(args[0]) not in (list, tuple):
            raise TorchCheckpointError(f"OrderedDict built from a {type(args[0]).__name__}")
        for pair in args[0]:
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise TorchCheckpointError(f"OrderedDict item {short_repr(pair)} is not a (key, value) pair")
            key, value = pair
            result[_check_key(key)] = value
    return result


def _build_allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "argparse.Namespace": Namespace,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": _TENSOR_MARKER,
        "torch.nn.parameter.Parameter": _PARAMETER_MARKER,
        "torch.storage.UntypedStorage": _StorageType("torch.storage.UntypedStorage", None),
        "torch.UntypedStorage": _StorageType("torch.UntypedStorage", None),
        "_codecs.encode": _codecs_encode,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": _bytearray,
        "builtins.complex": _complex,
    }
    for storage_name, dtype_name in _STORAGE_DTYPE.items():
        for module in ("torch", "torch.cuda"):
            name = f"{module}.{storage_name}"
            allowed[name] = _StorageType(name, _DTYPES[dtype_name])
    for dtype_name, dtype in _DTYPES.items():
        allowed[f"torch.{dtype_name}"] = dtype
    return allowed


_ALLOWED_GLOBALS = _build_allowed_globals()
# What REDUCE (and INST/OBJ) may call, and the classes NEWOBJ may instantiate. Functions are
# compared by identity; `collections.OrderedDict` is called through `_ordered_dict`.
_CALLABLE = {
    id(f): f
    for f in (
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_parameter,
        _rebuild_parameter_with_state,
        _rebuild_from_type_v2,
        _codecs_encode,
        _bytearray,
        _complex,
    )
}
_NEWOBJ_CLASSES = (Namespace, collections.OrderedDict, set, frozenset)

_HINTS = {
    "omegaconf": (
        "the checkpoint stores an OmegaConf config object (fairseq/hydra), which cannot be "
        "rebuilt here as plain data. Load it with unknown_globals='opaque' (inert placeholders; "
        "the tensors still load), or re-save the checkpoint with the config converted by "
        "OmegaConf.to_container(cfg)"
    ),
    "numpy": (
        "NumPy objects inside a pickle are not rebuilt (numpy's unpickling hooks are not data-only). "
        "Load with unknown_globals='opaque' to keep them as inert placeholders"
    ),
    "fairseq": (
        "the checkpoint pickles fairseq objects (for example meters in extra_state). "
        "Load with unknown_globals='opaque' to keep them as inert placeholders; the weights "
        "still load"
    ),
    "__torch__": "this looks like a TorchScript archive (torch.jit.save); use torch.jit.load",
}
_UNSUPPORTED_DTYPE_HINT = (
    "tensors of this dtype have no NumPy equivalent and are not supported by this reader"
)


# ----------------------------------------------------------------------------------------------
# The restricted unpickler


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file, *, source: str, persistent_load=None, unknown_globals="error",
                 max_objects: int = MAX_PICKLE_OBJECTS):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._persistent_load = persistent_load
        self._unknown_globals = unknown_globals
        self._objects = 0
        self._max_objects = max_objects

    # -- globals ----------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if type(module) is not str or type(name) is not str:
            raise TorchCheckpointError(f"{self._source}: a global named by {short_repr((module, name))}")
        full = f"{module}.{name}"
        allowed = _ALLOWED_GLOBALS.get(full)
        if allowed is not None:
            return allowed
        if self._unknown_globals == "opaque":
            return _OpaqueGlobal(full)
        root = module.split(".")[0]
        if root == "torch" and name in _DTYPE_LIKE_NAMES:
            raise TorchCheckpointError(f"{self._source}: {full}: {_UNSUPPORTED_DTYPE_HINT}")
        hint = _HINTS.get(root, "")
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load global {short_repr(full)}: it is not on the allow-list of "
            "data-only names, and importing or calling it could run arbitrary code"
            + (f". Hint: {hint}" if hint else "")
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise TorchCheckpointError(f"{self._source}: unexpected persistent id {short_repr(pid)}")
        return self._persistent_load(pid)

    # -- opcodes that call or mutate objects: only on our own objects -------------------------
    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if type(args) is not tuple:
            raise TorchCheckpointError(f"{self._source}: call arguments are not a tuple")
        if isinstance(func, _OpaqueGlobal):
            return OpaqueObject(func.global_name, args, kwargs)
        if kwargs:
            raise UnsafeCheckpointError(f"{self._source}: keyword arguments for {_describe(func)}")
        if func is collections.OrderedDict:
            return _ordered_dict(*args)
        if func is set:
            return _set(*args)
        if func is frozenset:
            return _frozenset(*args)
        if func is Namespace:
            if args:
                raise TorchCheckpointError(f"{self._source}: Namespace called with arguments")
            return Namespace()
        if _CALLABLE.get(id(func)) is func:
            return func(*args)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to call {_describe(func)}: not an allow-listed callable"
        )

    def _load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    def _newobj(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(cls, _OpaqueGlobal):
            return OpaqueObject(cls.global_name, args, kwargs)
        if any(cls is c for c in _NEWOBJ_CLASSES):
            if args or kwargs:
                raise TorchCheckpointError(f"{self._source}: {cls.__name__}.__new__ with arguments")
            return cls.__new__(cls)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to instantiate {_describe(cls)}: not an allow-listed class"
        )

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._newobj(cls, args, None))

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._newobj(cls, args, kwargs))

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, OpaqueObject):
            inst.state = state
            return
        if type(inst) in (Namespace, collections.OrderedDict):
            # argparse.Namespace pickles its attributes; a state dict carries `_metadata`.
            if type(state) is tuple and len(state) == 2 and state[1] is None:
                state = state[0]
            if state is None:
                return
            inst.__dict__.update(_str_keyed(state, self._source))
            return
        raise UnsafeCheckpointError(
            f"{self._source}: refusing BUILD (set state) on {_describe(inst)}"
        )

    def _target(self, kinds: tuple, what: str) -> Any:
        target = self.stack[-1]
        if type(target) not in kinds and not isinstance(target, OpaqueObject):
            raise UnsafeCheckpointError(f"{self._source}: refusing {what} on {_describe(target)}")
        return target

    def _load_append(self):
        value = self.stack.pop()
        target = self._target((list,), "APPEND")
        (target.list_items if isinstance(target, OpaqueObject) else target).append(value)

    def _load_appends(self):
        items = self.pop_mark()
        target = self._target((list,), "APPENDS")
        (target.list_items if isinstance(target, OpaqueObject) else target).extend(items)

    def _load_setitem(self):
        value = self.stack.pop()
        key = self._key(self.stack.pop())
        target = self._target((dict, collections.OrderedDict), "SETITEM")
        (target.dict_items if isinstance(target, OpaqueObject) else target)[key] = value

    def _load_setitems(self):
        items = self.pop_mark()
        target = self._target((dict, collections.OrderedDict), "SETITEMS")
        target = target.dict_items if isinstance(target, OpaqueObject) else target
        if len(items) % 2:
            raise TorchCheckpointError(f"{self._source}: SETITEMS with an odd number of items")
        self._count(len(items) // 2)
        for i in range(0, len(items), 2):
            target[self._key(items[i])] = items[i + 1]

    def _load_additems(self):
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        self._count(len(items))
        if isinstance(target, OpaqueObject):
            target.list_items.extend(items)
        else:
            target.update(self._key(k) for k in items)

    def _load_dict(self):  # DICT: built here so that every key is checked before it is hashed
        items = self.pop_mark()
        if len(items) % 2:
            raise TorchCheckpointError(f"{self._source}: DICT with an odd number of items")
        self._count(len(items) // 2)
        self.append({self._key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def _load_frozenset(self):
        items = self.pop_mark()
        self._count(4 + len(items))
        self.append(frozenset(self._key(k) for k in items))

    def _key(self, key: Any) -> Any:
        try:
            return _check_key(key)
        except TorchCheckpointError as e:
            raise TorchCheckpointError(f"{self._source}: {e}") from None

    def _count(self, n: int) -> None:
        self._objects += n
        if self._objects > self._max_objects:
            raise TorchCheckpointError(
                f"{self._source}: the pickle creates more than {self._max_objects:,} objects; a checkpoint "
                "needs about 20 per tensor, so this is not one (or it is damaged)")

    def _load_ext(self):
        raise UnsafeCheckpointError(f"{self._source}: refusing pickle extension-registry opcodes")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_ext

    # Every opcode that creates an object, a memo entry or a mark is counted (an empty set costs
    # ~4 units of memory, the rest ~1), so that a few megabytes of pickle cannot fill memory.
    def _counted(handler, cost):  # noqa: N805 - builds methods at class creation
        def run(self):
            self._count(cost)
            handler(self)

        return run

    for _op, _cost in [
        (pickle.MARK, 1), (pickle.EMPTY_LIST, 1), (pickle.EMPTY_DICT, 1), (pickle.EMPTY_SET, 4), (pickle.LIST, 1),
        (pickle.TUPLE, 1), (pickle.TUPLE1, 1), (pickle.TUPLE2, 1), (pickle.TUPLE3, 1), (pickle.REDUCE, 1),
        (pickle.NEWOBJ, 1), (pickle.NEWOBJ_EX, 1), (pickle.INST, 1), (pickle.OBJ, 1), (pickle.BUILD, 1),
        (pickle.PUT, 1), (pickle.BINPUT, 1), (pickle.LONG_BINPUT, 1), (pickle.MEMOIZE, 1),
        (pickle.BINUNICODE, 1), (pickle.SHORT_BINUNICODE, 1), (pickle.BINUNICODE8, 1), (pickle.UNICODE, 1),
        (pickle.BINBYTES, 1), (pickle.SHORT_BINBYTES, 1), (pickle.BINBYTES8, 1), (pickle.BYTEARRAY8, 1),
        (pickle.BINSTRING, 1), (pickle.SHORT_BINSTRING, 1), (pickle.STRING, 1), (pickle.BININT, 1),
        (pickle.BININT2, 1), (pickle.LONG1, 1), (pickle.LONG4, 1), (pickle.LONG, 1), (pickle.INT, 1),
        (pickle.BINFLOAT, 1), (pickle.FLOAT, 1), (pickle.GLOBAL, 1), (pickle.STACK_GLOBAL, 1),
        (pickle.BINPERSID, 1), (pickle.PERSID, 1),
    ]:
        dispatch[_op[0]] = _counted(dispatch[_op[0]], _cost)
    del _op, _cost, _counted


_DTYPE_LIKE_NAMES = {
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "complex32", "chalf", "quint8", "qint8", "qint32", "quint4x2",
    "quint2x4", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "uint1", "uint2", "uint3",
    "uint4", "uint5", "uint6", "uint7", "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    "ComplexHalfStorage", "QUInt8Storage", "QInt8Storage", "QInt32Storage", "QUInt4x2Storage",
    "QUInt2x4Storage",
}


def _describe(obj: Any) -> str:
    name = getattr(obj, "global_name", None)
    return name if isinstance(name, str) else f"an object of type {type(obj).__name__}"


def _str_keyed(state: Any, source: str) -> dict:
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise TorchCheckpointError(f"{source}: object state is not a dict with str keys")
    return state


def _exception_text(exc: BaseException) -> str:
    """An exception's message, bounded (a KeyError's text is the repr of a key from the file)."""
    if all(isinstance(a, str) for a in exc.args):
        text = "; ".join(exc.args)
    else:
        text = ", ".join(short_repr(a) for a in exc.args)
    return text if len(text) <= 200 else text[:197] + "..."


def _unpickle(data: bytes | io.BufferedIOBase, *, cls=None, **kwargs) -> Any:
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    source = kwargs["source"]
    try:
        return (cls or _RestrictedUnpickler)(file, **kwargs).load()
    except TorchCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, struct.error, OverflowError, RecursionError) as exc:
        raise TorchCheckpointError(
            f"{source}: the pickle is corrupt or malformed ({type(exc).__name__}: {_exception_text(exc)})"
        ) from None


# ----------------------------------------------------------------------------------------------
# Tensor construction, shared by the zip and legacy loaders


def _int_tuple(value: Any, what: str, source: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or not all(type(v) is int for v in value):
        raise TorchCheckpointError(f"{source}: tensor {what} {short_repr(value)} is not a tuple of ints")
    return tuple(value)


class _ArchiveLoader:
    """Turns storages + (offset, size, stride) into NumPy views; subclasses find the bytes."""

    def __init__(self, path: str, *, mmap: bool, bfloat16: str, big_endian: bool):
        self.path = path
        self.mmap = mmap
        self.bfloat16 = bfloat16
        self.big_endian = big_endian
        self._storages: dict[str, _Storage] = {}
        self._elements: dict[tuple[str, str], np.ndarray] = {}
        self._views: dict[tuple, np.ndarray] = {}
        self._storage_bytes = 0  # bytes of storage records read
        self._view_bytes = 0  # bytes (in storage dtype) of the distinct tensor views made

    def storage(self, key: str, stype: _StorageType, numel: int) -> _Storage:
        existing = self._storages.get(key)
        if existing is not None:
            if existing.stype.dtype is not stype.dtype or existing.raw.size != numel * stype.itemsize:
                raise TorchCheckpointError(
                    f"{self.path}: storage {short_repr(key)} is referenced as both {existing.stype} and "
                    f"{stype} (numel {numel})"
                )
            return existing
        if stype.dtype is not None and stype.dtype.np_dtype is None:
            raise TorchCheckpointError(f"{self.path}: {stype}: {_UNSUPPORTED_DTYPE_HINT}")
        raw = self.read_storage(key, numel * stype.itemsize)
        self._storage_bytes += raw.size
        storage = _Storage(self, key, stype, raw)
        self._storages[key] = storage
        return storage

    def read_storage(self, key: str, nbytes: int) -> np.ndarray:
        raise NotImplementedError

    def elements(self, storage: _Storage, dtype: _TorchDtype, flags: tuple[str, ...] = ()) -> np.ndarray:
        """The storage as a 1-D read-only array of final elements (one conversion per storage).

        flags: the conj/neg bits of the tensors viewing it, applied to the storage's elements (so
        a strided view of a small storage never materialises more than the storage)."""
        cache_key = (storage.key, dtype.name, flags)
        cached = self._elements.get(cache_key)
        if cached is not None:
            return cached
        if flags:
            elems = self.elements(storage, dtype)
            if "conj" in flags:
                elems = np.conj(elems)
            if "neg" in flags:
                elems = np.negative(elems)
            elems.flags.writeable = False
            self._elements[cache_key] = elems
            return elems
        raw = storage.raw
        if raw.size % dtype.itemsize:
            raise TorchCheckpointError(
                f"{self.path}: storage {short_repr(storage.key)} has {raw.size} bytes, not a multiple of "
                f"{dtype.itemsize} ({dtype})"
            )
        np_dtype = dtype.np_dtype
        if raw.size and raw.ctypes.data % np_dtype.alignment:
            raw = raw.copy()  # legacy files do not align storages
        if self.big_endian and np_dtype.itemsize > 1:
            elems = raw.view(np_dtype.newbyteorder(">")).astype(np_dtype)
        else:
            elems = raw.view(np_dtype)
        if dtype.name == "bfloat16":
            elems = elems.view(BF16_BITS) if self.bfloat16 == "bits" else (
                bf16_bits_to_float32(elems)
            )
        elif dtype.name == "bool" and elems.size and raw.max() > 1:
            elems = raw != 0
        elems.flags.writeable = False
        self._elements[cache_key] = elems
        return elems

    def make_tensor(self, storage, storage_offset, size, stride, dtype, metadata) -> np.ndarray:
        src = self.path
        if dtype is None:
            dtype = storage.stype.dtype
            if dtype is None:
                raise TorchCheckpointError(f"{src}: untyped storage used without a dtype")
        elif storage.stype.dtype is not None and storage.stype.dtype is not dtype:
            raise TorchCheckpointError(
                f"{src}: tensor of dtype {dtype} on a {storage.stype} storage"
            )
        if type(storage_offset) is not int or not 0 <= storage_offset <= _MAX_ARRAY_BYTES:
            raise TorchCheckpointError(f"{src}: bad storage offset {short_repr(storage_offset)}")
        size = _int_tuple(size, "size", src)
        stride = _int_tuple(stride, "stride", src)
        if len(size) != len(stride):
            raise TorchCheckpointError(
                f"{src}: tensor size {short_repr(size)} and stride {short_repr(stride)} differ in length")
        if len(size) > _MAX_NDIM:
            raise TorchCheckpointError(f"{src}: tensor has {len(size)} dimensions (max {_MAX_NDIM})")
        if any(d < 0 for d in size):
            raise TorchCheckpointError(f"{src}: negative tensor size {short_repr(size)}")
        if any(s < 0 for s in stride):
            raise TorchCheckpointError(f"{src}: negative strides {short_repr(stride)} are not supported")
        if any(v > _MAX_ARRAY_BYTES for v in size + stride):
            raise TorchCheckpointError(
                f"{src}: tensor size {short_repr(size)} / stride {short_repr(stride)} beyond any array")
        flags = self._metadata_flags(metadata)
        elems = self.elements(storage, dtype, flags)
        itemsize = elems.dtype.itemsize
        n = elems.size
        nonzero_product = 1
        for d in size:  # stops growing past the limit, so the products stay small
            nonzero_product = min(nonzero_product * max(d, 1), _MAX_ARRAY_BYTES + 1)
        if nonzero_product * itemsize > _MAX_ARRAY_BYTES:
            raise TorchCheckpointError(
                f"{src}: tensor shape {short_repr(size)} overflows (product of sizes times itemsize)"
            )
        numel = 0 if 0 in size else nonzero_product
        if numel == 0:
            if storage_offset > n:
                raise TorchCheckpointError(
                    f"{src}: storage offset {storage_offset} beyond storage {short_repr(storage.key)} of "
                    f"{n} elements"
                )
        else:
            last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
            if last >= n:
                raise TorchCheckpointError(
                    f"{src}: tensor (offset {storage_offset}, size {short_repr(size)}, stride {short_repr(stride)}) "
                    f"reaches element {last} of storage {short_repr(storage.key)}, which has {n} elements"
                )
        key = (storage.key, dtype.name, storage_offset, size, stride, flags)
        cached = self._views.get(key)
        if cached is not None:
            return cached
        self._view_bytes += numel * dtype.itemsize
        if self._view_bytes > _VIEW_RATIO * self._storage_bytes + _VIEW_SLACK:
            raise TorchCheckpointError(
                f"{src}: the file's tensors view {self._view_bytes:,} bytes of {self._storage_bytes:,} bytes of "
                "storage: more than a checkpoint's tensors (which share storage only for tied weights) can"
            )
        if numel == 0:
            out = np.zeros(size, dtype=elems.dtype)
        else:
            try:
                out = np.ndarray(
                    size,
                    dtype=elems.dtype,
                    buffer=elems,
                    offset=storage_offset * itemsize,
                    strides=tuple(s * itemsize for s in stride),
                )
            except (ValueError, TypeError) as exc:
                raise TorchCheckpointError(f"{src}: cannot view tensor: {_exception_text(exc)}") from exc
        out.flags.writeable = False
        self._views[key] = out
        return out

    def _metadata_flags(self, metadata: Any) -> tuple[str, ...]:
        """The conj/neg bits of a tensor's metadata (applied on load), checked."""
        if metadata is None or (isinstance(metadata, dict) and not metadata):
            return ()
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"} or not all(
            type(v) is bool for v in metadata.values()
        ):
            raise TorchCheckpointError(f"{self.path}: unsupported tensor metadata {short_repr(metadata)}")
        return tuple(k for k in ("conj", "neg") if metadata.get(k))


# ----------------------------------------------------------------------------------------------
# The zip format


class _ZipLoader(_ArchiveLoader):
    def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, **kwargs):
        super().__init__(path, **kwargs)
        self.zf = zf
        self.prefix = prefix
        self.infos = {info.filename: info for info in zf.infolist()}
        self.file_size = os.path.getsize(path)
        self._inflated = 0  # bytes inflated from compressed storage records so far
        self._map = None
        if self.mmap:
            self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def read_member(self, name: str, expected: int | None = None, limit: int | None = None) -> np.ndarray:
        """A record's bytes (a view of the file's memory map when stored uncompressed).

        expected: the size the pickle declares for it; limit: the most it may hold (else an error)."""
        info = self.infos.get(name)
        if info is None:
            raise TorchCheckpointError(f"{self.path}: the archive has no record {short_repr(name)}")
        if limit is not None and info.file_size > limit:
            raise TorchCheckpointError(
                f"{self.path}: record {short_repr(name)} holds {info.file_size:,} bytes, more than the "
                f"{limit:,} such a record can need"
            )
        if expected is not None and info.file_size != expected:
            raise TorchCheckpointError(
                f"{self.path}: record {short_repr(name)} holds {info.file_size} bytes but the pickle "
                f"declares {expected} bytes for it (corrupt or mismatched file)"
            )
        if info.flag_bits & 0x1:
            raise TorchCheckpointError(f"{self.path}: record {short_repr(name)} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED and self._map is not None:
            start = self._data_offset(info)
            return self._map[start : start + info.file_size]
        if info.compress_type != zipfile.ZIP_STORED:
            if info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                raise TorchCheckpointError(
                    f"{self.path}: record {short_repr(name)} claims an impossible compression ratio"
                )
            if limit is None:  # a storage: compressed records together are bounded by the file size
                self._inflated += info.file_size
                if self._inflated > MAX_INFLATION * self.file_size + _INFLATION_SLACK:
                    raise TorchCheckpointError(
                        f"{self.path}: compressed records inflate to more than {MAX_INFLATION} times the "
                        "file's size (torch never compresses its records): a zip bomb or a damaged file"
                    )
        try:
            with self.zf.open(info) as member:
                data = bytearray(member.read(info.file_size))
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
            raise TorchCheckpointError(f"{self.path}: cannot read record {short_repr(name)}: {_exception_text(exc)}") from exc
        if len(data) != info.file_size:
            raise TorchCheckpointError(f"{self.path}: record {short_repr(name)} is truncated")
        out = np.frombuffer(data, dtype=np.uint8)
        out.flags.writeable = False
        return out

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a member's bytes begin: after its local file header (30 bytes + name + extra)."""
        header_end = info.header_offset + 30
        if header_end > self.file_size:
            raise TorchCheckpointError(f"{self.path}: record {short_repr(info.filename)} header is truncated")
        header = bytes(self._map[info.header_offset : header_end])
        signature, name_len, extra_len = struct.unpack("<4s22xHH", header)
        if signature != b"PK\x03\x04":
            raise TorchCheckpointError(f"{self.path}: bad local header for {short_repr(info.filename)}")
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        name = bytes(self._map[header_end : header_end + name_len])
        if name != info.orig_filename.encode(encoding):
            raise TorchCheckpointError(
                f"{self.path}: local header name {short_repr(name)} does not match {short_repr(info.filename)}"
            )
        start = header_end + name_len + extra_len
        if start + info.file_size > self.file_size or info.compress_size != info.file_size:
            raise TorchCheckpointError(
                f"{self.path}: record {short_repr(info.filename)} extends past the end of the file "
                "(truncated?)"
            )
        return start

    def read_storage(self, key: str, nbytes: int) -> np.ndarray:
        return self.read_member(f"{self.prefix}data/{key}", nbytes)

    def persistent_load(self, pid: Any) -> _Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise TorchCheckpointError(f"{self.path}: unsupported persistent id {short_repr(pid)}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TorchCheckpointError(f"{self.path}: {short_repr(stype)} is not a storage type")
        if type(key) is bytes:
            key = key.decode("ascii", "replace")
        if type(key) is not str or not isinstance(location, (str, bytes)):
            raise TorchCheckpointError(f"{self.path}: bad storage key {short_repr(key)} / location {short_repr(location)}")
        if type(numel) is not int or numel < 0 or numel * stype.itemsize > _MAX_ARRAY_BYTES:
            raise TorchCheckpointError(f"{self.path}: bad storage size {short_repr(numel)}")
        return self.storage(key, stype, numel)


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise TorchCheckpointError(
            f"{path}: starts like a zip archive (torch's format) but its central directory "
            f"cannot be read ({_exception_text(exc)}); the file is probably truncated, e.g. an incomplete download"
        ) from exc


def _load_zip(path: str, *, mmap: bool, bfloat16: str, unknown_globals: str) -> Any:
    with _open_zip(path) as zf:
        names = zf.namelist()
        if len(set(names)) != len(names):
            raise TorchCheckpointError(f"{path}: the zip archive has duplicate record names")
        pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if not pickles:
            if any(n.endswith("constants.pkl") for n in names):
                raise TorchCheckpointError(f"{path}: {_HINTS['__torch__']}")
            raise TorchCheckpointError(
                f"{path}: a zip archive without a data.pkl record, so not a torch checkpoint"
            )
        if len(pickles) > 1:
            raise TorchCheckpointError(f"{path}: several data.pkl records: {short_repr(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names:
            raise TorchCheckpointError(f"{path}: {_HINTS['__torch__']}")
        loader = _ZipLoader(path, zf, prefix, mmap=mmap, bfloat16=bfloat16, big_endian=False)
        if f"{prefix}byteorder" in names:
            raw = loader.read_member(f"{prefix}byteorder", limit=64).tobytes()
            order = raw.decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise TorchCheckpointError(f"{path}: unknown byteorder record {short_repr(order)}")
            loader.big_endian = order == "big"
        # The pickle is small beside the tensors: it may not inflate past the whole file's size.
        pickle_limit = max(loader.file_size, 2**20)
        data = loader.read_member(f"{prefix}data.pkl", limit=pickle_limit).tobytes()
        return _unpickle(
            data,
            source=path,
            persistent_load=loader.persistent_load,
            unknown_globals=unknown_globals,
            max_objects=MAX_PICKLE_OBJECTS + _OBJECTS_PER_RECORD * len(names),
        )


# ----------------------------------------------------------------------------------------------
# The legacy (pre-zip) format


class _LegacyLoader(_ArchiveLoader):
    def __init__(self, path: str, offsets: dict[str, tuple[int, int, int]], **kwargs):
        super().__init__(path, **kwargs)
        self.offsets = offsets  # key -> (offset of the data, element count, byte count)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if self.mmap else None

    def read_storage(self, key: str, nbytes: int) -> np.ndarray:
        if key not in self.offsets:
            raise TorchCheckpointError(f"{self.path}: storage {short_repr(key)} is missing from the file")
        start, _, record_nbytes = self.offsets[key]
        if nbytes != record_nbytes:
            raise TorchCheckpointError(
                f"{self.path}: storage {short_repr(key)} is used with {nbytes} bytes but the file holds "
                f"{record_nbytes}"
            )
        if self._map is not None:
            return self._map[start : start + nbytes]
        with open(self.path, "rb") as f:
            f.seek(start)
            out = np.frombuffer(bytearray(f.read(nbytes)), dtype=np.uint8)
        out.flags.writeable = False
        return out

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
            if type(pid) is tuple and pid and pid[0] in ("module", b"module"):
                raise TorchCheckpointError(
                    f"{self.path}: the checkpoint pickles whole nn.Module objects, not tensors; "
                    "save model.state_dict() instead"
                )
            raise TorchCheckpointError(f"{self.path}: unsupported persistent id {short_repr(pid)}")
        if len(pid) != 6:
            raise TorchCheckpointError(f"{self.path}: malformed storage id {short_repr(pid)}")
        _, stype, key, location, numel, view = pid
        if not isinstance(stype, _StorageType) or stype.dtype is None:
            raise TorchCheckpointError(f"{self.path}: {short_repr(stype)} is not a typed storage type")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise TorchCheckpointError(f"{self.path}: malformed storage id {short_repr(pid)}")
        if key in self.offsets and self.offsets[key][1] != numel:
            raise TorchCheckpointError(
                f"{self.path}: storage {short_repr(key)} declares {numel} elements but the file holds "
                f"{self.offsets[key][1]}"
            )
        root = self.storage(key, stype, numel)
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3 or not all(
            type(v) is t for v, t in zip(view, (str, int, int))
        ):
            raise TorchCheckpointError(f"{self.path}: malformed storage view {short_repr(view)}")
        view_key, offset, view_numel = view
        if offset < 0 or view_numel < 0 or offset + view_numel > numel:
            raise TorchCheckpointError(f"{self.path}: storage view {short_repr(view)} is out of range")
        existing = self._storages.get(view_key)
        if existing is None:
            itemsize = stype.itemsize
            raw = root.raw[offset * itemsize : (offset + view_numel) * itemsize]
            existing = self._storages[view_key] = _Storage(self, view_key, stype, raw)
        return existing


def _load_legacy(path: str, *, mmap: bool, bfloat16: str, unknown_globals: str) -> Any:
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = _unpickle(f, source=path)
        protocol = _unpickle(f, source=path)
        sys_info = _unpickle(f, source=path)
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL_VERSION:
            raise TorchCheckpointError(f"{path}: bad legacy torch header ({short_repr(magic)}, {short_repr(protocol)})")
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise TorchCheckpointError(
                f"{path}: a big-endian legacy torch file is not supported; re-save it on a "
                "little-endian machine with a current torch (load it with torch, then torch.save it again)"
            )
        # The storages follow the object pickle, so tensors cannot be built on a first read.
        # Pass 1 reads the object pickle with inert stand-ins to learn each storage's element
        # size (and to reach the key list); pass 2 re-reads it for real.
        main_start = f.tell()
        itemsizes = _legacy_itemsizes(f, path, unknown_globals)
        keys = _unpickle(f, source=path)
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise TorchCheckpointError(f"{path}: malformed storage key list")
        offsets: dict[str, tuple[int, int, int]] = {}
        position = f.tell()
        for key in keys:
            if key not in itemsizes:
                raise TorchCheckpointError(f"{path}: storage {short_repr(key)} is not used by the pickle")
            f.seek(position)
            count_bytes = f.read(8)
            if len(count_bytes) != 8:
                raise TorchCheckpointError(f"{path}: storage {short_repr(key)} is truncated")
            (count,) = struct.unpack("<q", count_bytes)
            end = position + 8 + count * itemsizes[key]
            if count < 0 or end > file_size:
                raise TorchCheckpointError(
                    f"{path}: storage {short_repr(key)} ({count} elements) extends past the end of the "
                    "file (truncated?)"
                )
            offsets[key] = (position + 8, count, count * itemsizes[key])
            position = end
        loader = _LegacyLoader(path, offsets, mmap=mmap, bfloat16=bfloat16, big_endian=False)
        f.seek(main_start)
        return _unpickle(
            f, source=path, persistent_load=loader.persistent_load, unknown_globals=unknown_globals
        )


class _ScanUnpickler(_RestrictedUnpickler):
    """Reads a pickle with every allowed global except storage types replaced by inert records."""

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)  # still refuses what the real pass refuses
        if isinstance(found, _StorageType):
            return found
        return _OpaqueGlobal(f"{module}.{name}")


def _legacy_itemsizes(f, path: str, unknown_globals: str) -> dict[str, int]:
    """Storage key -> element size, from the persistent ids of the object pickle (pass 1)."""
    itemsizes: dict[str, int] = {}

    def record(pid: Any) -> None:
        if type(pid) is tuple and len(pid) == 6 and isinstance(pid[1], _StorageType):
            key, stype = pid[2], pid[1]
            if type(key) is str and stype.dtype is not None:
                if itemsizes.setdefault(key, stype.itemsize) != stype.itemsize:
                    raise TorchCheckpointError(f"{path}: storage {short_repr(key)} is used with two dtypes")

    _unpickle(
        f, source=path, persistent_load=record, unknown_globals=unknown_globals, cls=_ScanUnpickler
    )
    return itemsizes


# ----------------------------------------------------------------------------------------------
# Entry points


def _sniff(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if size == 0:
        raise TorchCheckpointError(f"{path}: the file is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    legacy = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") + b"."
    if head.startswith(legacy):
        return "legacy"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise TorchCheckpointError(
            f"{path}: a tar archive: the legacy torch<0.4 tar format is not supported. Re-save it "
            "with a current torch: load it with weights_only=False (only a trusted file!) and torch.save "
            "the result to a new path"
        )
    if len(head) >= 10:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            raise TorchCheckpointError(
                f"{path}: this is a safetensors file, not a torch pickle; read it with "
                "safetensors.numpy.load_file (refimpl loads safetensors directly)"
            )
    if head[:2] == b"\x1f\x8b":
        raise TorchCheckpointError(f"{path}: a gzip file; decompress it first")
    if head[:1] == b"\x80":
        raise TorchCheckpointError(
            f"{path}: a plain pickle, not a torch checkpoint (no torch zip or legacy header)"
        )
    if zipfile.is_zipfile(path):
        return "zip"
    raise TorchCheckpointError(
        f"{path}: not a torch checkpoint (neither torch's zip format nor its legacy format; "
        f"first bytes {head[:8]!r})"
    )


def load_torch_file(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    bfloat16: BFloat16Mode = "float32",
    unknown_globals: UnknownGlobals = "error",
) -> Any:
    """Load a file written by ``torch.save`` without torch and without running code from it.

    Returns the pickled object with every tensor (and ``nn.Parameter``) as a read-only NumPy
    array; ``argparse.Namespace`` becomes :class:`Namespace`, ``OrderedDict`` stays one.

    mmap: view uncompressed storages through a memory map of the file (no copy, pages load on
        first touch). False reads every storage into memory.
    bfloat16: "float32" (exact, costs a copy) or "bits" (uint16 bit patterns, zero-copy, dtype
        metadata ``{"torch_dtype": "bfloat16"}``).
    unknown_globals: "error" (default) raises :class:`UnsafeCheckpointError` for any global not on
        the allow-list; "opaque" turns each into an inert :class:`OpaqueObject` instead (nothing is
        imported or called either way) so that e.g. fairseq meters or OmegaConf configs do not
        stop the weights from loading.

    Raises FileNotFoundError, :class:`UnsafeCheckpointError` (a refused global or operation),
    :class:`TorchCheckpointError` (corrupt, truncated, or not a torch file).
    """
    path = os.fspath(path)
    if bfloat16 not in ("float32", "bits"):
        raise ValueError(f"bfloat16 must be 'float32' or 'bits', got {bfloat16!r}")
    if unknown_globals not in ("error", "opaque"):
        raise ValueError(f"unknown_globals must be 'error' or 'opaque', got {unknown_globals!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if os.path.isdir(path):
        raise TorchCheckpointError(
            f"{path} is a directory; pass the checkpoint file inside it (e.g. pytorch_model.bin)"
        )
    kind = _sniff(path)
    options = dict(mmap=mmap, bfloat16=bfloat16, unknown_globals=unknown_globals)
    if kind == "zip":
        return _load_zip(path, **options)
    return _load_legacy(path, **options)


def load_state_dict(
    path: str | os.PathLike, *, mmap: bool = True, bfloat16: BFloat16Mode = "float32"
) -> dict[str, np.ndarray]:
    """Load a plain state-dict file (``{name: tensor}``) as ``{name: read-only np.ndarray}``.

    Raises :class:`TorchCheckpointError` if the top level is not a mapping of str to tensors
    (a fairseq checkpoint keeps its state dict under ``load_torch_file(path)["model"]``).
    """
    obj = load_torch_file(path, mmap=mmap, bfloat16=bfloat16)
    if not isinstance(obj, Mapping):
        raise TorchCheckpointError(
            f"{os.fspath(path)}: the top level is a {type(obj).__name__}, not a state dict"
        )
    for key, value in obj.items():
        if type(key) is not str or not isinstance(value, np.ndarray):
            nested = [k for k in ("model", "state_dict", "module") if isinstance(obj.get(k), Mapping)]
            hint = f"; its state dict is probably load_torch_file(path)[{nested[0]!r}]" if nested else ""
            raise TorchCheckpointError(
                f"{os.fspath(path)}: not a plain state dict: entry {short_repr(key)} is a "
                f"{type(value).__name__}, not a tensor{hint}"
            )
    return dict(obj)
