"""A filter configuration pushed at runtime (what Istio does on every WasmPlugin change): the new
configuration takes over and what clients have used is kept. Envoy's native local_ratelimit builds
new buckets on such a push, so every client starts again with a full one."""

import time

from conftest import filter_config, fresh_key, header_rule


def wait_for_new_filter_chain(envoy, probe_header: str) -> None:
    # Envoy moves new connections to the new listener once it is warm; probe with throwaway keys.
    deadline = time.monotonic() + 30
    while envoy.request("/", {"x-key": fresh_key("probe")}).header(probe_header) is None:
        assert time.monotonic() < deadline, "the pushed configuration never answered"
        time.sleep(0.1)


def test_a_pushed_configuration_takes_over_and_keeps_what_clients_used(envoy_factory):
    rule = header_rule("per-key", 5, "1h")
    envoy = envoy_factory(filter_config(rule, headers="x-ratelimit"), dynamic=True)
    used = {"x-key": fresh_key("used")}
    assert [envoy.request("/", used).status for _ in range(6)] == [200] * 5 + [429]

    envoy.push_filter_config(filter_config(rule, headers="both"))
    wait_for_new_filter_chain(envoy, "ratelimit-policy")

    denied = envoy.request("/", used)
    assert denied.status == 429, "the exhausted client is still exhausted under the new configuration"
    assert denied.header("ratelimit").startswith('"per-key";r=0;'), denied.headers
    fresh = envoy.request("/", {"x-key": fresh_key("fresh")})
    assert fresh.status == 200 and fresh.header("ratelimit").startswith('"per-key";r=4;'), fresh.headers
    assert "invalid configuration" not in envoy.log()


def test_a_pushed_invalid_configuration_is_refused_and_the_old_one_keeps_serving(envoy_factory):
    rule = header_rule("per-key", 2, "1h")
    envoy = envoy_factory(filter_config(rule, headers="x-ratelimit"), dynamic=True)
    key = {"x-key": fresh_key("kept")}
    assert envoy.request("/", key).status == 200
    stat = "listener_manager.lds.update_rejected"
    before = envoy.stats(stat).get(stat, 0)
    envoy.push_filter_config({"rules": [{**rule, "limit": {"capacity": 0, "refill_period": "1h"}}]}, wait=False)
    deadline = time.monotonic() + 30
    while envoy.stats(stat).get(stat, 0) <= before:
        assert time.monotonic() < deadline, envoy.log()[-4000:]
    assert "ratelimit-wasm: invalid configuration: rules[0].limit.capacity" in envoy.log()
    assert [envoy.request("/", key).status for _ in range(2)] == [200, 429], "the old configuration still counts"
