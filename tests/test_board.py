"""The trial board's hand-offs between Tune trials and worker pools (its logic, without Ray)."""

from __future__ import annotations

import asyncio

from sweeps.board import CLOSE, STOP, Board


def _job(key: str, trial: str = "t0") -> dict:
    return {"key": key, "trial_id": trial, "params": None, "run_id": "r", "resume_from": None}


def run(coro):
    return asyncio.run(coro)


def test_jobs_are_taken_in_order_and_events_reach_their_trial():
    async def main():
        board = Board(pools=1)
        await board.submit(_job("a", "t0"))
        await board.submit(_job("b", "t1"))
        assert (await board.take("pool-0", 1))["key"] == "a"
        board.post("a", {"kind": "report", "metrics": {"eval_loss": 1.0}, "checkpoint": None})
        assert (await board.next_event("a", 1))["kind"] == "report"
        assert await board.next_event("b", 0.01) is None  # nothing for the other trial
        board.decide("a", {"stop": False, "checkpoint": "/ck/1"})
        assert await board.await_decision("a", 1) == {"stop": False, "checkpoint": "/ck/1"}
        board.finish("pool-0", "a")
        assert board.finished_jobs("pool-0") == 1
        assert (await board.take("pool-0", 1))["key"] == "b"
        assert await board.take("pool-1", 0.01) is None  # empty queue: the pool asks again
    run(main())


def test_a_cancelled_trial_stops_its_workers_and_is_never_taken():
    async def main():
        board = Board(pools=1)
        await board.submit(_job("a"))
        await board.take("pool-0", 1)
        board.cancel("a")  # ASHA stopped it while the workers were training
        assert await board.await_decision("a", 1) == STOP
        await board.submit(_job("b", "t1"))
        board.cancel("b")  # stopped before any pool took it
        await board.submit(_job("c", "t2"))
        assert (await board.take("pool-0", 1))["key"] == "c"
    run(main())


def test_a_retried_trial_supersedes_its_older_attempt():
    async def main():
        board = Board(pools=1)
        await board.submit(_job("old", "t0"))
        await board.take("pool-0", 1)
        await board.submit(_job("new", "t0"))  # Tune retried the trial: the old attempt must stop
        assert await board.await_decision("old", 1) == STOP
        assert (await board.take("pool-1", 1))["key"] == "new"
    run(main())


def test_a_lost_pool_hands_its_job_to_the_next_pool_with_its_latest_checkpoint():
    async def main():
        board = Board(pools=2, max_resumes=1)
        await board.submit(_job("a"))
        await board.submit(_job("b", "t1"))
        await board.take("pool-0", 1)
        board.decide("a", {"stop": False, "checkpoint": "/ck/a/2"})
        await board.await_decision("a", 1)
        board.pool_failed("pool-0", "node lost")
        again = await board.take("pool-1", 1)  # the orphan goes before the queued job
        assert again["key"] == "a" and again["resume_from"] == "/ck/a/2"
        board.pool_failed("pool-1", "node lost")  # a second loss exceeds max_resumes=1
        event = await board.next_event("a", 1)
        assert event["kind"] == "error" and "worker_max_failures=1" in event["message"]
        assert (await board.take("pool-1", 1))["key"] == "b"
    run(main())


def test_without_resumes_a_lost_pool_fails_its_trial():
    async def main():
        board = Board(pools=1, max_resumes=0)
        await board.submit(_job("a"))
        await board.take("pool-0", 1)
        board.pool_failed("pool-0", "the trial's Ray Train run failed: ActorDiedError")
        event = await board.next_event("a", 1)
        assert event["kind"] == "error" and "ActorDiedError" in event["message"]
    run(main())


def test_when_the_last_pool_is_gone_waiting_and_new_jobs_fail():
    async def main():
        board = Board(pools=2)
        await board.submit(_job("a"))
        board.pool_gone("pool-0", "pool-0 failed 3 times in a row")
        assert await board.next_event("a", 0.01) is None  # one pool is left
        board.pool_gone("pool-1", "pool-1 failed 3 times in a row")
        assert "no Ray Train worker pool is left" in (await board.next_event("a", 1))["message"]
        await board.submit(_job("b", "t1"))
        assert (await board.next_event("b", 1))["kind"] == "error"
    run(main())


def test_close_releases_waiting_pools():
    async def main():
        board = Board(pools=1)
        waiting = asyncio.ensure_future(board.take("pool-0", 30))
        await asyncio.sleep(0.01)
        board.close()
        assert await asyncio.wait_for(waiting, 1) == CLOSE
        assert board.closed()
    run(main())
