"""Prometheus metrics in a registry the app owns (never prometheus_client's global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "aiaas_http_requests",
            "HTTP requests served, by route template, method, status and organisation.",
            ["method", "route", "status", "org"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "aiaas_http_request_duration_seconds",
            "Time from request start to the end of the response body.",
            ["method", "route", "org"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "aiaas_http_requests_in_flight",
            "Requests being served now.",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "aiaas_auth_failures",
            "Requests rejected with 401.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
