"""Costs charged from the response, through a real Envoy: a daily token quota per plan, where the
upstream states each response's usage in `x-usage-tokens` (here it repeats what the client asked it
to, through Envoy's %REQ()% formatter). A request passes while any of the quota is left; its usage
is charged when the response arrives, and the headers show what is left after that charge."""

from conftest import clear_of_window_edge, counter, fresh_key, wait_for
from processes import Redis, Service
from test_global import service_bin, stack  # noqa: F401 (fixtures)

USAGE = 300


def config() -> dict:
    return {"key_prefix": "usage", "headers": "x-ratelimit", "rules": [{
        "name": "tokens", "key": [{"source": "header", "name": "x-key"}],
        "cost": {"response_header": "x-usage-tokens", "max": 100000},
        "plan": {"header": "x-plan"}, "default_plan": "free",
        "plans": {
            "free": {"limit": {"algorithm": "fixed_window", "requests": 1000, "window": "day"}},
            "pro": {"limit": {"algorithm": "fixed_window", "requests": 5000, "window": "day"}},
        }}]}


def test_a_daily_token_quota_per_plan_is_charged_from_each_response(envoy_factory, report):
    envoy = envoy_factory(config(), concurrency=2,
                          upstream_response_headers={"x-usage-tokens": "%REQ(x-usage)%"})
    clear_of_window_edge(86400, 120)
    results = {}
    for plan in ("free", "pro"):
        headers = {"x-key": fresh_key(plan), "x-plan": plan, "x-usage": str(USAGE)}
        responses = [envoy.request("/", headers) for _ in range(20)]
        passed = [r for r in responses if r.status == 200]
        results[plan] = (len(passed), [r.headers.get("x-ratelimit-remaining") for r in passed])
        assert all(r.status == 429 for r in responses[len(passed):]), [r.status for r in responses]
    report(f"usage: {USAGE} tokens per response, daily quota free 1000 / pro 5000: (passed, remaining after "
           f"each) {results}")
    # Passes while any is left: free 1000 -> 700, 400, 100, then -200 (shown as 0).
    assert results["free"] == (4, ["700", "400", "100", "0"])
    assert results["pro"][0] == 17 and results["pro"][1][:3] == ["4700", "4400", "4100"]
    assert results["pro"][1][-1] == "0"
    # Counters reach Envoy on the workers' next tick (100 ms).
    expected = (4 + 17) * (USAGE - 1)
    wait_for(lambda: counter(envoy, "charged_units_total", "usage", "tokens") == expected,
             f"the charged counter to reach {expected}", timeout=5)


def service_charges(service) -> int:
    """Usage charges the service has counted (its Prometheus counter)."""
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in service.metrics().splitlines()
               if line.startswith("ratelimit_service_charges_total{"))


def test_a_global_daily_token_quota_is_charged_by_a_second_call_after_each_response(envoy_factory, stack,
                                                                                     tmp_path, report):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    rule = {**config()["rules"][0], "global": True}
    envoy = envoy_factory({**config(), "global": {"cluster": "ratelimit_service", "domain": "usage"},
                           "rules": [rule]}, concurrency=2, rls_port=service.grpc_port,
                          upstream_response_headers={"x-usage-tokens": "%REQ(x-usage)%"})
    clear_of_window_edge(86400, 120)
    results = {}
    for plan in ("free", "pro"):
        headers = {"x-key": fresh_key(plan), "x-plan": plan, "x-usage": str(USAGE)}
        passed = []
        for _ in range(20):
            charged = service_charges(service)
            r = envoy.request("/", headers)
            if r.status != 200:
                assert r.status == 429
                break
            passed.append(r.headers.get("x-ratelimit-remaining"))
            # The charge is a call of its own, after the response: the next request must find it counted.
            wait_for(lambda: service_charges(service) == charged + 1, "the usage charge to reach the service")
        results[plan] = (len(passed), passed)
    report(f"usage, global rule: {USAGE} tokens per response charged by a second call; daily quota free 1000 / "
           f"pro 5000: (passed, remaining after each) {results}")
    assert results["free"] == (4, ["700", "400", "100", "0"])
    assert results["pro"][0] == 17 and results["pro"][1][:3] == ["4700", "4400", "4100"]
