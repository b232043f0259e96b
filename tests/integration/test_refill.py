"""b. Tokens come back with time."""

import time

from conftest import filter_config, fresh_key, header_rule


def test_bucket_refills_after_waiting(envoy_factory):
    envoy = envoy_factory(filter_config(header_rule("per-key", 2, "2s", refill_tokens=2)))
    h = {"x-key": fresh_key("refill")}
    assert [envoy.request("/", h).status for _ in range(3)] == [200, 200, 429]
    time.sleep(2.2)
    assert envoy.request("/", h).status == 200
