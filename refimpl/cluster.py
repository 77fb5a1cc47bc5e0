"""Running independent calls on a Dask cluster, with one setup per worker process.

:func:`run_calls` is what :func:`refimpl.corpus.run` uses for ``--workers N`` (a ``LocalCluster``
of N worker processes it starts and stops) and ``--scheduler ADDRESS`` (a running cluster:
dask-jobqueue on SLURM/PBS, dask-kubernetes, ``dask scheduler`` + ``dask worker``). It knows
nothing of models: a worker plugin runs ``setup(arg, worker address)`` once in every worker process
(also in a worker that replaces one that died), then ``fn(arg, item, worker address)`` runs for
each item, results coming back in completion order. A worker that dies mid-call is replaced and
its call rerun by Dask (up to ``distributed.scheduler.allowed-failures`` times, 3 by default).

This module imports Dask (the scale extra: ``pip install '.[scale]'`` in a checkout); refimpl imports it
only when asked to run on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

import dask
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from distributed.client import FutureCancelledError

__all__ = ["ClusterError", "environ_kept", "run_calls", "setup_on_workers", "worker_pids"]


class ClusterError(ValueError):
    """The cluster cannot be reached or used (bad address, no workers, workers that keep dying)."""


class _Setup(WorkerPlugin):
    """Runs ``setup(arg, address)`` when registered and on every worker that joins later, and
    ``teardown(arg)`` when unregistered or the worker closes."""

    def __init__(self, setup: Callable, teardown: Callable | None, arg: Any):
        self.setup_fn, self.teardown_fn, self.arg = setup, teardown, arg

    def setup(self, worker):
        self.setup_fn(self.arg, worker.address)

    def teardown(self, worker):
        if self.teardown_fn is not None:
            self.teardown_fn(self.arg)


def _call(fn: Callable, arg: Any, item: Any):
    return fn(arg, item, get_worker().address)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_calls(items: list[tuple[str, Any]], fn: Callable, arg: Any, *, setup: Callable, teardown: Callable | None = None,
              name: str, threads: int = 1, workers: int | None = None, scheduler: str | None = None,
              client: Client | None = None, on_result: Callable[[Any], None] = lambda r: None,
              timeout: float | None = None, log: Callable[[str], None] = lambda s: None) -> str:
    """``fn(arg, item, address)`` for every ``(key, item)`` on a cluster; ``on_result`` gets each
    result as it arrives. -> a description of where it ran.

    ``workers``: start a ``LocalCluster`` of that many processes, one Dask thread each, with BLAS,
    OpenMP and Numba limited to ``threads`` threads; ``scheduler``: connect to that address;
    ``client``: use it. The first error (from ``setup`` on any worker, or from a call) cancels the
    rest and is raised here.
    """
    cluster = None
    own_client = client is None
    restore = contextlib.ExitStack()
    if workers is not None:
        env = {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
        restore.enter_context(environ_kept())
        try:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.CRITICAL, env=env)
        except Exception as e:  # noqa: BLE001 - anything that stops a local cluster from starting
            restore.close()
            raise ClusterError(f"cannot start a local Dask cluster of {workers} workers: {_one_line(e)}") from None
        where = f"a LocalCluster of {workers} worker processes"
    elif scheduler is not None:
        where = f"the Dask cluster at {scheduler}"
    else:
        where = "the Dask cluster of the client given"
    try:
        if own_client:
            try:
                kw = {} if timeout is None else {"timeout": timeout}  # default: distributed.comm.timeouts.connect
                client = Client(cluster if cluster is not None else scheduler, **kw)
            except (OSError, TimeoutError, ValueError, TypeError) as e:
                raise ClusterError(f"cannot reach the Dask scheduler at {scheduler!r} ({_one_line(e)}); check the "
                                   f"address (e.g. tcp://host:8786) and that the scheduler is running") from None
        if cluster is None:
            try:
                client.wait_for_workers(1, timeout=timeout or 60)
            except (TimeoutError, OSError) as e:
                raise ClusterError(f"no worker joined {where} within {timeout or 60:g} s ({_one_line(e)})") from None
        info = client.scheduler_info()
        n_workers = len(info.get("workers", {}))
        threads_per = sorted({w.get("nthreads", 1) for w in info.get("workers", {}).values()})
        if "dashboard" in info.get("services", {}):
            log(f"Dask dashboard: {client.dashboard_link}")
        log(f"running {len(items)} calls on {where} ({n_workers} workers, {'/'.join(map(str, threads_per))} Dask "
            f"thread(s) each, {threads} compute thread(s) per process)")
        if threads > 1 and any(t > 1 for t in threads_per):
            log(f"note: a worker runs one of these calls at a time when it computes with {threads} threads; start "
                f"workers with --nthreads 1 (and more of them) to use every core")
        with setup_on_workers(client, setup, teardown, arg, name):
            futures = [client.submit(_call, fn, arg, item, key=key, pure=False, retries=0) for key, item in items]
            try:
                for future in as_completed(futures):
                    try:
                        result = future.result()
                    except FutureCancelledError:
                        continue
                    on_result(result)
            except BaseException:
                client.cancel(futures)
                raise
    except Exception as e:
        if type(e).__name__ == "KilledWorker":
            raise ClusterError(f"a partition was running on {dask.config.get('distributed.scheduler.allowed-failures') + 1}"
                               f" workers that died (out of memory? see the workers' logs): {_one_line(e)}") from None
        raise
    finally:
        if own_client and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        restore.close()
    return where


@contextlib.contextmanager
def environ_kept():
    """This process's environment as it was before the block, after it (what changed is put back).

    A ``LocalCluster``'s nannies run in the process that starts it, and a nanny sets variables in
    *its own* process's environment before spawning a worker: ``distributed.nanny.pre-spawn-environ``
    (``OMP_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``, ...; Dask's configuration says "this leaks
    variables into the nanny process"), ``PYTHONHASHSEED``, ``__DASK_PARENT_PID``. Every process
    started later from this one would inherit them: its BLAS on one thread, a fixed hash seed."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k not in before]:
            del os.environ[k]
        for k, v in before.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


@contextlib.contextmanager
def setup_on_workers(client: Client, setup: Callable, teardown: Callable | None, arg: Any, name: str):
    """``setup(arg, address)`` on every worker (and on workers that join later) for the duration of
    the block, ``teardown(arg)`` after it. An error in ``setup`` on any worker is raised here."""
    try:
        client.register_plugin(_Setup(setup, teardown, arg), name=name)
    except Exception:
        _unregister(client, name)
        raise
    try:
        yield
    finally:
        _unregister(client, name)


def _unregister(client: Client, name: str) -> None:
    try:
        client.unregister_worker_plugin(name)
    except Exception:  # noqa: BLE001 - the plugin may be gone with its workers; nothing to undo then
        pass


def worker_pids(client: Client) -> dict[str, int]:
    """``{worker address: process id}``: for measuring workers (memory) and for tests."""
    return client.run(os.getpid)
