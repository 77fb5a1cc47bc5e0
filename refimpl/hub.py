"""Finding a model: a local folder, a model shipped with refimpl, or a Hugging Face Hub repository.

    folder = resolve("andreasmadsen/efficient_mlm_m0.40")   # downloads into the standard HF cache
    folder = resolve("path/to/folder")                      # a local folder is used as it is
    folder = resolve("tiny")                                # a random checkpoint shipped with refimpl (SHIPPED)

Only the files a RoBERTa-PreLayerNorm model needs are fetched: ``config.json``; the tokenizer files
that exist among :data:`refimpl.io.TOKENIZER_FILES`; and the weights: ``model.safetensors`` (or its
index and shards) when the repository has safetensors, else ``pytorch_model.bin`` (or its index and
shards). Which files those are is :mod:`refimpl.io`'s knowledge (one list, one locator); a shard
index is read as hostile input there (its shard names must be plain file names).

Downloads go through ``huggingface_hub`` (its cache layout, its progress bars, its handling of
``HF_TOKEN``/``HF_HOME``/``HF_HUB_CACHE``). With ``HF_HUB_OFFLINE=1`` nothing touches the network:
the files come from the cache, and an uncached repository raises :class:`ModelNotFoundError` saying
how to get them. This module reads files and paths only: it knows no tensor format.
"""

from __future__ import annotations

import os
from typing import Iterable

from .io import TOKENIZER_FILES, WEIGHT_FORMATS, locate_weights, read_shard_index, weight_files, weights_format

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


class ModelNotFoundError(FileNotFoundError):
    """No model under that name: not a folder, not shipped, not on the Hub or not in the cache."""


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set, in the environment now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


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
        missing += [os.path.basename(p) for p in locate_weights(folder, must_exist=False).files if not os.path.isfile(p)]
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
    for _, single, index in WEIGHT_FORMATS:
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
        files += sorted(set(read_shard_index(index_path, index.split(".")[1]).values()))
    return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=files)
