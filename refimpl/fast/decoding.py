"""A decoding step's blocks in one compiled call: the encoder of :mod:`.tasks` for one new token.

A decoding step (a cache, one query position) is ~50 GEMMs that stream the weights plus a little
work per block (two LayerNorms, the cache append, the attention over the cache, GELU, two
residual adds). Run from Python, each of those ~10 calls a block costs more than it does hot: the
weights streamed between two calls push the interpreter's own data out of the caches. Here the
L blocks run in one Numba call that makes the same kernel calls in the same order, on the same
arrays: the same bits as :func:`.tasks.encode`, which ``tests/test_fast.py`` checks.

The GEMMs and the attention run as jobs on :mod:`.jobs`' board (both cores; the helper thread
claims chunks as it comes), exactly as :func:`.packed.packed_linear` (``cores=2``) and
:func:`.kernels.attention_few` post them; where those would keep to this core (a thread that keeps
to its own, one core, the helper serving another caller), the same driver and kernel run here.

Shape legend: B batch, R rows the GEMMs see (B, or B rounded up to a whole tile, the extra rows
zeros), H hidden, N heads, D = H / N, I intermediate, C the cache's capacity, P its length.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numba
import numpy as np

from . import jobs
from .jobs import ATTENTION_CHUNKS, ATTENTION_LIKE, attention_job, chunks_of, code_fingerprint, gemm_job, held_board
from .jobs import read_only
from .kernels import (LAYOUT_SIZE, attention_few_kernel, bias_gelu_inplace_kernel, layer_norm_row, layout_array,
                      layout_sizes)
from .llvm import DTYPES, JIT, pointer_like
from .packed import KC, MC, X_PACK_FROM, drive, panel_width, two_core_chunks, whole_tiles
from .schedule import packed_weight, this_core_only

# A plan's table: one row a layer, these addresses in it.
(_LN1W, _LN1B, _QKVW, _QKVB, _OUTW, _OUTB, _LN2W, _LN2B, _INW, _INB, _FFW, _FFB, _KEYS, _VALS, _COLS) = range(15)
# The step's sizes (an int64 vector): B, R, H, N, I, C, P, the packed weights' panel width, the
# packed GEMM's KC and MC, the mask's rows (1 or B, 0: no mask); then how each kind of job is cut
# (items a chunk, chunks; (0, 0): on this core): the q/k/v projection, the attention's output
# projection, W_1, W_2, the attention's (batch, head) pairs.
_NB, _NR, _HID, _NHEADS, _INTER, _CAP, _LEN, _WIDTH, _KC, _MC, _MB = range(11)
_QKV_JOB, _OUT_JOB, _IN_JOB, _FF_JOB, _ATT_JOB = range(11, 21, 2)
_SIZES = 21


def _make(fingerprint):
    """The compiled step's two functions, each with ``fingerprint`` (of the files whose code they
    compile in) as a closure cell, so in its cache key; the step reaches the other as a module
    global (a closure cell holding a dispatcher would keep a function out of Numba's cache)."""

    @numba.njit(**JIT)
    def linear(board, job, x, w, b, has_bias, out, nr, k, n_out, p, kc, mc):
        """``out[r*O + o] = x[r*K:(r+1)*K] . W[o] (+ b[o])`` for r < nr, as :func:`.packed.packed_linear`
        computes it on x read in place (nr < X_PACK_FROM): a job on the board cut as ``job`` says
        (items a chunk, chunks), or with no chunks on this core. w: the address of the packed
        weight's panels (width p); b: the bias's address (read only when ``has_bias``)."""
        fingerprint  # noqa: B018 (in the cache key)
        n_panels = (n_out + p - 1) // p
        pf = read_only(numba.carray(pointer_like(w, out), n_panels * k * p))  # [O/P * K * P], the panels
        bf = read_only(numba.carray(pointer_like(b, out), n_out if has_bias else 1))  # [O]
        scratch = np.empty(nr * p, out.dtype) if n_out % p else out  # [R, P], the partial last panel
        if job[1]:
            gemm_job(board, read_only(x), pf, bf, has_bias, out, scratch, nr, k, n_out, job[0], job[1], kc, mc)
        else:  # (the arguments' types as packed_linear's own call on one core: one specialisation)
            drive(read_only(x), pf, bf, has_bias, out, scratch, np.zeros(1, out.dtype), nr, k, n_out, kc, mc,
                  n_out - n_out, n_panels, job[1] != 0)

    @numba.njit(**JIT)
    def layers(table, sizes, eps, scale, h, mask, board, like):
        """The L blocks of ``encode`` for one new token. h: [R, H], the embeddings' LayerNorm in rows
        0..B-1 and zeros after, updated in place; table: [L, _COLS] addresses (``_Plan``'s, and each
        layer's key and value buffers [B, N, C, D]); sizes: ``_SIZES`` int64; eps: the LayerNorm's
        epsilon in h's dtype; scale: D**-0.5 in h's dtype, as a float64; mask: the bias
        [B|1, 1, 1, S], flat; board: the job board (read only by the jobs ``sizes`` asks for);
        like: ``jobs.ATTENTION_LIKE`` of h's dtype."""
        fingerprint  # noqa: B018 (in the cache key)
        dt = h.dtype
        nb, nr, hid, nh, inter = sizes[_NB], sizes[_NR], sizes[_HID], sizes[_NHEADS], sizes[_INTER]
        cap, pos, mb, p = sizes[_CAP], sizes[_LEN], sizes[_MB], sizes[_WIDTH]
        nd, ns = hid // nh, pos + 1  # D; S, the keys with this step's
        # (No literal as an argument: called from compiled code, a function compiles once more for
        # each literal value, and again apart from its calls from Python.)
        kc, mc, zero, n_pairs = sizes[_KC], sizes[_MC], np.int64(0), nb * nh
        has_mask = mb > 0
        yes = nb > 0
        no = not yes
        qkv_job, out_job = sizes[_QKV_JOB:_QKV_JOB + 2], sizes[_OUT_JOB:_OUT_JOB + 2]  # (items a chunk, chunks)
        in_job, ff_job, att_job = sizes[_IN_JOB:_IN_JOB + 2], sizes[_FF_JOB:_FF_JOB + 2], sizes[_ATT_JOB:_ATT_JOB + 2]
        n = dt.type(hid)  # (LayerNorm's divisor, in the dtype)
        one = np.zeros(1, dt)  # (the dtype, for pointer_like)
        ln = np.zeros((nr, hid), dt)  # [R, H] a LayerNorm's output (rows B.. stay zero)
        qkv = np.empty((nr, 3 * hid), dt)  # [R, 3H] q, k, v side by side
        ctx = np.zeros((nr, hid), dt)  # [R, H] the attention context, heads merged
        y = np.empty((nr, hid), dt)  # [R, H] a block's output projection
        mid = np.empty((nr, inter), dt)  # [R, I] the FFN's hidden layer
        lay = np.empty(LAYOUT_SIZE, np.int64)  # attention_few_kernel's layout vector
        bs, hs = (1 if nb > 1 else 0), (1 if nh > 1 else 0)  # (a stride along an axis of size 1 is 0)
        for i in range(table.shape[0]):
            t = table[i]
            # the attention block: h += W_o attention(LayerNorm(h)) + b_o
            w1, b1 = numba.carray(pointer_like(t[_LN1W], one), hid), numba.carray(pointer_like(t[_LN1B], one), hid)
            for r in range(nb):
                layer_norm_row(h[r], w1, b1, eps, n, ln[r])
            _linear(board, qkv_job, ln.ravel(), t[_QKVW], t[_QKVB], yes, qkv.ravel(), nr, hid, 3 * hid, p, kc, mc)
            keys = numba.carray(pointer_like(t[_KEYS], one), (nb, nh, cap, nd))  # [B, N, C, D]
            vals = numba.carray(pointer_like(t[_VALS], one), (nb, nh, cap, nd))
            for bi in range(nb):  # (cache.append: this step's k and v at position P)
                for hi in range(nh):
                    for d in range(nd):
                        keys[bi, hi, pos, d] = qkv[bi, hid + hi * nd + d]
                        vals[bi, hi, pos, d] = qkv[bi, 2 * hid + hi * nd + d]
            # q [B, N, 1, D] (in qkv), k and v [B, N, S, D] (the buffers), the mask [B|1, 1, 1, S]
            # and ctx as [B, N, 1, D], as kernels._layout describes them
            layout_sizes(lay, nh, 1, ns, nd, scale)
            layout_array(lay, 0, qkv.ctypes.data, (nb - 1) * 3 * hid + (nh - 1) * nd + nd, bs * 3 * hid, hs * nd, 0)
            kext = ((nb - 1) * nh * cap + (nh - 1) * cap + ns - 1) * nd + nd
            layout_array(lay, 1, keys.ctypes.data, kext, bs * nh * cap * nd, hs * cap * nd, nd if ns > 1 else 0)
            layout_array(lay, 2, vals.ctypes.data, kext, bs * nh * cap * nd, hs * cap * nd, nd if ns > 1 else 0)
            layout_array(lay, 3, mask.ctypes.data, mb * ns if has_mask else 1, ns if mb > 1 else 0, 0, 0)
            layout_array(lay, 4, ctx.ctypes.data, (nb - 1) * hid + (nh - 1) * nd + nd, bs * hid, hs * nd, 0)
            if att_job[1]:  # (as jobs.attention_on_two_cores posts it)
                attention_job(board, lay, has_mask, like, att_job[0], att_job[1], n_pairs)
            else:
                attention_few_kernel(lay, has_mask, like, zero, n_pairs)
            _linear(board, out_job, ctx.ravel(), t[_OUTW], t[_OUTB], yes, y.ravel(), nr, hid, hid, p, kc, mc)
            for r in range(nb):
                for j in range(hid):
                    h[r, j] = h[r, j] + y[r, j]
            # the feed-forward block: h += W_2 gelu(W_1 LayerNorm(h) + b_1) + b_2
            w2, b2 = numba.carray(pointer_like(t[_LN2W], one), hid), numba.carray(pointer_like(t[_LN2B], one), hid)
            for r in range(nb):
                layer_norm_row(h[r], w2, b2, eps, n, ln[r])
            _linear(board, in_job, ln.ravel(), t[_INW], t[_INB], no, mid.ravel(), nr, hid, inter, p, kc, mc)
            bias_gelu_inplace_kernel(mid, numba.carray(pointer_like(t[_INB], one), inter), yes)  # (rows B.. unread)
            _linear(board, ff_job, mid.ravel(), t[_FFW], t[_FFB], yes, y.ravel(), nr, inter, hid, p, kc, mc)
            for r in range(nb):
                for j in range(hid):
                    h[r, j] = h[r, j] + y[r, j]

    return linear, layers


_linear, _layers = _make(code_fingerprint("jobs.py"))


def _layer_leaves(layer) -> tuple:
    """The arrays a block reads (the key and value buffers aside): the attention's LayerNorm, q, k
    and v weights, their biases, its output projection, the FFN's LayerNorm, W_1, W_2."""
    a = layer.attention
    return (a.layer_norm.weight, a.layer_norm.bias, a.query.weight, a.key.weight, a.value.weight, a.query.bias,
            a.key.bias, a.value.bias, a.output.weight, a.output.bias, layer.ffn_layer_norm.weight,
            layer.ffn_layer_norm.bias, layer.intermediate.weight, layer.intermediate.bias, layer.output.weight,
            layer.output.bias)


class _Plan:
    """A model's blocks for :func:`run`: its weights packed (the same packed copies ``schedule.linear``
    uses), the q, k and v biases joined, every address in a table [L, _COLS]. ``leaves``: per layer
    the arrays it was made from (a plan is used only while the model still holds these very
    arrays); ``dtype``: theirs, or None where they are not NumPy arrays of one float dtype."""

    def __init__(self, leaves: list):
        self.leaves = leaves
        flat = [a for row in leaves for a in row]
        dtypes = {a.dtype if isinstance(a, np.ndarray) else None for a in flat}
        one = dtypes.pop() if len(dtypes) == 1 else None
        self.dtype = one if one in DTYPES else None
        self.keep = []  # the arrays whose addresses the table holds, alive while the plan is
        rows = []
        if self.dtype is not None:
            for ln1w, ln1b, qw, kw, vw, qb, kb, vb, ow, ob, ln2w, ln2b, iw, ib, fw, fb in leaves:
                rows.append([self._addr(ln1w), self._addr(ln1b), self._panels(qw, kw, vw),
                             self._addr(np.concatenate((qb, kb, vb))), self._panels(ow), self._addr(ob),
                             self._addr(ln2w), self._addr(ln2b), self._panels(iw), self._addr(ib), self._panels(fw),
                             self._addr(fb), 0, 0])
        self.table = np.array(rows, np.int64).reshape(len(rows), _COLS)

    def _addr(self, a) -> int:
        a = np.ascontiguousarray(a)  # (a copy only for a strided parameter)
        self.keep.append(a)
        return a.ctypes.data

    def _panels(self, *weights) -> int:
        pk = packed_weight(*weights)  # (in panels of panel_width(dtype))
        self.keep.append(pk)
        return pk.panels.ctypes.data


_plans: dict[int, tuple] = {}  # id(params) -> (weakref to params, its _Plan)
_plans_lock = threading.Lock()


def _plan(params) -> _Plan:
    """The plan for ``params``, made on first use and again whenever an array in it was replaced."""
    leaves = [_layer_leaves(layer) for layer in params.layers]
    key = id(params)
    hit = _plans.get(key)
    if hit is not None and hit[0]() is params and all(
            a is b for old, new in zip(hit[1].leaves, leaves) for a, b in zip(old, new)):
        return hit[1]
    with _plans_lock:
        plan = _Plan(leaves)
        _plans[key] = (weakref.ref(params, lambda ref, key=key: _plans.pop(key, None)), plan)
        return plan


def run(params, config, h, cache, bias) -> bool:
    """The blocks of :func:`.tasks.encode` for one new token, in one call: ``h`` [B, 1, H] (C, the
    embeddings' LayerNorm) updated in place, each layer of ``cache`` appended; ``bias``: the
    attention bias [B|1, 1, 1, S] or None. Each GEMM and the attention are a job on both cores
    where :func:`.schedule.linear` and ``attention_context`` would make them one (the helper free,
    this thread not keeping to its own core, the work large enough), else they run on this core.
    -> False, nothing done, where this path does not apply (then run ``encode``): rows for which x
    would be packed, an activation other than the exact GELU, a cache without room for the token,
    cross-attention, another bias."""
    nb, nt, hid = h.shape
    dtype = h.dtype
    nr = whole_tiles(nb)
    layers = cache.layers
    if (nt != 1 or nr >= X_PACK_FROM or dtype not in DTYPES
            or config.hidden_act not in ("gelu", "gelu_python") or not layers or not h.flags.c_contiguous):
        return False
    nh, inter = config.num_attention_heads, config.intermediate_size
    pos = layers[0].length
    keys = layers[0].keys
    if keys is None or keys.shape[2] <= pos:
        return False
    shape = (nb, nh, keys.shape[2], hid // nh)  # [B, N, C, D]
    for lc in layers:
        for buf in (lc.keys, lc.values):
            if buf is None or buf.shape != shape or buf.dtype != dtype or not buf.flags.c_contiguous:
                return False
        if lc.length != pos or lc.cross_keys is not None:
            return False
    ns = pos + 1
    if bias is None:
        mask, mb = _NO_MASK[dtype], 0
    elif (bias.dtype == dtype and bias.ndim == 4 and bias.shape[0] in (1, nb) and bias.shape[1:] == (1, 1, ns)
          and bias.flags.c_contiguous):
        mask, mb = bias.reshape(-1), bias.shape[0]  # [B|1 * S]
    else:
        return False
    plan = _plan(params)
    if plan.dtype != dtype or plan.table.shape[0] != len(layers):
        return False
    like = ATTENTION_LIKE[dtype]
    with contextlib.nullcontext() if this_core_only() else held_board(like) as board:
        table = plan.table.copy()  # [L, _COLS]
        table[:, _KEYS] = [lc.keys.ctypes.data for lc in layers]
        table[:, _VALS] = [lc.values.ctypes.data for lc in layers]
        p = panel_width(dtype)
        sizes = np.zeros(_SIZES, np.int64)
        sizes[:_MB + 1] = nb, nr, hid, nh, inter, shape[2], pos, p, KC, MC, mb
        if board is not None:  # (else every GEMM and the attention on this core)
            for at, (k, n_out) in ((_QKV_JOB, (hid, 3 * hid)), (_OUT_JOB, (hid, hid)), (_IN_JOB, (hid, inter)),
                                   (_FF_JOB, (inter, hid))):
                sizes[at:at + 2] = two_core_chunks(nr, k, n_out, p)
            if nb * nh >= 2 and nb * nh * ns * shape[3] >= jobs.ATTENTION_SPLIT_FROM:  # (attention_on_two_cores')
                sizes[_ATT_JOB:_ATT_JOB + 2] = chunks_of(nb * nh, ATTENTION_CHUNKS)
        x = h.reshape(nb, hid)  # [B, H], a view
        if nr > nb:
            x = np.concatenate((x, np.zeros((nr - nb, hid), dtype)))  # [R, H]: zeros after row B
        _layers(table, sizes, dtype.type(config.layer_norm_eps), np.float64(dtype.type(shape[3] ** -0.5)), x, mask,
                _NO_BOARD if board is None else board, like)
    if nr > nb:
        h[:, 0] = x[:nb]
    for lc in layers:
        lc.length = ns
    return True


_NO_MASK = {dtype: np.zeros(1, dtype) for dtype in DTYPES}  # (never read: no mask)
_NO_BOARD = np.zeros(1, np.int64)  # (never read: no jobs)
