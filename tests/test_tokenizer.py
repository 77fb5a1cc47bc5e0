"""refimpl.tokenizer against known encodings and against transformers' RobertaTokenizer.

transformers 5.x has one RoBERTa tokenizer class (``RobertaTokenizerFast is RobertaTokenizer``, on
the tokenizers backend; AutoTokenizer resolves to it), so that is the oracle. It is loaded from
``tokenizer.json``: loaded from vocab.json + merges.txt alone it registers ``<mask>`` without
lstrip (the pitfall we deliberately do not copy), so that route is compared against the oracle
built with ``mask_token=AddedToken("<mask>", lstrip=True)``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import refimpl.tokenizer
from refimpl.tokenizer import Tokenizer, max_length_for

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizers import AddedToken  # noqa: E402

DATA = Path(__file__).parent / "data" / "roberta-tokenizer"

KNOWN = [
    ("Hello world", [0, 31414, 232, 2]),
    (" Hello world", [0, 20920, 232, 2]),
    ("Hello world! cécé herlolip", [0, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588, 2]),
    ("The capital of France is <mask>.", [0, 133, 812, 9, 1470, 16, 50264, 4, 2]),
]

# ----------------------------------------------------------------------------- the corpus
WORDS = ["Hello", "world", "the", "The", "capital", "of", "France", "is", "herlolip", "cécé",
         "naïve", "Straße", "Ångström", "façade", "jalapeño", "über", "résumé", "don't", "I'm",
         "UPPER", "camelCase", "snake_case", "x", "a", "1234567", "3.14159", "$5.00", "100%"]
SCRIPTS = ["東京", "中文字符", "日本語のテキスト", "한국어", "漢字かなカナ", "مرحبا بالعالم", "العربية",
           "שלום", "Привет мир", "Ελληνικά", "हिन्दी", "ภาษาไทย", "ქართული", "Ελλάδα"]
COMBINING = ["e\u0301", "a\u0308\u0304", "n\u0303", "Z\u0351\u0358\u035c", "\u0915\u094d\u0937",
             "\u0301", "o\u0338"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "🧑🏿‍💻", "1️⃣", "🤷‍♀️", "😀😀😀"]
SPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\r\n", "\n\n", " \t ", "\u00a0", "\u3000",
         "\u2009", "\u200b", "\u2028", " \n "]
PUNCT = [".", ",", "!", "?", "...", "'s", "n't", '"', "(", ")", "-", "—", "…", "«", "»", "@", "#",
         "2024-01-01", "C++", "e-mail", "http://example.com/a?b=c", "<", ">", "</", "<<", "<b>"]
SPECIAL = ["<mask>", "<s>", "</s>", "<pad>", "<unk>", "<mask><mask>", " <mask>", "<mask> ",
           "  <mask>", "<MASK>", "<mask", "mask>"]
ODD = ["\x00", "\x7f", "\ufeff", "\U0010ffff", "\ufffd", "\x1b[0m", "\u202e"]
FRAGMENTS = WORDS + SCRIPTS + COMBINING + EMOJI + SPACE + PUNCT + SPECIAL + ODD

HANDWRITTEN = [s for s, _ in KNOWN] + [
    "", " ", "  ", "\n", "\t", "\r\n", " \n\t ", "<mask>", "<mask>.", ".<mask>", "<mask> is here",
    "here is <mask>", "here is <mask>", "a <mask>, b <mask>! c<mask>?", "<mask><mask><mask>",
    "<mask> <mask>  <mask>", " <mask>", "\n<mask>", "\t<mask>", "x<mask>y", "(<mask>)",
    "<s>Hello</s>", "<s> Hello </s></s> world </s>", "<pad><pad>", "<unk> token", "</s>",
    "The capital of France is <mask>. The capital of Italy is <mask>.", "cécé", "Cécé",
    "e\u0301", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "東京タワー", "مرحبا", "Hello   world", "Hello\tworld",
    "Hello\n\nworld", "trailing space ", " leading space", "   ", "🤷‍♀️<mask>🤷‍♀️",
]


def _corpus() -> list[str]:
    rng = random.Random(20240601)
    out = list(HANDWRITTEN)
    for _ in range(420):
        pieces = [rng.choice(rng.choice([WORDS, WORDS, SCRIPTS, COMBINING, EMOJI, SPACE, PUNCT,
                                         SPECIAL, ODD])) for _ in range(rng.randint(1, 12))]
        glue = rng.choice(["", " ", " ", rng.choice(SPACE)])
        out.append(glue.join(pieces))
    out += [
        " ".join(rng.choice(FRAGMENTS) for _ in range(700)),
        "".join(rng.choice(FRAGMENTS) for _ in range(700)),
        "a" * 3000, "😀" * 400, " " * 1000, "<mask>" * 200, "word " * 800,
    ]
    return out


CORPUS = _corpus()
PAIRS = [(CORPUS[i], CORPUS[(7 * i + 3) % len(CORPUS)]) for i in range(320)]
NO_SPECIAL_TEXT = [s for s in CORPUS if not any(t in s for t in ("<s>", "</s>", "<pad>", "<unk>", "<mask>"))]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(DATA)


@pytest.fixture(scope="module")
def vm_folder(tmp_path_factory) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json."""
    folder = tmp_path_factory.mktemp("vocab_merges")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(DATA / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tok_vm(vm_folder) -> Tokenizer:
    return Tokenizer.from_pretrained(vm_folder)


@pytest.fixture(scope="module")
def hf():
    return transformers.RobertaTokenizer.from_pretrained(str(DATA))


@pytest.fixture(scope="module")
def hf_left():
    return transformers.RobertaTokenizer.from_pretrained(str(DATA), truncation_side="left")


@pytest.fixture(scope="module")
def hf_vm(vm_folder):
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    return transformers.RobertaTokenizer.from_pretrained(str(vm_folder), mask_token=mask)


# The two ways a batch is encoded: one backend encode_batch call (its thread pool), or one encode a
# text on the calling thread, padded as encode_batch pads (refimpl.tokenizer.SERIAL_UP_TO_CHARS).
ROUTES = {"one call": -1, "text by text": 2**62}


@pytest.fixture(params=list(ROUTES))
def route(request, monkeypatch):
    monkeypatch.setattr(refimpl.tokenizer, "SERIAL_UP_TO_CHARS", ROUTES[request.param])
    return request.param


ALL = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_token_type_ids=True,
           return_word_ids=True, return_sequence_ids=True)


def assert_same(ours: dict, ref, overflow: bool = False):
    """Compare our dict with a batched transformers BatchEncoding, key by key, exactly."""
    n = len(ref["input_ids"])
    if "token_type_ids" in ours and "token_type_ids" not in ref:  # RoBERTa: all zeros
        assert ours["token_type_ids"].dtype == np.int64 and not ours["token_type_ids"].any()
    for key in ("input_ids", "attention_mask", "special_tokens_mask", "token_type_ids"):
        if key in ours and key in ref:
            assert ours[key].dtype == np.int64 and ours[key].ndim == 2, key
            assert ours[key].tolist() == [list(r) for r in ref[key]], key
    if "offset_mapping" in ours:
        assert ours["offset_mapping"].dtype == np.int64
        assert ours["offset_mapping"].shape == (n, ours["input_ids"].shape[1], 2)
        assert ours["offset_mapping"].tolist() == [[list(o) for o in r] for r in ref["offset_mapping"]]
    if "word_ids" in ours:
        assert ours["word_ids"] == [ref.word_ids(i) for i in range(n)]
    if "sequence_ids" in ours:
        assert ours["sequence_ids"] == [ref.sequence_ids(i) for i in range(n)]
    if overflow:
        assert ours["overflow_to_sample_mapping"].tolist() == list(ref["overflow_to_sample_mapping"])


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- known encodings
@pytest.mark.parametrize("text,ids", KNOWN)
def test_known_encodings(tok, tok_vm, text, ids):
    for t in (tok, tok_vm):
        out = t(text)
        assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (1, len(ids))
        assert out["input_ids"].tolist() == [ids]
        assert out["attention_mask"].tolist() == [[1] * len(ids)]


def test_vocab_merges_only_gets_mask_lstrip(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, tmp_path / name)
    t = Tokenizer.from_pretrained(tmp_path)
    assert t("The capital of France is <mask>.")["input_ids"].tolist() == [KNOWN[3][1]]
    # transformers 5.x built the same way keeps the space (1437): the pitfall we do not copy.
    hf_plain = transformers.RobertaTokenizer.from_pretrained(str(tmp_path))
    assert 1437 in hf_plain("The capital of France is <mask>.")["input_ids"]


def test_both_routes_build_the_same_pipeline(tok, tok_vm):
    import json
    a, b = json.loads(tok.backend.to_str()), json.loads(tok_vm.backend.to_str())
    assert a == b


def test_attributes(tok, hf):
    for key in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(tok, f"{key}_token") == getattr(hf, f"{key}_token")
        assert getattr(tok, f"{key}_token_id") == getattr(hf, f"{key}_token_id")
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 50264)
    assert tok.vocab_size == hf.vocab_size == 50265
    assert len(tok) == len(hf) == 50265
    assert tok.model_max_length is None  # the config says 1e30: unknown
    assert sorted(tok.all_special_ids) == sorted(hf.all_special_ids)
    assert tok.get_vocab() == hf.get_vocab()
    assert tok.num_special_tokens_to_add() == 2 and tok.num_special_tokens_to_add(pair=True) == 4


def test_model_max_length_sources(tmp_path):
    assert max_length_for(514, 1) == 512
    t = Tokenizer.from_pretrained(DATA, model_max_length=max_length_for(514, 1))
    assert t.model_max_length == 512
    shutil.copy(DATA / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 512, "add_prefix_space": true}')
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.model_max_length == 512
    assert t("Hello world")["input_ids"].tolist() == [[0, 20920, 232, 2]]  # add_prefix_space from config


def test_parity_add_prefix_space():
    ours = [Tokenizer.from_pretrained(DATA, add_prefix_space=True),
            Tokenizer.from_files(DATA / "vocab.json", DATA / "merges.txt", add_prefix_space=True)]
    ref = transformers.RobertaTokenizer.from_pretrained(str(DATA), add_prefix_space=True)
    batch, pairs = CORPUS[:200], [p[1] for p in PAIRS[:200]]
    expected = ref(batch, pairs, padding=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    for t in ours:
        assert t("Hello world")["input_ids"].tolist() == [[0, 20920, 232, 2]]
        assert_same(t(batch, pairs, padding=True, **ALL), expected)


def test_special_tokens_map_with_flags(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "special_tokens_map.json").write_text(
        '{"mask_token": {"content": "<mask>", "lstrip": false, "rstrip": false, "normalized": false}}')
    t = Tokenizer.from_pretrained(tmp_path)  # explicit lstrip=false is honoured
    assert t("is <mask>")["input_ids"].tolist() == [[0, 354, 1437, 50264, 2]]


# ----------------------------------------------------------------------------- parity
def test_corpus_size():
    assert len(CORPUS) >= 400 and len(PAIRS) >= 300 and "" in CORPUS


@pytest.mark.parametrize("which", ["tokenizer.json", "vocab+merges"])
def test_parity_single_unpadded(which, tok, tok_vm, hf, hf_vm):
    ours, ref = (tok, hf) if which == "tokenizer.json" else (tok_vm, hf_vm)
    refs = ref(CORPUS, return_offsets_mapping=True, return_special_tokens_mask=True,
               return_token_type_ids=True)
    for i, text in enumerate(CORPUS):
        out = ours(text, **ALL)
        n = len(refs["input_ids"][i])
        assert out["input_ids"].tolist() == [refs["input_ids"][i]], repr(text)
        assert out["attention_mask"].tolist() == [refs["attention_mask"][i]]
        assert out["special_tokens_mask"].tolist() == [refs["special_tokens_mask"][i]]
        assert out["token_type_ids"].tolist() == [[0] * n] == [refs["token_type_ids"][i]]
        assert out["offset_mapping"].tolist() == [[list(o) for o in refs["offset_mapping"][i]]], repr(text)
        assert out["word_ids"] == [refs.word_ids(i)]
        assert out["sequence_ids"] == [refs.sequence_ids(i)]
        assert ours(text, add_special_tokens=False)["input_ids"].tolist() == [
            ref(text, add_special_tokens=False)["input_ids"]]
        assert ours.tokenize(text) == ref.tokenize(text)


@pytest.mark.parametrize("side", ["right", "left"])
def test_parity_batches_padded_longest(tok, hf, side, route):
    for batch in chunks(CORPUS, 32):
        assert_same(tok(batch, padding=True, padding_side=side, **ALL),
                    hf(batch, padding="longest", padding_side=side, return_offsets_mapping=True,
                       return_special_tokens_mask=True, return_token_type_ids=True))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("truncation_side", ["right", "left"])
def test_parity_truncate_and_pad_to_max_length(tok, hf, hf_left, side, truncation_side, route):
    ref_tok = hf if truncation_side == "right" else hf_left
    for max_length in (2, 3, 8, 17):
        for batch in chunks(CORPUS, 64):
            ours = tok(batch, truncation=True, max_length=max_length, padding="max_length",
                       padding_side=side, truncation_side=truncation_side, **ALL)
            assert ours["input_ids"].shape == (len(batch), max_length)
            assert_same(ours, ref_tok(batch, truncation=True, max_length=max_length, padding="max_length",
                                      padding_side=side, return_offsets_mapping=True,
                                      return_special_tokens_mask=True, return_token_type_ids=True))


def test_parity_pairs_untruncated(tok, tok_vm, hf, route):
    a, b = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    for side in ("right", "left"):
        for ca, cb in zip(chunks(a, 40), chunks(b, 40)):
            ref = hf(ca, cb, padding=True, padding_side=side, return_offsets_mapping=True,
                     return_special_tokens_mask=True, return_token_type_ids=True)
            assert_same(tok(ca, cb, padding=True, padding_side=side, **ALL), ref)
            assert_same(tok_vm(ca, cb, padding=True, padding_side=side, **ALL), ref)
    # a single pair: <s> A </s></s> B </s>
    out = tok("Hello world", " Hello world", return_sequence_ids=True)
    assert out["input_ids"].tolist() == [[0, 31414, 232, 2, 2, 20920, 232, 2]]
    assert out["sequence_ids"] == [[None, 0, 0, None, None, 1, 1, None]]


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
def test_parity_pairs_truncated(tok, hf, strategy):
    """Per pair, since a too-small max_length is an error for the whole call in both libraries."""
    compared = refused = 0
    for max_length in (9, 24, 64):
        for a, b in PAIRS:
            kwargs = dict(truncation=strategy, max_length=max_length)
            try:
                ref = hf([a], [b], padding="max_length", return_offsets_mapping=True,
                         return_special_tokens_mask=True, **kwargs)
            except Exception:  # noqa: BLE001 - the backend says the kept sequence is too short
                with pytest.raises(ValueError, match="too short"):
                    tok(a, b, **kwargs)
                refused += 1
                continue
            assert_same(tok(a, b, padding="max_length", **ALL, **kwargs), ref)
            compared += 1
    assert compared > 450 and (strategy == "longest_first") == (refused == 0)


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_parity_overflow_windows_only_second(tok, hf, padding, route):
    """Question answering over long contexts: short question, long context, overlapping windows."""
    rng = random.Random(7)
    questions = [q for q in CORPUS if 0 < len(tok.tokenize(q)) <= 6][:60]
    contexts = [" ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 12))) for _ in questions]
    n_windows = 0
    for max_length, stride in ((24, 0), (24, 4), (32, 8), (48, 13)):
        for qs, cs in zip(chunks(questions, 12), chunks(contexts, 12)):
            kwargs = dict(truncation="only_second", max_length=max_length, stride=stride,
                          return_overflowing_tokens=True, padding=padding)
            ref = hf(qs, cs, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
            ours = tok(qs, cs, **ALL, **kwargs)
            assert_same(ours, ref, overflow=True)
            n_windows += len(ref["input_ids"])
            assert ours["input_ids"].shape[1] <= max_length
    assert n_windows > 2 * len(questions) * 4  # many inputs really overflow
    # windows of one sample overlap by `stride` context tokens
    q, c = "Who?", " ".join(["alpha beta gamma delta"] * 10)
    out = tok(q, c, truncation="only_second", max_length=16, stride=3, return_overflowing_tokens=True,
              padding="max_length", return_sequence_ids=True)
    ctx = [[t for t, s in zip(row, sid) if s == 1] for row, sid in zip(out["input_ids"].tolist(), out["sequence_ids"])]
    assert len(ctx) > 2 and all(x[-3:] == y[:3] for x, y in zip(ctx, ctx[1:]))
    assert out["overflow_to_sample_mapping"].tolist() == [0] * len(ctx)


def test_parity_overflow_single_sequence(tok, hf, route):
    batch = [s for s in CORPUS if s][:80]
    kwargs = dict(truncation=True, max_length=10, stride=2, return_overflowing_tokens=True, padding="max_length")
    assert_same(tok(batch, **ALL, **kwargs),
                hf(batch, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs), overflow=True)


def test_parity_model_max_length(hf, route):
    t = Tokenizer.from_pretrained(DATA, model_max_length=max_length_for(514, 1))
    ref = transformers.RobertaTokenizer.from_pretrained(str(DATA), model_max_length=512)
    long_texts = [s for s in CORPUS if len(hf(s)["input_ids"]) > 512]
    assert len(long_texts) >= 3
    out = t(long_texts, truncation=True, padding=True)
    assert out["input_ids"].shape == (len(long_texts), 512)
    assert_same(out, ref(long_texts, truncation=True, padding=True))
    with pytest.raises(ValueError, match=r"longer than model_max_length=512"):
        t(long_texts[0])


def test_decode_round_trip_and_parity(tok, hf):
    for text in CORPUS:
        ids = tok(text)["input_ids"][0]
        assert tok.decode(ids) == hf.decode(ids.tolist())
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids.tolist(), skip_special_tokens=True)
        assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids.tolist())
        assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(
            ids.tolist(), skip_special_tokens=True)
        tokens = hf.convert_ids_to_tokens(ids.tolist())
        assert tok.convert_tokens_to_ids(tokens) == ids.tolist()
    for text in NO_SPECIAL_TEXT:  # byte-level BPE is lossless
        assert tok.decode(tok(text)["input_ids"][0], skip_special_tokens=True) == text
    assert tok.decode([0, 31414, 232, 2, 1, 1]) == "<s>Hello world</s><pad><pad>"
    assert tok.batch_decode(np.array([[0, 31414, 2], [0, 232, 2]]), skip_special_tokens=True) == ["Hello", " world"]
    assert tok.decode(31414) == "Hello"
    assert tok.convert_ids_to_tokens(20920) == "ĠHello"
    assert tok.convert_tokens_to_ids("ĠHello") == 20920
    assert tok.convert_tokens_to_ids("not-a-token") == tok.unk_token_id == hf.convert_tokens_to_ids("not-a-token")


_SPICE = st.sampled_from(SPECIAL + SPACE + EMOJI + COMBINING + PUNCT)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=12), _SPICE), max_size=8).map("".join))
def test_hypothesis_random_text(tok, hf, text):
    ref = hf([text], return_offsets_mapping=True, return_special_tokens_mask=True)
    assert_same(tok(text, **ALL), ref)
    assert tok.decode(tok(text)["input_ids"][0]) == hf.decode(ref["input_ids"][0])


@settings(max_examples=80, derandomize=True, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), _SPICE), max_size=3).map("".join),
       st.lists(st.one_of(st.text(max_size=12), _SPICE), max_size=30).map("".join),
       st.integers(0, 12), st.integers(1, 20), st.sampled_from(["right", "left"]))
def test_hypothesis_overflow_windows(tok, hf, question, context, stride, room, side):
    """Random question/context, with max_length chosen so that each window has room > stride."""
    max_length = len(tok.tokenize(question)) + 4 + stride + room
    kwargs = dict(truncation="only_second", max_length=max_length, stride=stride,
                  return_overflowing_tokens=True, padding="max_length", padding_side=side)
    ref = hf([question], [context], return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
    assert_same(tok(question, context, **ALL, **kwargs), ref, overflow=True)


_OPTIONS = [
    dict(), dict(padding=True), dict(padding=True, padding_side="left"),
    dict(padding="max_length", max_length=24), dict(padding="max_length", max_length=24, padding_side="left"),
    dict(truncation=True, max_length=7, padding=True), dict(truncation=True, max_length=9, padding="max_length"),
    dict(truncation=True, max_length=8, padding=True, truncation_side="left"),
    dict(truncation="only_first", max_length=12, padding=True),
    dict(truncation="only_second", max_length=12, padding="max_length", padding_side="left"),
    dict(truncation="only_second", max_length=14, stride=2, return_overflowing_tokens=True, padding=True),
    dict(truncation=True, max_length=6, stride=1, return_overflowing_tokens=True, padding="max_length"),
]


@settings(max_examples=120, derandomize=True, deadline=None)
@given(st.lists(st.lists(st.one_of(st.text(max_size=10), _SPICE), max_size=14).map("".join), min_size=1, max_size=6),
       st.booleans(), st.sampled_from(_OPTIONS))
def test_hypothesis_both_routes_agree(tok, texts, paired, options):
    """A batch encoded in one backend call and text by text: the same arrays, or the same error."""
    pairs = [t[::-1] for t in texts] if paired else None
    results = []
    for limit in ROUTES.values():
        old, refimpl.tokenizer.SERIAL_UP_TO_CHARS = refimpl.tokenizer.SERIAL_UP_TO_CHARS, limit
        try:
            results.append(tok(texts, pairs, **ALL, **options))
        except ValueError as e:
            results.append(f"ValueError: {e}")
        finally:
            refimpl.tokenizer.SERIAL_UP_TO_CHARS = old
    a, b = results
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].tolist() if isinstance(a[key], np.ndarray) else a[key]) == (
            b[key].tolist() if isinstance(b[key], np.ndarray) else b[key]), key


def test_short_batches_encode_text_by_text(tok, monkeypatch):
    """Below SERIAL_UP_TO_CHARS the backend's encode_batch (its thread pool) is not called."""
    calls = []
    backend = tok.backend

    class Spy:
        def __getattr__(self, name):
            if name == "encode_batch":
                calls.append(name)
            return getattr(backend, name)

    monkeypatch.setattr(tok, "backend", Spy())
    short = ["Hello world"] * 8
    assert tok(short, padding=True)["input_ids"].shape == (8, 4)
    assert calls == []
    long = ["Hello world " * 200] * 8  # 19,200 characters
    tok(long, padding=True)
    assert calls == ["encode_batch"]


# ----------------------------------------------------------------------------- errors
def test_overlong_without_truncation_raises(tok):
    with pytest.raises(ValueError, match=r"input 1 is 5 tokens long .*longer than max_length=4.*truncation"):
        tok(["Hello", "Hello world again"], max_length=4, padding=True)
    with pytest.raises(ValueError, match=r"longer than max_length=4"):
        tok("Hello world again", max_length=4, padding="max_length")
    assert tok("Hello world", max_length=4)["input_ids"].shape == (1, 4)  # exactly at the limit is fine
    t = Tokenizer.from_pretrained(DATA, model_max_length=6)
    with pytest.raises(ValueError, match=r"7 tokens long .*model_max_length=6"):
        t("one two three four five")


@pytest.mark.parametrize("kwargs,message", [
    (dict(truncation="sideways", max_length=8), "truncation must be one of"),
    (dict(padding="shortest"), "padding must be one of"),
    (dict(padding=True, padding_side="up"), "padding_side must be 'right' or 'left'"),
    (dict(truncation=True, max_length=8, truncation_side="middle"), "truncation_side must be"),
    (dict(truncation=True, max_length=0), "max_length must be a positive integer"),
    (dict(truncation=True, max_length=8.0), "max_length must be a positive integer"),
    (dict(truncation=True, max_length=True), "max_length must be a positive integer"),
    (dict(truncation=True, max_length=8, stride=-1, return_overflowing_tokens=True), "stride must be"),
    (dict(truncation=True, max_length=8, stride=2), "stride only applies"),
    (dict(return_overflowing_tokens=True), "needs truncation"),
    (dict(truncation=True), "truncation=True needs max_length"),
    (dict(padding="max_length"), "padding='max_length' needs max_length"),
    (dict(truncation="only_second", max_length=8), "needs text_pair"),
    (dict(truncation=True, max_length=1), "shorter than the 2 special tokens"),
    (dict(truncation=True, max_length=8, stride=6, return_overflowing_tokens=True), "stride"),
])
def test_bad_arguments(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tok(["Hello world, this is long enough to be cut", "x"], padding=kwargs.pop("padding", True), **kwargs)


def test_bad_pair_arguments(tok):
    with pytest.raises(TypeError, match="text_pair must be a string or None"):
        tok("a", ["b"])
    with pytest.raises(TypeError, match="text_pair must be a list of strings"):
        tok(["a"], "b")
    with pytest.raises(ValueError, match="text has 2 entries but text_pair has 1"):
        tok(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="text must be a string or a list of strings"):
        tok(42)
    with pytest.raises(TypeError, match="text must be a string or a list of strings"):
        tok(["a", None])
    with pytest.raises(ValueError, match="empty batch"):
        tok([])
    with pytest.raises(ValueError, match="rows have different lengths .*padding=True"):
        tok(["a", "a b c"])
    with pytest.raises(ValueError, match="'longest_first'"):
        tok("q", "c " * 50, truncation=True, max_length=10, stride=1, return_overflowing_tokens=True,
            padding=True)
    with pytest.raises(ValueError, match="too short"):  # question fills max_length: no room for context
        tok("one two three four five six", "c", truncation="only_second", max_length=8)
    with pytest.raises(ValueError, match=r"no room is left for the second sequence"):
        tok("one two three four five six", "c " * 50, truncation="only_second", max_length=8, stride=0,
            return_overflowing_tokens=True, padding=True)
    with pytest.raises(ValueError, match=r"no room is left for the first sequence"):
        tok("a " * 50, truncation=True, max_length=2, return_overflowing_tokens=True, padding=True)
    with pytest.raises(ValueError, match=r"leaves 2 tokens per window .* more than stride=2"):
        # the backend would abort with a Rust panic here; we refuse first
        tok("one two three", "c " * 50, truncation="only_second", max_length=9, stride=2,
            return_overflowing_tokens=True, padding=True)


def test_bad_ids(tok):
    with pytest.raises(ValueError, match=r"token id 50265 is out of range \[0, 50265\)"):
        tok.decode([0, 50265])
    with pytest.raises(ValueError, match="out of range"):
        tok.convert_ids_to_tokens(-1)
    with pytest.raises(TypeError, match="token ids must be integers"):
        tok.decode([0, 1.5])
    with pytest.raises(ValueError, match="use batch_decode"):
        tok.decode(np.zeros((2, 3), dtype=np.int64))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    shutil.copy(DATA / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_pretrained(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert name in msg
    assert "the folder has ['vocab.json']" in msg
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_unknown_special_token(tmp_path):
    shutil.copy(DATA / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"mask_token": "[MASK]"}')
    with pytest.raises(ValueError, match=r"mask_token '\[MASK\]' is not in the vocabulary"):
        Tokenizer.from_pretrained(tmp_path)
