"""Requests that arrive together are decoded together.

    submit ──► queue (bounded) ──► gather ──► group by settings ──► decode (model thread) ──► answer

The first request in the queue waits at most `batch_wait_ms` for others; gathering stops early
when `batch_tokens` source tokens are in hand. Requests with the same decoding settings form one
batch, which `decode` (the engine's, on its own thread) sorts by length and searches; each
request then gets its own sentences back. With batching off, each request is decoded alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from transformer_mt.config import DecodeConfig
from transformer_mt.serve.engine import Scored
from transformer_mt.serve.metrics import ServerMetrics
from transformer_mt.serve.settings import ServeSettings

DecodeFn = Callable[[Sequence[Sequence[int]], DecodeConfig], list[Scored]]


class QueueFullError(Exception):
    """More requests are waiting than the server holds: answer 503 at once."""


@dataclass
class Job:
    """One request's sentences (source ids), settings and the future that gets its answer."""

    sources: list[list[int]]
    decode_cfg: DecodeConfig
    future: asyncio.Future[list[Scored]]
    arrived: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return sum(len(ids) + 1 for ids in self.sources)  # +1: the EOS every source gets


class Batcher:
    """Gathers queued jobs into decodes on `executor`; one gathering task per server."""

    def __init__(
        self,
        decode: DecodeFn,
        executor: Executor,
        settings: ServeSettings,
        metrics: ServerMetrics,
    ) -> None:
        self.decode = decode
        self.executor = executor
        self.settings = settings
        self.metrics = metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue(settings.max_queue)
        self.arrival = asyncio.Event()  # set when a job is queued: wakes a waiting gather
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="mt-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def submit(self, sources: list[list[int]], decode_cfg: DecodeConfig) -> list[Scored]:
        """n-best lists of `sources`; QueueFullError at once when the queue is full. A caller
        that stops waiting (a timeout) cancels the job's future, and the job is dropped."""
        job = Job(sources, decode_cfg, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFullError from None
        self.arrival.set()
        return await job.future

    async def run(self) -> None:
        while True:
            jobs = await self.gather()
            for group in groups(jobs):
                await self.answer(group)

    async def gather(self) -> list[Job]:
        """The next jobs to decode: the first to come, and those that join it in time."""
        jobs = [await self.next_job()]
        if not self.settings.batching:
            return jobs
        deadline = jobs[0].arrived + self.settings.batch_wait_ms / 1000
        tokens = jobs[0].tokens
        while tokens < self.settings.batch_tokens:
            if self.queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Waiting on the event, not on queue.get(): a timeout can never lose a job.
                self.arrival.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrival.wait(), left)
                continue
            job = self.queue.get_nowait()
            if not job.future.done():  # a job that timed out while queued is dropped
                jobs.append(job)
                tokens += job.tokens
        return jobs

    async def next_job(self) -> Job:
        while True:
            job = await self.queue.get()
            if not job.future.done():
                return job

    async def answer(self, jobs: list[Job]) -> None:
        """Decode the jobs' sentences as one batch and give each job its own."""
        live = [job for job in jobs if not job.future.done()]
        if not live:
            return
        sources = [ids for job in live for ids in job.sources]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self.executor, self.decode, sources, live[0].decode_cfg
            )
        except Exception as err:  # a bug in decoding: each waiting request gets a 500
            for job in live:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.metrics.decoded(len(live))
        start = 0
        for job in live:
            if not job.future.done():
                job.future.set_result(results[start : start + len(job.sources)])
            start += len(job.sources)


def groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs with equal decoding settings together, in order of their first job."""
    by_settings: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_settings.setdefault(dataclasses.astuple(job.decode_cfg), []).append(job)
    return list(by_settings.values())
