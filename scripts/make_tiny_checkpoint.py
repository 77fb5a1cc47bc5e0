"""Write the tiny random checkpoints shipped in refimpl/data/ (the provenance of those folders).

Each is a transformers ``RobertaPreLayerNorm*`` model with random weights (transformers' own
initialisation under a fixed seed), saved by transformers' ``save_pretrained``, with the tokenizer
files and a model card (README.md) saying that it is random and what it is for. Their predictions
are meaningless; they exist so that every command of the README runs offline on a fresh install.

- ``tiny-random-mlm`` (``--model tiny``): masked LM with the real RoBERTa vocabulary (50265 tokens),
  hidden size 16, 2 layers, seed 0. The README's ``refimpl forward --model tiny --ids "0 31414 232 2"``
  uses real RoBERTa ids, so this one keeps the full vocabulary (4.5 MB).
- one checkpoint per other head, hidden size 32, 2 layers, 4 heads (``--model tiny-classify`` etc.):
  sequence classification (labels negative/positive), token classification (CoNLL-2003 NER labels),
  question answering, multiple choice and causal LM (``is_decoder=True``). To stay small (~0.3 MB
  each) they share a reduced byte-level BPE tokenizer: RoBERTa's first merges, 1000 tokens in all
  (the 4 specials, the 256 byte symbols, the results of the first 739 merges of RoBERTa's
  merges.txt, and ``<mask>``), and their weights are drawn with ``initializer_range=0.2`` (10x
  transformers' default) so that scores differ visibly from one input to the next. Every merge of that list joins two symbols of the vocabulary, so any
  text tokenizes (into shorter pieces than with the full vocabulary); ids differ from RoBERTa's.

Run with the test extra installed (torch + transformers), from the repository root:

    python scripts/make_tiny_checkpoint.py                 # the five head checkpoints
    python scripts/make_tiny_checkpoint.py tiny-random-mlm # the masked LM (as shipped: seed 0)
"""

import json
import os
import shutil
import sys
import warnings

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "refimpl", "data")
TOKENIZER = os.path.join(HERE, "..", "tests", "data", "roberta-tokenizer")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, as RoBERTa; <mask> is the last id
SMALL_VOCAB = 1000
CONLL = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

# folder: (shipped name, transformers class, seed, config overrides, pipeline tag, what it is for)
HEADS = {
    "tiny-random-sequence-classification": (
        "tiny-classify", "RobertaPreLayerNormForSequenceClassification", 1,
        {"id2label": {0: "negative", 1: "positive"}}, "text-classification",
        "`refimpl classify` (single texts and text pairs) and `refimpl.pipelines.classify`"),
    "tiny-random-token-classification": (
        "tiny-tag", "RobertaPreLayerNormForTokenClassification", 2,
        {"id2label": dict(enumerate(CONLL))}, "token-classification",
        "`refimpl tag` (every aggregation strategy) and `refimpl.pipelines.tag`"),
    "tiny-random-question-answering": (
        "tiny-qa", "RobertaPreLayerNormForQuestionAnswering", 3, {}, "question-answering",
        "`refimpl qa` and `refimpl.pipelines.answer`"),
    "tiny-random-multiple-choice": (
        "tiny-choose", "RobertaPreLayerNormForMultipleChoice", 4, {}, "multiple-choice",
        "`refimpl choose` and `refimpl.pipelines.choose`"),
    "tiny-random-causal-lm": (
        "tiny-generate", "RobertaPreLayerNormForCausalLM", 5, {"is_decoder": True}, "text-generation",
        "`refimpl generate`, `refimpl.generate` and the KV cache (`use_cache=True`)"),
}
SMALL = dict(vocab_size=SMALL_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
             initializer_range=0.2)  # 10x the default: scores that differ visibly from input to input


def small_tokenizer(out: str) -> None:
    """vocab.json + merges.txt of the reduced tokenizer (see the module docstring), and the config."""
    with open(os.path.join(TOKENIZER, "vocab.json"), encoding="utf-8") as f:
        full = json.load(f)
    with open(os.path.join(TOKENIZER, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    header, merges = lines[0], [m for m in lines[1:] if m]
    assert header.startswith("#version"), header
    byte_symbols = sorted((t for t in full if len(t) == 1), key=full.get)  # the byte-level alphabet
    assert len(byte_symbols) == 256, len(byte_symbols)
    vocab = {t: i for i, t in enumerate(SPECIALS + byte_symbols)}
    kept = []
    for m in merges:
        if len(vocab) == SMALL_VOCAB - 1:
            break
        a, b = m.split(" ")
        assert a in vocab and b in vocab, m  # merges build on earlier symbols: a prefix is closed
        kept.append(m)
        vocab.setdefault(a + b, len(vocab))
    vocab["<mask>"] = len(vocab)
    assert len(vocab) == SMALL_VOCAB
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join([header] + kept) + "\n")
    shutil.copy(os.path.join(TOKENIZER, "tokenizer_config.json"), os.path.join(out, "tokenizer_config.json"))


CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: {tag}
tags:
- random-weights
- testing
---

# {folder} (shipped with refimpl as `{name}`)

**Random weights: this model was never trained, and its predictions are meaningless.** Scores,
labels, answers and generated text are those of random numbers.

What it is for: trying {purpose} offline, right after installing refimpl, and testing code that
handles this head; for example `refimpl {command} --model {name} ...` (see refimpl's README).
For real predictions, use a trained checkpoint of the same architecture.

- Architecture: transformers' `{cls}` (model_type `roberta-prelayernorm`), {config}.
- Weights: transformers' initialisation (normal with standard deviation `initializer_range` =
  {init}) under `torch.manual_seed({seed})`, saved in float32 by `save_pretrained`; written by
  `scripts/make_tiny_checkpoint.py` in the refimpl repository.
- Tokenizer: {tokenizer}
- Loads in refimpl (`refimpl.from_pretrained("{name}")`) and in transformers
  (`AutoModel...from_pretrained(folder)`, `AutoTokenizer.from_pretrained(folder)`).
"""
SMALL_TOKENIZER = ("a byte-level BPE (RoBERTa's pre-tokenizer and special tokens) with RoBERTa's first "
                   f"{SMALL_VOCAB - 261} merges: {SMALL_VOCAB} tokens (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, "
                   f"`<mask>`={SMALL_VOCAB - 1}). Any text tokenizes, into shorter pieces than with RoBERTa's "
                   "vocabulary; the ids are not RoBERTa's.")
COMMANDS = {"tiny": "fill-mask", "tiny-classify": "classify", "tiny-tag": "tag", "tiny-qa": "qa",
            "tiny-choose": "choose", "tiny-generate": "generate"}


def card(folder, name, cls, seed, config, tag, purpose, tokenizer) -> str:
    c = config.to_dict()
    desc = (f"hidden size {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} attention "
            f"heads, intermediate size {c['intermediate_size']}, vocabulary {c['vocab_size']}")
    if "id2label" in c and cls.endswith(("SequenceClassification", "TokenClassification")):
        desc += ", labels " + ", ".join(f"{k}: {v}" for k, v in sorted(c["id2label"].items(), key=lambda kv: int(kv[0])))
    if c.get("is_decoder"):
        desc += ", `is_decoder=True` (causal attention)"
    return CARD.format(folder=folder, name=name, cls=cls, seed=seed, config=desc, tag=tag, purpose=purpose,
                       tokenizer=tokenizer, command=COMMANDS[name], init=c["initializer_range"])


def save(folder, name, cls_name, seed, config, tag, purpose, tokenizer) -> None:
    out = os.path.join(DATA, folder)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(config).eval()
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card(folder, name, cls_name, seed, config, tag, purpose, tokenizer))
    print("wrote", os.path.normpath(out), sorted(os.listdir(out)))


def make_mlm() -> None:
    config = transformers.RobertaPreLayerNormConfig(
        vocab_size=50265, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
    )
    save("tiny-random-mlm", "tiny", "RobertaPreLayerNormForMaskedLM", 0, config, "fill-mask",
         "`refimpl fill-mask`, `refimpl embed`, `refimpl forward`, `refimpl golden` and the Python API",
         "RoBERTa's own (vocab.json + merges.txt, 50265 tokens).")
    out = os.path.join(DATA, "tiny-random-mlm")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), os.path.join(out, name))


def make_head(folder: str) -> None:
    name, cls_name, seed, overrides, tag, purpose = HEADS[folder]
    kwargs = {**SMALL, **overrides}
    if "id2label" in kwargs:
        kwargs["label2id"] = {v: k for k, v in kwargs["id2label"].items()}
    config = transformers.RobertaPreLayerNormConfig(**kwargs)
    config.architectures = [cls_name]
    save(folder, name, cls_name, seed, config, tag, purpose, SMALL_TOKENIZER)
    small_tokenizer(os.path.join(DATA, folder))


if __name__ == "__main__":
    names = sys.argv[1:] or list(HEADS)
    for n in names:
        if n == "tiny-random-mlm":
            make_mlm()
        elif n in HEADS:
            make_head(n)
        else:
            sys.exit(f"unknown checkpoint {n!r}; one of tiny-random-mlm, {', '.join(HEADS)}")
