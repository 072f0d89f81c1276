"""The trial board: where Tune trials hand their work to warm Ray Train worker pools.

Starting a Ray Train run costs 12-18 s on a small machine (controller, placement group,
worker actors, imports), which a sweep of short trials would pay once per trial. So each
sweep starts a few long-lived Ray Train runs (:mod:`sweeps.pool`) whose workers take trial
jobs from this board, one after another, and the Tune trial function (:mod:`sweeps.trial`)
only relays: it submits its job, turns the workers' eval reports into ``tune.report`` calls
(with real Tune checkpoints, so ASHA, PBT and trial retries work as in any Tune sweep), and
answers each report with Tune's decision: go on, or stop.

One job is one attempt of one trial, named by a ``key`` the trial function draws. The board
holds, per key, a queue of events for the trial (``report``, ``done``, ``error``) and a queue
of decisions for the workers; per pool, the job it runs, so that the job of a lost pool (a
node gone) goes to the next free pool and resumes from its latest checkpoint. An async actor:
every wait is a coroutine, so a blocked call holds no thread. The driver pins it to its own
node: it lives exactly as long as the sweep's driver.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

STOP = {"stop": True}
CLOSE = {"close": True}


class Board:
    """The board's logic (plain asyncio, unit-tested as is); :data:`TrialBoard` is its Ray actor."""

    def __init__(self, pools: int, max_resumes: int = 0) -> None:
        self._pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._orphans: list[dict[str, Any]] = []  # jobs whose pool was lost, to resume first
        self._events: dict[str, asyncio.Queue] = {}
        self._decisions: dict[str, asyncio.Queue] = {}
        self._running: dict[str, dict[str, Any]] = {}  # pool id -> its job
        self._latest: dict[str, str] = {}  # key -> latest Tune checkpoint path
        self._resumes: dict[str, int] = {}
        self._cancelled: set[str] = set()
        self._key_of_trial: dict[str, str] = {}
        self._max_resumes = max_resumes  # lost worker groups a job survives (-1: unlimited)
        self._closed = asyncio.Event()
        self._pools_left = pools
        self._finished: dict[str, int] = {}  # pool id -> jobs it ended
        self._fatal: str | None = None  # every pool is gone: no job can run any more
        self._started: set[str] = set()  # pools whose workers are up

    # ------------------------------------------------------------------ the trial's side

    async def submit(self, job: dict[str, Any]) -> None:
        """Queue a job; a newer attempt of the same trial supersedes an older one."""
        key, trial_id = job["key"], job["trial_id"]
        older = self._key_of_trial.get(trial_id)
        if older is not None and older != key:
            self.cancel(older)
        self._key_of_trial[trial_id] = key
        self._events[key], self._decisions[key] = asyncio.Queue(), asyncio.Queue()
        if self._fatal is not None:
            self.post(key, {"kind": "error", "message": self._fatal})
            return
        await self._pending.put(job)

    async def next_event(self, key: str, timeout_s: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self._events[key].get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    def decide(self, key: str, decision: dict[str, Any]) -> None:
        """Tune's answer to a report; a continuing trial also names its new Tune checkpoint."""
        if decision.get("checkpoint"):
            self._latest[key] = decision["checkpoint"]
        if key in self._decisions:
            self._decisions[key].put_nowait(decision)

    def cancel(self, key: str) -> None:
        """The trial ended on Tune's side (stopped, failed, superseded): its workers stop at their next report."""
        self._cancelled.add(key)
        if key in self._decisions:
            self._decisions[key].put_nowait(STOP)

    # ------------------------------------------------------------------ the workers' side

    def started(self, pool_id: str) -> None:
        self._started.add(pool_id)

    def started_pools(self) -> set[str]:
        return set(self._started)

    async def take(self, pool_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The pool's next job: a job whose pool was lost first, then the queue in order.

        Returns CLOSE when the sweep is over, None when nothing came within ``timeout_s``.
        """
        while not self._closed.is_set():
            if self._orphans:
                job = self._orphans.pop(0)
            else:
                getter = asyncio.ensure_future(self._pending.get())
                closed = asyncio.ensure_future(self._closed.wait())
                done, _ = await asyncio.wait({getter, closed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                closed.cancel()
                if getter not in done:
                    getter.cancel()
                    return CLOSE if self._closed.is_set() else None
                job = getter.result()
            if job["key"] in self._cancelled:
                continue
            self._running[pool_id] = job
            return job
        return CLOSE

    def post(self, key: str, event: dict[str, Any]) -> None:
        if key in self._events:
            self._events[key].put_nowait(event)

    def finish(self, pool_id: str, key: str) -> None:
        """The pool is done with this job (finished, failed or stopped)."""
        if self._running.get(pool_id, {}).get("key") == key:
            self._running.pop(pool_id)
        self._finished[pool_id] = self._finished.get(pool_id, 0) + 1

    def finished_jobs(self, pool_id: str) -> int:
        return self._finished.get(pool_id, 0)

    async def await_decision(self, key: str, timeout_s: float) -> dict[str, Any]:
        """Block a reporting worker until Tune has seen its report; a trial gone silent means stop."""
        if key in self._cancelled:
            return STOP
        try:
            return await asyncio.wait_for(self._decisions[key].get(), timeout_s)
        except asyncio.TimeoutError:
            return STOP

    def pool_failed(self, pool_id: str, message: str) -> None:
        """A pool's Train run died (a lost node, a crashed worker): its job goes to the next free
        pool and resumes from its latest checkpoint, up to ``max_resumes`` times, then fails."""
        job = self._running.pop(pool_id, None)
        if job is None or job["key"] in self._cancelled:
            return
        key = job["key"]
        self._resumes[key] = self._resumes.get(key, 0) + 1
        if 0 <= self._max_resumes < self._resumes[key]:
            self.post(key, {"kind": "error", "message": f"{message} (its worker group was lost {self._resumes[key]} "
                                                        f"times; resources.worker_max_failures={self._max_resumes})"})
            return
        self._orphans.append({**job, "resume_from": self._latest.get(key, job.get("resume_from"))})

    def pool_gone(self, pool_id: str, message: str) -> None:
        """A pool gave up; when the last one does, every waiting and future job fails with its reason."""
        self._pools_left -= 1
        if self._pools_left > 0:
            return
        self._fatal = f"no Ray Train worker pool is left: {message}"
        while not self._pending.empty():
            self.post(self._pending.get_nowait()["key"], {"kind": "error", "message": self._fatal})

    def close(self) -> None:
        self._closed.set()

    def closed(self) -> bool:
        return self._closed.is_set()


TrialBoard = ray.remote(num_cpus=0, max_restarts=0)(Board)
