"""Prometheus metrics: engine gauges/counters read at scrape time, latency histograms measured by the server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shoal.engine.protocol import EngineClient
from shoal.outputs import RequestOutput

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineCollector:
    """Reads engine.stats() at every scrape, so the numbers are never stale."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        gauges = [
            ("shoal_num_requests_running", "Requests being decoded", s.num_running),
            ("shoal_num_requests_waiting", "Requests waiting in the engine queue", s.num_waiting),
            ("shoal_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)", s.kv_cache_usage),
            ("shoal_kv_cache_free_blocks", "Free KV-cache blocks", s.num_free_blocks),
            ("shoal_kv_cache_total_blocks", "All KV-cache blocks", s.num_total_blocks),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("shoal_prompt_tokens", "Prompt tokens processed", s.prompt_tokens_total),
            ("shoal_generation_tokens", "Tokens generated", s.generation_tokens_total),
            ("shoal_num_preemptions", "Requests preempted to free KV blocks", s.num_preemptions_total),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """One registry per app (no global state)."""

    def __init__(self, engine: EngineClient | None) -> None:
        self.registry = CollectorRegistry()
        if engine is not None:
            self.registry.register(EngineCollector(engine))
        r = self.registry
        self.ttft = Histogram(
            "shoal_time_to_first_token_seconds", "Time to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "shoal_inter_token_latency_seconds", "Time between tokens", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "shoal_request_latency_seconds", "Request latency, end to end", buckets=_E2E_BUCKETS, registry=r
        )
        self.requests = Counter(
            "shoal_requests", "Requests answered, by route and status code", ["route", "status"], registry=r
        )
        self.rejected = Counter(
            "shoal_requests_rejected", "Requests refused with 503 (queue full or draining)", registry=r
        )
        self.aborted = Counter(
            "shoal_requests_aborted", "Requests aborted because the client went away", registry=r
        )
        self.waiting = Gauge(
            "shoal_server_waiting_sequences", "Interactive sequences admitted, no token yet", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTiming:
    """Observes one request's stream: TTFT per prompt, inter-token gaps, and when each prompt starts."""

    def __init__(
        self,
        metrics: ServerMetrics,
        arrival: float,
        on_first_token: Callable[[], None],
        cumulative: bool = False,
    ) -> None:
        """cumulative: outputs hold every token so far (non-streaming requests), not only new ones."""
        self.metrics = metrics
        self.arrival = arrival
        self.on_first_token = on_first_token
        self.cumulative = cumulative
        self.last: dict[int, float] = {}
        self.seen: dict[int, int] = {}  # tokens reported so far, per prompt

    def on_output(self, prompt_index: int, out: RequestOutput) -> None:
        count = max((len(c.token_ids) for c in out.outputs), default=0)
        new_tokens = count - self.seen.get(prompt_index, 0) if self.cumulative else count
        self.seen[prompt_index] = count if self.cumulative else self.seen.get(prompt_index, 0) + count
        if new_tokens <= 0:
            return
        now = time.perf_counter()
        last = self.last.get(prompt_index)
        if last is None:
            self.metrics.ttft.observe(now - self.arrival)
            self.on_first_token()
        else:
            gap = (now - last) / new_tokens
            for _ in range(new_tokens):
                self.metrics.itl.observe(gap)
        self.last[prompt_index] = now
