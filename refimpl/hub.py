"""Finding a model: a local folder, a model shipped with refimpl, or a Hugging Face Hub repository.

    folder = resolve("andreasmadsen/efficient_mlm_m0.40")   # downloads into the standard HF cache
    folder = resolve("path/to/folder")                      # a local folder is used as it is
    folder = resolve("tiny")                                # a random checkpoint shipped with refimpl (SHIPPED)

Only the files a RoBERTa-PreLayerNorm model needs are fetched: ``config.json``; the tokenizer files
that exist among ``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``; and the weights: ``model.safetensors`` (or its index and shards) when
the repository has safetensors, else ``pytorch_model.bin`` (or its index and shards).

Downloads go through ``huggingface_hub`` (its cache layout, its progress bars, its handling of
``HF_TOKEN``/``HF_HOME``/``HF_HUB_CACHE``). With ``HF_HUB_OFFLINE=1`` nothing touches the network:
the files come from the cache, and an uncached repository raises :class:`ModelNotFoundError` saying
how to get them. This module reads files and paths only: it knows no tensor format.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

__all__ = [
    "ModelNotFoundError", "SHIPPED", "TOKENIZER_FILES", "resolve", "weights_format", "weight_files",
    "is_offline",
]

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# The tiny random checkpoints shipped with refimpl (scripts/make_tiny_checkpoint.py; each folder's
# README.md is its model card): name -> folder. Predictions are meaningless; they run the examples.
SHIPPED = {name: os.path.join(_DATA, folder) for name, folder in (
    ("tiny", "tiny-random-mlm"),                                # masked LM, RoBERTa's vocabulary
    ("tiny-classify", "tiny-random-sequence-classification"),  # labels negative/positive
    ("tiny-tag", "tiny-random-token-classification"),          # CoNLL-2003 NER labels
    ("tiny-qa", "tiny-random-question-answering"),
    ("tiny-choose", "tiny-random-multiple-choice"),
    ("tiny-generate", "tiny-random-causal-lm"),                 # is_decoder=True
)}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_WEIGHTS = (  # (format, single file, index file), in order of preference
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


class ModelNotFoundError(FileNotFoundError):
    """No model under that name: not a folder, not shipped, not on the Hub or not in the cache."""


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, in the environment now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def weights_format(folder: str | os.PathLike) -> str | None:
    """``"safetensors"``, ``"safetensors-sharded"``, ``"bin"``, ``"bin-sharded"``, or None (no weights).

    safetensors wins when a folder has both formats.
    """
    for fmt, single, index in _WEIGHTS:
        if os.path.isfile(os.path.join(folder, single)):
            return fmt
        if os.path.isfile(os.path.join(folder, index)):
            return f"{fmt}-sharded"
    return None


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The weight files :func:`weights_format` chose, as paths (a sharded index lists its shards)."""
    folder = os.fspath(folder)
    fmt = weights_format(folder)
    if fmt is None:
        raise FileNotFoundError(
            f"no weights in {folder!r}: looked for model.safetensors, model.safetensors.index.json, "
            f"pytorch_model.bin and pytorch_model.bin.index.json")
    kind = fmt.split("-")[0]
    _, single, index = next(w for w in _WEIGHTS if w[0] == kind)
    if not fmt.endswith("sharded"):
        return [os.path.join(folder, single)]
    return [os.path.join(folder, shard) for shard in _shards(os.path.join(folder, index))]


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(f"{index_path}: not a readable shard index (no weight_map: {e})") from None
    return sorted(set(weight_map.values()))


def _looks_like_path(name: str) -> bool:
    """A name that can only be meant as a local path (a Hub id is ``name`` or ``org/name``)."""
    return (name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or os.path.exists(name))


def _how_to_get(repo_id: str) -> str:
    online = ("unset HF_HUB_OFFLINE so that refimpl downloads it" if is_offline()
              else "check the network connection")
    return (f"download it while online (`hf download {repo_id}`, or `huggingface-cli download {repo_id}` "
            f"with older huggingface_hub), {online}, or pass a local folder that holds config.json, the "
            f"tokenizer files and the weights")


def resolve(model: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None) -> str:
    """A local folder holding the model named ``model``; downloads what is missing from the Hub.

    model: a local folder (used as is), ``"tiny"`` or another name of :data:`SHIPPED` (the random
        checkpoints shipped with refimpl) or a Hub repository id such as
        ``"andreasmadsen/efficient_mlm_m0.40"``.
    revision: a branch, tag or commit of the Hub repository (default: its main branch).
    cache_dir: the Hub cache folder (default: huggingface_hub's, i.e. ``HF_HUB_CACHE``).
    token: a Hub token for private or gated repositories (default: huggingface_hub's, i.e. ``HF_TOKEN``
        or the saved login).

    Raises :class:`ModelNotFoundError` (a ``FileNotFoundError``) with the reason and what to do.
    """
    name = os.fspath(model)
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError("the model name is empty: give a local folder or a Hub id such as org/name")
    if os.path.isdir(name):
        return name
    if name in SHIPPED:
        return SHIPPED[name]
    if _looks_like_path(name):
        what = "is a file, not a folder" if os.path.isfile(name) else "does not exist"
        raise ModelNotFoundError(f"model folder {name!r} {what}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ModelNotFoundError(f"{name!r} is neither a local folder nor a valid Hub id ({e})") from None
    if is_offline():
        return _from_cache(name, revision, cache_dir, reason="HF_HUB_OFFLINE is set")
    return _download(name, revision, cache_dir, token)


def _from_cache(repo_id: str, revision, cache_dir, reason: str) -> str:
    """The cached snapshot of ``repo_id`` at ``revision``, checked for a config and weights; no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                   allow_patterns=["config.json"])
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        # IncompleteSnapshotError is a LocalEntryNotFoundError too.
        raise ModelNotFoundError(
            f"{repo_id!r}{rev} is not in the Hugging Face cache ({reason}): {_how_to_get(repo_id)}") from e
    missing = [] if os.path.isfile(os.path.join(folder, "config.json")) else ["config.json"]
    if weights_format(folder) is None:
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    else:
        missing += [os.path.basename(p) for p in weight_files(folder) if not os.path.isfile(p)]
    if missing:
        raise ModelNotFoundError(
            f"the cached copy of {repo_id!r}{rev} lacks {', '.join(missing)} ({reason}): {_how_to_get(repo_id)}")
    return folder


def choose_files(repo_files: Iterable[str]) -> tuple[list[str], str | None]:
    """From a repository's file list: (config + tokenizer files + the preferred weights, its index or None).

    A sharded checkpoint returns its index as the second element: the shards are named inside it.
    """
    files = set(repo_files)
    chosen = [f for f in ("config.json", *TOKENIZER_FILES) if f in files]
    for _, single, index in _WEIGHTS:
        if single in files:
            return chosen + [single], None
        if index in files:
            return chosen + [index], index
    return chosen, None


def _download(repo_id: str, revision, cache_dir, token) -> str:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id!r} is gated: accept its terms on huggingface.co and log in (`hf auth login`) or set "
            f"HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder and not a model on the Hugging Face Hub (or it is private: "
            f"log in with `hf auth login` or set HF_TOKEN)") from None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, Exception) as e:
        # No network, a proxy or timeout error from the HTTP client, the Hub down: fall back on the
        # cache, as huggingface_hub itself does; the reason goes into the error if that fails too.
        return _from_cache(repo_id, revision, cache_dir,
                           reason=f"the Hub could not be reached: {type(e).__name__}: {e}")
    files, index = choose_files(s.rfilename for s in (info.siblings or []))
    if "config.json" not in files:
        raise ModelNotFoundError(f"{repo_id!r}{rev} has no config.json: it is not a transformers model repository")
    if index is None and not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise ModelNotFoundError(f"{repo_id!r}{rev} has no model.safetensors or pytorch_model.bin weights")
    if index is not None:
        index_path = hf_hub_download(repo_id, index, revision=revision, cache_dir=cache_dir, token=token)
        files += _shards(index_path)
    return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=files)
