"""Group commit: concurrent submissions share commits, and each failure reaches the right requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from sync_project.receiver.batching import CommitDeadlineError, CommitterClosedError, GroupCommitter, QueueFullError
from sync_project.store import StoreUnavailableError


class Recorder:
    """A commit function that records its batches; ``gate`` holds the first commit until released."""

    def __init__(self, fail_on: set[str] | None = None, unavailable: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on or set()
        self.unavailable = unavailable

    def __call__(self, items: Sequence[str]) -> list[str]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(items))
        if self.unavailable:
            raise StoreUnavailableError("database down")
        if self.fail_on.intersection(items):
            raise ValueError(f"bad item among {len(items)}")
        return [f"committed {item}" for item in items]


async def _submit_while_first_commit_is_held(committer: GroupCommitter, recorder: Recorder, items: list[str]) -> list:
    """Submit ``items[0]``, wait until its commit started, queue the rest, then let commits run."""
    await committer.start()
    try:
        first = asyncio.create_task(committer.submit(items[0]))
        await asyncio.get_running_loop().run_in_executor(None, recorder.entered.wait, 10)
        rest = [asyncio.create_task(committer.submit(item)) for item in items[1:]]
        await asyncio.sleep(0)  # let every submission reach the queue
        recorder.gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await committer.stop()


def test_submissions_arriving_during_a_commit_share_the_next_one() -> None:
    recorder = Recorder()
    committer = GroupCommitter(recorder, max_batch=100)
    items = [f"d{i}" for i in range(30)]
    outcomes = asyncio.run(_submit_while_first_commit_is_held(committer, recorder, items))
    assert outcomes == [f"committed {item}" for item in items]
    assert recorder.batches == [["d0"], items[1:]]
    assert (committer.commits, committer.committed_items) == (2, 30)


def test_a_batch_never_exceeds_max_batch() -> None:
    recorder = Recorder()
    committer = GroupCommitter(recorder, max_batch=8)
    items = [f"d{i}" for i in range(20)]
    outcomes = asyncio.run(_submit_while_first_commit_is_held(committer, recorder, items))
    assert outcomes == [f"committed {item}" for item in items]
    assert [len(batch) for batch in recorder.batches] == [1, 8, 8, 3]


def test_an_unavailable_database_fails_every_request_of_the_batch_and_only_those() -> None:
    recorder = Recorder(unavailable=True)
    committer = GroupCommitter(recorder)
    outcomes = asyncio.run(_submit_while_first_commit_is_held(committer, recorder, ["a", "b", "c"]))
    assert all(isinstance(outcome, StoreUnavailableError) for outcome in outcomes)
    assert recorder.batches == [["a"], ["b", "c"]]  # no per-item retry against a database that is down


def test_another_failure_is_isolated_to_the_delivery_that_caused_it() -> None:
    recorder = Recorder(fail_on={"bad"})
    committer = GroupCommitter(recorder)
    outcomes = asyncio.run(_submit_while_first_commit_is_held(committer, recorder, ["a", "b", "bad", "c"]))
    assert outcomes[:2] == ["committed a", "committed b"]
    assert isinstance(outcomes[2], ValueError)
    assert outcomes[3] == "committed c"
    assert recorder.batches == [["a"], ["b", "bad", "c"], ["b"], ["bad"], ["c"]]


def test_a_full_queue_sheds_load_instead_of_waiting() -> None:
    recorder = Recorder()
    committer = GroupCommitter(recorder, max_queue=2)

    async def scenario() -> list:
        await committer.start()
        try:
            first = asyncio.create_task(committer.submit("held"))
            await asyncio.get_running_loop().run_in_executor(None, recorder.entered.wait, 10)
            queued = [asyncio.create_task(committer.submit(f"q{i}")) for i in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError):
                await committer.submit("one too many")
            recorder.gate.set()
            return await asyncio.gather(first, *queued)
        finally:
            await committer.stop()

    assert asyncio.run(scenario()) == ["committed held", "committed q0", "committed q1"]


def test_stop_commits_what_was_submitted_and_then_refuses_more() -> None:
    recorder = Recorder()
    recorder.gate.set()
    committer = GroupCommitter(recorder)

    async def scenario() -> tuple[list, Exception | None]:
        await committer.start()
        submitted = [asyncio.create_task(committer.submit(f"d{i}")) for i in range(5)]
        await asyncio.sleep(0)
        await committer.stop()
        try:
            await committer.submit("late")
        except CommitterClosedError as error:
            return await asyncio.gather(*submitted), error
        return await asyncio.gather(*submitted), None

    outcomes, refusal = asyncio.run(scenario())
    assert outcomes == [f"committed d{i}" for i in range(5)]
    assert isinstance(refusal, CommitterClosedError)


def test_several_writers_commit_batches_concurrently() -> None:
    both_in_flight = threading.Barrier(2, timeout=10)
    first_entered = threading.Event()
    batches: list[list[str]] = []

    def commit(items: Sequence[str]) -> list[str]:
        batches.append(list(items))
        if len(batches) <= 2:
            first_entered.set()
            both_in_flight.wait()  # passes only when two commits run at the same time
        return [f"committed {item}" for item in items]

    committer = GroupCommitter(commit, writers=2)

    async def scenario() -> list:
        await committer.start()
        try:
            first = asyncio.create_task(committer.submit("d0"))
            await asyncio.get_running_loop().run_in_executor(None, first_entered.wait, 10)
            rest = [asyncio.create_task(committer.submit(f"d{i}")) for i in range(1, 10)]
            return await asyncio.gather(first, *rest)
        finally:
            await committer.stop()

    assert asyncio.run(scenario()) == [f"committed d{i}" for i in range(10)]
    assert batches[0] == ["d0"] and sorted(item for batch in batches for item in batch) == sorted(
        f"d{i}" for i in range(10)
    )


# -- the commit deadline: a database that never answers ------------------------------------------


def test_past_the_deadline_a_request_gets_503_and_later_ones_are_refused_at_once() -> None:
    recorder = Recorder()  # its gate is the database: closed, the first commit never returns
    committer = GroupCommitter(recorder, deadline_s=0.2)

    async def scenario() -> tuple[list, float, list]:
        await committer.start()
        try:
            first = asyncio.create_task(committer.submit("in-flight"))
            await asyncio.get_running_loop().run_in_executor(None, recorder.entered.wait, 10)
            queued = asyncio.create_task(committer.submit("queued"))
            early = await asyncio.gather(first, queued, return_exceptions=True)
            started = asyncio.get_running_loop().time()
            try:
                await committer.submit("while stalled")
            except CommitDeadlineError as refusal:
                early.append(refusal)
            refused_in = asyncio.get_running_loop().time() - started
            recorder.gate.set()  # the database answers again
            await asyncio.get_running_loop().run_in_executor(None, _wait_for, lambda: committer.stalled_for() == 0)
            return early, refused_in, [await committer.submit("after")]
        finally:
            await committer.stop()

    early, refused_in, after = asyncio.run(scenario())
    assert [type(outcome) for outcome in early] == [CommitDeadlineError] * 3
    assert refused_in < 0.2  # not queued behind the stuck commit
    assert after == ["committed after"]
    # The in-flight delivery still committed (its provider's retry is then a duplicate); the
    # queued one, whose request had its 503, was dropped rather than committed late.
    assert recorder.batches == [["in-flight"], ["after"]]


def test_stop_gives_up_on_a_commit_the_database_never_answers() -> None:
    recorder = Recorder()
    committer = GroupCommitter(recorder, deadline_s=0.2)

    async def scenario() -> tuple[bool, list]:
        await committer.start()
        submitted = asyncio.create_task(committer.submit("stuck"))
        await asyncio.get_running_loop().run_in_executor(None, recorder.entered.wait, 10)
        finished = await committer.stop(timeout_s=0.5)
        return finished, await asyncio.gather(submitted, return_exceptions=True)

    try:
        finished, outcomes = asyncio.run(scenario())
    finally:
        recorder.gate.set()  # let the abandoned daemon thread end
    assert finished is False
    assert [type(outcome) for outcome in outcomes] == [CommitDeadlineError]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
