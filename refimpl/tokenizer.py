"""The RoBERTa byte-level BPE tokenizer, on the ``tokenizers`` library (no transformers at run time).

``Tokenizer.from_pretrained(folder)`` reads ``tokenizer.json`` when the folder has one; otherwise it
builds, from ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json`` /
``special_tokens_map.json`` when present), the same pipeline as transformers' ``RobertaTokenizer``:
byte-level pre-tokenizer (``add_prefix_space`` from the config, default False), BPE, the RoBERTa
post-processor (``<s> A </s>`` and ``<s> A </s></s> B </s>``, ``trim_offsets=True``) and the
byte-level decoder. ``<mask>`` is a special token with ``lstrip=True``, as on the Hub: "is <mask>."
gives ``[..., 16, 50264, 4, ...]``, not ``[..., 16, 1437, 50264, ...]`` (transformers 5.x built from
vocab + merges alone forgets the lstrip; we do not copy that).

Calling the tokenizer returns a plain ``dict`` of NumPy int64 arrays, batch first, always 2-D: a
single string is a batch of one (``[1, T]``). Keys:

    input_ids             [B, T]    always
    attention_mask        [B, T]    always (1 = token, 0 = padding)
    token_type_ids        [B, T]    return_token_type_ids=True (all zeros for RoBERTa)
    special_tokens_mask   [B, T]    return_special_tokens_mask=True (1 at <s>, </s>, padding)
    offset_mapping        [B, T, 2] return_offsets_mapping=True ((0, 0) at specials and padding)
    word_ids              list of B lists of int | None      return_word_ids=True
    sequence_ids          list of B lists of 0 | 1 | None    return_sequence_ids=True
    overflow_to_sample_mapping [B]  return_overflowing_tokens=True

With ``return_overflowing_tokens=True`` a row is a window, B counts windows, and the mapping says
which input each window came from (transformers' ``stride`` semantics: consecutive windows of the
truncated sequence share ``stride`` tokens). Rows of different lengths need ``padding``: we raise a
``ValueError`` rather than return ragged lists.

Where we are stricter than transformers (each raises ``ValueError`` with the reason):
- a sequence longer than a known limit without truncation (``max_length`` when given, else
  ``model_max_length`` when known); transformers only warns and returns the overlong row;
- ``truncation=True`` or ``padding="max_length"`` with no ``max_length`` and no known
  ``model_max_length``; transformers silently does neither;
- ``max_length`` with ``truncation=False`` is a limit to check, never an implicit truncation
  (transformers truncates when ``truncation`` is left unset);
- overflowing windows for pairs with ``longest_first`` (the backend's windows there are a
  cross product of both sequences' windows; use ``only_second`` or ``only_first``), and window
  sizes the backend would panic on (``stride`` not smaller than the room left for the truncated
  sequence).
- ``text_pair=""`` with a single ``text`` is an (empty) pair; transformers drops it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .io import read_json, short_repr

__all__ = ["Tokenizer", "TokenizerError", "max_length_for"]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read (malformed JSON, a vocabulary the library refuses, ...)."""

# transformers stores "no limit" as int(1e30); anything above its LARGE_INTEGER (1e20) means unknown.
_NO_LIMIT = int(1e20)

_SPECIAL_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ROBERTA_SPECIALS = {
    "bos": "<s>", "eos": "</s>", "unk": "<unk>", "sep": "</s>",
    "pad": "<pad>", "cls": "<s>", "mask": "<mask>",
}
_TRUNCATION = {
    True: "longest_first", "longest_first": "longest_first",
    "only_first": "only_first", "only_second": "only_second",
    False: None, None: None, "do_not_truncate": None,
}
# Up to this many characters (pairs: both texts) a batch is encoded text by text on the calling
# thread. The backend's ``encode_batch`` hands the texts to its thread pool, whose workers, asleep
# after the previous batch, take longer to wake than a few short texts take to encode. Measured on
# 2 cores, 1 ms of other work between batches (as in a pipeline): texts of ~56 characters in
# batches of 8 took 0.47x the time text by text, of 32 0.79x, of 64 0.92x; texts of ~680
# characters in batches of 8 0.95x, of 16 1.30x. Calls back to back with nothing between them find
# the pool awake: there 16-64 short texts took 1.26-1.51x the time text by text (a list tokenized
# in one call goes to the pool from 8,192 characters). The same encodings either way. (``encode`` holds
# the GIL while it runs, where ``encode_batch`` lets it go: threads that tokenize at the same time
# take turns below the limit, ~0.02 ms a short text, ~1 ms a batch at the limit.)
SERIAL_UP_TO_CHARS = 8192
# Likewise for decoding, in tokens: 5 rows of 20 tokens took 0.25x the time row by row, 40 rows
# 0.67x, 160 rows 1.02x (1 ms of other work between calls), 160 rows of 200 tokens 1.13x.
SERIAL_DECODE_UP_TO_TOKENS = 2048

_PADDING = {
    True: "longest", "longest": "longest", "max_length": "max_length",
    False: None, None: None, "do_not_pad": None,
}


def max_length_for(max_position_embeddings: int, pad_token_id: int) -> int:
    """The longest sequence (special tokens included) a RoBERTa model can embed.

    Position ids start at ``pad_token_id + 1``, so ``max_position_embeddings - pad_token_id - 1``
    positions are usable: 514 - 1 - 1 = 512 for roberta-base.
    """
    return int(max_position_embeddings) - int(pad_token_id) - 1


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return read_json(path, TokenizerError, what="the tokenizer file")


def _token_spec(value: Any) -> tuple[str | None, dict]:
    """A special-token entry of a config: ``"<s>"`` or ``{"content": "<s>", "lstrip": ...}``."""
    if value is None or isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return value["content"], flags
    raise TokenizerError(f"cannot read special token entry {short_repr(value)}")


def _backend_call(what: str, fn, *args):
    """Call the tokenizers library on a file: its refusals (a bare ``Exception``) become TokenizerError."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the library raises plain Exception for malformed files
        detail = " ".join(str(e).split())[:300]
        raise TokenizerError(f"{what}: the tokenizers library cannot read it ({type(e).__name__}: {detail})") from None


class Tokenizer:
    """RoBERTa byte-level BPE tokenizer; see the module docstring for the output convention.

    Attributes: ``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``,
    ``cls_token``, ``mask_token`` and their ``*_token_id``; ``model_max_length`` (int, or None when
    unknown; settable); ``vocab_size``; ``backend`` (the ``tokenizers.Tokenizer``, unconfigured:
    truncation and padding are set per call under a lock, then cleared).
    """

    def __init__(self, backend: _Backend, *, special_tokens: dict[str, str] | None = None,
                 model_max_length: int | None = None, name: str = ""):
        self.backend = backend
        self.backend.no_truncation()
        self.backend.no_padding()
        self._lock = threading.Lock()
        self.name = name
        tokens = dict(_ROBERTA_SPECIALS)
        tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        for key in _SPECIAL_NAMES:
            token = tokens[key]
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{key}_token {short_repr(token)} is not in the vocabulary{' of ' + name if name else ''}")
            setattr(self, f"{key}_token", token)
            setattr(self, f"{key}_token_id", int(token_id))
        if model_max_length is not None and int(model_max_length) > _NO_LIMIT:
            model_max_length = None
        self.model_max_length = None if model_max_length is None else int(model_max_length)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, model_max_length: int | None = None,
                        add_prefix_space: bool | None = None) -> "Tokenizer":
        """Load from a local folder: ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt``.

        ``tokenizer_config.json`` and ``special_tokens_map.json`` (optional) give the special tokens,
        ``model_max_length`` and ``add_prefix_space``; with ``tokenizer.json`` its added tokens (and
        their lstrip flags) are authoritative. Keyword arguments override the files; pass
        ``model_max_length=max_length_for(config.max_position_embeddings, config.pad_token_id)`` to
        check inputs against the model's real limit.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist or is not a directory")
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        specials: dict[str, str] = {}
        flags: dict[str, dict] = {}
        for source in (config, special_map):  # special_tokens_map.json is read last and wins
            for key in _SPECIAL_NAMES:
                content, f = _token_spec(source.get(f"{key}_token"))
                if content is not None:
                    specials[key] = content
                    flags[key] = f or flags.get(key, {})
        if model_max_length is None:
            model_max_length = config.get("model_max_length")
            if isinstance(model_max_length, float) and model_max_length.is_integer():
                model_max_length = int(model_max_length) if model_max_length < 1e30 else None
            if model_max_length is not None and (not isinstance(model_max_length, int) or isinstance(model_max_length, bool)
                                                 or model_max_length < 0):
                raise TokenizerError(f"{folder / 'tokenizer_config.json'}: model_max_length must be a positive integer, "
                                     f"got {short_repr(model_max_length)}")
        if add_prefix_space is None:
            add_prefix_space = config.get("add_prefix_space")
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict) or not all(isinstance(e, dict) for e in decoder.values()):
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must map ids to token "
                                 f"entries, got {short_repr(decoder)}")

        if (folder / "tokenizer.json").is_file():
            path = str(folder / "tokenizer.json")
            backend = _backend_call(path, _Backend.from_file, path)
            if add_prefix_space is not None:
                _set_prefix_space(backend, bool(add_prefix_space))
            return cls(backend, special_tokens=specials, model_max_length=model_max_length, name=str(folder))

        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            present = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(
                f"no tokenizer in {str(folder)!r}: looked for 'tokenizer.json', or 'vocab.json' + "
                f"'merges.txt' (optionally with 'tokenizer_config.json', 'special_tokens_map.json'); "
                f"the folder has {present}")
        # added_tokens_decoder (transformers >= 4.34 configs) carries per-token flags such as lstrip.
        for entry in decoder.values():
            for key in _SPECIAL_NAMES:
                if entry.get("content") == specials.get(key, _ROBERTA_SPECIALS[key]) and not flags.get(key):
                    flags[key] = _token_spec(entry)[1]
        return cls.from_files(
            vocab, merges, add_prefix_space=bool(add_prefix_space or False),
            trim_offsets=bool(config.get("trim_offsets", True)), model_max_length=model_max_length,
            special_tokens=specials, token_flags=flags, name=str(folder))

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, *,
                   add_prefix_space: bool = False, trim_offsets: bool = True,
                   model_max_length: int | None = None, special_tokens: dict[str, str] | None = None,
                   token_flags: dict[str, dict] | None = None, name: str = "") -> "Tokenizer":
        """Build the RoBERTa pipeline from ``vocab.json`` + ``merges.txt``.

        ``special_tokens`` maps ``bos/eos/unk/sep/pad/cls/mask`` to strings (RoBERTa's by default);
        ``token_flags`` maps the same keys to ``AddedToken`` flags. ``<mask>`` gets ``lstrip=True``
        unless its flags say otherwise.
        """
        for path in (vocab_file, merges_file):
            if not Path(path).is_file():
                raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        tokens = dict(_ROBERTA_SPECIALS)
        tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        vocab, merges = _backend_call(f"{vocab_file} + {merges_file}", BPE.read_file, str(vocab_file), str(merges_file))
        for key in ("sep", "cls"):
            if tokens[key] not in vocab:
                raise TokenizerError(f"{vocab_file}: the {key} token {short_repr(tokens[key])} is not in the vocabulary")
        backend = _Backend(BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.RobertaProcessing(
            (tokens["sep"], vocab[tokens["sep"]]), (tokens["cls"], vocab[tokens["cls"]]),
            trim_offsets=trim_offsets, add_prefix_space=add_prefix_space)
        added, seen = [], set()
        for key in _SPECIAL_NAMES:
            if tokens[key] in seen:
                continue
            seen.add(tokens[key])
            f = {"lstrip": key == "mask", "rstrip": False, "single_word": False, "normalized": False}
            f.update((token_flags or {}).get(key, {}))
            added.append(AddedToken(tokens[key], special=True, **f))
        backend.add_special_tokens(added)
        return cls(backend, special_tokens=tokens, model_max_length=model_max_length,
                   name=name or str(Path(vocab_file).parent))

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (50265 for RoBERTa), as transformers' ``vocab_size``."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Vocabulary size including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({getattr(self, f"{k}_token_id") for k in _SPECIAL_NAMES})

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.backend.num_special_tokens_to_add(pair)

    def _check_id(self, index) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"token ids must be integers, got {type(index).__name__} {index!r}")
        index = int(index)
        if not 0 <= index < len(self):
            raise ValueError(f"token id {index} is out of range [0, {len(self)})")
        return index

    def _checked_ids(self, ids) -> list[int]:
        """A 1-D sequence of ids -> list of ints, each checked by :meth:`_check_id` (an integer array at once)."""
        if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
            self._check_id_range(ids)
            return ids.tolist()
        return [self._check_id(i) for i in _as_id_list(ids)]

    def _check_id_range(self, ids: np.ndarray) -> None:
        """Raise :meth:`_check_id`'s error for the first id of an integer array outside the vocabulary."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            self._check_id(ids[(ids < 0) | (ids >= len(self))][0])

    def _checked_rows(self, ids) -> list[list[int]]:
        """Rows of ids -> lists of ints, checked as :meth:`_checked_ids` checks them; rows that are
        integer arrays of one dtype (a 2-D array's rows, a list of 1-D arrays) checked at once (the
        same first bad id, in row-major order)."""
        rows = list(ids)
        first = rows[0] if rows else None
        if (isinstance(first, np.ndarray) and first.dtype.kind in "iu"
                and all(isinstance(r, np.ndarray) and r.ndim == 1 and r.dtype == first.dtype for r in rows)):
            self._check_id_range(np.concatenate(rows))
            return [r.tolist() for r in rows]
        return [self._checked_ids(row) for row in rows]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """An id -> its token string; a sequence of ids -> a list. Out-of-range ids raise ValueError."""
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, (bool, np.bool_)):
            return self.backend.id_to_token(self._check_id(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in map(self._check_id, _as_id_list(ids)) if i not in skip]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        """A token -> its id (``unk_token_id`` when unknown, as transformers); a sequence -> a list."""
        if isinstance(tokens, str):
            token_id = self.backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else int(token_id)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids (int, list or 1-D array) -> text. No clean-up of spaces (transformers 5.x skips it for BPE)."""
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        return self.backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = False) -> list[str]:
        """A batch ([B, T] array or list of lists) -> list of B strings: decode's, row by row on this
        thread up to ``SERIAL_DECODE_UP_TO_TOKENS`` tokens, else in one call of the backend's
        ``decode_batch`` (its thread pool)."""
        rows = self._checked_rows(ids)
        if sum(map(len, rows)) <= SERIAL_DECODE_UP_TO_TOKENS:
            return [self.backend.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        """Byte-level BPE tokens of ``text``, without special tokens."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str = False,
        max_length: int | None = None,
        stride: int = 0,
        padding: bool | str = False,
        padding_side: str = "right",
        truncation_side: str = "right",
        return_overflowing_tokens: bool = False,
        return_token_type_ids: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_word_ids: bool = False,
        return_sequence_ids: bool = False,
    ) -> dict[str, Any]:
        """Encode a string, a pair, or a batch of either; see the module docstring for the output.

        truncation: False | True (= "longest_first") | "longest_first" | "only_first" | "only_second",
            to ``max_length`` or, when that is None, to ``model_max_length``.
        padding: False | True (= "longest") | "longest" | "max_length" (to ``max_length`` or
            ``model_max_length``), on ``padding_side`` ("right" or "left").
        max_length without truncation is a limit: a longer row raises ValueError.
        stride / return_overflowing_tokens: split what truncation removes into extra windows that
            overlap by ``stride`` tokens (transformers' semantics), with ``overflow_to_sample_mapping``.
        """
        texts, pairs = _batch_inputs(text, text_pair)
        is_pair = pairs is not None
        strategy = _choice("truncation", truncation, _TRUNCATION)
        pad = _choice("padding", padding, _PADDING)
        for arg, value in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if value not in ("right", "left"):
                raise ValueError(f"{arg} must be 'right' or 'left', got {value!r}")
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 0:
            raise ValueError(f"stride must be a non-negative integer, got {stride!r}")
        stride = int(stride)
        if stride and not return_overflowing_tokens:
            raise ValueError("stride only applies with return_overflowing_tokens=True")
        if return_overflowing_tokens and strategy is None:
            raise ValueError("return_overflowing_tokens=True needs truncation (for example truncation='only_second')")
        if strategy == "only_second" and not is_pair:
            raise ValueError("truncation='only_second' needs text_pair")
        if return_overflowing_tokens and is_pair and strategy == "longest_first":
            raise ValueError("overflowing windows of a pair need truncation='only_first' or 'only_second', "
                             "not 'longest_first'")

        limit = max_length if max_length is not None else self.model_max_length
        if limit is None and (strategy is not None or pad == "max_length"):
            what = f"truncation={truncation!r}" if strategy is not None else "padding='max_length'"
            raise ValueError(f"{what} needs max_length: this tokenizer has no known model_max_length "
                             f"(pass max_length=..., or set model_max_length, e.g. from "
                             f"max_length_for(max_position_embeddings, pad_token_id))")
        n_special = self.num_special_tokens_to_add(is_pair) if add_special_tokens else 0
        if strategy is not None and limit < n_special:
            raise ValueError(f"max_length={limit} is shorter than the {n_special} special tokens of a "
                             f"{'pair' if is_pair else 'sequence'}")
        inputs = list(zip(texts, pairs)) if is_pair else texts

        with self._lock:
            if return_overflowing_tokens:
                self._check_windows(inputs, strategy, limit, stride, n_special, add_special_tokens)
            encodings = self._encode(inputs, add_special_tokens, strategy, limit,
                                     stride if return_overflowing_tokens else 0, truncation_side,
                                     pad, padding_side)

        rows, sample = [], []
        for i, enc in enumerate(encodings):
            for window in [enc] + (list(enc.overflowing) if return_overflowing_tokens else []):
                rows.append(window)
                sample.append(i)
        if strategy is None and limit is not None:
            for i, enc in enumerate(rows):
                n = sum(enc.attention_mask)
                if n > limit:
                    source = "max_length" if max_length is not None else "model_max_length"
                    raise ValueError(
                        f"input {i} is {n} tokens long (special tokens included), longer than "
                        f"{source}={limit}; pass truncation=True (or a truncation strategy) to cut it")
        lengths = {len(enc.ids) for enc in rows}
        if len(lengths) > 1:
            raise ValueError(f"rows have different lengths ({min(lengths)}..{max(lengths)}); pass "
                             f"padding=True or padding='max_length' to get [B, T] arrays")

        def stack(attr):
            return np.asarray([getattr(enc, attr) for enc in rows], dtype=np.int64).reshape(len(rows), -1)

        out: dict[str, Any] = {"input_ids": stack("ids"), "attention_mask": stack("attention_mask")}
        if return_token_type_ids:
            out["token_type_ids"] = stack("type_ids")
        if return_special_tokens_mask:
            out["special_tokens_mask"] = stack("special_tokens_mask")
        if return_offsets_mapping:
            out["offset_mapping"] = np.asarray([enc.offsets for enc in rows], dtype=np.int64).reshape(
                len(rows), -1, 2)  # [B, T, 2]
        if return_word_ids:
            out["word_ids"] = [list(enc.word_ids) for enc in rows]
        if return_sequence_ids:
            out["sequence_ids"] = [list(enc.sequence_ids) for enc in rows]
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = np.asarray(sample, dtype=np.int64)
        return out

    def _encode(self, inputs, add_special_tokens, strategy, max_length, stride, truncation_side,
                pad, padding_side):
        """The backend's encodings with truncation/padding set for them, then cleared (caller holds
        the lock): one ``encode_batch``, or up to ``SERIAL_UP_TO_CHARS`` characters one ``encode``
        each on this thread, padded as ``encode_batch`` pads them (the longest row, or
        ``max_length``; a row's overflowing windows with it)."""
        be = self.backend
        try:
            if strategy is not None:
                be.enable_truncation(max_length, stride=stride, strategy=strategy, direction=truncation_side)
            serial = _serial(inputs)
            if pad is not None and not serial:
                be.enable_padding(direction=padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                  pad_token=self.pad_token,
                                  length=max_length if pad == "max_length" else None)
            encodings = self._encode_all(inputs, add_special_tokens, serial)
            if pad is not None and serial:
                length = max(len(e.ids) for e in encodings) if pad == "longest" else max_length
                for e in encodings:
                    e.pad(length, direction=padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                          pad_token=self.pad_token)
            return encodings
        except Exception as e:  # the backend's errors are plain Exception (or ValueError)
            raise ValueError(f"cannot encode with truncation={strategy!r}, max_length={max_length}, "
                             f"stride={stride}: {e}") from e
        finally:
            be.no_truncation()
            be.no_padding()

    def _encode_all(self, inputs, add_special_tokens: bool, serial: bool) -> list:
        """The backend's encodings of ``inputs`` (texts or (text, pair) tuples) with its settings:
        ``encode_batch``, or with ``serial`` (:func:`_serial`) one ``encode`` each (padded to its
        own length only)."""
        be = self.backend
        if not serial:
            return be.encode_batch(inputs, add_special_tokens=add_special_tokens)
        return [be.encode(*x, add_special_tokens=add_special_tokens) if isinstance(x, tuple)
                else be.encode(x, add_special_tokens=add_special_tokens) for x in inputs]

    def _check_windows(self, inputs, strategy, max_length, stride, n_special, add_special_tokens):
        """Reject window sizes the backend panics on (Rust ``panic!``, not a Python exception) or
        answers with malformed windows (no room at all for the truncated sequence).

        A row that must be cut keeps ``max_length - specials - len(other sequence)`` tokens of the
        truncated sequence per window; the backend requires ``stride`` to be smaller than that.
        (Pairs reach here only with only_first/only_second; a single sequence has no other.)
        """
        encodings = self._encode_all(inputs, add_special_tokens, _serial(inputs))
        cut = 1 if strategy == "only_second" else 0
        for i, enc in enumerate(encodings):
            total = len(enc.ids)
            if total <= max_length:
                continue
            other = sum(1 for s in enc.sequence_ids if s == 1 - cut)
            room = max_length - n_special - other
            which = "first" if cut == 0 else "second"
            if room <= 0:
                raise ValueError(
                    f"input {i}: {n_special} special tokens and {other} tokens of the other sequence "
                    f"fill max_length={max_length}: no room is left for the {which} sequence")
            if room <= stride:
                raise ValueError(
                    f"input {i}: truncation={strategy!r} leaves {room} tokens per window for the "
                    f"{which} sequence (max_length={max_length} - "
                    f"{n_special} special tokens - {other} tokens of the other sequence); it must be more "
                    f"than stride={stride}")

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length})")


def _set_prefix_space(backend: _Backend, add_prefix_space: bool) -> None:
    """Make a loaded RoBERTa pipeline use ``add_prefix_space`` (pre-tokenizer and post-processor)."""
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        raise ValueError("add_prefix_space needs a byte-level pre-tokenizer")
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space,
                                                     use_regex=backend.pre_tokenizer.use_regex)
    post = backend.post_processor
    if isinstance(post, processors.RobertaProcessing):
        state = json.loads(post.__getstate__())
        backend.post_processor = processors.RobertaProcessing(
            tuple(state["sep"]), tuple(state["cls"]), trim_offsets=state["trim_offsets"],
            add_prefix_space=add_prefix_space)


def _as_id_list(ids) -> list:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of ids, got shape {arr.shape}; use batch_decode for a batch")
    return list(ids)


def _batch_inputs(text, text_pair):
    """Normalize to (list of texts, list of pair texts or None)."""
    def is_batch(x):
        return isinstance(x, (list, tuple))

    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise TypeError(f"text is a string, so text_pair must be a string or None, "
                            f"got {type(text_pair).__name__}")
        return [text], None if text_pair is None else [text_pair]
    if not is_batch(text) or not all(isinstance(t, str) for t in text):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if len(text) == 0:
        raise ValueError("text is an empty batch")
    if text_pair is None:
        return list(text), None
    if not is_batch(text_pair) or not all(isinstance(t, str) for t in text_pair):
        raise TypeError(f"text is a list, so text_pair must be a list of strings of the same length, "
                        f"got {type(text_pair).__name__}")
    if len(text_pair) != len(text):
        raise ValueError(f"text has {len(text)} entries but text_pair has {len(text_pair)}")
    return list(text), list(text_pair)


def _choice(name: str, value, table: dict):
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name} must be one of {sorted(map(repr, table))}, got {value!r}") from None


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _serial(inputs) -> bool:
    """Whether a batch is encoded text by text on this thread (``SERIAL_UP_TO_CHARS``)."""
    return len(inputs) <= 1 or sum(len(x[0]) + len(x[1]) if isinstance(x, tuple) else len(x)
                                   for x in inputs) <= SERIAL_UP_TO_CHARS
