"""``refimpl finetune``: fine-tune a sequence classifier on a TSV file, without a framework.

The library side (data, training loop, checkpoints) is :mod:`refimpl.finetune`.
"""

from __future__ import annotations

import json
import os

from ..finetune import TASK, FinetuneConfig, finetune, read_examples, validate_labels
from ..hub import resolve
from . import common


def add_finetune_command(subparsers) -> None:
    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune", help="fine-tune a sequence classifier on tab-separated text<TAB>label lines (AdamW, no framework)",
        description="Fine-tune a sequence classifier: AdamW with linear warm-up/decay and gradient clipping, "
                    "gradients from refimpl's written-out backward pass. After every epoch: the mean training loss, "
                    "the dev accuracy, and a checkpoint written atomically to --out (a transformers folder).",
        epilog="example:\n  refimpl finetune --model path/to/model --task sequence-classification "
               "--train train.tsv --eval dev.tsv --out finetuned/\n\nData: one example a line, 'text<TAB>label' or "
               "'text<TAB>pair<TAB>label'; blank lines are skipped.",
    )
    p.add_argument("--model", required=True, help="model folder with tokenizer files, 'tiny', or a Hugging Face Hub id")
    p.add_argument("--task", default=TASK, choices=[TASK], help="what to train (default and only: %(default)s)")
    p.add_argument("--train", required=True, help="training data (TSV)")
    p.add_argument("--eval", required=True, help="dev data (TSV), evaluated after every epoch")
    p.add_argument("--out", required=True, help="the checkpoint folder to write (must not exist, or be empty)")
    p.add_argument("--labels", default=None, help="comma-separated labels, in id order (default: the training labels, sorted)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of steps warming up (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay, not on biases and "
                   "LayerNorm parameters (default %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="global-norm clipping (default %(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example; longer ones are cut (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="shuffling and new-head seed (default %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float64"], help="compute dtype (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_ratio=args.warmup_ratio,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                         max_length=args.max_length, dtype=args.dtype)
    cfg.validate()
    labels = None if args.labels is None else validate_labels([x.strip() for x in args.labels.split(",")])
    train = read_examples(args.train, labels)
    dev = read_examples(args.eval)
    folder = os.fspath(resolve(common.resolve_model_path(args.model)))
    for report in finetune(folder, train, dev, args.out, cfg, labels=labels, train_path=args.train,
                           dev_path=args.eval, progress=not args.no_progress):
        print(json.dumps(report.__dict__) if args.json else str(report), flush=True)
    return 0
