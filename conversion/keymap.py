"""Key tables: how another checkpoint format names the rows of refimpl's ONE key table.

refimpl.params.hf_key_table lists every parameter as ``Entry(tree path, Hugging Face key, shape)``.
A converter does not copy that table; it names the *tree paths* in its own format with a short
table of patterns, and :func:`apply_table` maps a foreign state dict onto tree paths. The converter
then turns the paths into Hugging Face keys with :func:`hf_state` (the one table again) and hands
them to :func:`refimpl.loading.params_from_state_dict`, which checks every shape and reports every
missing tensor. Every source key must be matched by the table or listed as ignored: nothing is
dropped silently.

Pattern placeholders: ``{i}`` a layer index, ``{wb}`` ``weight`` or ``bias``; any other ``{name}``
must be given a value (``values={"head": "mnli"}``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from refimpl.config import Config
from refimpl.params import hf_key_table
from refimpl.io import CheckpointError, short_repr

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "wb": r"(?P<wb>weight|bias)"}


class ConversionError(CheckpointError):
    """A checkpoint that cannot be converted; the message says why and, where there is one, the fix.

    A :class:`refimpl.CheckpointError`, like every refusal of a checkpoint that refimpl itself
    makes (a post-LayerNorm RoBERTa, a missing tensor)."""


def _compile(pattern: str, values: Mapping[str, str]) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        name = m.group(1)
        if name in _PLACEHOLDERS:
            out.append(_PLACEHOLDERS[name])
        elif name in values:
            out.append(re.escape(values[name]))
        else:
            raise KeyError(f"pattern {pattern!r} needs a value for {{{name}}}")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


def apply_table(
    state: Mapping[str, Any],
    table: Iterable[tuple[str, str]],
    ignored: Iterable[str] = (),
    values: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Map ``state`` (source key -> array) onto refimpl tree paths.

    table: ``(source pattern, tree path pattern)`` pairs; ignored: source patterns that are known
    and deliberately not converted (buffers, version counters). Returns ``({tree path: array},
    [source keys that nothing matched])``. Two source keys mapping to one path is an error.
    """
    values = dict(values or {})
    compiled = [(_compile(src, values), dst) for src, dst in table]
    skip = [_compile(p, values) for p in ignored]
    leaves: dict[str, Any] = {}
    origin: dict[str, str] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for rx, dst in compiled:
            m = rx.match(key)
            if m:
                path = dst.format(**m.groupdict())
                if path in leaves:
                    raise ConversionError(f"both {short_repr(origin[path])} and {short_repr(key)} map to {path!r}")
                leaves[path], origin[path] = value, key
                break
        else:
            if not any(rx.match(key) for rx in skip):
                unmatched.append(key)
    return leaves, unmatched


def hf_state(config: Config, task: str, leaves: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Tree paths -> Hugging Face keys for ``task`` through refimpl's one table.

    Returns ``(state dict, [tree paths this task has no place for])``; the caller decides whether
    those may be dropped (another head) or are an error.
    """
    table = hf_key_table(config, task, with_pooler=True)
    by_path = {e.path: e.key for e in table}
    state = {by_path[p]: a for p, a in leaves.items() if p in by_path}
    return state, sorted(p for p in leaves if p not in by_path)


def describe_keys(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


class Loaded:
    """A converted checkpoint: the model plus what the converter learnt about its source.

    model: the refimpl :class:`~refimpl.model.Model`; format: ``hf``, ``bin``, ``original`` or
    ``fairseq``; source: the file or folder read; source_dtype: the floating dtype holding most of
    the source's parameters (an export keeps it unless told otherwise); folder: where tokenizer
    files may be found (None for none); notes: what was dropped or changed, one line each.
    """

    def __init__(self, model, format: str, source: str, source_dtype: str, folder: str | None, notes: list[str] | None = None):
        self.model = model
        self.format = format
        self.source = source
        self.source_dtype = source_dtype
        self.folder = folder
        self.notes = list(notes or [])

    def __repr__(self) -> str:
        return f"Loaded(format={self.format!r}, source={self.source!r}, source_dtype={self.source_dtype!r}, model={self.model!r})"
