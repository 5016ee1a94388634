"""Spread a per-sample job over workers: in-process, local processes (--workers N) or Ray actors (--ray ADDRESS).

Scheduling is dynamic in every mode: a worker takes the next sample when it finishes one, so a slow sample does not
hold a fixed shard back. A worker (process or actor) that dies has its sample retried once; a second death reports
the sample as failed. Which worker wrote a sample's files does not change them (seeds depend on the sample id).

A job is a picklable `make_worker` (called once per worker: loads the models) and its `run(ref, run_dir) -> dict`.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

MAX_ATTEMPTS = 2


class ProgressLog:
    """A bar over samples (done / failed / ETA) on a terminal; a line per sample otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=self.stream)

    def update(self, record: dict) -> None:
        if record.get("status") == "done":
            self.done += 1
        else:
            self.failed += 1
        n = self.done + self.failed
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / n * (self.total - n) if n else 0.0
        if self.bar is not None:
            self.bar.set_postfix(done=self.done, failed=self.failed)
            self.bar.update(1)
            return
        msg = record.get("status", "?")
        if msg != "done":
            msg += ": " + str(record.get("error", "")).splitlines()[-1][:160] if record.get("error") else ""
        print(f"{self.label} [{n}/{self.total}] {record.get('id')} {msg} (done {self.done}, failed {self.failed}, "
              f"ETA {eta:.0f}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_in_process(make_worker: Callable, refs: list, run_dir: str, on_record: Callable) -> None:
    worker = make_worker()
    for ref in refs:
        on_record(ref, worker.run(ref, run_dir))


def _pool_init(make_worker):
    global _WORKER
    try:
        _WORKER = make_worker()
    except Exception as e:  # noqa: BLE001 - raised again by each task, so the driver sees the real error
        _WORKER = e


def _pool_run(ref, run_dir):
    if isinstance(_WORKER, Exception):
        raise _WORKER  # the worker could not start (a model that does not load, ...): not a death, an error
    return _WORKER.run(ref, run_dir)


def _run_pool(make_worker, queue: list, run_dir: str, on_record: Callable, n: int) -> list:
    """Run `queue` (popped as submitted) on a fresh pool of `n` processes until it is empty or the pool breaks;
    returns the samples that were in flight when it broke (empty: all done)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    suspects = []
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                             initargs=(make_worker,)) as pool:
        inflight = {}
        while (queue or inflight) and not suspects:
            while queue and len(inflight) < n:
                ref = queue.pop(0)
                inflight[pool.submit(_pool_run, ref, run_dir)] = ref
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in finished:
                ref = inflight.pop(fut)
                try:
                    record = fut.result()
                except BrokenProcessPool:
                    suspects.append(ref)
                    continue
                on_record(ref, record)
        if suspects:
            suspects += list(inflight.values())
            pool.shutdown(wait=False, cancel_futures=True)
    return suspects


def run_processes(make_worker: Callable, refs: list, run_dir: str, on_record: Callable, n: int,
                  on_death: Callable) -> None:
    """`n` spawned processes, each loading the models once; at most one sample in flight per process. A process
    that dies breaks the pool; which of the samples in flight killed it is unknown, so each of them runs again
    alone in a one-process pool, where a death is its own: a sample is retried once after a death, then failed."""
    queue = list(refs)
    deaths = {r.id: 0 for r in refs}

    def died(ref) -> bool:
        deaths[ref.id] += 1
        if deaths[ref.id] >= MAX_ATTEMPTS:
            on_death(ref, f"its worker process died on each of {deaths[ref.id]} attempts")
            return False
        return True

    while queue:
        suspects = _run_pool(make_worker, queue, run_dir, on_record, n)
        if len(suspects) == 1:
            if died(suspects[0]):
                queue.insert(0, suspects[0])
            continue
        for ref in suspects:
            while _run_pool(make_worker, [ref], run_dir, on_record, 1) and died(ref):
                pass


def _retry_or_fail(ref, attempts, queue, on_death, why) -> None:
    if attempts[ref.id] < MAX_ATTEMPTS:
        queue.insert(0, ref)
    else:
        on_death(ref, f"{why} on each of {attempts[ref.id]} attempts")


def init_ray(address: str | None):
    """Ray, connected: an existing session, a new local one ('local') or a cluster ('auto' or an address)."""
    try:
        import ray
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("--ray needs Ray: pip install 'fastdrag[eval]' (ray==2.60.0)") from None
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, log_to_driver=False)
    return ray


def run_ray(make_worker: Callable, refs: list, run_dir: str, on_record: Callable, n: int, on_death: Callable,
            num_gpus: float) -> None:
    """`n` Ray actors (num_gpus each), each loading the models once, one sample in flight per actor. An actor that
    dies (its node removed, its process killed) is replaced and its sample retried once."""
    import ray

    @ray.remote(num_gpus=num_gpus, max_restarts=0)
    class Worker:
        def __init__(self, make):
            self.w = make()

        def run(self, ref, run_dir):
            return self.w.run(ref, run_dir)

    actors = [Worker.remote(make_worker) for _ in range(n)]
    idle = list(actors)
    queue = list(refs)
    attempts = {r.id: 0 for r in refs}
    inflight = {}
    while queue or inflight:
        while queue and idle:
            ref, actor = queue.pop(0), idle.pop(0)
            attempts[ref.id] += 1
            inflight[actor.run.remote(ref, run_dir)] = (ref, actor)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for obj in ready:
            ref, actor = inflight.pop(obj)
            try:
                record = ray.get(obj)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                _retry_or_fail(ref, attempts, queue, on_death, f"its Ray worker died ({str(e).strip()[:300]})")
                idle.append(Worker.remote(make_worker))  # a replacement, scheduled wherever resources remain
                continue
            on_record(ref, record)
            idle.append(actor)
    for a in actors + idle:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already dead
            pass
