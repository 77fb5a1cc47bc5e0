"""Fine-tuning: AdamW, the schedule and clipping against torch; the CLI learns a synthetic task; the
checkpoint is atomic, loads in transformers with the same logits, and bad data is a clear error."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers

import refimpl
from refimpl import finetune as ft
from refimpl.cli import main
from refimpl.optim import AdamWState, clip_grad_norm, decays, linear_schedule
from backward_oracle import build, torch_inputs
from conftest import TINY
from tolerances import assert_close

HERE = os.path.dirname(os.path.abspath(__file__))


# =============================================================================================
# The optimiser against torch
# =============================================================================================


def test_linear_schedule_is_transformers():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=10)
    for step in range(12):
        assert linear_schedule(step, 3, 10) == opt.param_groups[0]["lr"], step
        opt.step()
        sched.step()


def test_clip_grad_norm_is_torch():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5), "c": None}
    for max_norm in (0.5, 100.0):
        ts = [torch.tensor(grads["a"], requires_grad=True), torch.tensor(grads["b"], requires_grad=True)]
        for t, g in zip(ts, (grads["a"], grads["b"])):
            t.grad = torch.tensor(g)
        norm = torch.nn.utils.clip_grad_norm_(ts, max_norm)
        clipped, ours = clip_grad_norm(grads, max_norm)
        assert abs(float(ours) - norm.item()) <= 1e-14 * norm.item()
        assert_close(clipped["a"], ts[0].grad.numpy(), "float64")
        assert_close(clipped["b"], ts[1].grad.numpy(), "float64")
        assert clipped["c"] is None


def test_decay_groups_are_the_trainers():
    """No weight decay on biases and on the parameters of LayerNorm modules (transformers' Trainer)."""
    hf, _ = build("masked-lm", dict(TINY), seed=0)
    norm_params = {f"{m}.{p}" if m else p for m, mod in hf.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                   for p, _ in mod.named_parameters(recurse=False)}
    for name, _ in hf.named_parameters():
        assert decays(name) == (name not in norm_params and not name.endswith("bias")), name


def five_steps_setup():
    cfg = {**TINY, "num_labels": 3}
    hf, model = build("sequence-classification", cfg, seed=9, std=0.3)
    rng = np.random.default_rng(10)
    batches = []
    for _ in range(5):
        ids = rng.integers(3, TINY["vocab_size"], size=(4, 7))
        ids[:, 0] = 0
        mask = np.ones_like(ids)
        ids[1, 5:], mask[1, 5:] = 1, 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 3, size=4)})
    hp = ft.FinetuneConfig(lr=1e-2, warmup_ratio=0.4, weight_decay=0.1, max_grad_norm=0.5, betas=(0.9, 0.98), eps=1e-6,
                           dtype="float64")
    return hf, model, batches, hp


def test_five_adamw_steps_match_torch_and_the_checkpoint_loads_in_transformers(tmp_path):
    hf, model, batches, hp = five_steps_setup()
    initial = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    # torch: AdamW over two groups, transformers' schedule (2 warm-up steps of 5), clip_grad_norm_
    groups = [{"params": [p for n, p in hf.named_parameters() if decays(n)], "weight_decay": hp.weight_decay},
              {"params": [p for n, p in hf.named_parameters() if not decays(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas, eps=hp.eps)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, 5)
    torch_losses, torch_norms = [], []
    for batch in batches:
        opt.zero_grad()
        loss = hf(**torch_inputs(batch, torch.float64)).loss
        loss.backward()
        torch_norms.append(torch.nn.utils.clip_grad_norm_(hf.parameters(), hp.max_grad_norm).item())
        torch_losses.append(loss.item())
        opt.step()
        sched.step()
    # refimpl
    state = AdamWState()
    for step, batch in enumerate(batches):
        r = ft.train_step(model, batch, state, step, 5, hp)
        model, state = r.model, r.state
        assert abs(r.loss - torch_losses[step]) <= 1e-12 and abs(r.grad_norm - torch_norms[step]) <= 1e-12 * torch_norms[step]
    assert max(torch_norms) > hp.max_grad_norm  # clipping was active
    ours = refimpl.state_dict(model)
    theirs = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert set(ours) == set(theirs)
    moved = 0.0
    for name, value in theirs.items():
        assert_close(ours[name], value, "float64", name)
        moved = max(moved, float(np.max(np.abs(value - initial[name]))))
    assert moved > 1e-3  # the steps changed the parameters
    # the exported checkpoint, loaded by transformers, gives refimpl's logits
    model = ft.classifier_model(model, ["a", "b", "c"], seed=0)  # keeps the head: rename the labels
    out = tmp_path / "ckpt"
    ft.save_checkpoint(model, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["RobertaPreLayerNormForSequenceClassification"]
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"} and config["problem_type"] == "single_label_classification"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.RobertaPreLayerNormForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    loaded = loaded.double().eval()
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        want = loaded(**torch_inputs(batch, torch.float64)).logits.numpy()
    assert_close(model(**batch).logits, want, "float64", "logits")
    assert_close(refimpl.from_pretrained(str(out), dtype="float64")(**batch).logits, want, "float64", "reloaded logits")


# =============================================================================================
# The command line on a synthetic task
# =============================================================================================

WORDS = "apple river stone cloud green music table window paper light sound water".split()


def write_task(path, n: int, seed: int) -> None:
    """'does the text contain the word dog': half the lines do (label yes), half do not (no)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = list(rng.choice(WORDS, size=int(rng.integers(3, 9))))
            if i % 2:
                words[int(rng.integers(0, len(words)))] = "dog"
            f.write(" ".join(words) + "\t" + ("yes" if i % 2 else "no") + "\n")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A randomly initialised transformers MLM (H32, L2, transformers' own init) with RoBERTa's tokenizer."""
    folder = tmp_path_factory.mktemp("small-model")
    config = transformers.RobertaPreLayerNormConfig(
        vocab_size=50265, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, layer_norm_eps=1e-5, type_vocab_size=1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.RobertaPreLayerNormForMaskedLM(config).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(HERE, "data", "roberta-tokenizer", f), folder / f)
    write_task(folder / "train.tsv", 400, seed=1)
    write_task(folder / "dev.tsv", 200, seed=2)
    return folder


def test_finetune_learns_a_synthetic_task(small_model, tmp_path, capsys):
    """>= 95% dev accuracy on 'contains the word dog' in 5 epochs of 25 steps (~4 s on 2 cores)."""
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(small_model), "--task", "sequence-classification",
               "--train", str(small_model / "train.tsv"), "--eval", str(small_model / "dev.tsv"), "--out", str(out),
               "--epochs", "5", "--lr", "1e-3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    epochs = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5] and epochs[-1]["steps"] == 125
    assert epochs[-1]["dev_accuracy"] >= 0.95, epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert "epoch 5/5" in captured.err  # the progress bar, on stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folders left
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out))
    # transformers loads it and agrees with refimpl; refimpl classify uses it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.RobertaPreLayerNormForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.id2label == {0: "no", 1: "yes"}
    tok = refimpl.tokenizer.Tokenizer.from_pretrained(out)
    enc = tok(["green dog water", "paper light"], padding=True)
    ours = refimpl.from_pretrained(str(out), backend="numpy")(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(enc["input_ids"]), attention_mask=torch.from_numpy(enc["attention_mask"])).logits.numpy()
    assert_close(ours, theirs, "float32", "logits")
    assert list(np.argmax(ours, -1)) == [1, 0]


def run_small(small_model, out, *extra, train=None, dev=None):
    return main(["finetune", "--model", str(small_model), "--train", str(train or small_model / "train.tsv"),
                 "--eval", str(dev or small_model / "dev.tsv"), "--out", str(out), "--epochs", "1", "--no-progress",
                 "--batch-size", "32", *extra])


def test_finetune_is_deterministic(small_model, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("".join(open(small_model / "train.tsv").readlines()[:64]))
    for name in ("a", "b"):
        assert run_small(small_model, tmp_path / name, "--seed", "5", train=train) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    capsys.readouterr()


# =============================================================================================
# Bad data, bad settings, interruptions
# =============================================================================================


@pytest.mark.parametrize("content,message", [
    ("", "no examples (the file is empty or blank)"),
    ("\n  \n", "no examples"),
    ("a text\tyes\nno tab here\n", ":2: no tab"),
    ("a\tb\tc\tyes\n", ":1: 4 tab-separated fields"),
    ("a text\t\n", ":1: the label (the last field) is empty"),
    ("\tyes\n", ":1: the text (the first field) is empty"),
    ("a\tyes\nb\tc\tno\n", ":2: mixes single texts and text pairs"),
])
def test_bad_training_data_is_a_clear_error(content, message, small_model, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content)
    assert run_small(small_model, tmp_path / "out", train=bad) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "out")


def test_labels_outside_the_label_set_name_the_file_and_line(small_model, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("a dog\tyes\nno dog\tno\nmaybe\tperhaps\n")
    assert run_small(small_model, tmp_path / "out", "--labels", "yes,no", train=train) == 2
    err = capsys.readouterr().err
    assert f"{train}:3: label 'perhaps' is not one of the labels" in err
    dev = tmp_path / "dev.tsv"
    dev.write_text("a dog\tyes\nsomething\tunknown\n")
    train.write_text("a dog\tyes\nno dog\tno\n")
    assert run_small(small_model, tmp_path / "out", train=train, dev=dev) == 2
    assert f"{dev}:2: label 'unknown' is not one of the labels ['no', 'yes']" in capsys.readouterr().err
    bytes_file = tmp_path / "latin1.tsv"
    bytes_file.write_bytes(b"ok\tyes\ncaf\xe9\tno\n")
    assert run_small(small_model, tmp_path / "out", train=bytes_file) == 2
    assert f"{bytes_file}:2: not UTF-8 text" in capsys.readouterr().err
    assert run_small(small_model, tmp_path / "out", train=tmp_path / "missing.tsv") == 2
    assert "missing.tsv: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--lr", "0"], "lr must be a positive number"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--warmup-ratio", "2"], "warmup_ratio must lie in [0, 1]"),
    (["--labels", "yes"], "at least two distinct, non-empty labels"),
])
def test_bad_settings_are_clear_errors(extra, message, small_model, tmp_path, capsys):
    assert run_small(small_model, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err


def test_an_existing_output_folder_is_not_overwritten(small_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    assert run_small(small_model, out) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "mine"


def test_an_interrupted_run_keeps_the_last_complete_checkpoint(small_model, tmp_path, monkeypatch, capsys):
    """Interrupted during epoch 2's training, and during epoch 2's checkpoint write: epoch 1's
    checkpoint stays complete at --out, byte for byte, and no temporary folder remains."""
    train = tmp_path / "train.tsv"
    train.write_text("".join(open(small_model / "train.tsv").readlines()[:64]))
    snapshots = tmp_path / "snapshots"
    real_save = ft.save_checkpoint

    def save_and_keep_a_copy(model, out, **kw):
        real_save(model, out, **kw)
        shutil.copytree(out, snapshots / f"{os.path.basename(out)}-{len(os.listdir(snapshots)) if snapshots.exists() else 0}")

    monkeypatch.setattr(ft, "save_checkpoint", save_and_keep_a_copy)
    real_step, calls = ft.train_step, []

    def interrupted_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the first step of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(ft, "train_step", interrupted_step)
    out = tmp_path / "out"
    assert run_small(small_model, out, "--epochs", "2", train=train) == 130
    assert "refimpl finetune: interrupted" in capsys.readouterr().err
    assert os.listdir(snapshots) == ["out-0"]
    assert (out / "model.safetensors").read_bytes() == (snapshots / "out-0" / "model.safetensors").read_bytes()
    ids = {"input_ids": [[0, 9, 10, 2]]}
    assert refimpl.from_pretrained(str(out), backend="numpy")(**ids).logits.shape == (1, 2)

    monkeypatch.setattr(ft, "train_step", real_step)
    real_write, writes = ft.write_safetensors, []

    def interrupted_write(path, tensors):
        writes.append(path)
        if len(writes) == 2:  # epoch 2's weights, half written
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        real_write(path, tensors)

    monkeypatch.setattr(ft, "write_safetensors", interrupted_write)
    out2 = tmp_path / "out2"
    assert run_small(small_model, out2, "--epochs", "2", train=train) == 130
    assert sorted(os.listdir(snapshots)) == ["out-0", "out2-1"]
    assert (out2 / "model.safetensors").read_bytes() == (snapshots / "out2-1" / "model.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["out", "out2", "snapshots", "train.tsv"]  # no temporary folders
    capsys.readouterr()
