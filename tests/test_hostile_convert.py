"""refimpl-convert never deletes what it did not write, and an interrupted conversion leaves nothing.

The kinds:

* data loss: ``--force`` once renamed DST aside and deleted it recursively whatever it held (an
  unrelated folder of user files; DST = the parent of SRC deleted the source), exit status 0;
* debris: SIGTERM and SIGHUP (``kill``, ``timeout``, a closed terminal) left hidden temporary
  folders that nothing removed; SIGKILL between the two renames of a replace left DST missing; a
  write that failed half-way (a file size limit, a full disk) was a ``SafetensorError`` traceback
  and left the parent folders it had created.

Signals are sent by the conversion process to itself at a chosen moment (a wrapper around the one
safetensors writer), so every run is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from refimpl.io import atomic
from refimpl_conversion import cli, exporter as export_mod

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refimpl", "data", "tiny-random-mlm")


def leftovers(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if "refimpl-tmp" in n or "refimpl-old" in n)


def convert(*args) -> int:
    return cli.main([TINY, *map(str, args)])


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (signals and resource limits stay out of the test process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})


# ---- --force replaces only what an export could have written ----------------------------------


def test_force_refuses_an_unrelated_folder(tmp_path, capsys):
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"precious")
    (dst / "config.json").write_text("{}")  # a name we write is not enough: the folder holds more
    assert convert(dst, "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds what refimpl-convert does not write ('holiday.jpg')" in err
    assert (dst / "holiday.jpg").read_bytes() == b"precious" and not leftovers(tmp_path)


def test_force_refuses_the_folder_holding_the_source(tmp_path, capsys):
    src = tmp_path / "models" / "src"
    os.makedirs(src)
    for name in os.listdir(TINY):
        (src / name).write_bytes(open(os.path.join(TINY, name), "rb").read())
    for dst in (src.parent, src):  # the parent of SRC, and SRC itself
        assert cli.main([str(src), str(dst), "--force"]) == 2
        assert "holds the source" in capsys.readouterr().err
    assert sorted(os.listdir(src)) == sorted(os.listdir(TINY))


def test_force_refuses_a_file_and_a_symlink(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert convert(tmp_path / "notes.txt", "--force") == 2
    assert "is a file, not a model folder" in capsys.readouterr().err
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert convert(tmp_path / "link", "--force") == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.path.islink(tmp_path / "link")


def test_force_replaces_an_earlier_export_and_an_empty_folder(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    assert convert(dst, "--force") == 0  # an empty folder
    assert convert(dst, "--force", "--dtype", "float16", "--max-shard-size", "20KB") == 0  # an earlier export
    files = os.listdir(dst)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    with open(dst / "config.json") as f:
        assert json.load(f)["dtype"] == "float16"
    assert not leftovers(tmp_path)


def test_the_swap_is_one_step_where_the_os_offers_it(tmp_path):
    """renameat2(RENAME_EXCHANGE): both folders exist at every instant (Linux; skipped elsewhere)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.renameat2(str(a), str(b), atomic.RENAME_EXCHANGE):  # the OS capability itself
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ---- signals, SIGKILL, write failures ------------------------------------------------------------

_SIGNAL_AFTER_FIRST_SHARD = """
import os, signal, sys
import refimpl_conversion.exporter as ex
from refimpl_conversion import cli
real, calls = ex.write_safetensors, []
def writer(*a, **k):
    real(*a, **k)
    calls.append(1)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.{sig})
ex.write_safetensors = writer
{extra}
sys.exit(cli.main([{src!r}, {dst!r}, "--max-shard-size", "10KB"{force}]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
def test_signals_clean_up_like_ctrl_c(sig, existing, tmp_path):
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "config.json").write_text('{"old": true}')
    r = run_child(_SIGNAL_AFTER_FIRST_SHARD.format(sig=sig, src=TINY, dst=str(dst), extra="",
                                                    force=', "--force"' if existing else ""))
    signum = getattr(signal, sig)
    assert r.returncode == 128 + signum, r.stderr
    assert r.stderr.strip() == f"refimpl-convert: interrupted ({sig}); nothing was written"
    assert os.listdir(tmp_path) == (["out"] if existing else [])
    if existing:
        assert os.listdir(dst) == ["config.json"] and (dst / "config.json").read_text() == '{"old": true}'


def test_sigkill_leaves_a_temporary_folder_that_the_next_run_removes(tmp_path, capsys):
    dst = tmp_path / "out"
    r = run_child(_SIGNAL_AFTER_FIRST_SHARD.format(sig="SIGKILL", src=TINY, dst=str(dst), extra="", force=""))
    assert r.returncode == -signal.SIGKILL
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.refimpl-tmp-") and not os.path.exists(dst)
    (tmp_path / ".out.refimpl-tmp-0123abcd-1-0123abcd").mkdir()  # another host's: never touched
    (tmp_path / "keep").mkdir()
    assert convert(tmp_path / "other") == 0  # any later export into the same parent folder sweeps it
    assert leftovers(tmp_path) == [".out.refimpl-tmp-0123abcd-1-0123abcd"]
    assert sorted(os.listdir(tmp_path)) == [".out.refimpl-tmp-0123abcd-1-0123abcd", "keep", "other"]


def test_sigkill_between_the_two_renames_is_repaired_by_the_next_run(tmp_path):
    """Where the swap takes two renames, a SIGKILL between them leaves DST missing and the old
    version parked; the next run puts it back (and then replaces it, with --force)."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text('{"old": true}')
    code = f"""
    import os, signal, sys
    import refimpl_conversion.exporter as ex
    from refimpl_conversion import cli
    import refimpl.io.atomic as at
    at.renameat2 = lambda src, dst, flags: False  # the non-Linux path: two renames
    real = os.rename
    def rename(a, b):
        real(a, b)
        if ".refimpl-old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
    os.rename = rename
    sys.exit(cli.main([{TINY!r}, {str(dst)!r}, "--force"]))
    """
    assert run_child(code).returncode == -signal.SIGKILL
    assert not os.path.exists(dst) and len(leftovers(tmp_path)) == 2  # the new version, the parked old one
    assert export_mod.sweep_stale(str(tmp_path))
    assert os.listdir(tmp_path) == ["out"] and (dst / "config.json").read_text() == '{"old": true}'


def test_a_write_that_fails_half_way_is_one_line_and_leaves_no_folders(tmp_path):
    """RLIMIT_FSIZE (the same OSError path as a full disk): exit 2, one line, no new folders."""
    dst = tmp_path / "new" / "deeper" / "out"
    code = f"""
    import resource, sys
    from refimpl_conversion import cli
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    sys.exit(cli.main([{TINY!r}, {str(dst)!r}]))
    """
    r = run_child(code)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("refimpl-convert: error:") and "File too large" in err, err
    assert os.listdir(tmp_path) == []
