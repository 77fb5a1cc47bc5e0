"""The task subcommands: fill-mask, classify, tag, qa, choose, embed, generate (pipelines from the shell)."""

from __future__ import annotations

import json
import sys

import numpy as np

from . import common


def cmd_fill_mask(args) -> int:
    from ..pipelines import FillMask

    texts = common.need_input(common.read_lines(args))
    pipe = common.pipeline(FillMask, args)
    results = pipe(texts, top_k=args.top_k, targets=args.targets)

    def human(i, r):
        print(texts[i])
        for m, preds in enumerate(r if r and isinstance(r[0], list) else [r]):
            if isinstance(r[0], list):
                print(f"  mask {m + 1}:")
            for p in preds:
                print(f"  {p['score']:.4g}  {p['token_str']!r:20}  {p['sequence']}")

    common.emit(args, results, human)
    return 0


def cmd_classify(args) -> int:
    from ..pipelines import TextClassification

    lines = common.need_input(common.read_lines(args))
    texts, pairs = [], []
    for line in lines:
        if "\t" in line:
            a, b = line.split("\t", 1)
            texts.append(a)
            pairs.append(b)
        else:
            texts.append(line)
            pairs.append(args.pair)
    if any(p is None for p in pairs) and any(p is not None for p in pairs):
        raise common.CommandError("some inputs have a pair (a tab or --pair) and some do not: give every input a pair or none")
    pipe = common.pipeline(TextClassification, args)
    results = pipe(texts, pairs if pairs[0] is not None else None, top_k=args.top_k or None,
                   function_to_apply=args.function)

    def human(i, r):
        print(texts[i] if pairs[i] is None else f"{texts[i]} | {pairs[i]}")
        for d in r:
            print(f"  {d['score']:.4f}  {d['label']}")

    common.emit(args, results, human)
    return 0


def cmd_tag(args) -> int:
    from ..pipelines import TokenClassification

    texts = common.need_input(common.read_lines(args))
    pipe = common.pipeline(TokenClassification, args)
    ignore = [x for x in args.ignore_labels.split(",") if x]
    results = pipe(texts, aggregation_strategy=args.aggregation, ignore_labels=ignore)

    def human(i, r):
        print(texts[i])
        for e in r:
            label = e.get("entity_group", e.get("entity"))
            print(f"  {e['start']:>4}-{e['end']:<4} {label:12} {e['score']:.4f}  {texts[i][e['start']:e['end']]!r}")

    common.emit(args, results, human)
    return 0


def cmd_qa(args) -> int:
    from ..pipelines import QuestionAnswering

    context = args.context
    if args.context_file is not None:
        if context is not None:
            raise common.CommandError("give --context or --context-file, not both")
        with open(args.context_file, encoding="utf-8") as f:
            context = f.read()
    questions, contexts = [], []
    if args.question is not None:
        if context is None:
            raise common.CommandError("--question needs --context or --context-file")
        questions, contexts = [args.question], [context]
    else:
        for n, line in enumerate(common.read_lines(args), 1):
            if "\t" in line:
                q, c = line.split("\t", 1)
            elif context is not None:
                q, c = line, context
            else:
                raise common.CommandError(f"input line {n} has no tab: give 'question<TAB>context' lines, or "
                                   f"questions with --context/--context-file")
            questions.append(q)
            contexts.append(c)
    common.need_input(questions, "questions (--question, or 'question<TAB>context' lines)")
    pipe = common.pipeline(QuestionAnswering, args)
    results = pipe(questions, contexts, top_k=args.top_k, doc_stride=args.doc_stride,
                   max_answer_len=args.max_answer_len, max_seq_len=args.max_seq_len,
                   handle_impossible_answer=args.handle_impossible_answer)

    def human(i, r):
        print(questions[i])
        for a in r if isinstance(r, list) else [r]:
            print(f"  {a['score']:.4f}  {a['start']}-{a['end']}  {a['answer']!r}")

    common.emit(args, results, human)
    return 0


def cmd_choose(args) -> int:
    from ..pipelines import MultipleChoice

    if args.texts:
        if args.file is not None:
            raise common.CommandError("give the prompt and endings as arguments or with --file, not both")
        groups = [args.texts]
    else:
        groups = [line.split("\t") for line in common.read_lines(args)]
    common.need_input(groups, "a prompt and its endings (arguments, or 'prompt<TAB>ending<TAB>ending...' lines)")
    for n, g in enumerate(groups, 1):
        if len(g) < 3:
            raise common.CommandError(f"input {n} has {len(g) - 1} ending(s): give a prompt and at least two endings")
    pipe = common.pipeline(MultipleChoice, args)
    results = pipe([g[0] for g in groups], [g[1:] for g in groups])

    def human(i, r):
        print(groups[i][0])
        best = max(range(len(r)), key=lambda c: r[c]["score"])
        for c, d in enumerate(r):
            print(f"  {'*' if c == best else ' '} {d['score']:.4f}  {d['ending']}")

    common.emit(args, results, human)
    return 0


def cmd_embed(args) -> int:
    from ..pipelines import Embedding

    texts = common.need_input(common.read_lines(args))
    pipe = common.pipeline(Embedding, args)
    vectors = pipe(texts, pooling=args.pooling, normalize=args.normalize)  # [N, H]
    if args.out:
        np.save(args.out, vectors)
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {vectors.dtype} embeddings to {args.out}",
              file=sys.stderr)
        return 0
    for v in vectors:
        print(json.dumps([float(x) for x in v]))
    return 0


def cmd_generate(args) -> int:
    from ..pipelines import TextGeneration

    texts = common.need_input(common.read_lines(args), "prompts")
    pipe = common.pipeline(TextGeneration, args)
    results = pipe(texts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    common.emit(args, results, lambda i, r: print(r["generated_text"]))
    return 0
