"""The task subcommands: fill-mask, classify, tag, qa, choose, embed, generate (pipelines from the shell).

Each reads its inputs lazily (:func:`common.input_lines`), runs the pipeline's ``stream`` and
prints every result as its batch finishes (:func:`common.run`): one output per input, blank lines
included.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

import numpy as np

from . import common


def cmd_fill_mask(args) -> int:
    from ..pipelines import FillMask

    lines = common.first_input(common.input_lines(args))
    pipe = common.pipeline(FillMask, args)

    def human(line, text, r) -> str:
        out = [text]
        for m, preds in enumerate(r if r and isinstance(r[0], list) else [r]):
            if isinstance(r[0], list):
                out.append(f"  mask {m + 1}:")
            out += [f"  {p['score']:.4g}  {p['token_str']!r:20}  {p['sequence']}" for p in preds]
        return "\n".join(out)

    return common.run(args, lines, lambda items: pipe.stream(items, top_k=args.top_k, targets=args.targets),
                      lambda line: line.text, human)


def cmd_classify(args) -> int:
    from ..pipelines import TextClassification

    lines = common.first_input(common.input_lines(args))
    pipe = common.pipeline(TextClassification, args)

    def parse(line):
        if "\t" in line.text:
            return tuple(line.text.split("\t", 1))
        return line.text if args.pair is None else (line.text, args.pair)

    def human(line, item, r) -> str:
        head = item if isinstance(item, str) else f"{item[0]} | {item[1]}"
        return "\n".join([head] + [f"  {d['score']:.4f}  {d['label']}" for d in r])

    return common.run(args, lines, lambda items: pipe.stream(items, top_k=args.top_k or None,
                                                             function_to_apply=args.function), parse, human)


def cmd_tag(args) -> int:
    from ..pipelines import TokenClassification

    lines = common.first_input(common.input_lines(args))
    pipe = common.pipeline(TokenClassification, args)
    ignore = [x for x in args.ignore_labels.split(",") if x]

    def human(line, text, r) -> str:
        out = [text]
        for e in r:
            label = e.get("entity_group", e.get("entity"))
            out.append(f"  {e['start']:>4}-{e['end']:<4} {label:12} {e['score']:.4f}  {text[e['start']:e['end']]!r}")
        return "\n".join(out)

    return common.run(args, lines, lambda items: pipe.stream(items, aggregation_strategy=args.aggregation,
                                                             ignore_labels=ignore), lambda line: line.text, human)


def cmd_qa(args) -> int:
    from ..pipelines import QuestionAnswering

    context = args.context
    if args.context_file is not None:
        if context is not None:
            raise common.CommandError("give --context or --context-file, not both")
        context = common.read_text(args.context_file, "--context-file")
    if args.question is not None:
        if context is None:
            raise common.CommandError("--question needs --context or --context-file")
        if args.file is not None:
            raise common.CommandError("give --question or --file, not both")
        lines = iter([common.Line(0, args.question if args.question.strip() else None, "--question")])
    else:
        lines = common.input_lines(args)
    lines = common.first_input(lines, "questions (--question, or 'question<TAB>context' lines)")
    pipe = common.pipeline(QuestionAnswering, args)

    def parse(line):
        if "\t" in line.text:
            return tuple(line.text.split("\t", 1))
        if context is not None:
            return line.text, context
        raise common.CommandError(f"{line.label()} has no tab: give 'question<TAB>context' lines, or "
                                  f"questions with --context/--context-file")

    def human(line, item, r) -> str:
        return "\n".join([item[0]] + [f"  {a['score']:.4f}  {a['start']}-{a['end']}  {a['answer']!r}"
                                      for a in (r if isinstance(r, list) else [r])])

    return common.run(args, lines, lambda items: pipe.stream(
        items, top_k=args.top_k, doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
        max_seq_len=args.max_seq_len, handle_impossible_answer=args.handle_impossible_answer), parse, human)


def cmd_choose(args) -> int:
    from ..pipelines import MultipleChoice

    what = "a prompt and its endings (arguments, or 'prompt<TAB>ending<TAB>ending...' lines)"
    if args.texts:
        if args.file is not None:
            raise common.CommandError("give the prompt and endings as arguments or with --file, not both")
        lines = iter([common.Line(0, "\t".join(args.texts), "the arguments")])
    else:
        lines = common.input_lines(args)
    lines = common.first_input(lines, what)
    pipe = common.pipeline(MultipleChoice, args)

    def parse(line):
        group = line.text.split("\t")
        if len(group) < 3:
            raise common.CommandError(f"{line.label()} has {len(group) - 1} ending(s): give a prompt and at least "
                                      f"two endings")
        return group[0], group[1:]

    def human(line, item, r) -> str:
        best = max(range(len(r)), key=lambda c: r[c]["score"])
        return "\n".join([item[0]] + [f"  {'*' if c == best else ' '} {d['score']:.4f}  {d['ending']}"
                                      for c, d in enumerate(r)])

    return common.run(args, lines, pipe.stream, parse, human)


def cmd_embed(args) -> int:
    from ..pipelines import Embedding

    out = args.out
    if out is not None and os.path.isdir(out):
        raise common.CommandError(f"--out {out!r} is a folder: give the file to write, such as "
                                  f"{os.path.join(out, 'embeddings.npy')!r}")
    if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise common.CommandError(f"--out {out!r}: the folder {os.path.dirname(out) or '.'!r} does not exist")
    lines = common.first_input(common.input_lines(args))
    pipe = common.pipeline(Embedding, args)
    options = dict(pooling=args.pooling, normalize=args.normalize)
    if out is None:  # one JSON list of floats per input (null for a blank line), or --json records
        return common.run(args, lines, lambda items: ([float(x) for x in v] for v in pipe.stream(items, **options)),
                          lambda line: line.text, lambda line, text, v: json.dumps(v), blank="null")

    def texts():
        for line in lines:
            if line.text is None:
                raise common.CommandError(f"{line.label()} is empty: --out writes one row per input line, so "
                                          f"every line needs a text (remove the blank lines, or print JSON lines "
                                          f"without --out)")
            yield line.text

    vectors = np.stack(list(pipe.stream(texts(), **options)))  # [N, H]
    save_npy(out, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {vectors.dtype} embeddings to {out}", file=sys.stderr)
    return 0


def save_npy(path: str, array: np.ndarray) -> None:
    """``array`` as a .npy file at exactly ``path`` (no suffix added), written atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):  # name the file asked for, never the temporary one beside it
            raise type(e)(f"cannot write {path!r}: {e.strerror or e}") from None
        raise


def cmd_generate(args) -> int:
    from ..pipelines import TextGeneration

    lines = common.first_input(common.input_lines(args), "prompts")
    pipe = common.pipeline(TextGeneration, args)
    return common.run(args, lines, lambda items: pipe.stream(
        items, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed), lambda line: line.text,
        lambda line, text, r: r["generated_text"])
