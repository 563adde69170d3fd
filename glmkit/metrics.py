"""The engine's Prometheus metrics (what ``GET /metrics`` of ``glmkit serve`` shows), named after vLLM's.

Each engine has its own registry, so several engines in one process (tests, notebooks) do not collide.
Without ``prometheus-client`` installed (it comes with the ``server`` extra) the engine keeps no metrics.
Introduced in ``notebooks/07_openai_server.ipynb``.

>>> m = EngineMetrics(slots=4)
>>> m.prompt_tokens.inc(12)
>>> "glmkit_prompt_tokens_total 12.0" in m.text()
True
"""

from __future__ import annotations

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0,
                2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineMetrics:
    """Gauges, counters and histograms of one engine, in its own ``prometheus_client.CollectorRegistry``."""

    def __init__(self, slots: int) -> None:
        # optional (server extra): only a served engine counts
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.running = Gauge("glmkit_num_requests_running", "Requests holding a KV-cache slot.", registry=r)
        self.waiting = Gauge("glmkit_num_requests_waiting", "Requests waiting for a slot.", registry=r)
        self.prompt_tokens = Counter("glmkit_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("glmkit_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("glmkit_request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("glmkit_time_to_first_token_seconds", "Submission to first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("glmkit_time_per_output_token_seconds", "Time between consecutive tokens of the "
                              "running requests: one observation per decode step.", buckets=TPOT_BUCKETS, registry=r)
        self.batch = Histogram("glmkit_batch_size", "Requests decoded together, per decode step.",
                               buckets=BATCH_BUCKETS, registry=r)
        self.slots_used = Gauge("glmkit_kv_slots_used", "KV-cache slots (rows) in use.", registry=r)
        self.slots_total = Gauge("glmkit_kv_slots_total", "KV-cache slots (rows) in all.", registry=r)
        self.slots_total.set(slots)

    def text(self) -> str:
        """The Prometheus text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def engine_metrics(slots: int) -> EngineMetrics | None:
    """``EngineMetrics`` if ``prometheus-client`` is installed, else ``None``."""
    try:
        return EngineMetrics(slots)
    except ImportError:
        return None
