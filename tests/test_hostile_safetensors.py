"""Hostile and malformed safetensors folders: paths stay in the folder, the reader refuses what the
``safetensors`` library refuses, and every error is a CheckpointError naming the file.

Every load runs in a child process under a memory cap and a timeout (tests/hostile_harness.py):
at most 2 s of CPU and 256 MiB beyond the file's own bytes. The kinds:

* paths escaping the model folder: shard index entries ``../../../../etc/passwd`` and an absolute
  path to another checkpoint (once opened and parsed, or loaded silently);
* malformed files once accepted silently: overlapping byte ranges, a dimension ``16.9``, a tensor
  name listed twice, int32 data for a float weight;
* wrong exception types: JSON nested 100k deep in the header and in the shard index
  (RecursionError), a shape whose product overflows int64 (a NumPy error naming no file).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hostile_harness import Cases

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refimpl", "data", "tiny-random-mlm")
LOAD = "refimpl.from_pretrained(P)"
Q0 = "roberta_prelayernorm.encoder.layer.0.attention.self.query.weight"
Q1 = "roberta_prelayernorm.encoder.layer.1.attention.self.query.weight"


def read_raw(path) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path, header: dict | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def folder(d, *, weights: bool = True) -> str:
    """A copy of the shipped tiny model (config, tokenizer, and model.safetensors unless not ``weights``)."""
    for name in os.listdir(TINY):
        if weights or not name.startswith("model"):
            shutil.copy(os.path.join(TINY, name), d / name)
    return str(d)


def damaged(d, change) -> dict:
    """The tiny model with its safetensors header changed by ``change(header, data) -> (header, data)``."""
    path = os.path.join(folder(d), "model.safetensors")
    header, data = change(*read_raw(path))
    write_raw(path, header, data)
    return {"path": str(d), "mapped": os.path.getsize(path), "code": LOAD}


def sharded(d, index_name: str, target: str) -> dict:
    """The tiny model's tensors listed in a shard index that names ``target`` for every tensor."""
    header, _ = read_raw(os.path.join(TINY, "model.safetensors"))
    folder(d, weights=False)
    weight_map = {k: target for k in header if k != "__metadata__"}
    with open(d / index_name, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return {"path": str(d), "code": LOAD}


case = Cases("CheckpointError")


# ---- paths out of the folder ------------------------------------------------------------------


@case("index-parent-path", match="not a file name in the model folder")
def _(d):
    return sharded(d, "model.safetensors.index.json", "../../../../../../etc/passwd")


@case("index-absolute-path", match="not a file name in the model folder")
def _(d):  # another checkpoint's file: once loaded silently
    return sharded(d, "model.safetensors.index.json", os.path.join(TINY, "model.safetensors"))


@case("bin-index-parent-path", match="not a file name in the model folder")
def _(d):
    return sharded(d, "pytorch_model.bin.index.json", "../../../../../../etc/passwd")


# ---- malformed files the safetensors library refuses --------------------------------------------


def _overlap(header, data):
    assert header[Q0]["shape"] == header[Q1]["shape"]
    header[Q1]["data_offsets"] = header[Q0]["data_offsets"]  # two tensors, one byte range
    return header, data


@case("overlapping-ranges", match="overlap")
def _(d):
    return damaged(d, _overlap)


def _fractional(header, data):
    header[Q0]["shape"] = [header[Q0]["shape"][0] + 0.9, header[Q0]["shape"][1]]  # 16.9 once read as 16
    return header, data


@case("fractional-dimension", match="malformed header entry")
def _(d):
    return damaged(d, _fractional)


def _duplicate(header, data):
    second = header.pop(Q1)  # Q0 listed twice, the second time over Q1's bytes (a JSON parser keeps the last)
    entry = json.dumps({Q0: second})[1:-1]
    return json.dumps(header)[:-1] + ", " + entry + "}", data


@case("duplicate-name", match="names .* twice")
def _(d):
    return damaged(d, _duplicate)


def _int32(header, data):
    header[Q0]["dtype"] = "I32"  # same byte size: once cast to float silently
    return header, data


@case("int32-weight", match="not floating point .*I32")
def _(d):
    return damaged(d, _int32)


# ---- errors that were the wrong type -------------------------------------------------------------


@case("deep-header", match="nested too deeply")
def _(d):
    return damaged(d, lambda h, data: ('{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}", b""))


@case("deep-index", match="nested too deeply")
def _(d):
    spec = sharded(d, "model.safetensors.index.json", "model-00001-of-00001.safetensors")
    with open(d / "model.safetensors.index.json", "w") as f:
        f.write('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return spec


def _overflow(header, data):
    begin, _ = header[Q0]["data_offsets"]
    # 3 * 6148914691236517206 = 2^64 + 2: wraps to 2 elements (8 bytes) in int64 arithmetic
    header[Q0] = {"dtype": "F32", "shape": [3, 6148914691236517206], "data_offsets": [begin, begin + 8]}
    return header, data


@case("overflowing-shape", match="model.safetensors: tensor .* does not match its byte range")
def _(d):
    return damaged(d, _overflow)


@case("legit-folder", error=None)
def _(d):
    return {"path": folder(d), "mapped": os.path.getsize(os.path.join(TINY, "model.safetensors")), "code": LOAD}


@pytest.mark.parametrize("name", case.names())
def test_hostile_safetensors(name, hostile_outcomes):  # (the fixture: tests/conftest.py)
    case.check(hostile_outcomes, name)
    result = hostile_outcomes[1][name]
    assert "root:" not in result.get("message", "")  # nothing of /etc/passwd was read into a message



def test_reader_agrees_with_the_safetensors_library(tmp_path):
    """Whatever the reader accepts, the library accepts (the library validates every file read)."""
    import safetensors

    from refimpl.io import CheckpointError, read_safetensors

    src = os.path.join(TINY, "model.safetensors")
    for i, change in enumerate([_overlap, _fractional, _duplicate, _overflow]):
        path = tmp_path / f"{i}.safetensors"
        header, data = change(*read_raw(src))
        write_raw(path, header, data)
        with pytest.raises(safetensors.SafetensorError):
            safetensors.safe_open(str(path), framework="numpy")
        with pytest.raises(CheckpointError, match=str(path)):
            read_safetensors(path)
