"""The ``refimpl`` command line: one subcommand per task; errors print one line and exit with 2.

    refimpl fill-mask "The capital of France is <mask>."          # downloads the default model
    refimpl fill-mask --model tiny "Hello <mask>!" --json
    refimpl classify --model path/to/classifier "great film" --top-k 0
    refimpl tag --model path/to/ner --aggregation simple --file texts.txt
    refimpl qa --model path/to/qa --question "Where?" --context "It is in Paris."
    refimpl choose --model path/to/mc "The cat" "sat on the mat." "flew to Mars."
    refimpl embed --model tiny --pooling mean --normalize --out vectors.npy < texts.txt
    refimpl info --model tiny
    refimpl forward --model tiny --ids "0 31414 232 2"

Each task command reads its texts from the arguments, from ``--file FILE`` (``-`` = stdin) or, with
neither, from stdin when it is not a terminal: one text per line, blank lines skipped. ``--json``
prints one JSON value per input (JSON lines). ``--model`` is a folder, ``tiny`` (the random
checkpoint shipped with refimpl) or a Hugging Face Hub id (downloaded into the standard cache;
``HF_HUB_OFFLINE=1`` uses the cache only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .hub import SHIPPED

DEFAULT_MODEL = "andreasmadsen/efficient_mlm_m0.40"


class CommandError(ValueError):
    """A bad command line (missing input, conflicting options); printed as one line."""


def resolve_model_path(name: str) -> str:
    """``tiny`` names the small random checkpoint shipped with refimpl; anything else is unchanged."""
    return SHIPPED.get(name, name)


def _hub_args(args) -> dict:
    return dict(revision=getattr(args, "revision", None), cache_dir=getattr(args, "cache_dir", None))


def load_model(name: str, task: str | None, dtype: str, **hub):
    import refimpl

    return refimpl.from_pretrained(name, task=task, dtype=dtype, **hub)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------


def read_lines(args) -> list[str]:
    """Texts from the positional arguments, ``--file`` (``-`` = stdin), or stdin when piped."""
    texts = list(getattr(args, "texts", None) or [])
    source = getattr(args, "file", None)
    if source is None and not texts and not sys.stdin.isatty():
        source = "-"
    if source is not None:
        if source == "-":
            data = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                data = f.read()
        texts += [line.rstrip("\r") for line in data.split("\n") if line.strip()]
    return texts


def need_input(texts: list, what: str = "texts") -> list:
    if not texts:
        raise CommandError(f"no input: give {what} as arguments, with --file FILE, or as lines on stdin")
    return texts


def emit(args, results: list, human) -> None:
    """JSON lines with --json, else ``human(index, result)`` for each result."""
    for i, r in enumerate(results):
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            human(i, r)


def _pipeline(cls, args):
    return cls(args.model, dtype=args.dtype, batch_size=args.batch_size, truncate=args.truncate, **_hub_args(args))


# ---------------------------------------------------------------------------------------------
# Task commands
# ---------------------------------------------------------------------------------------------


def cmd_fill_mask(args) -> int:
    from .pipelines import FillMask

    texts = need_input(read_lines(args))
    pipe = _pipeline(FillMask, args)
    results = pipe(texts, top_k=args.top_k, targets=args.targets)

    def human(i, r):
        print(texts[i])
        for m, preds in enumerate(r if r and isinstance(r[0], list) else [r]):
            if isinstance(r[0], list):
                print(f"  mask {m + 1}:")
            for p in preds:
                print(f"  {p['score']:.4g}  {p['token_str']!r:20}  {p['sequence']}")

    emit(args, results, human)
    return 0


def cmd_classify(args) -> int:
    from .pipelines import TextClassification

    lines = need_input(read_lines(args))
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
        raise CommandError("some inputs have a pair (a tab or --pair) and some do not: give every input a pair or none")
    pipe = _pipeline(TextClassification, args)
    results = pipe(texts, pairs if pairs[0] is not None else None, top_k=args.top_k or None,
                   function_to_apply=args.function)

    def human(i, r):
        print(texts[i] if pairs[i] is None else f"{texts[i]} | {pairs[i]}")
        for d in r:
            print(f"  {d['score']:.4f}  {d['label']}")

    emit(args, results, human)
    return 0


def cmd_tag(args) -> int:
    from .pipelines import TokenClassification

    texts = need_input(read_lines(args))
    pipe = _pipeline(TokenClassification, args)
    ignore = [x for x in args.ignore_labels.split(",") if x]
    results = pipe(texts, aggregation_strategy=args.aggregation, ignore_labels=ignore)

    def human(i, r):
        print(texts[i])
        for e in r:
            label = e.get("entity_group", e.get("entity"))
            print(f"  {e['start']:>4}-{e['end']:<4} {label:12} {e['score']:.4f}  {texts[i][e['start']:e['end']]!r}")

    emit(args, results, human)
    return 0


def cmd_qa(args) -> int:
    from .pipelines import QuestionAnswering

    context = args.context
    if args.context_file is not None:
        if context is not None:
            raise CommandError("give --context or --context-file, not both")
        with open(args.context_file, encoding="utf-8") as f:
            context = f.read()
    questions, contexts = [], []
    if args.question is not None:
        if context is None:
            raise CommandError("--question needs --context or --context-file")
        questions, contexts = [args.question], [context]
    else:
        for n, line in enumerate(read_lines(args), 1):
            if "\t" in line:
                q, c = line.split("\t", 1)
            elif context is not None:
                q, c = line, context
            else:
                raise CommandError(f"input line {n} has no tab: give 'question<TAB>context' lines, or "
                                   f"questions with --context/--context-file")
            questions.append(q)
            contexts.append(c)
    need_input(questions, "questions (--question, or 'question<TAB>context' lines)")
    pipe = _pipeline(QuestionAnswering, args)
    results = pipe(questions, contexts, top_k=args.top_k, doc_stride=args.doc_stride,
                   max_answer_len=args.max_answer_len, max_seq_len=args.max_seq_len,
                   handle_impossible_answer=args.handle_impossible_answer)

    def human(i, r):
        print(questions[i])
        for a in r if isinstance(r, list) else [r]:
            print(f"  {a['score']:.4f}  {a['start']}-{a['end']}  {a['answer']!r}")

    emit(args, results, human)
    return 0


def cmd_choose(args) -> int:
    from .pipelines import MultipleChoice

    if args.texts:
        if args.file is not None:
            raise CommandError("give the prompt and endings as arguments or with --file, not both")
        groups = [args.texts]
    else:
        groups = [line.split("\t") for line in read_lines(args)]
    need_input(groups, "a prompt and its endings (arguments, or 'prompt<TAB>ending<TAB>ending...' lines)")
    for n, g in enumerate(groups, 1):
        if len(g) < 3:
            raise CommandError(f"input {n} has {len(g) - 1} ending(s): give a prompt and at least two endings")
    pipe = _pipeline(MultipleChoice, args)
    results = pipe([g[0] for g in groups], [g[1:] for g in groups])

    def human(i, r):
        print(groups[i][0])
        best = max(range(len(r)), key=lambda c: r[c]["score"])
        for c, d in enumerate(r):
            print(f"  {'*' if c == best else ' '} {d['score']:.4f}  {d['ending']}")

    emit(args, results, human)
    return 0


def cmd_embed(args) -> int:
    from .pipelines import Embedding

    texts = need_input(read_lines(args))
    pipe = _pipeline(Embedding, args)
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
    from .pipelines import TextGeneration

    texts = need_input(read_lines(args), "prompts")
    pipe = _pipeline(TextGeneration, args)
    results = pipe(texts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    emit(args, results, lambda i, r: print(r["generated_text"]))
    return 0


# ---------------------------------------------------------------------------------------------
# info and forward
# ---------------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    from .hub import resolve, weight_files, weights_format
    from .tokenizer import Tokenizer

    folder = resolve(args.model, **_hub_args(args))
    model = load_model(folder, args.task, args.dtype)
    files = weight_files(folder)
    tokenizer = None
    try:
        tok = Tokenizer.from_pretrained(folder)
        tokenizer = {
            "files": [f for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                  "special_tokens_map.json") if os.path.isfile(os.path.join(folder, f))],
            "vocab_size": tok.vocab_size, "size_with_added_tokens": len(tok),
            "model_max_length": tok.model_max_length,
            "special_tokens": {k: getattr(tok, f"{k}_token") for k in ("bos", "eos", "unk", "pad", "mask")},
        }
    except (OSError, ValueError) as e:
        tokenizer = {"error": " ".join(str(e).split())}
    info = {
        "model": args.model,
        "path": folder,
        "task": model.task,
        "dtype": str(np.dtype(model.dtype)),
        "parameters": model.num_parameters(),
        "format": weights_format(folder),
        "weight_files": [os.path.basename(f) for f in files],
        "weight_bytes": sum(os.path.getsize(f) for f in files),
        "max_sequence_length": model.config.max_sequence_length,
        "tokenizer": tokenizer,
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    c = model.config
    print(model)
    print(f"  path {folder}")
    print(f"  weights {info['format']}: {', '.join(info['weight_files'])} ({info['weight_bytes'] / 1e6:.1f} MB)")
    print(f"  max sequence length {c.max_sequence_length}, hidden_act {c.hidden_act}, layer_norm_eps {c.layer_norm_eps}")
    if "error" in tokenizer:
        print(f"  tokenizer: none ({tokenizer['error']})")
    else:
        print(f"  tokenizer: {', '.join(tokenizer['files'])}; vocab {tokenizer['vocab_size']} "
              f"({tokenizer['size_with_added_tokens']} with added tokens), model_max_length "
              f"{tokenizer['model_max_length']}, mask {tokenizer['special_tokens']['mask']!r}")
    if c.num_labels and model.task in ("sequence-classification", "token-classification"):
        print(f"  labels {c.id2label}")
    return 0


def parse_ids(text: str) -> np.ndarray:
    """``"0 5 6 2; 0 7 2 1"`` -> [[0, 5, 6, 2], [0, 7, 2, 1]] (rows separated by ';')."""
    rows = [r.replace(",", " ").split() for r in text.split(";") if r.strip()]
    if not rows:
        raise ValueError("--ids is empty: give token ids such as \"0 31414 232 2\"")
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every row of --ids must have the same length (pad with the pad id, 1)")
    try:
        return np.array([[int(x) for x in r] for r in rows], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--ids must hold integers, got {text!r}") from None


def cmd_forward(args) -> int:
    model = load_model(resolve_model_path(args.model), args.task, args.dtype, **_hub_args(args))
    ids = parse_ids(args.ids)
    mask = (ids != model.config.pad_token_id).astype(np.int64)
    out = model(input_ids=ids, attention_mask=mask)
    result = {k: np.asarray(v).tolist() for k, v in out.to_dict().items()
              if k not in ("hidden_states", "past_key_values")}
    if args.json:
        print(json.dumps(result))
        return 0
    for name, value in out.to_dict().items():
        if name == "past_key_values":
            continue
        arr = np.asarray(value)
        print(f"{name}: shape {list(arr.shape)} dtype {arr.dtype}")
        if arr.ndim >= 2 and arr.shape[-1] > 8:
            top = np.argsort(-arr[..., -1, :] if arr.ndim == 3 else -arr, axis=-1)[..., :5]
            print(f"  top-5 ids at the last position: {top.tolist()}")
        else:
            print(f"  {np.array2string(arr, precision=5, threshold=20)}")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_TEXT_INPUT = ("Input: texts as arguments, --file FILE (one per line, '-' = stdin), or lines on stdin. "
               "--json prints one JSON value per input.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refimpl", description="RoBERTa-PreLayerNorm reference implementation: "
                     "framework-free inference (NumPy).", formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog='example: refimpl fill-mask --model tiny "Hello <mask>!"')
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name, help, example, func, default_model=None):
        p = sub.add_parser(name, help=help, description=help, epilog="example:\n  " + example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if default_model is None:
            p.add_argument("--model", required=True, help="model folder, 'tiny', or a Hugging Face Hub id")
        else:
            p.add_argument("--model", default=default_model,
                           help=f"model folder, 'tiny' (the shipped random checkpoint), or a Hub id (default: {default_model})")
        p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
        p.add_argument("--json", action="store_true", help="print JSON (one value per input)")
        p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
        p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")
        p.set_defaults(func=func)
        return p

    def batching(p, texts=True):
        if texts:
            p.add_argument("texts", nargs="*", metavar="TEXT", help="input texts (else --file or stdin)")
            p.add_argument("--file", default=None, help="read one input per line from FILE ('-' = stdin)")
        p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default 8)")
        p.add_argument("--truncate", action="store_true",
                       help="cut inputs longer than the model's limit (max_position_embeddings - pad_token_id - 1) "
                            "instead of failing")

    p = add("fill-mask", "predict the <mask> tokens of each text (top-k tokens with scores)",
            'refimpl fill-mask "The capital of France is <mask>."\n  refimpl fill-mask --model tiny --top-k 3 --json '
            '"Hello <mask>!" "A <mask> and a <mask>."\n\n' + _TEXT_INPUT, cmd_fill_mask, DEFAULT_MODEL)
    batching(p)
    p.add_argument("--top-k", type=int, default=5, help="predictions per mask (default 5)")
    p.add_argument("--target", dest="targets", action="append", default=None, metavar="TOKEN",
                   help="only score this token (repeat for several; e.g. --target ' Paris' --target ' Lyon')")

    p = add("classify", "classify each text (or text pair) with a sequence-classification checkpoint",
            'refimpl classify --model path/to/sst2 "a great film" "a dull film" --top-k 0\n'
            '  printf "premise\\thypothesis\\n" | refimpl classify --model path/to/mnli --json\n\n'
            "Pairs: --pair TEXT (the second text of every input) or 'text<TAB>pair' lines. " + _TEXT_INPUT,
            cmd_classify)
    batching(p)
    p.add_argument("--pair", default=None, help="second text of each input (a text pair)")
    p.add_argument("--top-k", type=int, default=1, help="labels per input, best first; 0 = all (default 1)")
    p.add_argument("--function", default=None, choices=["softmax", "sigmoid", "none"],
                   help="score function (default: from problem_type/num_labels, as transformers)")

    p = add("tag", "label the tokens of each text (NER) with a token-classification checkpoint",
            'refimpl tag --model path/to/ner --aggregation simple "Ada Lovelace was born in London."\n\n' + _TEXT_INPUT,
            cmd_tag)
    batching(p)
    p.add_argument("--aggregation", default="none", choices=["none", "simple", "first", "average", "max"],
                   help="transformers' aggregation strategy (default none: one entry per token)")
    p.add_argument("--ignore-labels", default="O", metavar="LABELS",
                   help="comma-separated labels to leave out (default: O; '' keeps every label)")

    p = add("qa", "extractive question answering: the best span of the context",
            'refimpl qa --model path/to/squad --question "Where does she live?" --context "She lives in Paris."\n'
            '  refimpl qa --model path/to/squad --context-file article.txt --file questions.txt\n\n'
            "Input: --question with --context/--context-file, or 'question<TAB>context' lines (--file or stdin), "
            "or question lines with --context/--context-file.", cmd_qa)
    batching(p, texts=False)
    p.add_argument("--question", default=None, help="the question")
    p.add_argument("--context", default=None, help="the context to find the answer in")
    p.add_argument("--context-file", default=None, help="read the context from a file")
    p.add_argument("--file", default=None, help="read 'question<TAB>context' (or question) lines from FILE ('-' = stdin)")
    p.add_argument("--top-k", type=int, default=1, help="answers per question (default 1)")
    p.add_argument("--doc-stride", type=int, default=None, help="overlap of the windows of a long context, in tokens "
                   "(default min(max_seq_len // 2, 128))")
    p.add_argument("--max-answer-len", type=int, default=15, help="longest answer, in tokens (default 15)")
    p.add_argument("--max-seq-len", type=int, default=None, help="window length, in tokens (default min(384, model limit))")
    p.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer")

    p = add("choose", "multiple choice: score each ending of a prompt (softmax over the endings)",
            'refimpl choose --model path/to/swag "The chef opened the oven" "and took out the bread." '
            '"and flew to the moon."\n\n'
            "Input: PROMPT ENDING ENDING... as arguments, or 'prompt<TAB>ending<TAB>ending...' lines (--file or stdin).",
            cmd_choose)
    batching(p)

    p = add("embed", "sentence embeddings from the last hidden state (CLS or mean pooling)",
            'refimpl embed --model tiny --pooling mean --normalize "first text" "second text"\n'
            "  refimpl embed --model tiny --file texts.txt --out vectors.npy\n\n"
            "Output: a .npy array [N, H] with --out, else one JSON list of floats per line. " + _TEXT_INPUT,
            cmd_embed, DEFAULT_MODEL)
    batching(p)
    p.add_argument("--pooling", default="cls", choices=["cls", "mean"], help="cls (first token) or mean over the mask")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--out", default=None, help="write a .npy file instead of printing")

    p = add("generate", "continue each prompt with a causal-LM checkpoint (greedy or sampling)",
            'refimpl generate --model path/to/causal-lm --max-new-tokens 20 "Once upon a time"\n\n' + _TEXT_INPUT,
            cmd_generate)
    batching(p)
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to add (default 20)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")

    p = add("info", "describe a model: config, parameters, dtype, weight format, tokenizer",
            "refimpl info --model tiny\n  refimpl info --model andreasmadsen/efficient_mlm_m0.40 --json", cmd_info, "tiny")
    p.add_argument("--task", default=None, help="task (default: from config.json's architectures)")

    p = add("forward", "run a forward pass on token ids",
            'refimpl forward --model tiny --ids "0 31414 232 2; 0 20920 2 1"', cmd_forward, "tiny")
    p.add_argument("--task", default=None, help="task (default: from config.json's architectures)")
    p.add_argument("--ids", required=True, help="token ids, rows separated by ';'")
    try:
        from .golden import add_golden_commands  # refimpl golden, refimpl compare
    except ImportError:  # a tree without refimpl/golden.py
        pass
    else:
        add_golden_commands(sub)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, LookupError, ImportError) as e:
        # PipelineError, InputError, CheckpointError, ConfigError, CommandError, GenerationError
        # are ValueErrors; ModelNotFoundError and missing files are OSErrors.
        print(f"refimpl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refimpl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
