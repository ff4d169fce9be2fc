"""The Studio's shared-machine scheduling: a fair training queue (one job at a time, arrival order, one
per user, positions, ETAs, cancel waiting or running, a crash fails one job only) and the core split
between a training and chats."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hub_peft.errors import InvalidInputError
from hub_peft.training.queue import CANCELLED, DONE, FAILED, RUNNING, WAITING, Cores, TrainingQueue


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def stepping(steps: int, gate: threading.Event | None = None, ran: list | None = None, crash: bool = False):
    """A job that reports ``steps`` steps, each after ``gate`` opens (if given), and stops when cancelled."""

    def run(job):
        if ran is not None:
            ran.append(job.user)
        for step in range(1, steps + 1):
            if gate is not None:
                gate.wait(10)
            if job.cancelled.is_set():
                return "stopped"
            time.sleep(0.01)
            job.report({"step": step, "loss": 1.0 / step})
            if crash and step == 2:
                raise RuntimeError("boom")
        return "trained"

    return run


def test_jobs_run_one_at_a_time_in_arrival_order_one_per_user():
    jobs, ran, gate = TrainingQueue(), [], threading.Event()
    first = jobs.submit("ann", stepping(3, gate, ran), planned_steps=3)
    wait_for(lambda: first.state == RUNNING)
    second = jobs.submit("bob", stepping(3, gate, ran), planned_steps=3)
    third = jobs.submit("cat", stepping(3, gate, ran), planned_steps=3)
    with pytest.raises(InvalidInputError, match="already have a training in the queue"):
        jobs.submit("bob", stepping(1), planned_steps=1)
    assert [jobs.position(j) for j in (first, second, third)] == [0, 1, 2]
    assert jobs.job_of("cat") is third and jobs.job_of("dan") is None
    assert jobs.eta(second) is None  # nothing has been timed yet: no made-up ETA
    gate.set()
    wait_for(lambda: third.state == DONE)
    assert ran == ["ann", "bob", "cat"] and [j.result for j in (first, second, third)] == ["trained"] * 3
    starts = [j.started for j in (first, second, third)]
    ends = [j.finished for j in (first, second, third)]
    assert starts[1] >= ends[0] and starts[2] >= ends[1]  # never two at once
    entries = []
    while (entry := second.updates.get(timeout=1)) is not None:
        entries.append(entry["step"])
    assert entries == [1, 2, 3]
    jobs.submit("bob", stepping(1), planned_steps=1)  # bob's earlier job ended: he may queue again


def test_positions_and_etas_follow_the_running_jobs_pace():
    jobs, gate = TrainingQueue(), threading.Event()
    running = jobs.submit("ann", stepping(10, gate), planned_steps=10)
    waiting = jobs.submit("bob", stepping(4), planned_steps=4)
    later = jobs.submit("cat", stepping(4), planned_steps=4)
    gate.set()
    wait_for(lambda: running.step >= 3)
    gate.clear()
    pace = running.seconds_per_step()
    left = running.planned_steps - running.step
    assert jobs.eta(running) == pytest.approx(pace * left, rel=0.5)
    assert jobs.eta(waiting) == pytest.approx(pace * left, rel=0.5)
    assert jobs.eta(later) == pytest.approx(pace * (left + 4), rel=0.5)
    assert jobs.eta(later) > jobs.eta(waiting)
    gate.set()


def test_a_user_cancels_a_waiting_or_a_running_job_and_a_crash_fails_one_job_only():
    jobs, gate = TrainingQueue(), threading.Event()
    crashing = jobs.submit("ann", stepping(5, gate, crash=True), planned_steps=5)
    wait_for(lambda: crashing.state == RUNNING)
    queued = jobs.submit("bob", stepping(5), planned_steps=5)
    survivor = jobs.submit("cat", stepping(50, gate), planned_steps=50)
    assert jobs.cancel("bob") is queued and queued.state == CANCELLED and queued.updates.get(timeout=1) is None
    assert jobs.position(survivor) == 1 and jobs.cancel("dan") is None
    gate.set()
    wait_for(lambda: crashing.state == FAILED)
    assert isinstance(crashing.error, RuntimeError)
    wait_for(lambda: survivor.state == RUNNING and survivor.step >= 2)
    jobs.cancel("cat")  # running: stops at its next step
    wait_for(lambda: survivor.state == CANCELLED)
    assert survivor.result == "stopped" and survivor.step < 50
    assert queued.started is None  # it never ran
    assert jobs.submit("ann", stepping(1), planned_steps=1).state in (WAITING, RUNNING, DONE)


def test_a_chat_next_to_a_training_gets_one_core_and_the_training_the_rest():
    cores = Cores(total=4)
    before = torch.get_num_threads()
    with cores.chat() as alone:
        assert alone == 4 and torch.get_num_threads() == 4
    assert torch.get_num_threads() == before
    seen = {}

    def train():
        with cores.train() as share:
            seen["alone"] = share()
            started.set()
            chatting.wait(5)
            seen["beside a chat"] = share()
            seen["threads"] = torch.get_num_threads()

    started, chatting = threading.Event(), threading.Event()
    worker = threading.Thread(target=train)
    worker.start()
    started.wait(5)
    with cores.chat() as beside:
        chatting.set()
        worker.join(5)
        assert beside == 1 and torch.get_num_threads() == 1
    assert seen == {"alone": 4, "beside a chat": 3, "threads": 3}
    assert not cores.training and cores.chats == 0
