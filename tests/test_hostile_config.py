"""Hostile and malformed config.json and tokenizer files: bounded work, every error the project's own.

Every load runs in a child process under a memory cap and a timeout (tests/hostile_harness.py):
at most 2 s of CPU and 256 MiB beyond the file's own bytes. The kinds:

* memory/CPU bombs in config.json: ``"num_hidden_layers": 10000000`` (the key table was built
  before any shape check: hours), ``"num_labels": 100000000`` (a 10^8-entry id2label);
* silently accepted: ``"architectures"`` as a string (loaded as the base model);
* wrong exception types: JSON nested 100k deep, a 5000-digit integer, a 4000-digit float field,
  non-UTF-8 bytes, id2label/label2id/architectures of the wrong type or with bad keys; malformed
  tokenizer_config.json, tokenizer.json and vocab.json (the tokenizers library's bare Exception),
  which must also leave ``refimpl info`` reporting the tokenizer problem inline (exit status 0).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hostile_harness import Cases

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refimpl", "data", "tiny-random-mlm")
LOAD = "refimpl.from_pretrained(P)"
WEIGHTS = os.path.getsize(os.path.join(TINY, "model.safetensors"))
TOKENIZE = "from refimpl.tokenizer import Tokenizer\nTokenizer.from_pretrained(P)"
INFO_REPORTS_TOKENIZER = (
    "import contextlib, io, json\n"
    "from refimpl.cli import main\n"
    "out = io.StringIO()\n"
    "with contextlib.redirect_stdout(out):\n"
    "    rc = main(['info', '--model', P, '--json'])\n"
    "assert rc == 0, rc\n"
    "assert 'the tokenizers library cannot read it' in json.loads(out.getvalue())['tokenizer']['error']\n"
)


def model_folder(d, config_text: str | bytes | None = None, **changes) -> dict:
    """The shipped tiny model with config.json replaced by ``config_text`` or changed by ``changes``."""
    for name in os.listdir(TINY):
        shutil.copy(os.path.join(TINY, name), d / name)
    if config_text is None:
        with open(d / "config.json") as f:
            config = json.load(f)
        config.update(changes)
        config_text = json.dumps(config, separators=(",", ":"))
    with open(d / "config.json", "wb") as f:
        f.write(config_text.encode() if isinstance(config_text, str) else config_text)
    return {"path": str(d), "mapped": WEIGHTS, "code": LOAD}


def tokenizer_folder(d, name: str, text: str, code: str = TOKENIZE) -> dict:
    spec = model_folder(d)  # (vocab.json + merges.txt; a tokenizer.json, when written, is read instead)
    with open(d / name, "w") as f:
        f.write(text)
    return {**spec, "code": code}


case = Cases("ConfigError")


# ---- bombs -------------------------------------------------------------------------------------


@case("ten-million-layers", match=r"num_hidden_layers=10000000 is above refimpl's limit")
def _(d):
    return model_folder(d, num_hidden_layers=10_000_000)


@case("hundred-million-labels", match=r"num_labels=100000000 is above refimpl's limit")
def _(d):
    return model_folder(d, num_labels=100_000_000, id2label=None, label2id=None)


@case("more-layers-than-the-weights", error="CheckpointError", match=r"num_hidden_layers=1000, the tensors hold 2")
def _(d):  # within the limit, but the key table is only built for the layers the tensors hold
    return model_folder(d, num_hidden_layers=1000)


# ---- silently accepted -------------------------------------------------------------------------


@case("architectures-a-string", match="architectures must be a list of class names")
def _(d):
    return model_folder(d, architectures="RobertaPreLayerNormForMaskedLM")


# ---- wrong exception types ---------------------------------------------------------------------


@case("json-100k-deep", match="config.json: the config is nested too deeply")
def _(d):
    return model_folder(d, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")


@case("5000-digit-integer", match="config.json: the config holds a value that cannot be read")
def _(d):
    return model_folder(d, '{"vocab_size": ' + "9" * 5000 + "}")


@case("4000-digit-eps", match="layer_norm_eps must be a positive finite number")
def _(d):
    with open(os.path.join(TINY, "config.json")) as f:
        text = f.read()
    return model_folder(d, text.replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": ' + "9" * 4000))


@case("not-utf8", match="config.json: the config is not valid JSON \\(not UTF-8 text")
def _(d):
    return model_folder(d, b'{"hidden_act": "\xff\xfe"}')


@case("id2label-a-list", match="id2label must map label ids to label names")
def _(d):
    return model_folder(d, id2label=["a", "b"])


@case("id2label-bad-key", match="an id2label key must be an integer label id, got 'x'")
def _(d):
    return model_folder(d, id2label={"x": "a", "1": "b"})


@case("id2label-nested-value", match=r"id2label\[.0.\] must be a label name")
def _(d):
    return model_folder(d, id2label={"0": {"a": 1}, "1": "b"})


@case("label2id-a-string", match="label2id must map label names to label ids")
def _(d):
    return model_folder(d, label2id="LABEL_0")


@case("label2id-bad-value", match=r"label2id\['a'\] must be an integer label id")
def _(d):
    return model_folder(d, label2id={"a": "zero"})


@case("architectures-of-numbers", match="architectures must be a list of class names")
def _(d):
    return model_folder(d, architectures=[1, 2])


@case("tokenizer-config-not-json", error="TokenizerError", match="tokenizer_config.json: the tokenizer file is not valid JSON")
def _(d):
    return tokenizer_folder(d, "tokenizer_config.json", "{nope")


@case("tokenizer-config-a-list", error="TokenizerError", match="tokenizer_config.json must hold a JSON object")
def _(d):
    return tokenizer_folder(d, "tokenizer_config.json", "[1, 2]")


@case("tokenizer-config-bad-max-length", error="TokenizerError", match="model_max_length must be a positive integer")
def _(d):
    return tokenizer_folder(d, "tokenizer_config.json", '{"model_max_length": [512]}')


@case("tokenizer-json-malformed", error="TokenizerError", match="the tokenizers library cannot read it")
def _(d):
    return tokenizer_folder(d, "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}')


@case("vocab-json-malformed", error="TokenizerError", match="the tokenizers library cannot read it")
def _(d):
    return tokenizer_folder(d, "vocab.json", '{"a": 0,')


@case("vocab-json-without-specials", error="TokenizerError", match="the sep token '</s>' is not in the vocabulary")
def _(d):  # once a KeyError from deep inside the pipeline construction
    return tokenizer_folder(d, "vocab.json", '{"a": 0}')


@case("refimpl-info-reports-tokenizer-inline", error=None)
def _(d):
    return tokenizer_folder(d, "tokenizer.json", '{"version": "1.0", "model": 5}', INFO_REPORTS_TOKENIZER)


@case("two-megabyte-id2label", error=None)
def _(d):  # the control: a legitimately large (2 MB) config loads within the bounds
    labels = {str(i): f"L{i}" for i in range(65_000)}
    spec = model_folder(d, id2label=labels, label2id={v: int(k) for k, v in labels.items()})
    assert 1.5e6 < os.path.getsize(d / "config.json") <= 2**21
    return spec


@pytest.mark.parametrize("name", case.names())
def test_hostile_config(name, hostile_outcomes):  # (the fixture: tests/conftest.py)
    case.check(hostile_outcomes, name)



@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 48), ("hidden_size", 4096), ("intermediate_size", 16384), ("vocab_size", 250_002),
    ("max_position_embeddings", 514), ("num_attention_heads", 64),
])
def test_limits_admit_the_largest_released_models(field, value):
    """xlm-roberta-xxl sizes (the largest RoBERTa released) are far inside the limits."""
    from refimpl.config import LIMITS, Config

    assert value * 8 <= LIMITS[field]
    Config(**{"hidden_size": 4096, "num_attention_heads": 64, field: value}).validate()
