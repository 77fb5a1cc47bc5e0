"""Where Numba keeps refimpl's compiled code, so that a kernel compiles once per machine, not once per process.

Every Numba function of refimpl is declared with ``cache=True``: its machine code goes to disk at
its first compile and later processes load it (a fraction of a second instead of seconds). Numba
looks for a place to write, in this order: ``NUMBA_CACHE_DIR`` when set; the ``__pycache__``
folder beside the source (an editable install or a writable ``site-packages``); the per-user cache
(``~/.cache/numba``). When none of them can be written (a read-only install and a read-only home,
as in some containers) Numba would refuse to load the module at all, so :func:`ensure` points it
at a per-user folder under the system's temporary directory instead (:func:`fallback_dir`).

:func:`ensure` runs before refimpl declares its first Numba function (``refimpl.fast`` on import,
the reference's ``erf`` on first use). :func:`cache_dir` answers where a given source file's
compiled code goes, so a test or a user can check that the cache really is written and read.
"""

from __future__ import annotations

import os
import tempfile

_ensured = False
FALLBACK_ENV = "REFIMPL_NUMBA_CACHE_DIR"  # overrides fallback_dir(); NUMBA_CACHE_DIR overrides everything


def _writable(folder: str) -> bool:
    """Whether ``folder`` can be created (if missing) and written, tested as Numba tests it."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _user_wide_dir() -> str | None:
    """Numba's per-user cache folder (``~/.cache/numba`` on Linux), or None if Numba lacks it."""
    try:
        from numba.misc.appdirs import AppDirs
    except ImportError:  # pragma: no cover - a Numba without its vendored appdirs
        return None
    return AppDirs(appname="numba", appauthor=False).user_cache_dir


def package_dirs() -> list[str]:
    """The folders of refimpl that hold Numba functions (their ``__pycache__`` is Numba's in-tree cache)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [here, os.path.join(here, "fast")]


def fallback_dir() -> str:
    """The folder used when neither the package nor the per-user cache can be written."""
    explicit = os.environ.get(FALLBACK_ENV)
    if explicit:
        return explicit
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"refimpl-numba-cache-{uid}")


def choose(package_dirs: list[str], user_dir: str | None, numba_cache_dir: str | None) -> str | None:
    """The folder to give Numba as its cache directory, or None when Numba's own choice works.

    None when ``NUMBA_CACHE_DIR`` is set (the user's choice), or when every package folder's
    ``__pycache__`` is writable, or else the per-user cache is; otherwise :func:`fallback_dir`.
    """
    if numba_cache_dir:
        return None
    if all(_writable(os.path.join(d, "__pycache__")) for d in package_dirs):
        return None
    if user_dir is not None and _writable(user_dir):
        return None
    return fallback_dir()


def ensure() -> str | None:
    """Make sure Numba has a writable cache folder for refimpl's functions; idempotent.

    Returns the folder it set (None when Numba's own choice stands). Must run before a
    ``cache=True`` function is declared: Numba picks the folder at declaration.
    """
    global _ensured
    if _ensured:
        return None
    from numba.core import config

    _ensured = True
    chosen = choose(package_dirs(), _user_wide_dir(), config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR"))
    if chosen is not None:
        os.makedirs(chosen, mode=0o700, exist_ok=True)
        config.CACHE_DIR = chosen
    return chosen


def cache_dir(dispatcher) -> str | None:
    """Where a ``cache=True`` Numba function (a dispatcher or a ``vectorize`` ufunc) keeps its code."""
    cache = getattr(dispatcher, "_cache", None)
    if cache is None:  # a DUFunc / ufunc: its dispatcher holds the cache
        inner = getattr(dispatcher, "_dispatcher", None)
        cache = getattr(inner, "cache", None) or getattr(inner, "_cache", None)
    return getattr(cache, "cache_path", None)
