"""refimpl.torch_pickle: torch checkpoints read with NumPy only, and no code from the file run.

torch is the oracle here (round trips against ``torch.load(weights_only=True)``); the reader itself
never imports it. Hostile and corrupt files are written by hand into ``tmp_path``.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from refimpl.torch_pickle import (
    Namespace,
    OpaqueObject,
    TorchCheckpointError,
    UnsafeCheckpointError,
    bf16_bits_to_float32,
    load_state_dict,
    load_torch_file,
)

torch = pytest.importorskip("torch")

DATA = Path(__file__).parent / "data" / "fairseq-prenorm"
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# helpers


def _np_ref(t) -> np.ndarray:
    """torch tensor -> NumPy with the reader's conventions (bfloat16 -> float32 exactly)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def assert_same_tensor(got: np.ndarray, ref, name: str = "") -> None:
    want = _np_ref(ref)
    assert isinstance(got, np.ndarray), name
    assert got.shape == want.shape, name
    assert got.dtype == want.dtype, name
    assert not got.flags.writeable, name
    # bit for bit (NaN-safe): compare the raw bytes of C-ordered copies
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), name


def _bases(a: np.ndarray):
    while a is not None:
        yield a
        a = getattr(a, "base", None)


def is_memmap_backed(a: np.ndarray) -> bool:
    return any(isinstance(b, np.memmap) for b in _bases(a))


def mixed_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict()
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        sd[str(dt)] = torch.randn(3, 5, generator=g).to(dt)
    sd["torch.int64"] = torch.randint(-(2**40), 2**40, (4, 3), generator=g)
    sd["torch.int32"] = torch.randint(-1000, 1000, (7,), generator=g, dtype=torch.int32)
    sd["torch.int8"] = torch.randint(-100, 100, (2, 2), generator=g, dtype=torch.int8)
    sd["torch.uint8"] = torch.randint(0, 255, (2, 2), generator=g, dtype=torch.uint8)
    sd["torch.bool"] = torch.randn(6, generator=g) > 0
    sd["complex64"] = torch.randn(3, generator=g, dtype=torch.complex64)
    base = torch.arange(24.0).reshape(4, 6)
    sd["transposed"] = base.t()  # stride (1, 6)
    sd["sliced"] = base[1:3, 2:5]  # storage offset 8, shares base's storage
    sd["column"] = base[:, 4]  # stride (6,), offset 4
    sd["expanded"] = torch.ones(1, 3).expand(4, 3)  # stride (0, 1)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 5)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 3, generator=g))
    sd["frozen_param"] = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
    sd["bf16_view"] = torch.randn(4, 4, generator=g).to(torch.bfloat16)[:, 1:3]
    return sd


from torch_files import (  # noqa: E402  (the hand-written pickle assembler)
    BINPERSID, FALSE, call, dict_, dumps, g, i, rewrite_zip, s, storage, tensor, tup, write_torch_zip,
)


# ----------------------------------------------------------------------------------------------
# round trips against torch


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_round_trip_matches_torch_load(tmp_path, mmap, legacy):
    sd = mixed_state_dict()
    path = tmp_path / "sd.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    ref = torch.load(path, weights_only=True)
    got = load_torch_file(path, mmap=mmap)
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == list(ref)
    for name, t in ref.items():
        assert_same_tensor(got[name], t, name)
        if t.numel():  # the view keeps torch's layout: same element strides, no copy
            itemsize = got[name].itemsize
            assert got[name].strides == tuple(st * itemsize for st in t.stride()), name
    assert np.shares_memory(got["transposed"], got["sliced"])
    assert np.shares_memory(got["transposed"], got["column"])
    assert got["scalar"].shape == () and got["scalar"] == 2.5
    assert got["empty"].shape == (0, 5)
    assert got["expanded"].strides == (0, 4)
    # the state dict's `_metadata` attribute (BUILD on an OrderedDict) survives as plain data
    assert getattr(got, "_metadata", None) == getattr(ref, "_metadata", None)


def test_tensor_with_python_attributes_and_conj_neg_bits(tmp_path):
    t = torch.arange(3.0)
    t.note = "hello"  # saved through torch._tensor._rebuild_from_type_v2
    z = torch.randn(3, dtype=torch.complex64)
    sd = {"attr": t, "conj": z.conj(), "neg": torch.randn(2, dtype=torch.complex64).conj().imag}
    assert sd["conj"].is_conj() and sd["neg"].is_neg()
    path = tmp_path / "x.pt"
    torch.save(sd, path)
    ref = torch.load(path, weights_only=True)
    got = load_torch_file(path)
    for name in sd:
        assert_same_tensor(got[name], ref[name], name)


def test_untyped_storage_dtypes_v3(tmp_path):
    # uint16/32/64 are saved with _rebuild_tensor_v3 over an UntypedStorage
    sd = {
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([[1, 2], [3, 2**32 - 1]], dtype=torch.uint32).t(),
    }
    path = tmp_path / "u.pt"
    torch.save(sd, path)
    got = load_torch_file(path)
    assert got["u16"].dtype == np.uint16 and got["u16"].tolist() == [0, 1, 65535]
    assert got["u32"].dtype == np.uint32 and got["u32"].tolist() == [[1, 3], [2, 2**32 - 1]]


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    path = tmp_path / "f8.pt"
    torch.save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(TorchCheckpointError, match="float8_e4m3fn.*no NumPy equivalent"):
        load_torch_file(path)


def test_bfloat16_bits_mode(tmp_path):
    w = torch.randn(4, 6).to(torch.bfloat16)
    path = tmp_path / "bf16.pt"
    torch.save({"w": w, "wt": w.t()}, path)
    bits = load_torch_file(path, bfloat16="bits")
    want_bits = w.view(torch.int16).numpy().view(np.uint16)
    assert bits["w"].dtype == np.uint16
    assert bits["w"].dtype.metadata == {"torch_dtype": "bfloat16"}
    np.testing.assert_array_equal(bits["w"], want_bits)
    np.testing.assert_array_equal(bits["wt"], want_bits.T)
    assert is_memmap_backed(bits["w"])  # bits are zero-copy; float32 is a (documented) copy
    as_f32 = load_torch_file(path)["w"]
    np.testing.assert_array_equal(bf16_bits_to_float32(bits["w"]), as_f32)
    np.testing.assert_array_equal(as_f32, w.float().numpy())


@pytest.mark.parametrize("plain_dict", [False, True], ids=["state_dict", "transformers4-shard"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_transformers_model_bin(tmp_path, dtype, plain_dict):
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaPreLayerNormConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=40, type_vocab_size=2,
    )
    torch.manual_seed(0)
    model = transformers.RobertaPreLayerNormForMaskedLM(config).to(getattr(torch, dtype)).eval()
    sd = model.state_dict()
    if plain_dict:  # transformers 4.x wrote shards as plain dicts of contiguous tensors
        sd = {k: v.contiguous() for k, v in sd.items()}
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    ref = torch.load(path, weights_only=True)
    got = load_state_dict(path)
    assert type(got) is dict and list(got) == list(ref)
    for name, t in ref.items():
        assert_same_tensor(got[name], t, name)
    emb = got["roberta_prelayernorm.embeddings.word_embeddings.weight"]
    assert emb.shape == (50, 16)
    # the tied MLM decoder weight is the same storage in the file, and the same memory here
    assert np.shares_memory(emb, got["lm_head.decoder.weight"])


def test_fairseq_checkpoint():
    path = DATA / "model.pt"
    got = load_torch_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ref = torch.load(path, weights_only=True)

    def compare(a, b, where):
        if isinstance(b, torch.Tensor):
            assert_same_tensor(a, b, where)
        elif isinstance(b, argparse.Namespace):
            assert isinstance(a, Namespace), where
            compare(vars(a), vars(b), where)
        elif isinstance(b, dict):
            assert isinstance(a, dict) and list(a) == list(b), where
            for k in b:
                compare(a[k], b[k], f"{where}[{k!r}]")
        elif isinstance(b, (list, tuple)):
            assert type(a) is type(b) and len(a) == len(b), where
            for n, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{n}]")
        else:
            assert a == b and type(a) is type(b), where

    compare(got, ref, "ckpt")
    model_cfg = got["cfg"]["model"]
    assert isinstance(model_cfg, Namespace)
    assert model_cfg.encoder_embed_dim == 16
    assert model_cfg["encoder_layers"] == 2 and "encoder_attention_heads" in model_cfg
    weights = got["model"]
    emb = weights["encoder.sentence_encoder.embed_tokens.weight"]
    assert emb.dtype == np.float32 and emb.shape == (65, 16)
    assert is_memmap_backed(emb)
    import json

    reference = json.loads((DATA / "reference_outputs.json").read_text())
    assert reference["len_dict"] == emb.shape[0]
    with pytest.raises(TorchCheckpointError, match=r"load_torch_file\(path\)\['model'\]"):
        load_state_dict(path)


def test_reader_needs_no_torch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from refimpl.torch_pickle import load_state_dict\n"
        f"sd = load_state_dict({str(path)!r})\n"
        "assert sd['w'].tolist() == [[0, 1, 2], [3, 4, 5]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ----------------------------------------------------------------------------------------------
# memory mapping, read-only views, storage layouts


def test_uncompressed_storages_are_memory_mapped(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"a": torch.randn(64, 32), "b": torch.randn(10)}, path)
    mapped = load_state_dict(path)
    assert all(is_memmap_backed(a) for a in mapped.values())
    # the root of the chain is one read-only map of the whole file, shared by every tensor
    mm = [b for b in _bases(mapped["a"]) if isinstance(b, np.memmap)][-1]
    assert mm.nbytes == path.stat().st_size and not mm.flags.writeable
    assert np.shares_memory(mapped["a"], mm) and np.shares_memory(mapped["b"], mm)
    with pytest.raises(ValueError, match="read-only"):
        mapped["a"][0, 0] = 1.0
    read = load_state_dict(path, mmap=False)
    assert not any(is_memmap_backed(a) for a in read.values())
    assert not read["a"].flags.writeable
    np.testing.assert_array_equal(read["a"], mapped["a"])


def test_compressed_records_fall_back_to_reading(tmp_path):
    src = tmp_path / "sd.pt"
    sd = {"a": torch.randn(30, 7), "b": torch.arange(10)}
    torch.save(sd, src)
    dst = rewrite_zip(src, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(dst) as zf:
        assert any(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    got = load_state_dict(dst)
    for k in sd:
        assert_same_tensor(got[k], sd[k], k)
        assert not is_memmap_backed(got[k])


def test_big_endian_file_is_byteswapped(tmp_path):
    sd = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(5, dtype=torch.float64),
        "i64": torch.tensor([1, -2, 2**40]),
        "bf16": torch.randn(6).to(torch.bfloat16),
        "bool": torch.tensor([True, False]),
    }
    src = tmp_path / "le.pt"
    torch.save(sd, src)
    itemsize = {str(n): t.element_size() for n, t in enumerate(sd.values())}  # keys 0..4 in order
    replace = {"/byteorder": b"big"}
    for key, size in itemsize.items():
        dt = np.dtype(f"u{size}")
        replace[f"/data/{key}"] = lambda data, dt=dt: np.frombuffer(data, dt).byteswap().tobytes()
    dst = rewrite_zip(src, tmp_path / "be.pt", replace=replace)
    got = load_torch_file(dst)
    for name, t in sd.items():
        assert_same_tensor(got[name], t, name)


def test_bool_bytes_other_than_0_1_are_normalised(tmp_path):
    pkl = dumps(dict_(b=tensor(storage("0", 4, "BoolStorage"), 0, [4], [1])))
    path = write_torch_zip(tmp_path / "b.pt", pkl, {"0": bytes([0, 1, 2, 255])})
    b = load_torch_file(path)["b"]
    assert b.dtype == np.bool_ and b.tolist() == [False, True, True, True]
    assert b.view(np.uint8).tolist() == [0, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# hostile pickles: refused, with the global named, and nothing runs


class Reduce:
    """Pickles as `func(*args)`: how a malicious object hides a call in a normal pickle."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Outer:
    class Inner:
        """A nested class whose __setstate__ has a side effect (unpickling would import us)."""

        def __init__(self, target: str):
            self.target = target

        def __setstate__(self, state):
            Path(state["target"]).write_text("pwned")


def _payloads(sentinel: Path):
    cmd = f"touch {sentinel}"
    code = f"open({str(sentinel)!r}, 'w').close()"
    nested = Outer.Inner(str(sentinel))
    nested_name = f"{Outer.Inner.__module__}.Outer.Inner"
    return {
        # name: (pickle, refused global, live-checkable with plain pickle.loads)
        "os.system": (dumps(call(g("os", "system"), s(cmd))), "os.system", True),
        "posix.system": (pickle.dumps(Reduce(os.system, (cmd,)), protocol=2), "posix.system", True),
        "posix.system-proto5": (
            pickle.dumps(Reduce(os.system, (cmd,)), protocol=5), "posix.system", True
        ),
        "builtins.eval": (dumps(call(g("builtins", "eval"), s(code))), "builtins.eval", True),
        "builtins.exec": (dumps(call(g("builtins", "exec"), s(code))), "builtins.exec", True),
        "subprocess.Popen": (
            pickle.dumps(Reduce(subprocess.Popen, (["touch", str(sentinel)],)), protocol=2),
            "subprocess.Popen",
            False,
        ),
        "builtins.getattr": (
            dumps(
                call(
                    call(g("builtins", "getattr"), call(g("builtins", "__import__"), s("os")), s("system")),
                    s(cmd),
                )
            ),
            "builtins.getattr",
            True,
        ),
        "nested-class": (pickle.dumps(nested, protocol=4), nested_name, True),
        "rebuild_tensor_v2-with-call": (
            dumps(dict_(w=tensor(call(g("os", "system"), s(cmd)), 0, [1], [1]))),
            "os.system",
            True,
        ),
        "rebuild_tensor_v2-eval-in-size": (
            dumps(dict_(w=tensor(storage("0", 1), 0, [call(g("builtins", "eval"), s(code))], [1]))),
            "builtins.eval",
            False,  # a plain unpickler needs torch to get this far; the eval is the point
        ),
    }


PAYLOAD_NAMES = list(_payloads(Path("x")))


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_hostile_pickles_are_refused(tmp_path, name):
    sentinel = tmp_path / "pwned"
    pkl, refused, _ = _payloads(sentinel)[name]
    path = write_torch_zip(tmp_path / "evil.pt", pkl, {"0": b"\0\0\0\0"})
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        load_torch_file(path)
    message = str(excinfo.value)
    assert repr(refused) in message and str(path) in message
    # "opaque" mode records the refused global as inert data: still nothing runs
    try:
        load_torch_file(path, unknown_globals="opaque")
    except TorchCheckpointError:
        pass  # e.g. a tensor whose storage argument is an OpaqueObject
    assert not sentinel.exists()


@pytest.mark.parametrize("name", [n for n in PAYLOAD_NAMES if _payloads(Path("x"))[n][2]])
def test_hostile_pickles_are_live(tmp_path, name):
    """The payloads really do run code under plain pickle.loads: the refusals above mean something."""
    sentinel = tmp_path / "pwned"
    pkl, _, _ = _payloads(sentinel)[name]
    try:
        pickle.loads(pkl)
    except Exception:  # noqa: BLE001 - e.g. _rebuild_tensor_v2 never called: os.system ran first
        pass
    assert sentinel.exists()


def test_hostile_legacy_file_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    src = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, src, _use_new_zipfile_serialization=False)
    raw = src.read_bytes()
    header = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {}))
    evil = header + dumps(call(g("builtins", "exec"), s(f"open({str(sentinel)!r}, 'w')"))) + raw[-40:]
    path = tmp_path / "evil_legacy.pt"
    path.write_bytes(evil)
    with pytest.raises(UnsafeCheckpointError, match="'builtins.exec'"):
        load_torch_file(path)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "expr, match",
    [
        # BUILD (set state) on a tensor: would call ndarray.__setstate__
        (call(g("builtins", "set"), tup()) + dict_(a=i(1)) + b"b", "BUILD"),
        (tensor(storage("0", 1), 0, [1], [1]) + dict_(a=i(1)) + b"b", "BUILD"),
        (tensor(storage("0", 1), 0, [1], [1]) + i(1) + b"a", "APPEND"),
        (tensor(storage("0", 1), 0, [1], [1]) + i(1) + i(2) + b"s", "SETITEM"),
        (b"\x82\x01", "extension"),  # EXT1: the copyreg registry, a side door to globals
        # calling a non-callable we handed out (a storage type marker)
        (call(g("torch", "FloatStorage"), i(3)), "refusing to call torch.FloatStorage"),
        (call(g("torch._utils", "_rebuild_tensor_v2"), s("rm -rf /"), i(0), tup(), tup(), FALSE, dict_()),
         "str where a storage was expected"),
        (call(g("torch._utils", "_rebuild_tensor_v2"), storage("0", 1), i(0), tup(), tup(), FALSE,
              dict_(hook=i(1))), "backward hooks"),
        (g("argparse", "Namespace") + tup() + b"\x81" + b"}" + i(1) + i(2) + b"s" + b"b",
         "dict with str keys"),
    ],
    ids=["build-on-set", "build-on-tensor", "append-to-tensor", "setitem-on-tensor", "ext1",
         "call-storage-type", "rebuild-with-str-storage", "rebuild-with-hooks", "namespace-int-keys"],
)
def test_hostile_opcodes_are_refused(tmp_path, expr, match):
    path = write_torch_zip(tmp_path / "evil.pt", dumps(expr), {"0": b"\0\0\0\0"})
    with pytest.raises(TorchCheckpointError, match=match):
        load_torch_file(path)


def test_unknown_globals_opaque_mode(tmp_path):
    # fairseq-style extra_state with a meter object, and an OmegaConf config
    meter = g("fairseq.logging.meters", "AverageMeter") + tup() + b"\x81" + dict_(val=i(3)) + b"b"
    cfg = call(g("omegaconf.dictconfig", "DictConfig"), dict_(lr=i(1)))
    pkl = dumps(dict_(model=dict_(w=tensor(storage("0", 2), 0, [2], [1])), meter=meter, cfg=cfg))
    path = write_torch_zip(tmp_path / "fs.pt", pkl, {"0": np.float32([1, 2]).tobytes()})
    with pytest.raises(UnsafeCheckpointError, match="fairseq.logging.meters.AverageMeter.*opaque"):
        load_torch_file(path)
    got = load_torch_file(path, unknown_globals="opaque")
    assert got["model"]["w"].tolist() == [1.0, 2.0]
    assert isinstance(got["meter"], OpaqueObject)
    assert got["meter"].global_name == "fairseq.logging.meters.AverageMeter"
    assert got["meter"].state == {"val": 3}
    assert got["cfg"].global_name == "omegaconf.dictconfig.DictConfig"
    assert got["cfg"].args == ({"lr": 1},)
    omega_only = write_torch_zip(tmp_path / "omega.pt", dumps(cfg))
    with pytest.raises(UnsafeCheckpointError, match="OmegaConf.to_container"):
        load_torch_file(omega_only)


# ----------------------------------------------------------------------------------------------
# corrupt files: clear errors, no crash, no garbage


F32_4 = np.float32([1, 2, 3, 4]).tobytes()


@pytest.mark.parametrize(
    "expr, storages, match",
    [
        (tensor(storage("0", 4), 0, [4], [1]), {"0": F32_4[:8]}, "holds 8 bytes but the pickle declares 16"),
        (tensor(storage("0", 4), 2, [3], [1]), {"0": F32_4}, "reaches element 4 .* has 4 elements"),
        (tensor(storage("0", 4), 0, [2, 2], [3, 1]), {"0": F32_4}, "reaches element 4"),
        (tensor(storage("0", 4), 5, [0], [1]), {"0": F32_4}, "offset 5 beyond storage"),
        (tensor(storage("0", 4), 3, [2], [-1]), {"0": F32_4}, "negative strides"),
        (tensor(storage("0", 4), 0, [-1], [1]), {"0": F32_4}, "negative tensor size"),
        (tensor(storage("0", 4), -1, [1], [1]), {"0": F32_4}, "bad storage offset"),
        (tensor(storage("0", 1), 0, [2**40, 2**40], [0, 0]), {"0": F32_4[:4]}, "overflows"),
        (tensor(storage("0", 4), 0, [2**61], [1]), {"0": F32_4}, "overflows"),
        (tensor(storage("0", 4), 0, [2**40, 0, 2**40], [1, 1, 1]), {"0": F32_4}, "overflows"),
        (tensor(storage("0", 4), 0, [2, 2], [1]), {"0": F32_4}, "differ in length"),
        (tensor(storage("0", 4), 0, [s("2")], [1]), {"0": F32_4}, "not a tuple of ints"),
        (tensor(storage("0", 4), 0, [1] * 65, [1] * 65), {"0": F32_4}, "65 dimensions"),
        (tensor(storage("7", 4), 0, [4], [1]), {"0": F32_4}, "no record 'archive/data/7'"),
        (tensor(storage("0", -4), 0, [4], [1]), {"0": F32_4}, "bad storage size"),
        (tensor(storage("0", 2**62), 0, [4], [1]), {"0": F32_4}, "bad storage size"),
        (tensor(tup(s("storage"), g("torch", "FloatStorage"), s("0")) + BINPERSID, 0, [4], [1]),
         {"0": F32_4}, "unsupported persistent id"),
        (tup(tensor(storage("0", 4), 0, [4], [1]), tensor(storage("0", 2, "DoubleStorage"), 0, [2], [1])),
         {"0": F32_4}, "referenced as both"),
        (b"(K\x01", {}, "corrupt or malformed"),  # truncated pickle
    ],
    ids=["short-record", "offset-past-end", "stride-past-end", "empty-offset-past-end",
         "negative-stride", "negative-size", "negative-offset", "broadcast-overflow",
         "huge-size", "overflow-with-zero-dim", "rank-mismatch", "str-size", "too-many-dims",
         "missing-key", "negative-numel", "huge-numel", "short-persistent-id", "two-dtypes",
         "truncated-pickle"],
)
def test_corrupt_tensors_are_clear_errors(tmp_path, expr, storages, match):
    pkl = dumps(expr) if not expr.startswith(b"(K") else b"\x80\x02" + expr
    path = write_torch_zip(tmp_path / "bad.pt", pkl, storages)
    with pytest.raises(TorchCheckpointError, match=match):
        load_torch_file(path)
    with pytest.raises(TorchCheckpointError, match=match):
        load_torch_file(path, mmap=False)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_files(tmp_path, legacy, keep):
    src = tmp_path / "full.pt"
    torch.save({"w": torch.randn(256, 16)}, src, _use_new_zipfile_serialization=not legacy)
    data = src.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TorchCheckpointError, match="truncated"):
        load_torch_file(path)


def test_not_torch_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_torch_file(tmp_path / "missing.bin")
    with pytest.raises(TorchCheckpointError, match="is a directory"):
        load_torch_file(tmp_path)
    from safetensors.numpy import save_file

    st = tmp_path / "model.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(st))
    with pytest.raises(TorchCheckpointError, match="this is a safetensors file"):
        load_torch_file(st)
    cases = {
        "empty.bin": (b"", "empty"),
        "random.bin": (bytes(range(200)), "not a torch checkpoint"),
        "plain.pkl": (pickle.dumps({"a": 1}), "plain pickle"),
        "x.gz": (b"\x1f\x8b\x08\x00" + bytes(20), "gzip"),
        "old.tar": (bytes(257) + b"ustar" + bytes(300), "tar archive"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TorchCheckpointError, match=match):
            load_torch_file(tmp_path / name)
    no_pkl = tmp_path / "other.zip"
    with zipfile.ZipFile(no_pkl, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(TorchCheckpointError, match="without a data.pkl"):
        load_torch_file(no_pkl)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(TorchCheckpointError, match="TorchScript"):
        load_torch_file(path)


def test_state_dict_must_be_a_mapping_of_arrays(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(TorchCheckpointError, match="top level is a list"):
        load_state_dict(path)
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "step": 3}, path)
    with pytest.raises(TorchCheckpointError, match="entry 'step' is a int"):
        load_state_dict(path)


def test_bad_options():
    with pytest.raises(ValueError, match="bfloat16"):
        load_torch_file(DATA / "model.pt", bfloat16="float16")
    with pytest.raises(ValueError, match="unknown_globals"):
        load_torch_file(DATA / "model.pt", unknown_globals="allow")
