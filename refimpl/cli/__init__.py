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

Commands can also come from other installed packages: an entry point of the group
``refimpl.commands`` (``[project.entry-points."refimpl.commands"]`` in their pyproject.toml) names a
function that adds its subcommand to the subparsers given to it. ``refimpl dump`` (docs/judge.md)
arrives that way, from the adapters package of this distribution, so that refimpl itself imports
neither the adapters nor the frameworks they run. A plugin that fails to load breaks only its own
command, which then says what went wrong and how to fix it.

Each task command reads its texts from the arguments, from ``--file FILE`` (``-`` = stdin) or, with
neither, from stdin when it is not a terminal: one text per line, read as the work goes. Results
are printed as each batch finishes, one output per input in input order; ``--json`` prints one JSON
object per input (JSON lines), ``{"index": i, "result": ...}``, or ``{"index": i, "error": "empty
line"}`` for a blank line. ``--model`` is a folder, ``tiny`` (the random masked-LM checkpoint
shipped with refimpl; ``tiny-classify``, ``tiny-tag``, ``tiny-qa``, ``tiny-choose`` and
``tiny-generate`` are random checkpoints for the other heads) or a Hugging Face Hub id
(downloaded into the standard cache; ``HF_HUB_OFFLINE=1`` uses the cache only).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_TEXT_INPUT = ("Input: texts as arguments, --file FILE (one per line, '-' = stdin), or lines on stdin. "
               "One output per input, printed as each batch finishes; --json prints one JSON object per input "
               "(JSON lines): {\"index\": i, \"result\": ...}, or {\"index\": i, \"error\": \"empty line\"}.")
BACKENDS = ("auto", "numba", "numpy")


def add_model_options(p, default_model=None, default_dtype="float32", hub=True) -> None:
    """--model, --dtype, --backend and (for Hub ids) --revision, --cache-dir: every command that loads a model."""
    if default_model is None:
        p.add_argument("--model", required=True, help="model folder, 'tiny' (or tiny-classify, tiny-tag, tiny-qa, "
                       "tiny-choose, tiny-generate: random checkpoints shipped with refimpl), or a Hugging Face Hub id")
    else:
        p.add_argument("--model", default=default_model,
                       help=f"model folder, 'tiny' (the shipped random checkpoint), or a Hub id (default: {default_model})")
    p.add_argument("--dtype", default=default_dtype, choices=["float32", "float64"],
                   help=f"compute dtype (default {default_dtype})")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (the default: numba from hidden size 256 up, else numpy; one choice per model), "
                        "numba (NumPy with Numba kernels) or numpy (the pure NumPy reference)")
    if hub:
        p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
        p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")


# The commands defined in this file. A command line naming one of them builds its parser without the
# commands whose modules load golden files, adapters or training code (~0.15 s of imports), and
# without looking up the plugin commands' entry points (~0.01 s).
_LIGHT_COMMANDS = ("fill-mask", "classify", "tag", "qa", "choose", "embed", "generate", "info", "forward")
PLUGIN_GROUP = "refimpl.commands"  # the entry point group of the commands other packages add


def build_parser(heavy: bool = True) -> argparse.ArgumentParser:
    """The ``refimpl`` parser; ``heavy=False``: only the commands of ``_LIGHT_COMMANDS``."""
    # The subcommands' modules are imported here, not at the top: `refimpl --version` needs none.
    from . import common, corpus, describe, tasks

    parser = _Parser(prog="refimpl", description="RoBERTa-PreLayerNorm reference implementation: "
                     "framework-free inference (NumPy).", formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog='example: refimpl fill-mask --model tiny "Hello <mask>!"')
    parser.add_argument("--version", action="version", version=f"refimpl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name, help, example, func, default_model=None):
        p = sub.add_parser(name, help=help, description=help, epilog="example:\n  " + example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_model_options(p, default_model)
        p.add_argument("--json", action="store_true", help="print JSON lines (one JSON object per input)")
        p.set_defaults(func=func)
        return p

    def batching(p, texts=True, group=True):
        if texts:
            p.add_argument("texts", nargs="*", metavar="TEXT", help="input texts (else --file or stdin)")
            p.add_argument("--file", default=None, help="read one input per line from FILE ('-' = stdin)")
        p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default 8)")
        if group:
            p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                           help="batch the inputs in their order (default: read 8 batches at a time and batch "
                                "them by length, which pads less; results are printed in input order either way)")
        p.add_argument("--truncate", action="store_true",
                       help="cut inputs longer than the model's limit (max_position_embeddings - pad_token_id - 1) "
                            "instead of failing")

    p = add("fill-mask", "predict the <mask> tokens of each text (top-k tokens with scores)",
            'refimpl fill-mask "The capital of France is <mask>."\n  refimpl fill-mask --model tiny --top-k 3 --json '
            '"Hello <mask>!" "A <mask> and a <mask>."\n\n' + _TEXT_INPUT, tasks.cmd_fill_mask, common.DEFAULT_MODEL)
    batching(p)
    p.add_argument("--top-k", type=int, default=5, help="predictions per mask (default 5)")
    p.add_argument("--target", dest="targets", action="append", default=None, metavar="TOKEN",
                   help="only score this token (repeat for several; e.g. --target ' Paris' --target ' Lyon')")
    corpus.add_options(p, "fill-mask")

    p = add("classify", "classify each text (or text pair) with a sequence-classification checkpoint",
            'refimpl classify --model path/to/sst2 "a great film" "a dull film" --top-k 0\n'
            '  printf "premise\\thypothesis\\n" | refimpl classify --model path/to/mnli --json\n\n'
            "Pairs: --pair TEXT (the second text of every input) or 'text<TAB>pair' lines. " + _TEXT_INPUT,
            tasks.cmd_classify)
    batching(p)
    p.add_argument("--pair", default=None, help="second text of each input (a text pair)")
    p.add_argument("--top-k", type=int, default=1, help="labels per input, best first; 0 = all (default 1)")
    p.add_argument("--function", default=None, choices=["softmax", "sigmoid", "none"],
                   help="score function (default: from problem_type/num_labels, as transformers)")
    corpus.add_options(p, "classify")

    p = add("tag", "label the tokens of each text (NER) with a token-classification checkpoint",
            'refimpl tag --model path/to/ner --aggregation simple "Ada Lovelace was born in London."\n\n' + _TEXT_INPUT,
            tasks.cmd_tag)
    batching(p)
    p.add_argument("--aggregation", default="none", choices=["none", "simple", "first", "average", "max"],
                   help="transformers' aggregation strategy (default none: one entry per token)")
    p.add_argument("--ignore-labels", default="O", metavar="LABELS",
                   help="comma-separated labels to leave out (default: O; '' keeps every label)")
    corpus.add_options(p, "tag")

    p = add("qa", "extractive question answering: the best span of the context",
            'refimpl qa --model path/to/squad --question "Where does she live?" --context "She lives in Paris."\n'
            '  refimpl qa --model path/to/squad --context-file article.txt --file questions.txt\n\n'
            "Input: --question with --context/--context-file, or 'question<TAB>context' lines (--file or stdin), "
            "or question lines with --context/--context-file.", tasks.cmd_qa)
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
    corpus.add_options(p, "qa")

    p = add("choose", "multiple choice: score each ending of a prompt (softmax over the endings)",
            'refimpl choose --model path/to/swag "The chef opened the oven" "and took out the bread." '
            '"and flew to the moon."\n\n'
            "Input: PROMPT ENDING ENDING... as arguments, or 'prompt<TAB>ending<TAB>ending...' lines (--file or stdin).",
            tasks.cmd_choose)
    batching(p, group=False)  # one forward per prompt
    corpus.add_options(p, "choose")

    p = add("embed", "sentence embeddings from the last hidden state (CLS or mean pooling)",
            'refimpl embed --model tiny --pooling mean --normalize "first text" "second text"\n'
            "  refimpl embed --model tiny --file texts.txt --out vectors.npy\n\n"
            "Output: a .npy array [N, H] with --out, else one JSON list of floats per input (null for a blank "
            "line). " + _TEXT_INPUT,
            tasks.cmd_embed, common.DEFAULT_MODEL)
    batching(p)
    p.add_argument("--pooling", default="cls", choices=["cls", "mean"], help="cls (first token) or mean over the mask")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the vectors [N, H] to FILE.npy in .npy format (exactly that path) instead of printing; "
                        "a folder (an existing one, or a name without .npy) makes it a corpus run")
    corpus.add_options(p, "embed")

    p = add("generate", "continue each prompt with a causal-LM checkpoint (greedy or sampling)",
            'refimpl generate --model path/to/causal-lm --max-new-tokens 20 "Once upon a time"\n\n' + _TEXT_INPUT,
            tasks.cmd_generate)
    batching(p, group=False)  # sampling: batches in input order
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to add (default 20)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")

    p = add("info", "describe a model: config, parameters, dtype, weight format, tokenizer",
            "refimpl info --model tiny\n  refimpl info --model andreasmadsen/efficient_mlm_m0.40 --json", describe.cmd_info, "tiny")
    p.add_argument("--task", default=None, help="task (default: from config.json's architectures)")

    p = add("forward", "run a forward pass on token ids",
            'refimpl forward --model tiny --ids "0 31414 232 2; 0 20920 2 1"', describe.cmd_forward, "tiny")
    p.add_argument("--task", default=None, help="task (default: from config.json's architectures)")
    p.add_argument("--ids", required=True, help="token ids, rows separated by ';'")
    if heavy:
        from . import finetune, golden

        golden.add_golden_commands(sub, add_model_options)  # refimpl golden, refimpl compare
        finetune.add_finetune_command(sub)  # refimpl finetune
        add_plugin_commands(sub)  # refimpl dump, and any other installed package's commands
    return parser


def add_plugin_commands(sub) -> None:
    """Add the subcommands of the ``refimpl.commands`` entry points, in the order of their names.

    Each entry point is a function called with ``sub`` (argparse's subparsers). A name refimpl
    already has keeps its own command. A plugin that fails to import or to add itself leaves a
    command of its name that fails with one line naming the error and the fix, and accepts any
    arguments: a broken plugin breaks nothing else.
    """
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        if ep.name in sub.choices:
            continue
        try:
            ep.load()(sub)
        except Exception as e:  # noqa: BLE001 - whatever broke the plugin, the other commands keep working
            message = _plugin_error(ep, e)
            p = sub.choices.get(ep.name)  # what the plugin added before it failed, else a placeholder
            if p is None:
                p = sub.add_parser(ep.name, help=f"(unavailable: {message})", description=message)
            p.set_defaults(func=_failing(message), plugin_error=message)


def _plugin_error(ep, error: BaseException) -> str:
    dist = getattr(ep.dist, "name", None)
    fix = ("reinstall refimpl from its checkout: pip install . (pip install -e . for an editable install)"
           if dist == "refimpl" else f"reinstall {dist or 'the package that provides it'}, or uninstall that "
           "package to drop the command")
    return (f"the {ep.name} command could not be loaded ({ep.value}, entry point of {dist or 'an unknown package'}: "
            f"{type(error).__name__}: {_one_line(error)}); {fix}")


def _failing(message: str):
    def fail(args) -> int:
        raise ImportError(message)

    return fail


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _OneLine(logging.Formatter):
    def format(self, record) -> str:
        return " ".join(super().format(record).split())


def _log_warnings_to_stderr(command: str) -> logging.Handler:
    """Warnings of the ``refimpl`` logger (a fill-mask target that is several tokens, ...) as one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLine(f"refimpl {command}: warning: %(message)s"))
    logging.getLogger("refimpl").addHandler(handler)
    return handler


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (``refimpl ... | head``): stop quietly, as Unix tools do.

    Later writes (Python's own flush at exit) go to /dev/null; the status is 128 + SIGPIPE (141), what
    a shell reports for a tool that a closed pipe stopped.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (tests): nothing to silence
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words == ["--version"]:  # answered without building the parser
        print(f"refimpl {__version__}")
        raise SystemExit(0)
    command = next((w for w in words if not w.startswith("-")), None)  # the top level takes no option values
    parser = build_parser(heavy=command not in _LIGHT_COMMANDS)
    args, unknown = parser.parse_known_args(argv)  # parse_args, but a broken plugin's command takes any words
    if unknown and getattr(args, "plugin_error", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler = _log_warnings_to_stderr(args.command)
    try:
        return args.func(args)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (ValueError, OSError, ImportError) as e:
        # PipelineError, InputError, CheckpointError, ConfigError, CommandError, GenerationError
        # are ValueErrors; ModelNotFoundError and missing files are OSErrors.
        print(f"refimpl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refimpl {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.getLogger("refimpl").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
