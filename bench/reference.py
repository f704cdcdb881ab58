"""Peer figures measured earlier on this machine kind (medians of 3 interleaved rounds).

Source: bench/peers/REFERENCE.md (2026-11-28). Used only when a peer cannot be
installed or started in this run, and then marked "reference, not measured in this run".
"""

from __future__ import annotations

SOURCE = "bench/peers/REFERENCE.md"

# key -> workload -> figures
REFERENCE: dict[str, dict[str, dict[str, float]]] = {
    "dbos-sqlite": {"throughput": {"workflows_per_s": 170.8},
                    "latency": {"p50_ms": 3.94, "p99_ms": 6.02}},
    "dbos-postgres": {"throughput": {"workflows_per_s": 179.4},
                      "latency": {"p50_ms": 6.79, "p99_ms": 9.48}},
    "faststream-nats": {"throughput": {"workflows_per_s": 1490.1},
                        "latency": {"p50_ms": 1.69, "p99_ms": 2.29}},
    "celery-redis": {"throughput": {"workflows_per_s": 291.5},
                     "latency": {"p50_ms": 5.31, "p99_ms": 8.68}},
    "temporal-activities": {"throughput": {"workflows_per_s": 32.5},
                            "latency": {"p50_ms": 199.98, "p99_ms": 204.27}},
    "temporal-local": {"throughput": {"workflows_per_s": 45.3},
                       "latency": {"p50_ms": 50.10, "p99_ms": 63.98}},
}
