"""h. The filter's counters, as Envoy exposes them (stats and /stats/prometheus)."""

from conftest import custom_stat, filter_config, fresh_key, header_rule

PREFIX = "rl"
RULE = "per-key"


def test_counters_count_allowed_and_denied(envoy_factory, report):
    envoy = envoy_factory(filter_config(header_rule(RULE, 3, "24h"), key_prefix=PREFIX), concurrency=2)
    h = {"x-key": fresh_key("metrics")}
    statuses = [envoy.request("/", h).status for _ in range(5)]
    statuses += [envoy.request("/", {}).status for _ in range(2)]  # rule skipped: counted nowhere
    assert statuses == [200, 200, 200, 429, 429, 200, 200]

    base = f"ratelimit_wasm.{PREFIX}"
    assert custom_stat(envoy, f"{base}.{RULE}.allowed") == 3, envoy.stats("wasmcustom.")
    assert custom_stat(envoy, f"{base}.{RULE}.denied") == 2
    assert custom_stat(envoy, f"{base}.{RULE}.table_full") == 0
    assert custom_stat(envoy, f"{base}.cas_retries_exhausted") == 0

    # Envoy strips the "wasmcustom." namespace in Prometheus output (no "envoy_" prefix) and
    # turns every character outside [a-zA-Z0-9_] into "_".
    prom = envoy.prometheus_samples("ratelimit_wasm_")
    report("metrics: Envoy stat names: " + ", ".join(sorted(envoy.stats("wasmcustom.ratelimit_wasm"))))
    report("metrics: prometheus samples: " + ", ".join(f"{k} {v:g}" for k, v in sorted(prom.items())))
    assert prom["ratelimit_wasm_rl_per_key_allowed{}"] == 3
    assert prom["ratelimit_wasm_rl_per_key_denied{}"] == 2
    assert prom["ratelimit_wasm_rl_per_key_table_full{}"] == 0
    assert prom["ratelimit_wasm_rl_cas_retries_exhausted{}"] == 0
