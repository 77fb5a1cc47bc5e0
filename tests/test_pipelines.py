"""refimpl.pipelines against transformers' pipelines on tiny random checkpoints with the real tokenizer.

Labels, tokens, words and character offsets must be equal; scores within the float32 tolerance
(refimpl and transformers both compute in float32). transformers 5 has no extractive
question-answering pipeline: the oracle below is transformers 4.53's QuestionAnsweringPipeline
(fast-tokenizer path) rebuilt on transformers' own ``select_starts_ends``, which transformers 5
still ships in its document-QA pipeline. Multiple choice has no pipeline: the oracle is the
transformers model's softmax over the choices.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pipeline_checkpoints
import refimpl.tokenizer
from refimpl import pipelines as P
from refimpl.tokenizer import Tokenizer
from tolerances import FLOAT32_REFERENCE, assert_close

pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

FILL_TEXTS = [
    "The capital of France is <mask>.",
    "A <mask> walks into a <mask> and orders a drink.",
    "Hugging Face makes <mask> for machine learning, mostly in Python and Rust.",
]
NER_TEXTS = [
    "Wolfgang Amadeus Mozart lived in Salzburgerland, Austria.",
    "Ada Lovelace met Charles Babbage in London in 1833; they corresponded for years.",
    "Zxqwv Blorptown isn't a real place, but Pétursdóttir lives there.",
]
CLS_TEXTS = ["I loved this film.", "A dull, overlong and unbearably pretentious mess of a movie!", "Okay."]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return pipeline_checkpoints.get(tmp_path_factory)


def hf_pipeline(task, model, tokenizer, **kwargs):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.pipeline(task, model=model, tokenizer=tokenizer, **kwargs)


def flat_scores(x):
    """Every 'score' in a nested result, in order."""
    if isinstance(x, dict):
        return [float(x["score"])]
    return [s for item in x for s in flat_scores(item)]


def strip_scores(x):
    if isinstance(x, dict):
        return {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in x.items() if k != "score"}
    return [strip_scores(item) for item in x]


def assert_same(ours, theirs, what):
    """Equal apart from scores; scores within float32 tolerance. Returns the largest score difference."""
    assert strip_scores(ours) == strip_scores(theirs), what
    a, b = flat_scores(ours), flat_scores(theirs)
    assert_close(np.array(a), np.array(b), "float32", what)
    for s in a:
        assert type(s) is float, f"{what}: scores must be Python floats"
    return float(np.max(np.abs(np.array(a) - np.array(b)))) if a else 0.0


# ---------------------------------------------------------------------------------------------
# fill-mask
# ---------------------------------------------------------------------------------------------


def test_fill_mask_matches_transformers(ck):
    model, folder = ck["mlm"]
    hf = hf_pipeline("fill-mask", model, ck["tokenizer"])
    pipe = P.FillMask(folder, batch_size=2)  # the last batch pads, the first does not
    ours = pipe(FILL_TEXTS, top_k=4)
    for text, got in zip(FILL_TEXTS, ours):
        assert_same(got, hf(text, top_k=4), text)
    assert isinstance(ours[1][0], list) and len(ours[1]) == 2  # two masks: one list per mask
    # A single string gives one result (the same, up to float32 rounding: a batch of one takes a
    # different GEMM schedule than a padded batch of two, see ops.linear).
    assert_same(pipe(FILL_TEXTS[0], top_k=4), ours[0], "single string")
    assert_same(P.fill_mask(folder, FILL_TEXTS[0], top_k=3, targets=[" Paris", " London", "Berlin", "xyzzy"]),
                hf(FILL_TEXTS[0], top_k=3, targets=[" Paris", " London", "Berlin", "xyzzy"]), "targets")


def test_fill_mask_errors(ck):
    _, folder = ck["mlm"]
    pipe = P.FillMask(folder)
    with pytest.raises(P.PipelineError, match=r"input 2 has no <mask>"):
        pipe(["a <mask>", "no mask here"])
    with pytest.raises(P.PipelineError, match="no input"):
        pipe([])
    with pytest.raises(P.PipelineError, match="input 1 is an empty text"):
        pipe("  ")
    long = "word " * 600 + "<mask>."
    with pytest.raises(P.PipelineError, match=r"input 1 is \d+ tokens long.*limit of 512.*truncate"):
        pipe(long)


# ---------------------------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cls", "cls_multi", "cls_one"])
def test_classify_matches_transformers(ck, name):
    model, folder = ck[name]
    hf = hf_pipeline("text-classification", model, ck["tokenizer"])
    pipe = P.TextClassification(folder, batch_size=2)
    assert pipe.default_function() == {"cls": "softmax", "cls_multi": "sigmoid", "cls_one": "sigmoid"}[name]
    ours = pipe(CLS_TEXTS, top_k=None)
    theirs = hf(CLS_TEXTS, top_k=None)
    assert_same(ours, theirs, name)
    assert_same(pipe(CLS_TEXTS, top_k=2), hf(CLS_TEXTS, top_k=2), f"{name} top_k=2")
    assert_same(pipe(CLS_TEXTS[0], function_to_apply="none", top_k=None),
                hf(CLS_TEXTS[0], function_to_apply="none", top_k=None), f"{name} none")


def test_classify_pairs_and_truncation(ck):
    model, folder = ck["cls"]
    hf = hf_pipeline("text-classification", model, ck["tokenizer"])
    pipe = P.TextClassification(folder)
    a, b = "A man is playing a guitar.", "Somebody makes music."
    assert_same(pipe(a, b, top_k=None), hf({"text": a, "text_pair": b}, top_k=None), "pair")
    assert_same(pipe([a, b], [b, a], top_k=None)[1], hf({"text": b, "text_pair": a}, top_k=None), "pair batch")
    long = "This film is long. " * 120  # ~600 tokens
    with pytest.raises(P.PipelineError, match="truncate"):
        pipe(long)
    truncated = P.TextClassification(folder, truncate=True)(long, top_k=None)
    assert_same(truncated, hf(long, top_k=None, truncation=True, max_length=512), "truncated")


# ---------------------------------------------------------------------------------------------
# tag
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", P.AGGREGATIONS)
def test_tag_matches_transformers(ck, strategy):
    model, folder = ck["ner"]
    hf = hf_pipeline("token-classification", model, ck["tokenizer"], aggregation_strategy=strategy)
    ours = P.TokenClassification(folder, batch_size=2)(NER_TEXTS, aggregation_strategy=strategy)
    theirs = hf(NER_TEXTS)
    for text, got, want in zip(NER_TEXTS, ours, theirs):
        assert_same(got, want, f"{strategy}: {text}")
        for e in got:  # offsets point into the text
            assert 0 <= e["start"] <= e["end"] <= len(text)
    labels = {e.get("entity_group", e.get("entity")) for r in ours for e in r}
    assert len(labels) >= 2, f"the random model should predict several labels, got {labels}"
    if strategy != "none":
        assert any(" " in e["word"].strip() or len(e["word"]) > 6 for r in ours for e in r)  # groups span tokens


# ---------------------------------------------------------------------------------------------
# qa
# ---------------------------------------------------------------------------------------------


def hf_question_answering(model, tok, question, context, top_k=1, doc_stride=None, max_answer_len=15,
                          max_seq_len=None, handle_impossible_answer=False, align_to_words=True):
    """transformers 4.53 QuestionAnsweringPipeline (fast tokenizer, question first, batch size 1)."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    if max_seq_len is None:
        max_seq_len = min(tok.model_max_length, 384)
    if doc_stride is None:
        doc_stride = min(max_seq_len // 2, 128)
    enc = tok(text=question, text_pair=context, padding="do_not_pad", truncation="only_second",
              max_length=max_seq_len, stride=doc_stride, return_token_type_ids=True, return_overflowing_tokens=True,
              return_offsets_mapping=True, return_special_tokens_mask=True)
    min_null_score, answers = 1000000, []
    for span in range(len(enc["input_ids"])):
        ids = enc["input_ids"][span]
        p_mask = np.array([[s != 1 for s in enc.sequence_ids(span)]], dtype=np.int64)
        p_mask[0, np.array(ids) == tok.cls_token_id] = 0
        attention = np.array([enc["attention_mask"][span]])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor(attention))
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), p_mask, attention, min_null_score, top_k,
            handle_impossible_answer, max_answer_len)
        e_ = enc.encodings[span]
        for s, e, score in zip(starts, ends, scores):
            try:
                assert align_to_words
                start = e_.word_to_chars(e_.token_to_word(s), sequence_index=1)[0]
                end = e_.word_to_chars(e_.token_to_word(e), sequence_index=1)[1]
            except Exception:
                start, end = e_.offsets[s][0], e_.offsets[e][1]
            text = context[start:end]
            same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
            if same:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start, "end": end, "answer": text})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


QA = [
    ("Where did Ada Lovelace meet Charles Babbage?",
     "Ada Lovelace met Charles Babbage in London in 1833. They corresponded for years about the Analytical Engine."),
    ("What is the capital of the country?",
     " ".join(f"Sentence number {i} talks about Paris, Lyon, Marseille and the river Seine." for i in range(12))),
]


@pytest.mark.parametrize("options", [
    {},
    {"top_k": 3, "max_seq_len": 48, "doc_stride": 16},  # the long context is cut into many windows
    {"top_k": 2, "max_answer_len": 3, "handle_impossible_answer": True, "max_seq_len": 64},
    {"top_k": 2, "align_to_words": False, "max_seq_len": 40, "doc_stride": 8},
])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_qa_matches_transformers_4x(ck, options, backend):
    model, folder = ck["qa"]
    tok = ck["tokenizer"]
    pipe = P.QuestionAnswering(folder, batch_size=3, backend=backend)  # padded windows: numba leaves padding out
    ours = pipe([q for q, _ in QA], [c for _, c in QA], **options)
    for (q, c), got in zip(QA, ours):
        want = hf_question_answering(model, tok, q, c, **options)
        assert_same(got, want, f"{options}: {q}")
        for a in got if isinstance(got, list) else [got]:
            assert c[a["start"]:a["end"]] == a["answer"]
    windows = tok(QA[1][0], QA[1][1], truncation="only_second", max_length=48, stride=16,
                  return_overflowing_tokens=True)["input_ids"]
    assert len(windows) > 3  # the stride case really has several windows


def test_qa_errors(ck):
    _, folder = ck["qa"]
    pipe = P.QuestionAnswering(folder)
    with pytest.raises(P.PipelineError, match="doc_stride"):
        pipe("q?", "some context", max_seq_len=32, doc_stride=40)
    with pytest.raises(P.PipelineError, match="limit of 512"):
        pipe("q?", "some context", max_seq_len=600)
    with pytest.raises(P.PipelineError, match="2 questions but 3 contexts"):
        pipe(["a?", "b?"], ["x", "y", "z"])


# ---------------------------------------------------------------------------------------------
# choose, embed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_choose_matches_transformers_softmax(ck, backend):
    """The choices as rows of one batch, the pooler and head on their <s> states (padding left out
    on the numba backend), against transformers' [1, C, T] forward."""
    model, folder = ck["mc"]
    tok = ck["tokenizer"]
    prompts = ["The chef opened the oven", "She picked up the phone"]
    endings = [["and took out the bread.", "and flew to the moon on a bicycle.", "and sang."],
               ["and called her mother.", "and ate it."]]
    ours = P.MultipleChoice(folder, backend=backend)(prompts, endings)
    for p, ends, got in zip(prompts, endings, ours):
        enc = tok([p] * len(ends), ends, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"][None], attention_mask=enc["attention_mask"][None]).logits
        want = torch.softmax(logits, -1)[0].numpy()
        assert [d["ending"] for d in got] == ends and [d["index"] for d in got] == list(range(len(ends)))
        assert_close(np.array([d["score"] for d in got]), want, "float32", p)
    with pytest.raises(P.PipelineError, match="at least two"):
        P.choose(folder, "prompt", ["only one"])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embed_matches_transformers_features(ck, pooling):
    model, folder = ck["mlm"]  # the encoder of the masked-LM checkpoint
    hf = hf_pipeline("feature-extraction", model.roberta_prelayernorm, ck["tokenizer"])
    ours = P.Embedding(folder, batch_size=2)(CLS_TEXTS, pooling=pooling)
    assert ours.shape == (3, 32) and ours.dtype == np.float32
    for text, got in zip(CLS_TEXTS, ours):
        h = np.array(hf(text))[0]  # [T, H] last_hidden_state
        want = h[0] if pooling == "cls" else h.mean(axis=0)
        assert_close(got, want, "float32", f"{pooling}: {text}")
    unit = P.embed(folder, CLS_TEXTS, pooling=pooling, normalize=True)
    assert_close(np.linalg.norm(unit, axis=1), np.ones(3), "float32", "norms")
    assert_close(unit, ours / np.linalg.norm(ours, axis=1, keepdims=True), "float32", "normalized")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_model_object_and_float64(ck):
    import refimpl

    model, folder = ck["cls"]
    hf = hf_pipeline("text-classification", model, ck["tokenizer"])
    loaded = refimpl.from_pretrained(folder, dtype="float64")
    in_memory = refimpl.Model(loaded.config, loaded.params, loaded.task, loaded.backend)  # built, not loaded: no folder
    with pytest.raises(P.PipelineError, match="tokenizer="):
        P.TextClassification(in_memory)
    ours = P.TextClassification(in_memory, Tokenizer.from_pretrained(folder))(CLS_TEXTS[0], top_k=None)
    assert P.TextClassification(loaded)(CLS_TEXTS[0], top_k=None) == ours  # a loaded Model knows its tokenizer
    err = assert_same(ours, hf(CLS_TEXTS[0], top_k=None), "float64 model")
    assert err <= FLOAT32_REFERENCE["float64"]  # float64 refimpl vs float32 transformers: float32 rounding only
    with pytest.raises(P.PipelineError, match="sequence-classification model"):
        P.TokenClassification(loaded, folder)
    with pytest.raises(P.PipelineError, match="is a masked-lm checkpoint"):
        P.TextClassification(ck["mlm"][1])
    assert P.Embedding(loaded, folder)("hello").shape == (32,)  # any task's encoder embeds


def test_pipeline_factory_and_shipped_model():
    pipe = P.pipeline("fill-mask", "tiny")
    assert isinstance(pipe, P.FillMask)
    out = pipe("Hello <mask>!", top_k=2)
    assert [sorted(d) for d in out] == [["score", "sequence", "token", "token_str"]] * 2
    with pytest.raises(P.PipelineError, match="unknown task"):
        P.pipeline("summarize", "tiny")


# ---------------------------------------------------------------------------------------------
# Streaming, the model's own tokenizer, determinism
# ---------------------------------------------------------------------------------------------


def test_batches_grouped_by_length_give_the_same_results_in_input_order(ck, monkeypatch):
    """group_by_length (the default) batches each window of 8 batches in order of length: the
    results are those of batches in input order up to float rounding, in input order."""
    _, mlm = ck["mlm"]
    texts = [("word " * (1 + (7 * i) % 13)) + "<mask>." for i in range(21)]  # lengths out of order
    seen = []
    encode = P.Pipeline._encode

    def spy(self, batch, *args, **kw):
        seen.append(list(batch))
        return encode(self, batch, *args, **kw)

    monkeypatch.setattr(P.Pipeline, "_encode", spy)
    grouped = P.FillMask(mlm, batch_size=2)(texts, top_k=3)
    batches, seen[:] = list(seen), []
    in_order = P.FillMask(mlm, batch_size=2, group_by_length=False)(texts, top_k=3)
    assert seen == [texts[i:i + 2] for i in range(0, 21, 2)]
    for text, a, b in zip(texts, grouped, in_order):
        assert_same(a, b, text)
    # The first window (16 texts) in order of length, ties in input order; then the last 5.
    first = sorted(texts[:16], key=len)
    assert batches[:8] == [first[i:i + 2] for i in range(0, 16, 2)]
    assert batches[8:] == [sorted(texts[16:], key=len)[i:i + 2] for i in range(0, 5, 2)]
    assert len({len(t) for t in batches[0]}) == 1  # short with short


def test_grouped_batches_report_the_first_failing_input_after_the_results_before_it(ck):
    """Inputs 3 and 6 (1-based) have no mask; sorted by length, input 6 comes first: yet input 3 is
    reported, after the results of inputs 1 and 2, as batches in input order would."""
    _, mlm = ck["mlm"]
    texts = ["a much longer text with a <mask> in it", "and another long one with a <mask>",
             "no mask at all in this rather long text", "short <mask>", "tiny <mask>", "none"]
    pipe = P.FillMask(mlm, batch_size=2)
    got = []
    with pytest.raises(P.PipelineError, match="input 3 has no <mask>") as e:
        for r in pipe.stream(texts, top_k=2):
            got.append(r)
    assert e.value.index == 2 and len(got) == 2
    for text, r in zip(texts, got):
        assert_same(r, pipe(text, top_k=2), text)
    with pytest.raises(P.PipelineError, match="input 6 has no <mask>"):
        pipe(texts[3:5] + texts[3:5] + texts[3:4] + ["none"])


def test_stream_gives_the_results_of_a_list(ck):
    """stream(iterable) and pipe(generator) run the same batches as a list: identical results,
    one per input, produced batch by batch as the input is read."""
    _, mlm = ck["mlm"]
    pipe = P.FillMask(mlm, batch_size=2)
    want = pipe(FILL_TEXTS * 2, top_k=3)
    read = []

    def texts():
        for i, t in enumerate(FILL_TEXTS * 2):
            read.append(i)
            yield t

    stream = pipe.stream(texts(), top_k=3)
    assert read == []  # nothing is read before the first result is asked for
    first = next(stream)
    assert read == list(range(len(FILL_TEXTS) * 2)) and first == want[0]  # one window (up to 8 batches) read
    assert [first, *stream] == want
    read.clear()
    in_order = P.FillMask(mlm, batch_size=2, group_by_length=False)
    stream = in_order.stream(texts(), top_k=3)
    first = next(stream)
    assert read == [0, 1] and first == in_order(FILL_TEXTS * 2, top_k=3)[0]  # one batch read
    assert list(pipe(iter(FILL_TEXTS * 2), top_k=3)) == want
    with pytest.raises(P.PipelineError, match="top_k"):  # options are checked at once
        pipe.stream(iter([]), top_k=0)
    with pytest.raises(P.PipelineError, match="input 3 has no <mask>") as e:
        list(pipe.stream(iter(["a <mask>", "b <mask>", "no mask"])))
    assert (e.value.index, e.value.reason.split(":")[0]) == (2, "has no <mask>")
    _, cls = ck["cls"]
    clf = P.TextClassification(cls, batch_size=2)
    pairs = [("A man plays.", "Someone makes music."), ("It rains.", "The sun shines.")] * 2
    assert list(clf.stream(pairs, top_k=None)) == clf([a for a, _ in pairs], [b for _, b in pairs], top_k=None)
    with pytest.raises(P.PipelineError, match="input 2 has no pair and the first input has one"):
        list(clf.stream([pairs[0], "alone"]))
    emb = P.Embedding(mlm, batch_size=2)
    np.testing.assert_array_equal(np.stack(list(emb.stream(iter(CLS_TEXTS)))), emb(CLS_TEXTS))
    _, qa = ck["qa"]
    qa_pipe = P.QuestionAnswering(qa, batch_size=2)
    assert list(qa_pipe.stream(QA)) == qa_pipe([q for q, _ in QA], [c for _, c in QA])
    _, mc = ck["mc"]
    mc_pipe = P.MultipleChoice(mc)
    items = [("The chef opened the oven", ["and took out the bread.", "and sang."])] * 3
    assert list(mc_pipe.stream(items)) == mc_pipe([p for p, _ in items], [e for _, e in items])


def test_loaded_model_knows_its_tokenizer(ck):
    """A Model loaded from a folder, 'tiny' or a Hub id remembers it (name_or_path, as transformers'),
    so the README's `fill_mask(model, texts)` works; tokenizer= takes 'tiny' too."""
    import refimpl

    model = refimpl.from_pretrained("tiny")
    assert model.name_or_path == refimpl.hub.SHIPPED["tiny"]
    assert model.to("numpy").name_or_path == model.astype("float64").name_or_path == model.name_or_path
    want = P.fill_mask("tiny", "Hello <mask>!", top_k=2)
    assert P.fill_mask(model, "Hello <mask>!", top_k=2) == want
    assert P.fill_mask(model, "Hello <mask>!", top_k=2, tokenizer="tiny") == want
    assert P.FillMask(model, backend="numpy").model.backend == "numpy"
    _, folder = ck["mlm"]
    assert P.embed(refimpl.from_pretrained(folder), "hello").shape == (32,)  # a head's model embeds too


def test_same_inputs_same_bits_other_batches_within_reordered(ck):
    """What the README promises: the same call twice gives the same bits; a text alone or batched
    with others differs only by BLAS rounding, within tolerances.REORDERED."""
    from tolerances import REORDERED

    _, folder = ck["cls"]
    pipe = P.TextClassification(folder, batch_size=4)
    texts = CLS_TEXTS + ["A much longer text, so that the others are padded in its batch, " * 3]
    first = pipe(texts, top_k=None)
    assert pipe(texts, top_k=None) == first
    alone = [pipe(t, top_k=None) for t in texts]
    assert strip_scores(alone) == strip_scores(first)
    assert_close(np.array(flat_scores(alone)), np.array(flat_scores(first)), "float32", "batched vs alone", REORDERED)


def test_progress_bar_over_a_stream(capsys):
    """progress=True shows a tqdm bar on stderr for a stream of unknown length too (counting inputs)."""
    pipe = P.FillMask("tiny", batch_size=2, progress=True)
    assert len(list(pipe.stream(iter(["a <mask>"] * 5), top_k=1))) == 5
    err = capsys.readouterr().err
    assert "fill-mask: 0input" in err and "input/s" in err  # tqdm without a total: a count and a rate


# ---------------------------------------------------------------------------------------------
# The fast fill-mask path against the full-head reference
# ---------------------------------------------------------------------------------------------


def full_head_fill_mask(pipe, texts, top_k, target_ids=None):
    """What FillMask returned before it ran the LM head on mask rows only: the model's forward with
    every position through the head (``model(...).logits``, [B, T, V]) on the same batches, a stable
    argsort of each mask's probabilities, one decode per proposal."""
    tok = pipe.tokenizer
    out = []
    for b0 in range(0, len(texts), pipe.batch_size):
        enc = tok(texts[b0:b0 + pipe.batch_size], padding=True)
        logits = pipe.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # [B, T, V]
        for ids, attn, lg in zip(enc["input_ids"], enc["attention_mask"], logits):
            row, lg = ids[attn == 1], lg[attn == 1]
            masked = np.nonzero(row == tok.mask_token_id)[0]
            probs = P._softmax(lg[masked])  # noqa: SLF001  (the pipeline's own softmax)
            if target_ids is not None:
                probs = probs[:, target_ids]
            single = len(masked) == 1
            per_mask = []
            for m, p in zip(masked, probs):
                props = []
                for j in np.argsort(-p, kind="stable")[:min(top_k, p.shape[-1])]:
                    token_id = int(target_ids[j]) if target_ids is not None else int(j)
                    tokens = row.copy()
                    tokens[m] = token_id
                    tokens = tokens[tokens != tok.pad_token_id]
                    props.append({"score": float(p[j]), "token": token_id, "token_str": tok.decode([token_id]),
                                  "sequence": tok.decode(tokens, skip_special_tokens=single)})
                per_mask.append(props)
            out.append(per_mask[0] if single else per_mask)
    return out


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_mask_logits_are_the_full_heads_rows(ck, backend):
    """pipelines.mask_logits runs the LM head on the mask rows only: the rows of the reference
    forward's logits (refimpl.tasks.masked_lm, every position), to rounding: FAST for the numba
    backend (refimpl.fast.tasks.masked_lm_at), REORDERED for the reference on [M, H] rows."""
    import refimpl
    from refimpl import tasks
    from refimpl.inputs import validate
    from tolerances import FAST, REORDERED

    _, folder = ck["mlm"]
    model = refimpl.from_pretrained(folder, task="masked-lm", backend=backend)
    tok = Tokenizer.from_pretrained(folder)
    enc = tok(FILL_TEXTS + ["<mask> alone"], padding=True)
    where = (enc["input_ids"] == tok.mask_token_id) & (enc["attention_mask"] == 1)
    got = P.mask_logits(model, enc, where)
    x = validate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    full = tasks.masked_lm(model.params, model.config, x).logits  # [B, T, V]
    assert got.shape == (int(where.sum()), model.config.vocab_size) and got.dtype == full.dtype
    assert_close(got, full[where], "float32", "mask rows", FAST if backend == "numba" else REORDERED)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("options", [dict(top_k=5), dict(top_k=1), dict(top_k=20),
                                     dict(top_k=3, targets=[" Paris", " London", "Berlin", "the"])])
def test_fill_mask_matches_the_full_head_path(ck, options, backend):
    """FillMask (mask rows through the head, a partial top-k, batched decoding) returns what the
    full-head path returned on the same backend and batches: the same tokens in the same order,
    token strings and sequences; scores within the float32 tolerance of the pipeline tests (the
    head's GEMM runs on [M, H] rows instead of [B*T, H]: rounding only)."""
    _, folder = ck["mlm"]
    texts = FILL_TEXTS + ["<mask>", "Paris is the <mask> of <mask>, and <mask> too.", "Short <mask>."]
    pipe = P.FillMask(folder, batch_size=3, backend=backend)  # padded batches mixing one and several masks
    got = pipe(texts, **options)
    targets = pipe._target_ids(options["targets"]) if "targets" in options else None  # noqa: SLF001
    expected = full_head_fill_mask(pipe, texts, options["top_k"], targets)
    assert strip_scores(got) == strip_scores(expected)
    assert_close(np.array(flat_scores(got)), np.array(flat_scores(expected)), "float32", "scores")
    assert all(type(s) is float for s in flat_scores(got))


def test_top_k_indices_is_the_stable_argsort():
    """Exactly ``argsort(-x, stable)[:, :k]``: ties (many, and straddling the k-th place) ordered by
    index, every k including k >= the chunk count (full sort) and k = V, rows with NaN."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        rows = [rng.standard_normal((5, 1000)),  # distinct values
                rng.integers(0, 4, size=(5, 1000)),  # a few values, heavy ties
                np.zeros((2, 1000)),  # all equal
                rng.standard_normal((3, 7))]  # fewer values than chunks
        nan = rng.standard_normal((3, 1000))
        nan[1, [5, 500]] = np.nan
        for x in rows + [nan]:
            x = x.astype(dtype)
            for k in (1, 2, 5, 50, 256, 257, x.shape[1]):
                k = min(k, x.shape[1])
                np.testing.assert_array_equal(P.top_k_indices(x, k), np.argsort(-x, axis=-1, kind="stable")[:, :k])
        for x in (np.asfortranarray(rows[0].astype(dtype)), rows[1].astype(dtype)[:, ::3]):  # other layouts
            assert not x.flags.c_contiguous
            np.testing.assert_array_equal(P.top_k_indices(x, 5), np.argsort(-x, axis=-1, kind="stable")[:, :5])
    assert P.top_k_indices(np.zeros((0, 10), np.float32), 3).shape == (0, 3)


def test_batch_decode_is_decode_per_row(ck, monkeypatch):
    _, folder = ck["mlm"]
    tok = Tokenizer.from_pretrained(folder)
    rows = [np.array([0, 133, 812, 50264, 2]), [0, 31414, 2], np.array([], dtype=np.int64)]
    for limit in (2048, -1):  # row by row on this thread, and the backend's decode_batch
        monkeypatch.setattr(refimpl.tokenizer, "SERIAL_DECODE_UP_TO_TOKENS", limit)
        for skip in (False, True):
            assert tok.batch_decode(rows, skip_special_tokens=skip) == [
                tok.decode(r, skip_special_tokens=skip) for r in rows]
    with pytest.raises(ValueError, match=r"token id 60000 is out of range"):
        tok.batch_decode([np.array([5, 60000, -1])])
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        tok.decode(np.array([-1]))
    # integer arrays checked at once: the first bad id in row-major order, as row by row
    arrays = [np.array([0, 5, 2]), np.array([7, -3, 60000]), np.array([60001])]
    with pytest.raises(ValueError, match=r"token id -3 is out of range"):
        tok.batch_decode(arrays)
    with pytest.raises(ValueError, match=r"token id -3 is out of range"):
        tok.batch_decode(np.array([[0, 5, 2], [7, -3, 60000]]))
    mixed = [np.array([0, 133], np.int32), np.array([2], np.uint16), [31414]]  # other dtypes, lists
    assert tok.batch_decode(mixed) == [tok.decode(r) for r in mixed]
    with pytest.raises(TypeError, match=r"token ids must be integers"):
        tok.batch_decode([np.array([0, 5]), np.array([1.0])])


def test_small_batches_run_on_one_thread(monkeypatch):
    """A batch too small for two threads (fast.tasks.worth_splitting: too little work, or at most
    TWO_CORE_ROWS tokens, whose GEMMs use both cores anyway) runs whole; a large one splits, and a
    vocabulary-sized head counts: the tiny masked LM's full head makes the same batch large."""
    import refimpl
    import refimpl.fast.tasks as fast_tasks

    model = refimpl.from_pretrained("tiny", task="base", backend="numba")
    ids = np.full((4, 13), 100)  # 52 tokens
    assert fast_tasks.SPLIT_MIN_ROWS <= 52
    calls = []
    split_batch = fast_tasks.split_batch
    monkeypatch.setattr(fast_tasks, "split_batch", lambda fn, n, piece=None: calls.append(n) or split_batch(fn, n, piece))
    model(input_ids=ids)
    assert calls == []
    masked_lm = refimpl.from_pretrained("tiny", backend="numba")
    masked_lm(input_ids=ids)  # masked LM: [52, 16] x [16, 50265] in the head
    assert calls == [4]
    masked_lm(input_ids=ids[:, :12])  # 48 tokens: whole, however big the head
    assert calls == [4]
    monkeypatch.setattr(fast_tasks, "SPLIT_MIN_WORK", 4 * 13 * model.config.num_hidden_layers * 3 * 16 * 64)
    model(input_ids=ids)  # the encoder's work reaches the bound exactly
    assert calls == [4, 4]


def test_a_small_model_on_the_reference_runs_its_batches_on_one_blas_thread(monkeypatch):
    """A tiny model's GEMMs take microseconds; waking OpenBLAS's second thread for each costs more.
    The pipeline runs each batch on one BLAS thread and restores the count after it."""
    from refimpl import blas

    if blas.openblas_threads() is None:
        pytest.skip("NumPy is not linked to an OpenBLAS refimpl can reach")
    get, _ = blas.openblas_threads()
    before = get()
    seen = []
    real = P.first_token_states
    monkeypatch.setattr(P, "first_token_states", lambda m, enc: seen.append(get()) or real(m, enc))
    pipe = P.TextClassification("tiny-classify", batch_size=2)
    assert pipe.model.backend == "numpy"
    want = P.TextClassification("tiny-classify", batch_size=2)(["a b", "c d", "e"])
    assert pipe(["a b", "c d", "e"]) == want
    assert seen[-2:] == [1, 1] and get() == before
