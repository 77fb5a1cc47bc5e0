"""Writing files so that a reader sees the old version or the new one, never half of one.

* :func:`interrupt_on_signals`: while a write is under way, SIGTERM and SIGHUP raise
  :class:`Interrupted` (a ``KeyboardInterrupt``) just as Ctrl-C does, so that the same cleanup runs
  for ``kill``, ``timeout``, a closed terminal and a container stop. Only handlers left at the
  default are replaced, only in the main thread, and they are restored afterwards.
* :func:`signals_ignored`: cleanup code runs with SIGINT/SIGTERM/SIGHUP ignored, so that a second
  signal cannot leave a half-removed temporary folder.
* :func:`fsync_file` / :func:`fsync_dir`: data and renames reach the disk before a write is
  reported done.
* :func:`swap_in`: a finished folder takes the place of an existing one, in one step where the OS
  offers it (Linux ``renameat2(RENAME_EXCHANGE)``), else by two renames that put the old version
  back if the second fails.
* :func:`temp_name`: a recognisable temporary name beside the target, carrying this host and
  process, so that a later run can tell its own stale leftovers (:func:`stale_temp_owner`) from a
  write still in progress, and never touches anything else.

SIGKILL (and a power loss) cannot be caught: what a write leaves then is a temporary file or
folder beside its target, named by :func:`temp_name`; the target itself is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from typing import Iterator

__all__ = ["Interrupted", "interrupt_on_signals", "signals_ignored", "fsync_file", "fsync_dir", "temp_name",
           "stale_temp_owner", "renameat2", "swap_in", "remove_tree"]

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived during a write; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP raise :class:`Interrupted` inside the block (where their handler is the default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP are ignored inside the block (cleanup that must finish)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the renames inside the folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a folder
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_name(target: str, kind: str = "tmp") -> str:
    """A fresh temporary path beside ``target``: ``.NAME.refimpl-KIND-HOST-PID-RANDOM``."""
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{name}.refimpl-{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


_TEMP_RX = re.compile(r"\.(?P<name>.+)\.refimpl-(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d{1,10})-[0-9a-f]{8}\Z")


def stale_temp_owner(entry: str) -> tuple[str, str] | None:
    """For a folder entry named by :func:`temp_name` on this host by a process that no longer
    runs: ``(the target's name, kind)``; None for anything else (including live writes)."""
    m = _TEMP_RX.match(entry)
    if m is None or m.group("host") != _host_tag():
        return None
    pid = int(m.group("pid"))
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return m.group("name"), m.group("kind")
    except (PermissionError, OSError):
        return None  # alive (another user's process) or unknown: leave it
    return None


def remove_tree(path: str) -> None:
    """Remove a folder (or a file or link) that this process wrote."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


_AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux ``renameat2``; False where the system or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def swap_in(tmp: str, dst: str) -> None:
    """Put the finished folder ``tmp`` in the place of the existing ``dst`` and remove the old one:
    one step where the OS offers it (both exist at every instant); else ``dst`` is renamed aside
    (:func:`temp_name` ``"old"``), ``tmp`` renamed to ``dst``, and the old version put back if that
    fails. Killed between the two renames, the old version waits under its temporary name for the
    next run's sweep to put it back. Call it with signals ignored (:func:`signals_ignored`)."""
    if renameat2(tmp, dst, RENAME_EXCHANGE):  # dst is new, tmp holds the old version
        remove_tree(tmp)
        return
    old = temp_name(dst, "old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    remove_tree(old)
