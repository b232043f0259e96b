"""h. The filter's counters, as Envoy exposes them (stats and /stats/prometheus)."""

import re

from conftest import counter, filter_config, fresh_key, header_rule

PREFIX = "rl"
RULE = "per-key"


def test_counters_count_allowed_and_denied(envoy_factory, report):
    envoy = envoy_factory(filter_config(header_rule(RULE, 3, "24h"), key_prefix=PREFIX), concurrency=2)
    h = {"x-key": fresh_key("metrics")}
    statuses = [envoy.request("/", h).status for _ in range(5)]
    statuses += [envoy.request("/", {}).status for _ in range(2)]  # rule skipped: counted nowhere
    assert statuses == [200, 200, 200, 429, 429, 200, 200]

    assert counter(envoy, "requests_total", PREFIX, RULE, "allowed") == 3, envoy.stats("wasmcustom.")
    assert counter(envoy, "requests_total", PREFIX, RULE, "denied") == 2
    assert counter(envoy, "table_full_total", PREFIX, RULE) == 0
    assert counter(envoy, "cas_retries_exhausted_total", PREFIX) == 0

    # With the stats_tags the README ships, the labels written into the names become Prometheus
    # labels, and Envoy strips the "wasmcustom." namespace (no "envoy_" prefix).
    samples = envoy.prometheus_samples("ratelimit_wasm_")
    report("metrics: prometheus samples: " + ", ".join(f"{k} {v:g}" for k, v in sorted(samples.items())))
    prom = {labelled(sample): value for sample, value in samples.items()}
    rule = {"key_prefix": PREFIX, "rule": RULE}
    assert prom[("ratelimit_wasm_requests_total", frozenset({**rule, "decision": "allowed"}.items()))] == 3
    assert prom[("ratelimit_wasm_requests_total", frozenset({**rule, "decision": "denied"}.items()))] == 2
    assert prom[("ratelimit_wasm_table_full_total", frozenset(rule.items()))] == 0
    assert prom[("ratelimit_wasm_cas_retries_exhausted_total", frozenset({"key_prefix": PREFIX}.items()))] == 0


def labelled(sample: str) -> tuple[str, frozenset]:
    """'name{a="1",b="2"}' -> ('name', {('a', '1'), ('b', '2')}), whatever order Envoy prints them in."""
    name, _, rest = sample.partition("{")
    pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', rest)
    return name, frozenset(pairs)
