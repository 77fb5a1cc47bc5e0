"""The first answer: the backend chosen per model, erf without a compile, lazy imports, the compile cache.

No timing here (benchmarks/cli_latency.py measures); these check the mechanisms that make the first
call cheap and that none of them changes an output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import refimpl
from refimpl import backend, jitcache, tasks
from refimpl.model import AUTO_NUMBA_FROM_HIDDEN, auto_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter (the checkout first on the path); its stdout."""
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# backend="auto": one choice per model, from its config
# ---------------------------------------------------------------------------------------------


def test_auto_backend_follows_the_config_only():
    tiny = refimpl.from_pretrained("tiny")
    assert tiny.config.hidden_size < AUTO_NUMBA_FROM_HIDDEN and tiny.backend == "numpy"
    big = dataclasses.replace(tiny.config, hidden_size=AUTO_NUMBA_FROM_HIDDEN)
    assert auto_backend(big) == "numba" and auto_backend(tiny.config) == "numpy"
    # forced backends stay forced, whatever the size
    assert refimpl.from_pretrained("tiny", backend="numba").backend == "numba"
    assert tiny.to("numba").backend == "numba" and tiny.to("numba").to("auto").backend == "numpy"
    assert refimpl.Model(tiny.config, tiny.params, "masked-lm", backend="auto").backend == "numpy"
    assert refimpl.Model(big, tiny.params, "masked-lm", backend="auto").backend == "numba"
    with pytest.raises(ValueError, match="backend must be one of auto, numba, numpy, cupy"):
        tiny.to("fast")


@pytest.mark.parametrize("threshold, expected", [(AUTO_NUMBA_FROM_HIDDEN, "reference"), (0, "fast")])
def test_one_model_runs_one_path_whatever_the_input_size(monkeypatch, threshold, expected):
    """The same auto model takes the same path for one token and for a long batch."""
    import refimpl.fast.tasks as fast_tasks
    import refimpl.model

    monkeypatch.setattr(refimpl.model, "AUTO_NUMBA_FROM_HIDDEN", threshold)
    model = refimpl.from_pretrained("tiny", dtype="float64")
    ran = []
    for name, table in (("reference", tasks.FORWARD), ("fast", fast_tasks.FORWARD)):
        inner = table["masked-lm"]
        monkeypatch.setitem(table, "masked-lm", lambda *a, _inner=inner, _name=name: ran.append(_name) or _inner(*a))
    rng = np.random.default_rng(0)
    for batch, length in ((1, 3), (4, 300)):
        ids = rng.integers(3, model.config.vocab_size, size=(batch, length))
        ids[:, 0], ids[:, -1] = 0, 2
        model(input_ids=ids)
    assert ran == [expected, expected]


# ---------------------------------------------------------------------------------------------
# erf: the C library's, called directly for small arrays, through Numba for large ones: same bits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_erf_direct_and_numba_give_the_same_bits(dtype):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(3000) * 3, rng.standard_normal(1000) * 1e-3,
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-310, -1e-310, 3.9, 5.9, 6.1, 30.0]]).astype(dtype)
    direct = backend._libm_erf()[np.dtype(dtype)]
    by_libm = np.array([direct(v) for v in x.tolist()], dtype)
    by_numba = backend._get_numba_erf(np.dtype(dtype))(x)
    assert by_numba.dtype == x.dtype
    np.testing.assert_array_equal(by_libm.view(f"i{x.itemsize}"), by_numba.view(f"i{x.itemsize}"))
    np.testing.assert_array_equal(backend.erf(x[:7].reshape(7, 1)), by_numba[:7].reshape(7, 1))


def test_erf_takes_the_ufunc_once_the_direct_budget_is_spent(monkeypatch):
    """Small arrays go the direct way until the process has spent ERF_DIRECT_BUDGET elements there,
    then through the Numba ufunc (same values either way)."""
    monkeypatch.setattr(backend, "_numba_erf", {})
    monkeypatch.setattr(backend, "_direct_used", 0)
    monkeypatch.setattr(backend, "ERF_DIRECT_BUDGET", 1000)
    x = np.linspace(-4, 4, 600, dtype=np.float32)
    first = backend.erf(x)
    assert backend._direct_used == 600 and not backend._numba_erf
    second = backend.erf(x)  # would pass the budget: the ufunc
    assert np.dtype(np.float32) in backend._numba_erf and backend._direct_used == 600
    np.testing.assert_array_equal(first.view(np.int32), second.view(np.int32))


def test_erf_keeps_dtype_and_shape_for_small_arrays():
    for dtype, want in (("float32", "float32"), ("float64", "float64"), ("float16", "float32"), ("int64", "float64")):
        y = backend.erf(np.arange(6, dtype=dtype).reshape(2, 3))
        assert y.dtype == want and y.shape == (2, 3)
    assert backend.erf(np.zeros((0, 4))).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Imports: only what a command uses
# ---------------------------------------------------------------------------------------------

_HEAVY = ("numba", "tqdm", "dask", "pyarrow", "torch", "scipy", "refimpl.fast", "refimpl.golden", "refimpl.finetune")


def test_version_imports_nothing_heavy():
    out = _python("import sys\nfrom refimpl import cli\ntry:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
                  f"print([m for m in {_HEAVY!r} if m in sys.modules])")
    assert out.splitlines() == ["refimpl " + refimpl.__version__, "[]"]


def test_fill_mask_on_tiny_loads_no_numba():
    out = _python("import sys\nfrom refimpl import cli\ncli.main(['fill-mask', '--model', 'tiny', '--json', 'Hi <mask>'])\n"
                  f"print(json.dumps([m for m in {_HEAVY!r} if m in sys.modules]))".replace("import sys", "import sys, json"))
    lines = out.splitlines()
    assert json.loads(lines[-1]) == [] and json.loads(lines[0])["result"]


@pytest.mark.skipif(not backend.NUMPY_IS_ARRAY_API, reason="NumPy < 2.1 takes array-api-compat's namespace")
def test_numpy_arrays_take_numpy_itself_as_their_namespace():
    """NumPy 2.1+ implements the Array API standard in its main namespace (the functions
    array-api-compat's NumPy namespace wraps): refimpl takes ``numpy`` itself, so a tiny answer
    never builds the wrapper, whose construction imports numpy.testing, numpy.f2py and more."""
    assert backend.namespace(np.ones(2), None) is np
    wrapper = ("array_api_compat.numpy", "numpy.testing", "numpy.f2py")
    out = _python("import sys, json\nfrom refimpl import cli\ncli.main(['fill-mask', '--model', 'tiny', '--json', 'Hi <mask>'])\n"
                  f"print(json.dumps([m for m in {wrapper!r} if m in sys.modules]))")
    assert json.loads(out.splitlines()[-1]) == []


def test_light_parser_has_every_command_but_the_heavy_ones():
    from refimpl import cli

    def commands(parser):
        return list(next(a for a in parser._actions if a.dest == "command").choices)

    full, light = commands(cli.build_parser()), commands(cli.build_parser(heavy=False))
    assert light == list(cli._LIGHT_COMMANDS)
    assert full[:len(light)] == light and set(full) - set(light) == {"golden", "compare", "dump", "finetune"}


# ---------------------------------------------------------------------------------------------
# The compile cache
# ---------------------------------------------------------------------------------------------


def _blocked(tmp_path) -> str:
    """A folder no one can create, root included: its parent is a file."""
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "sub")


def test_cache_folder_choice(tmp_path, monkeypatch):
    writable, blocked = str(tmp_path / "pkg"), _blocked(tmp_path)
    monkeypatch.delenv(jitcache.FALLBACK_ENV, raising=False)
    assert jitcache.choose([writable], None, None) is None  # in-tree __pycache__: Numba's own choice
    assert jitcache.choose([blocked], str(tmp_path / "user"), None) is None  # the per-user cache
    assert jitcache.choose([blocked], blocked, "/somewhere") is None  # NUMBA_CACHE_DIR is the user's word
    assert jitcache.choose([writable, blocked], blocked, None) == jitcache.fallback_dir()
    assert jitcache.fallback_dir().startswith(tempfile.gettempdir())
    monkeypatch.setenv(jitcache.FALLBACK_ENV, str(tmp_path / "fallback"))
    assert jitcache.choose([blocked], None, None) == str(tmp_path / "fallback")


def test_unwritable_install_still_caches_and_hits(tmp_path):
    """A read-only package and home: the kernels' code goes to the fallback folder and the next
    process loads it from there (a cache hit, not a second compile)."""
    blocked, fallback = _blocked(tmp_path), str(tmp_path / "fallback")
    code = f"""
import json
import numpy as np
from refimpl import jitcache
jitcache.package_dirs = lambda: [{blocked!r}]
jitcache._user_wide_dir = lambda: {blocked!r}
from refimpl.fast import reductions
reductions.pairwise_sum(np.ones(40))
d = reductions.pairwise_sum
print(json.dumps([jitcache.cache_dir(d), sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]))
"""
    env = {jitcache.FALLBACK_ENV: fallback, "NUMBA_CACHE_DIR": ""}
    first = json.loads(_python(code, env).splitlines()[-1])
    second = json.loads(_python(code, env).splitlines()[-1])
    assert first[0].startswith(fallback) and second[0] == first[0]
    assert first[1:] == [0, 1] and second[1:] == [1, 0]
