"""Prometheus metrics: what the server counts, served at GET /metrics.

With several worker processes, set PROMETHEUS_MULTIPROC_DIR to an empty folder before start
(`custom-llm serve` does it when WORKERS > 1) and /metrics sums every worker's numbers.
"""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the endpoint)
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Requests are labelled by endpoint (the route table's labels) and agent (a profile's name, or "-").
REQUESTS = Counter(
    "custom_llm_requests_total",
    "Requests answered, by endpoint, HTTP status and agent.",
    ["endpoint", "status", "agent"],
)
FIRST_BYTE = Histogram(
    "custom_llm_time_to_first_byte_seconds",
    "From request to the first byte sent back.",
    ["endpoint", "agent"],
    buckets=SECONDS,
)
DURATION = Histogram(
    "custom_llm_request_duration_seconds",
    "From request to the last byte sent back.",
    ["endpoint", "agent"],
    buckets=SECONDS,
)
IN_FLIGHT = Gauge(
    "custom_llm_in_flight_requests", "Requests being answered now.", ["endpoint"], multiprocess_mode="livesum"
)
FIRST_SENTENCE = Histogram(
    "custom_llm_first_sentence_seconds",
    "From request to the end of the first complete sentence sent (our side of Agora's time to the first "
    "sentence: the turns API's llm_ttft + llm_ftfs, webhook event 111's llm_ttfs).",
    ["endpoint", "agent"],
    buckets=SECONDS,
)
CANCELLED = Counter("custom_llm_cancelled_total", "Requests the caller hung up on (barge-in).", ["endpoint", "agent"])
UPSTREAM_FIRST_EVENT = Histogram(
    "custom_llm_upstream_first_event_seconds",
    "From calling an upstream LLM to its first event.",
    ["upstream"],
    buckets=SECONDS,
)
UPSTREAM_ERRORS = Counter(
    "custom_llm_upstream_errors_total", "Failed upstream calls, by upstream and error code.", ["upstream", "code"]
)
RETRIES = Counter("custom_llm_upstream_retries_total", "Upstream calls tried again on the same upstream.")
FALLBACKS = Counter("custom_llm_fallbacks_total", "Upstream calls served by the fallback LLM.")
RETRIEVAL = Histogram("custom_llm_retrieval_seconds", "Knowledge base searches for /rag.", buckets=SECONDS)
TASKS = Gauge(
    "custom_llm_event_loop_tasks",
    "asyncio tasks alive in the worker, read at scrape time (leak check).",
    multiprocess_mode="livesum",
)
LIMITS_UNSHARED = Counter(
    "custom_llm_limits_unshared_total",
    "Requests whose per-key limits were counted in the process (or refused) because Redis was out of reach.",
)
TOOLS = Histogram("custom_llm_tool_seconds", "Server tool runs, by tool and outcome.", ["tool", "ok"], buckets=SECONDS)


# What an upstream failure is counted as: this server's own codes, else "other" (an upstream's own
# error codes are any string it likes, and each new label value would be a new series forever).
ERROR_CODES = frozenset(
    {
        "upstream_timeout",
        "upstream_unreachable",
        "upstream_failed",
        "upstream_auth_failed",
        "upstream_empty",
        "upstream_too_large",
        "upstream_event_too_large",
        "upstream_invalid_response",
        "too_deeply_nested",
        "rate_limit_exceeded",
        "insufficient_quota",
        "model_not_found",
        "context_length_exceeded",
        "invalid_request_error",
    }
)


def error_code(code: str | None) -> str:
    """A bounded label for an upstream error code."""
    return code if code in ERROR_CODES else "other"


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
