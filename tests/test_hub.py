"""refimpl.hub and from_pretrained on Hub ids: offline loading from a Hugging Face cache, file choice.

The cache is written the way huggingface_hub writes it: ``models--org--name/blobs/<hash>`` (sha256
for LFS files, the git blob sha1 for the others), ``refs/main`` holding the commit, and
``snapshots/<commit>/<file>`` as relative symlinks into ``blobs``. Nothing here touches the network:
HF_HUB_OFFLINE is set (in the environment and in huggingface_hub.constants, which reads it at import
time), and HfApi is patched to fail if called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch

import pipeline_checkpoints
import refimpl
from conftest import build_hf, save_hf, torch_forward
from refimpl import hub
from refimpl import pipelines as P
from tolerances import assert_close

IDS = np.array([[0, 31414, 232, 50264, 4, 2], [0, 20920, 50264, 2, 1, 1]])
MASK = (IDS != 1).astype(np.int64)


def write_hub_cache(cache_dir, repo_id: str, folder, commit: str | None = None) -> str:
    """Put every file of ``folder`` into ``cache_dir`` as huggingface_hub's cache holds a download."""
    storage = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        if name.endswith((".bin", ".safetensors")):  # LFS files: named by their sha256
            blob = hashlib.sha256(data).hexdigest()
        else:  # regular git files: named by their git blob id
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob_path = os.path.join(storage, "blobs", blob)
        with open(blob_path, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob_path, snapshot), os.path.join(snapshot, name))
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used offline")

    monkeypatch.setattr(HfApi, "model_info", no_network)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A cache with org/mlm-bin (pytorch_model.bin only) and org/mlm-safetensors, same weights."""
    model, folder = pipeline_checkpoints.get(tmp_path_factory)["mlm"]
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name in os.listdir(folder):
        if name != "model.safetensors":
            shutil.copy(os.path.join(folder, name), bin_dir / name)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")  # tied decoder weight shares storage
    write_hub_cache(cache, "org/mlm-bin", bin_dir)
    write_hub_cache(cache, "org/mlm-safetensors", folder)
    return str(cache), model, folder


@pytest.mark.parametrize("repo", ["org/mlm-bin", "org/mlm-safetensors"])
def test_offline_hub_id_loads_from_cache(offline, hub_cache, repo):
    cache, hf_model, _ = hub_cache
    folder = hub.resolve(repo, cache_dir=cache)
    assert os.sep + "snapshots" + os.sep in folder
    assert hub.weights_format(folder) == ("bin" if repo.endswith("bin") else "safetensors")
    model = refimpl.from_pretrained(repo, cache_dir=cache)
    assert model.task == "masked-lm"
    want = torch_forward(hf_model, "float32", input_ids=IDS, attention_mask=MASK).logits.numpy()
    assert_close(model(input_ids=IDS, attention_mask=MASK).logits, want, "float32", f"{repo} logits")
    # The pipelines take Hub ids too (tokenizer files come from the same snapshot).
    out = P.fill_mask(repo, "The capital of France is <mask>.", top_k=3, cache_dir=cache)
    assert out == P.fill_mask(hub_cache[2], "The capital of France is <mask>.", top_k=3)


def test_dump_takes_a_hub_id(offline, hub_cache, tmp_path, capsys):
    """`refimpl dump --model ORG/NAME` runs the other implementation on the cached snapshot, as every
    other command resolves a Hub id; an uncached id is one line and exit status 2."""
    pytest.importorskip("transformers")
    from refimpl.cli import main
    from refimpl.golden import write_golden

    cache, _, folder = hub_cache
    golden = str(tmp_path / "g.safetensors")
    write_golden(refimpl.from_pretrained(folder, dtype="float64"), golden, input_ids=IDS, attention_mask=MASK)
    out = str(tmp_path / "c.safetensors")
    assert main(["dump", "--impl", "transformers", "--model", "org/mlm-bin", "--cache-dir", cache, golden,
                 "--out", out]) == 0
    assert main(["compare", golden, out, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["dump", "--impl", "transformers", "--model", "org/not-cached", "--cache-dir", cache, golden,
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and err.count("\n") == 1, err


def test_offline_uncached_id_says_how_to_get_it(offline, tmp_path):
    with pytest.raises(hub.ModelNotFoundError) as e:
        refimpl.from_pretrained("org/not-cached", cache_dir=tmp_path)
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download org/not-cached" in msg and "huggingface-cli download org/not-cached" in msg
    assert "local folder" in msg and "\n" not in msg


def test_offline_cached_without_weights(offline, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "roberta-prelayernorm"}))
    write_hub_cache(tmp_path / "cache", "org/config-only", src)
    with pytest.raises(hub.ModelNotFoundError, match="lacks weights"):
        hub.resolve("org/config-only", cache_dir=tmp_path / "cache")


def test_local_paths_and_shipped_model(tmp_path):
    assert hub.resolve(str(tmp_path)) == str(tmp_path)
    assert hub.resolve("tiny") == hub.SHIPPED["tiny"]
    for bad in ("./missing-folder", str(tmp_path / "missing"), "a/b/c"):
        with pytest.raises(hub.ModelNotFoundError, match="does not exist"):
            hub.resolve(bad)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(hub.ModelNotFoundError, match="is a file"):
        hub.resolve(str(tmp_path / "file.txt"))
    with pytest.raises(hub.ModelNotFoundError, match="valid Hub id"):
        hub.resolve("bad name with spaces")


def test_sharded_and_bfloat16_bin_folders(tmp_path):
    """pytorch_model.bin.index.json + shards, and a bfloat16 .bin (read as float32 exactly)."""
    hf_model = build_hf("masked-lm", seed=3).float()
    state = hf_model.state_dict()
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    save_hf(hf_model, sharded, dtype="float32")
    os.remove(sharded / "model.safetensors")
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k].clone() for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert hub.weights_format(sharded) == "bin-sharded" and len(hub.weight_files(sharded)) == 2
    ids = np.array([[0, 5, 17, 33, 2]])
    want = torch_forward(hf_model, "float32", input_ids=ids).logits.numpy()
    assert_close(refimpl.from_pretrained(str(sharded))(input_ids=ids).logits, want, "float32", "sharded bin")

    bf16 = tmp_path / "bf16"
    save_hf(hf_model, bf16, dtype="float32")
    os.remove(bf16 / "model.safetensors")
    torch.save(hf_model.to(torch.bfloat16).state_dict(), bf16 / "pytorch_model.bin")
    want = torch_forward(hf_model.float(), "float32", input_ids=ids).logits.numpy()  # bf16-rounded weights
    model = refimpl.from_pretrained(str(bf16))
    assert model.dtype == np.float32
    assert_close(model(input_ids=ids).logits, want, "float32", "bfloat16 bin")


def test_sharded_safetensors_preferred_over_bin(tmp_path):
    hf_model = build_hf("masked-lm", seed=4).float()
    folder = save_hf(hf_model, tmp_path / "m", dtype="float32", max_shard_size="20KB")
    assert hub.weights_format(folder) == "safetensors-sharded"
    torch.save({"garbage": torch.zeros(1)}, os.path.join(folder, "pytorch_model.bin"))  # must not be read
    ids = np.array([[0, 5, 17, 33, 2]])
    want = torch_forward(hf_model, "float32", input_ids=ids).logits.numpy()
    assert_close(refimpl.from_pretrained(folder)(input_ids=ids).logits, want, "float32", "sharded safetensors")


def test_online_downloads_only_what_is_needed(monkeypatch, tmp_path):
    """The file choice, with huggingface_hub's API replaced by fakes (no network)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    listings = {
        "org/both": ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json",
                     "merges.txt", "README.md", "flax_model.msgpack", "onnx/model.onnx"],
        "org/bin-sharded": ["config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                            "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                            "pytorch_model-00002-of-00002.bin", "tf_model.h5"],
    }
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                                "b": "pytorch_model-00002-of-00002.bin"}}))

    def model_info(self, repo_id, revision=None, **kw):
        calls.append(("model_info", repo_id, revision, self.token))
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in listings[repo_id]])

    def hf_hub_download(repo_id, filename, **kw):
        calls.append(("hf_hub_download", repo_id, filename))
        return str(index)

    def snapshot_download(repo_id, **kw):
        calls.append(("snapshot_download", repo_id, sorted(kw["allow_patterns"]), kw["token"], kw["revision"]))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    assert hub.resolve("org/both", token="hf_x", revision="v1") == str(tmp_path)
    assert calls[-1] == ("snapshot_download", "org/both",
                         ["config.json", "merges.txt", "model.safetensors", "tokenizer.json", "vocab.json"], "hf_x", "v1")
    assert calls[0] == ("model_info", "org/both", "v1", "hf_x")
    hub.resolve("org/bin-sharded")
    assert calls[-2] == ("hf_hub_download", "org/bin-sharded", "pytorch_model.bin.index.json")
    assert calls[-1][2] == sorted(["config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                                   "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                                   "pytorch_model-00002-of-00002.bin"])
