"""The server's metrics in Prometheus' text exposition format (version 0.0.4), and its request ids.

Written here rather than with `prometheus_client`, which slmkit does not depend on: counters, gauges read at
scrape time, and histograms with fixed buckets, each family rendered as

    # HELP name text
    # TYPE name counter|gauge|histogram
    name{label="value",...} number

(histograms as `name_bucket{le="..."}` cumulative counts ending at `le="+Inf"`, then `name_sum` and
`name_count`). Label values escape backslash, double quote and newline. Labels come from fixed sets (the
server's routes, HTTP status codes), never from request content, so a client cannot grow the number of series.

Updates take one lock: they come from the event loop (requests) and from the engine's scheduler thread
(finished sequences), and each is a few dictionary operations.

Request ids: `request_id(headers)` keeps a client's `X-Request-Id` when it is short and made of safe characters
(letters, digits, `._:-`), else makes a new one; `RequestIdFilter` puts the id of the request being served into
the log records of the `slmkit.serve` logger (as `record.request_id` and as a `[id] ` prefix).
"""

from __future__ import annotations

import contextvars
import logging
import math
import re
import threading
import uuid
from typing import Callable, Iterable

__all__ = ["CONTENT_TYPE", "Counter", "Histogram", "MetricsRegistry", "RequestIdFilter", "ServerMetrics",
           "current_request_id", "request_id"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Time to first token spans a cached short prompt (ms) to a long prefill behind a queue (s);
# the time between tokens of a CPU model spans about 1 ms to a second.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# engine.stats() key -> metric (the prefix cache's counters are 0 when it is off or the engine has none).
PREFIX_CACHE_METRICS = (
    ("prefix_cache_lookups", "slmkit_prefix_cache_lookups_total", "counter",
     "Prompts looked up in the prefix cache."),
    ("prefix_cache_hits", "slmkit_prefix_cache_hits_total", "counter",
     "Prompts that reused at least one cached block of prompt-prefix K/V."),
    ("prefix_cache_tokens_reused", "slmkit_prefix_cache_reused_tokens_total", "counter",
     "Prompt tokens taken from the prefix cache instead of being prefilled."),
    ("prefix_cache_evictions", "slmkit_prefix_cache_evictions_total", "counter",
     "Blocks evicted from the prefix cache to stay within its budget."),
    ("prefix_cache_bytes", "slmkit_prefix_cache_bytes", "gauge", "Bytes of K/V held by the prefix cache."),
    ("prefix_cache_blocks", "slmkit_prefix_cache_blocks", "gauge", "Blocks held by the prefix cache."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class _Family:
    type = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...], lock: threading.Lock):
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.help, self.label_names, self._lock = name, help, tuple(labels), lock

    def _key(self, labels: dict[str, str] | None) -> tuple[str, ...]:
        labels = labels or {}
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]


class Counter(_Family):
    type = "counter"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Family):
    """A value read when scraped (`read()` returns it); `kind="counter"` for a count kept elsewhere."""

    def __init__(self, name: str, help: str, lock: threading.Lock, read: Callable[[], float], kind: str = "gauge"):
        super().__init__(name, help, (), lock)
        self.read, self.type = read, kind

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(float(self.read()))}"]


class Histogram(_Family):
    type = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...], lock: threading.Lock,
                 buckets: Iterable[float]):
        super().__init__(name, help, labels, lock)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._series: dict[tuple[str, ...], list] = {}  # key -> [per-bucket counts (+Inf last), sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            s[0][i] += 1
            s[1] += value
            s[2] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            s = self._series.get(self._key(labels))
            return s[2] if s else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, ([*s[0]], s[1], s[2])) for k, s in self._series.items())
        if not items and not self.label_names:
            items = [((), ([0] * (len(self.buckets) + 1), 0.0, 0))]
        lines = self.header()
        for key, (counts, total, n) in items:
            running = 0
            for b, c in zip((*self.buckets, math.inf), counts):
                running += c
                le = 'le="' + _number(b) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return lines


class MetricsRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._families: list[_Family] = []

    def _add(self, family):
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} is already registered")
        self._families.append(family)
        return family

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help, labels, self._lock))

    def gauge(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> Gauge:
        return self._add(Gauge(name, help, self._lock, read, kind))

    def histogram(self, name: str, help: str, buckets: Iterable[float], labels: tuple[str, ...] = ()) -> Histogram:
        return self._add(Histogram(name, help, labels, self._lock, buckets))

    def render(self) -> str:
        return "\n".join(line for f in self._families for line in f.render()) + "\n"


class ServerMetrics:
    """The metrics of one `slm serve`: HTTP requests and errors, tokens, the engine's queue, latencies.
    `engine_stats` returns the engine's `stats()` (running, waiting, max_concurrent, max_waiting, the prefix
    cache's counters) and
    `engine_steps` its decode-step count; both are read at scrape time."""

    def __init__(self, engine_stats: Callable[[], dict], engine_steps: Callable[[], int] = lambda: 0):
        r = self.registry = MetricsRegistry()
        self.requests = r.counter("slmkit_http_requests_total", "HTTP requests answered, by endpoint, method and "
                                  "status code.", ("endpoint", "method", "status"))
        self.errors = r.counter("slmkit_http_errors_total", "HTTP requests answered with a 4xx or 5xx status, by "
                                "status code.", ("status",))
        self.duration = r.histogram("slmkit_http_request_duration_seconds", "Seconds from a request's arrival to "
                                    "the end of its response, by endpoint.", DURATION_BUCKETS, ("endpoint",))
        self.prompt_tokens = r.counter("slmkit_prompt_tokens_total", "Prompt tokens of accepted requests (as "
                                       "usage.prompt_tokens counts them).")
        self.completion_tokens = r.counter("slmkit_completion_tokens_total", "Tokens generated by sequences that "
                                           "finished (as usage.completion_tokens counts them).")
        self.sequences = r.counter("slmkit_sequences_finished_total", "Engine sequences that finished, by "
                                   "finish reason.", ("finish_reason",))
        self.ttft = r.histogram("slmkit_time_to_first_token_seconds", "Seconds from a sequence's submission to its "
                                "first generated token (queueing and prefill included).", TTFT_BUCKETS)
        self.tpot = r.histogram("slmkit_time_per_output_token_seconds", "Mean seconds between the generated tokens "
                                "of a sequence after its first, one observation per sequence.", TPOT_BUCKETS)
        stats = engine_stats
        r.gauge("slmkit_requests_running", "Sequences in the running batch (decoding or being prefilled).",
                lambda: stats()["running"])
        r.gauge("slmkit_requests_waiting", "Sequences waiting for a slot (the queue depth).",
                lambda: stats()["waiting"])
        r.gauge("slmkit_batch_occupancy_ratio", "Running sequences / the engine's max_concurrent.",
                lambda: (lambda s: s["running"] / max(1, s["max_concurrent"]))(stats()))
        r.gauge("slmkit_max_concurrent", "Sequences the engine runs at once (--max-concurrent).",
                lambda: stats()["max_concurrent"])
        r.gauge("slmkit_engine_decode_steps_total", "Decode steps the engine has run (one forward pass for the "
                "whole running batch).", lambda: engine_steps(), kind="counter")
        for key, name, kind, text in PREFIX_CACHE_METRICS:
            r.gauge(name, text, lambda key=key: stats().get(key, 0), kind=kind)

    def observe_http(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(endpoint=endpoint, method=method, status=str(status))
        if status >= 400:
            self.errors.inc(status=str(status))
        self.duration.observe(seconds, endpoint=endpoint)

    def observe_sequence(self, finished) -> None:
        """A sequence's `Finished` event (engine.py): tokens out, finish reason, its latencies."""
        n = finished.completion_tokens
        self.completion_tokens.inc(n)
        self.sequences.inc(finish_reason=finished.finish_reason)
        if n > 0:
            self.ttft.observe(finished.time_to_first_token)
        if n > 1:
            self.tpot.observe(max(0.0, finished.seconds - finished.time_to_first_token) / (n - 1))

    def render(self) -> str:
        return self.registry.render()


# -- request ids -------------------------------------------------------------------------------------

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("slmkit_request_id", default=None)


def request_id(given: str | None) -> str:
    """The client's id when it is sane (1-128 of `A-Za-z0-9._:-`: safe in a header and a log line), else a new
    random one."""
    if given is not None and _SANE_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return _current.get()


def set_request_id(rid: str | None) -> contextvars.Token:
    return _current.set(rid)


def reset_request_id(token: contextvars.Token) -> None:
    _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds the request being served to a log record: `record.request_id` ("-" outside a request) and, inside
    one, a `[id] ` prefix to the message, so the id shows whatever the handler's format."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _current.get()
        if getattr(record, "request_id", None) is None:
            record.request_id = rid or "-"
            if rid is not None:
                record.msg = f"[{rid}] {record.msg}"
        return True
