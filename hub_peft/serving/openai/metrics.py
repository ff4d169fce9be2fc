"""Prometheus metrics of the server through ``prometheus_client``, named like vLLM's (``hub_peft:`` for
``vllm:``). Each app has its own registry, so several servers in one process never share counters."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from ..engine import Engine
    from ..request import Request
    from ..scheduler import Scheduler

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hub_peft:requests", "Finished requests by adapter and HTTP status.", ["adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter("hub_peft:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_prompt_tokens = Counter(
            "hub_peft:prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache.", registry=r
        )
        self.generation_tokens = Counter("hub_peft:generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram(
            "hub_peft:time_to_first_token_seconds", "From arrival to the first token.", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "hub_peft:inter_token_latency_seconds", "Between two tokens of one request.", buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram(
            "hub_peft:e2e_request_latency_seconds", "From arrival to the end.", buckets=_LATENCY, registry=r
        )
        self.batch = Histogram(
            "hub_peft:iteration_rows",
            "Sequences in one engine step.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.running = Gauge("hub_peft:num_requests_running", "Requests holding a cache slot.", registry=r)
        self.waiting = Gauge("hub_peft:num_requests_waiting", "Requests in the queue.", registry=r)
        r.register(_EngineCollector(engine, scheduler))

    def step(self, scheduler: Scheduler, seconds: float) -> None:
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        if scheduler.running:
            self.batch.observe(len(scheduler.running))

    def finished(self, request: Request, status: int) -> None:
        self.requests.labels(request.label, str(status)).inc()
        if request.generation is not None:
            self.prompt_tokens.inc(len(request.generation.prompt_ids))
            self.cached_prompt_tokens.inc(request.generation.cached_prompt_tokens)
            self.generation_tokens.inc(len(request.generation.output))
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted)
        self.e2e.observe(time.monotonic() - request.submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Per-adapter running/waiting requests and the adapter cache, read at scrape time."""

    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self.engine, self.scheduler = engine, scheduler

    def collect(self):
        running = GaugeMetricFamily(
            "hub_peft:adapter_requests_running", "Running requests per adapter.", labels=["adapter"]
        )
        waiting = GaugeMetricFamily(
            "hub_peft:adapter_requests_waiting", "Waiting requests per adapter.", labels=["adapter"]
        )
        for family, queue in ((running, list(self.scheduler.running)), (waiting, list(self.scheduler.waiting))):
            counts: dict[str, int] = {}
            for request in queue:
                counts[request.label] = counts.get(request.label, 0) + 1
            for label, count in sorted(counts.items()):
                family.add_metric([label], count)
        yield running
        yield waiting
        loaded = self.engine.cache.loaded()
        yield GaugeMetricFamily("hub_peft:adapters_loaded", "Adapters known by name.", value=len(loaded))
        yield GaugeMetricFamily(
            "hub_peft:adapters_resident",
            "Adapters whose weights are in memory.",
            value=sum(e["resident"] for e in loaded),
        )
        yield GaugeMetricFamily(
            "hub_peft:adapter_cache_bytes",
            "Bytes of resident adapter weights.",
            value=self.engine.cache.resident_bytes(),
        )
        grammars = self.engine.__dict__.get("grammars")  # made at the first constrained request (never here)
        yield CounterMetricFamily(
            "hub_peft:structured_output_mask_seconds",
            "Time the steps spent computing structured output's token masks.",
            value=grammars.mask_seconds if grammars is not None else 0.0,
        )
        yield CounterMetricFamily(
            "hub_peft:structured_output_compiles",
            "Schemas and grammars compiled (the rest came from the cache).",
            value=grammars.compiles if grammars is not None else 0,
        )
        for name in ("hits", "misses", "evictions", "loads"):
            yield CounterMetricFamily(
                f"hub_peft:adapter_cache_{name}", f"Adapter cache {name}.", value=self.engine.cache.stats[name]
            )
