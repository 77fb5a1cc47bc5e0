"""Hostile ``.bin``/``.pt`` pickles: no hang, no memory bomb, no import, every error the project's own.

Each case is a file written by hand (tests/torch_files.py) and loaded in a child process under a
memory cap and a timeout (tests/hostile_harness.py), which measures the CPU time and the peak RSS
of the load: at most 2 s and 256 MiB beyond the file's own bytes, for every file here (each is
well under 2 MB). The kinds:

* CPU bombs: a memo DAG of nested tuples used as a dict key, set element, OrderedDict key (hashing
  walks 2^64 paths), and shared-list DAGs quoted in error messages (a repr of 2^40 elements);
* memory bombs: a compressed ``data.pkl`` or storage record that inflates far beyond the file, a
  one-element storage viewed as 20000 x 20000 with zero strides and the neg bit, millions of empty
  sets or memo entries from a couple of megabytes of opcodes;
* the codec registry reached from a file (``bytearray(s, "bz2_codec")`` imports a module);
* huge integers in a tensor's shape.
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile

import pytest

from hostile_harness import Cases
from torch_files import FALSE, MARK, NONE, STOP, call, dumps, g, i, s, storage, tensor, tup, write_torch_zip

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refimpl", "data", "tiny-random-mlm")

# Opcodes beyond the assembler's (protocol 2 and 4).
POP, BINPUT0, BINGET0 = b"0", b"q\x00", b"h\x00"
TUPLE2, LIST, EMPTY_DICT, EMPTY_LIST, SETITEM, DICT = b"\x86", b"l", b"}", b"]", b"s", b"d"
EMPTY_SET, FROZENSET, MEMOIZE, APPENDS, BINPERSID = b"\x8f", b"\x91", b"\x94", b"e", b"Q"
PROTO4 = b"\x80\x04"
F32_1 = struct.pack("<f", 1.5)


def tuple_dag(depth: int = 64) -> bytes:
    """A tuple of two references to a tuple of two references to ... (2^depth paths, ~6 bytes a level)."""
    out = NONE + BINPUT0 + POP
    for _ in range(depth):
        out += BINGET0 + BINGET0 + TUPLE2 + BINPUT0 + POP
    return out + BINGET0


def list_dag(depth: int = 40) -> bytes:
    """A list of two references to a list of two references to ... (a repr of 2^depth elements)."""
    out = NONE + BINPUT0 + POP
    for _ in range(depth):
        out += MARK + BINGET0 + BINGET0 + LIST + BINPUT0 + POP
    return out + BINGET0


def bin_file(folder, pkl: bytes, storages=None, **kw) -> dict:
    path = write_torch_zip(folder / "pytorch_model.bin", pkl, storages, **kw)
    return {"path": str(path), "mapped": os.path.getsize(path)}


LOAD = "refimpl.torch_pickle.load_torch_file(P)"
case = Cases("TorchCheckpointError")


# ---- CPU bombs ---------------------------------------------------------------------------------


@case("dag-dict-key", match="dict key or set element is a tuple")
def _(d):
    return {**bin_file(d, dumps(EMPTY_DICT + tuple_dag() + i(1) + SETITEM)), "code": LOAD}


@case("dag-dict-opcode", match="dict key or set element is a tuple")
def _(d):
    return {**bin_file(d, dumps(MARK + tuple_dag() + i(1) + DICT)), "code": LOAD}


@case("dag-set", match="dict key or set element is a tuple")
def _(d):
    return {**bin_file(d, dumps(call(g("builtins", "set"), MARK + tuple_dag() + LIST))), "code": LOAD}


@case("dag-frozenset-opcode", match="dict key or set element is a tuple")
def _(d):
    return {**bin_file(d, PROTO4 + MARK + tuple_dag() + FROZENSET + STOP), "code": LOAD}


@case("dag-ordereddict", match="dict key or set element is a tuple")
def _(d):
    return {**bin_file(d, dumps(call(g("collections", "OrderedDict"), MARK + tup(tuple_dag(), i(1)) + LIST))),
            "code": LOAD}


@case("dag-backward-hooks", match="backward hooks")
def _(d):
    pkl = dumps(call(g("torch._utils", "_rebuild_tensor_v2"), storage("0", 1), i(0), tup(i(1)), tup(i(1)), FALSE,
                     list_dag()))
    return {**bin_file(d, pkl, {"0": F32_1}), "code": LOAD}


@case("dag-persistent-id", match="persistent id")
def _(d):
    return {**bin_file(d, dumps(list_dag() + BINPERSID)), "code": LOAD}


@case("dag-in-refimpl-info", error=None)
def _(d):
    shutil.copy(os.path.join(TINY, "config.json"), d / "config.json")
    spec = bin_file(d, dumps(EMPTY_DICT + tuple_dag() + i(1) + SETITEM))
    code = ("from refimpl.cli import main\n"
            "rc = main(['info', '--model', P])\n"
            "assert rc == 2, rc  # one line on stderr, exit status 2\n")
    return {**spec, "path": str(d), "code": code}


# ---- memory bombs ------------------------------------------------------------------------------


@case("inflating-data-pkl", match=r"data.pkl.* more than")
def _(d):
    path = d / "model.bin"
    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compresslevel=1) as zf:
        with zf.open(info, "w", force_zip64=True) as f:  # 64 MB of NONE POP, deflated
            f.write(b"\x80\x02")
            chunk = b"N0" * 2**19
            for _ in range(64):
                f.write(chunk)
            f.write(b"N.")
    return {"path": str(path), "mapped": os.path.getsize(path), "code": LOAD}


@case("inflating-storage", match="inflate to more than")
def _(d):
    numel = 40 * 2**20  # 160 MB of float32 zeros, deflated
    pkl = dumps(tensor(storage("0", numel), 0, [numel], [1]))
    path = d / "model.bin"
    with zipfile.ZipFile(path, "w", compresslevel=1) as zf:
        zf.writestr("archive/data.pkl", pkl)
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as f:
            chunk = bytes(2**20)
            for _ in range(160):
                f.write(chunk)
    return {"path": str(path), "mapped": os.path.getsize(path), "code": LOAD}


@case("zero-stride-neg-view", match="view .* bytes of .* bytes of storage")
def _(d):
    neg = EMPTY_DICT + s("neg") + b"\x88" + SETITEM
    pkl = dumps(call(g("torch._utils", "_rebuild_tensor_v2"), storage("0", 1), i(0), tup(i(20000), i(20000)),
                     tup(i(0), i(0)), FALSE, call(g("collections", "OrderedDict")), neg))
    spec = bin_file(d, pkl, {"0": F32_1})
    assert spec["mapped"] < 1000  # a few hundred bytes that once materialised 1.6 GB
    return {**spec, "code": LOAD}


@case("zero-stride-view", match="view .* bytes of .* bytes of storage")
def _(d):  # no neg bit: a zero-copy view, but a float64 load would materialise it
    pkl = dumps(tensor(storage("0", 1), 0, [20000, 20000], [0, 0]))
    return {**bin_file(d, pkl, {"0": F32_1}), "code": LOAD}


@case("millions-of-empty-sets", match=r"more than 1,048,[0-9]{3} objects")
def _(d):
    pkl = PROTO4 + EMPTY_LIST + MARK + EMPTY_SET * 1_900_000 + APPENDS + STOP  # 1.9 MB
    return {**bin_file(d, pkl), "code": LOAD}


@case("millions-of-memo-entries", match=r"more than 1,048,[0-9]{3} objects")
def _(d):
    pkl = PROTO4 + NONE + MEMOIZE * 1_900_000 + STOP
    return {**bin_file(d, pkl), "code": LOAD}


# ---- imports and huge numbers ------------------------------------------------------------------


@case("bytearray-bz2-codec", match="bytearray only accepted")
def _(d):
    pkl = dumps(call(g("builtins", "bytearray"), s("BZh9"), s("bz2_codec")))
    code = ("import sys\n"
            "try:\n"
            f"    {LOAD}\n"
            "finally:\n"
            "    assert 'encodings.bz2_codec' not in sys.modules, 'a file made Python import a codec module'\n")
    return {**bin_file(d, pkl), "code": code}


@case("huge-ints-in-shape", match="beyond any array|overflows")
def _(d):
    big = b"\x8b" + struct.pack("<i", 200_000) + b"\x01" * 199_999 + b"\x01"  # LONG4: a 1.6-million-bit int
    pkl = dumps(tensor(storage("0", 1), 0, [big] * 8, [0] * 8))
    return {**bin_file(d, pkl, {"0": F32_1}), "code": LOAD}


@case("legit-state-dict", error=None)
def _(d):  # the control: a real tiny state dict loads, within the same bounds
    pkl = dumps(tup(tensor(storage("0", 6), 0, [2, 3], [3, 1]), tensor(storage("0", 6), 0, [3, 2], [1, 3])))
    return {**bin_file(d, pkl, {"0": b"\0" * 24}), "code": f"a, b = {LOAD}\nassert a.shape == (2, 3)"}


@case("reprs-of-shared-graphs", error=None)
def _(d):  # the stand-ins' own reprs (a user may print what a file held): a DAG of depth 60
    code = ("from refimpl.io import short_repr\n"
            "from refimpl.torch_pickle import Namespace, OpaqueObject\n"
            "node = []\n"
            "for _ in range(60):\n"
            "    node = [node, node]\n"
            "assert len(short_repr(node)) <= 200 and 'bits' in short_repr(10 ** 100_000)\n"
            "assert len(repr(Namespace(a=node, b=node))) <= 450\n"
            "assert len(repr(OpaqueObject('x.y', (node,)))) <= 700\n")
    return {"code": code}


@pytest.mark.parametrize("name", case.names())
def test_hostile_pickle(name, hostile_outcomes):  # (the fixture: tests/conftest.py)
    case.check(hostile_outcomes, name)



def test_realistic_key_types_still_load(tmp_path):
    """Keys state dicts and fairseq args really use: str, int (optimizer state), flat tuples, None."""
    from refimpl.torch_pickle import load_torch_file

    pkl = dumps(EMPTY_DICT + s("a") + i(1) + SETITEM + i(7) + i(2) + SETITEM + tup(s("x"), i(3)) + i(3) + SETITEM
                + NONE + i(4) + SETITEM)
    got = load_torch_file(write_torch_zip(tmp_path / "k.bin", pkl))
    assert got == {"a": 1, 7: 2, ("x", 3): 3, None: 4}
