"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations


class ServerMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("embedkit_http_requests_total", "HTTP requests by route and status code.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("embedkit_http_request_seconds", "HTTP request latency by route.", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.inflight = Gauge("embedkit_http_requests_in_flight", "Requests being handled.", registry=self.registry)
        self.inputs = Counter("embedkit_embedding_inputs_total", "Texts embedded.", ["model"], registry=self.registry)
        self.tokens = Counter("embedkit_embedding_tokens_total", "Tokens embedded (prompt and special tokens "
                              "included).", ["model"], registry=self.registry)
        self.rerank_requests = Counter("embedkit_rerank_requests_total", "Rerank requests answered.", ["model"],
                                       registry=self.registry)
        self.rerank_pairs = Counter("embedkit_rerank_pairs_total", "(query, document) pairs scored.", ["model"],
                                    registry=self.registry)
        self.rerank_tokens = Counter("embedkit_rerank_tokens_total", "Tokens of the pairs scored (after truncation, "
                                     "special tokens included).", ["model"], registry=self.registry)
        self.batch_rows = Histogram("embedkit_batch_rows", "Texts (or rerank pairs) per model call (after merging "
                                    "requests).",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                                    registry=self.registry)
        self.batch_tokens = Histogram("embedkit_batch_padded_tokens", "Padded tokens per model call.", ["model"],
                                      buckets=(64, 256, 1024, 4096, 8192, 16384, 32768, 65536),
                                      registry=self.registry)
        self.batch_seconds = Histogram("embedkit_batch_seconds", "Seconds per model call.", ["model"],
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                       registry=self.registry)
        self.queue_depth = Gauge("embedkit_queue_depth", "Requests waiting for the model.", ["model"],
                                 registry=self.registry)

    def batch_observer(self, model: str):
        rows, tokens, seconds = (self.batch_rows.labels(model), self.batch_tokens.labels(model),
                                 self.batch_seconds.labels(model))

        def observe(n_rows: int, n_tokens: int, elapsed: float) -> None:
            rows.observe(n_rows)
            tokens.observe(n_tokens)
            seconds.observe(elapsed)

        return observe

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
