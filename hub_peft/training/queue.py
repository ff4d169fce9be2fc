"""Sharing one CPU machine between trainings and chats (the Adapter Studio, a public Space).

- :class:`TrainingQueue`: trainings run one at a time, in arrival order, at most one per user (so
  nobody can queue ten jobs ahead of everyone else); each job knows its place in the queue and an ETA,
  and its user can cancel it, waiting or running. A job that crashes fails alone: the queue goes on.
- :class:`Cores`: how many threads each kind of work gets, so that a chat next to a training does not
  oversubscribe the cores (two GEMMs each using every core run far slower than the two side by side).
  torch's intra-op thread count is per thread, so each worker sets its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"


class Cores:
    """The machine's cores split between one training and any chats: each chat gets one core while a
    training runs (all of them alone, shared when several chat), and the training gets what the chats
    leave, re-checked at every step."""

    def __init__(self, total: int | None = None) -> None:
        if total is None:
            total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.total = max(1, int(total or 1))
        self._lock = threading.Lock()
        self.chats = 0
        self.training = False

    def training_threads(self) -> int:
        with self._lock:
            return max(1, self.total - self.chats)

    @contextlib.contextmanager
    def chat(self) -> Iterator[int]:
        """Run a chat in this block on its share of the cores (set for the calling thread)."""
        with self._lock:
            self.chats += 1
            threads = 1 if self.training else max(1, self.total // self.chats)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(previous)
            with self._lock:
                self.chats -= 1

    @contextlib.contextmanager
    def train(self) -> Iterator[Callable[[], int]]:
        """Mark a training as running; yields a function that sets this thread's share and returns it
        (call it at every step)."""
        with self._lock:
            self.training = True

        def share() -> int:
            threads = self.training_threads()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return threads

        try:
            share()
            yield share
        finally:
            with self._lock:
                self.training = False


@dataclass(eq=False)
class Job:
    """One training in the queue. ``run(job)`` does the work in the queue's worker thread; it reports
    progress with :meth:`report` and stops when :attr:`cancelled` is set."""

    user: str
    run: Callable[[Job], Any]
    planned_steps: int
    id: int = 0
    state: str = WAITING
    step: int = 0
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    updates: queue.Queue = field(default_factory=queue.Queue)  # progress entries, then None when the job ends

    def report(self, entry: dict[str, Any]) -> None:
        self.step = int(entry.get("step", self.step))
        self.updates.put(entry)

    def cancel(self) -> None:
        self.cancelled.set()

    def seconds_per_step(self) -> float | None:
        if self.started is None or not self.step:
            return None
        return ((self.finished or time.monotonic()) - self.started) / self.step


class TrainingQueue:
    """Trainings one at a time in arrival order, one per user (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[Job] = []
        self.running: Job | None = None
        self._ids = itertools.count(1)
        self._wake = threading.Condition(self._lock)
        self._seconds_per_step: float | None = None  # the last finished job's, once there is one
        threading.Thread(target=self._work, name="hub_peft-training-queue", daemon=True).start()

    def submit(self, user: str, run: Callable[[Job], Any], planned_steps: int) -> Job:
        """Queue a training for ``user``; refused while that user already has one waiting or running."""
        with self._lock:
            if any(job.user == user for job in self._active()):
                raise InvalidInputError("You already have a training in the queue; cancel it or wait for it to end.")
            job = Job(user, run, max(1, planned_steps), id=next(self._ids))
            self._waiting.append(job)
            self._wake.notify()
        return job

    def job_of(self, user: str) -> Job | None:
        with self._lock:
            return next((job for job in self._active() if job.user == user), None)

    def cancel(self, user: str) -> Job | None:
        """Cancel ``user``'s job: a waiting one leaves the queue at once, a running one stops after its step."""
        with self._lock:
            job = next((j for j in self._active() if j.user == user), None)
            if job is None:
                return None
            job.cancel()
            if job.state == WAITING:
                self._waiting.remove(job)
                job.state = CANCELLED
                job.updates.put(None)
        return job

    def position(self, job: Job) -> int:
        """0 while ``job`` runs, n when n - 1 jobs wait before it and one runs (or n jobs wait, none running)."""
        with self._lock:
            if job.state != WAITING:
                return 0
            return self._waiting.index(job) + (1 if self.running is not None else 0) if job in self._waiting else 0

    def eta(self, job: Job) -> float | None:
        """Seconds until ``job`` starts (waiting) or ends (running), from the running job's own pace or the
        last finished one's; None before any job has been timed."""
        with self._lock:
            running = self.running
            pace = (running.seconds_per_step() if running else None) or self._seconds_per_step
            if pace is None:
                return None
            if job.state == RUNNING:
                return pace * max(0, job.planned_steps - job.step)
            ahead = self._waiting[: self._waiting.index(job)] if job in self._waiting else []
            left = max(0, running.planned_steps - running.step) if running else 0
            return pace * (left + sum(j.planned_steps for j in ahead))

    def _active(self) -> list[Job]:
        return ([self.running] if self.running is not None else []) + self._waiting

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._wake.wait()
                job = self.running = self._waiting.pop(0)
                job.state, job.started = RUNNING, time.monotonic()
            try:
                job.result = job.run(job)
                job.state = CANCELLED if job.cancelled.is_set() else DONE
            except BaseException as error:  # a crash fails this job only; the queue goes on
                job.error, job.state = error, FAILED
            finally:
                with self._lock:
                    job.finished = time.monotonic()
                    self._seconds_per_step = job.seconds_per_step() or self._seconds_per_step
                    self.running = None
                job.updates.put(None)
