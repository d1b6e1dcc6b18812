"""Every Prometheus object lowbit exports, and the boundary hooks that update them.

Updated only at request boundaries (admission, first token, finish, error) by the
scheduler (through `SchedulerObserver`) and by the serving layer; never inside an engine.
Each app instance owns its own registry so that tests can build many apps in one process.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engines.base import EngineInfo

LABELS = ("model", "engine", "device")
_TOKENS_PER_S_WINDOW_S = 10.0

# Seconds, from a millisecond to many minutes: LLM latencies span that whole range.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                    0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
                    300.0, 600.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                          0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class TokenRateWindow:
    """Generated tokens per second over the last few seconds, per label set."""

    def __init__(self, window_s: float = _TOKENS_PER_S_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._events: dict[tuple[str, ...], collections.deque] = {}
        self._lock = threading.Lock()

    def add(self, labels: tuple[str, ...], num_tokens: int) -> None:
        with self._lock:
            self._events.setdefault(labels, collections.deque()).append((self._clock(), num_tokens))

    def rates(self) -> dict[tuple[str, ...], float]:
        cutoff = self._clock() - self._window_s
        with self._lock:
            result = {}
            for labels, events in self._events.items():
                while events and events[0][0] < cutoff:
                    events.popleft()
                result[labels] = sum(n for _, n in events) / self._window_s
            return result


class _EngineStateCollector(Collector):
    """Gauges read at scrape time: the engines' KV-cache usage and the token rate."""

    def __init__(self, engines: Callable[[], Iterable[tuple[tuple[str, ...], Callable[[], float | None]]]],
                 rate: TokenRateWindow):
        self._engines = engines
        self._rate = rate

    def collect(self):
        kv = GaugeMetricFamily("lowbit_kv_cache_usage_ratio",
                               "Fraction of the engine's KV-cache memory in use", labels=LABELS)
        for labels, usage in self._engines():
            value = usage()
            if value is not None:
                kv.add_metric(labels, value)
        yield kv
        rate = GaugeMetricFamily("lowbit_generation_tokens_per_second",
                                 f"Generated tokens per second over the last {_TOKENS_PER_S_WINDOW_S:g} s",
                                 labels=LABELS)
        for labels, value in self._rate.rates().items():
            rate.add_metric(labels, value)
        yield rate


class Metrics:
    """Owns the registry; its methods are the only way code changes a metric."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lowbit_requests_total", "Requests by outcome",
                                LABELS + ("outcome", "finish_reason"), registry=r)
        self.prompt_tokens = Counter("lowbit_prompt_tokens_total", "Prompt tokens processed", LABELS, registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens_total", "Tokens generated", LABELS, registry=r)
        self.rejected = Counter("lowbit_request_rejected_total", "Requests refused before admission",
                                ("model", "reason"), registry=r)
        self.admitted = Counter("lowbit_request_admitted_total", "Requests admitted to an engine's queue",
                                LABELS, registry=r)
        self.aborted = Counter("lowbit_request_aborted_total", "Admitted requests aborted",
                               LABELS + ("reason",), registry=r)
        self.engine_fallbacks = Counter("lowbit_engine_fallback_total", "Requests moved to another engine",
                                       ("model", "from_engine", "to_engine"), registry=r)
        self.device_fallbacks = Counter("lowbit_device_fallback_total", "Engine loads that fell back to another device",
                                       ("model", "engine", "from_device", "to_device"), registry=r)
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "Time from arrival to the first token",
                              LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lowbit_inter_token_latency_seconds", "Time between streamed tokens",
                             LABELS, buckets=_TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lowbit_e2e_request_latency_seconds", "Time from arrival to the last token",
                             LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lowbit_request_queue_time_seconds", "Time waiting for an engine slot",
                                    LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("lowbit_request_prefill_time_seconds", "Time from start to the first token",
                                      LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("lowbit_request_decode_time_seconds", "Time from the first to the last token",
                                     LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("lowbit_request_prompt_tokens", "Prompt tokens per request",
                                               LABELS, buckets=_TOKEN_COUNT_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("lowbit_request_generation_tokens",
                                                   "Generated tokens per request", LABELS,
                                                   buckets=_TOKEN_COUNT_BUCKETS, registry=r)
        self.running = Gauge("lowbit_num_requests_running", "Requests generating", LABELS, registry=r)
        self.waiting = Gauge("lowbit_num_requests_waiting", "Requests queued for an engine", LABELS, registry=r)
        self.engine_info = Gauge("lowbit_engine_info", "Loaded engines (value 1)",
                                 ("model", "engine", "device", "quantization"), registry=r)
        self.engine_in_rotation = Gauge("lowbit_engine_in_rotation", "1 while the engine takes requests",
                                        ("model", "engine", "device", "instance"), registry=r)
        self.token_rate = TokenRateWindow()
        self._kv_sources: dict[tuple[str, ...], Callable[[], float | None]] = {}
        self._slots_by_labels: dict[tuple[str, ...], set] = {}
        r.register(_EngineStateCollector(lambda: list(self._kv_sources.items()), self.token_rate))

    # --- engines --------------------------------------------------------------------------

    def engine_loaded(self, model_id: str, info: EngineInfo, kv_cache_usage: Callable[[], float | None]) -> None:
        labels = (model_id, info.engine, info.device)
        self.engine_info.labels(model_id, info.engine, info.device, info.quantization).set(1)
        self._kv_sources[labels] = kv_cache_usage
        for failed, succeeded in zip(info.device_attempts, info.device_attempts[1:]):
            self.device_fallbacks.labels(model_id, info.engine, failed.device, succeeded.device).inc()
        for labels_ in (self.running, self.waiting):
            labels_.labels(*labels).set(0)

    # --- SchedulerObserver -------------------------------------------------------------------

    def request_rejected(self, model_id: str, reason: str) -> None:
        self.rejected.labels(model_id, reason).inc()
        self.requests.labels(model_id, "", "", "rejected", "").inc()

    def request_admitted(self, slot) -> None:
        self.admitted.labels(*slot_labels(slot)).inc()

    def queue_changed(self, slot) -> None:
        labels = slot_labels(slot)
        # Several engine instances may share one label set (two CPU engines): sum them.
        peers = self._slots_by_labels.setdefault(labels, set())
        peers.add(slot)
        self.running.labels(*labels).set(sum(len(s.running) for s in peers))
        self.waiting.labels(*labels).set(sum(len(s.waiting) for s in peers))

    def request_started(self, slot, queue_time_s: float) -> None:
        self.queue_time.labels(*slot_labels(slot)).observe(queue_time_s)

    def engine_fallback(self, from_slot, to_slot) -> None:
        self.engine_fallbacks.labels(from_slot.model_id, from_slot.name, to_slot.name).inc()

    def request_aborted(self, slot, reason: str) -> None:
        labels = slot_labels(slot) if slot is not None else ("", "", "")
        self.aborted.labels(*labels, reason).inc()

    def rotation_changed(self, slot) -> None:
        model, engine, device = slot_labels(slot)
        self.engine_in_rotation.labels(model, engine, device, slot.name).set(1 if slot.in_rotation else 0)

    # --- serving boundaries ---------------------------------------------------------------------

    def tokens_streamed(self, labels: tuple[str, str, str], num_tokens: int) -> None:
        self.token_rate.add(labels, num_tokens)

    def request_finished(self, labels: tuple[str, str, str], outcome: str, finish_reason: str,
                         num_prompt_tokens: int, num_generated_tokens: int,
                         arrived: float, started: float | None,
                         chunk_times: Sequence[tuple[float, int]], finished: float) -> None:
        """One call per admitted request, whatever its outcome.

        Times are monotonic seconds; `chunk_times` holds (arrival, number of tokens) for
        each chunk of tokens the engine produced.
        """
        self.requests.labels(*labels, outcome, finish_reason).inc()
        self.prompt_tokens.labels(*labels).inc(num_prompt_tokens)
        self.generation_tokens.labels(*labels).inc(num_generated_tokens)
        self.request_prompt_tokens.labels(*labels).observe(num_prompt_tokens)
        self.request_generation_tokens.labels(*labels).observe(num_generated_tokens)
        self.e2e.labels(*labels).observe(finished - arrived)
        if chunk_times:
            first, last = chunk_times[0][0], chunk_times[-1][0]
            self.ttft.labels(*labels).observe(first - arrived)
            if started is not None:
                self.prefill_time.labels(*labels).observe(first - started)
            self.decode_time.labels(*labels).observe(last - first)
            itl = self.itl.labels(*labels)
            for (previous, _), (current, num_tokens) in zip(chunk_times, chunk_times[1:]):
                for _ in range(num_tokens):  # a chunk of n tokens: n equal gaps
                    itl.observe((current - previous) / num_tokens)


def slot_labels(slot) -> tuple[str, str, str]:
    info = slot.engine.info
    return (slot.model_id, info.engine, info.device)
