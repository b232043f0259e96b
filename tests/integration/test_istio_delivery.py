"""The filter delivered exactly as Istio delivers a WasmPlugin (pilot's wasmplugin translation):
by extension config discovery (ECDS) under the filter name Istio uses, before and from Istio 1.30;
`configuration` a StringValue of compact JSON with sorted keys whose numbers Go printed as doubles;
no `root_id`, no `vm_id`; runtime V8; `failure_policy` FAIL_CLOSED. Limits and headers work, and an
update pushed over ECDS keeps what clients used (as Istio pushes one on every WasmPlugin change)."""

import json
import os
import time

import pytest

from conftest import fresh_key

NAMES = [
    "extensions.istio.io/wasmplugin/istio-system.ratelimit",  # Istio up to 1.29
    "extensions.istio.io/trafficextension/istio-system.ratelimit~istio-translated-wasmplugin",  # from 1.30
]


def as_go_prints_it(config: dict) -> str:
    """Compact, sorted keys, every number a double (protobuf Struct values are), e.g. 3 -> 3.0."""
    def doubles(v):
        if isinstance(v, bool) or not isinstance(v, (int, float, dict, list)):
            return v
        if isinstance(v, dict):
            return {k: doubles(x) for k, x in v.items()}
        if isinstance(v, list):
            return [doubles(x) for x in v]
        return float(v)
    return json.dumps(doubles(config), sort_keys=True, separators=(",", ":"))


def write_ecds(path, name: str, wasm_path, config: dict) -> None:
    resource = {
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name.split("/")[-1],
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": as_go_prints_it(config)},
                "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(wasm_path)}}},
                "failure_policy": "FAIL_CLOSED",
            },
        },
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version_info": str(time.time_ns()), "resources": [resource]}))
    os.replace(tmp, path)


def plugin_config(requests: int) -> dict:
    return {"key_prefix": "istio-system.ratelimit", "headers": "both", "rules": [{
        "name": "per-user", "key": [{"source": "header", "name": "x-user"}],
        "limit": {"algorithm": "fixed_window", "requests": requests, "window": "1h"}}]}


def reloads(envoy) -> int:
    return sum(v for k, v in envoy.stats("extension_config_discovery.").items() if k.endswith(".config_reload"))


@pytest.mark.parametrize("name", NAMES, ids=["before-1.30", "from-1.30"])
def test_a_wasmplugin_delivered_as_istio_does_limits_and_keeps_counts_across_an_update(
        envoy_factory, wasm_path, tmp_path, name):
    ecds = tmp_path / "ecds.json"
    write_ecds(ecds, name, wasm_path, plugin_config(3))
    envoy = envoy_factory("{}", ecds=(name, ecds), vm_id=None)
    user = {"x-user": fresh_key("istio")}
    statuses = [envoy.request("/", user) for _ in range(4)]
    assert [r.status for r in statuses] == [200, 200, 200, 429]
    assert statuses[0].header("ratelimit") .startswith('"per-user";r=2;'), statuses[0].headers

    before = reloads(envoy)
    write_ecds(ecds, name, wasm_path, plugin_config(5))
    deadline = time.monotonic() + 30
    while reloads(envoy) <= before:
        assert time.monotonic() < deadline, "Envoy did not take the ECDS update\n" + envoy.log()[-3000:]
        time.sleep(0.05)
    # The window's count of 3 is kept: 2 more under the new limit of 5, not 5.
    statuses = [envoy.request("/", user).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert "invalid configuration" not in envoy.log()
