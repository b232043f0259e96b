"""Costs charged from the response, through a real Envoy: a daily token quota per plan, where the
upstream states each response's usage in `x-usage-tokens` (here it repeats what the client asked it
to, through Envoy's %REQ()% formatter). A request passes while any of the quota is left; its usage
is charged when the response arrives, and the headers show what is left after that charge."""

from http.server import BaseHTTPRequestHandler

from conftest import clear_of_window_edge, counter, fresh_key, loopback_http_server, wait_for
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


class TrailerUpstream(BaseHTTPRequestHandler):
    """Streams its body in chunks and states the usage (what the request's x-usage asks) only in a
    trailer, as a streamed LLM response does."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        usage = self.headers.get("x-usage", "0")
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("trailer", "x-usage-tokens")
        self.end_headers()
        for piece in (b"hello ", b"world"):
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(f"0\r\nx-usage-tokens: {usage}\r\n\r\n".encode())

    def log_message(self, *_):
        pass


def test_a_usage_stated_in_the_trailers_is_charged_when_they_arrive(envoy_factory, report):
    with loopback_http_server(TrailerUpstream) as port:
        envoy = envoy_factory(config(), concurrency=2, external_upstream=port, upstream_trailers=True)
        clear_of_window_edge(86400, 120)
        headers = {"x-key": fresh_key("trailers"), "x-plan": "free", "x-usage": str(USAGE)}
        statuses = []
        for _ in range(8):
            charged = counter(envoy, "charged_units_total", "usage", "tokens") or 0
            r = envoy.request("/", headers)
            statuses.append(r.status)
            if r.status != 200:
                break
            assert r.body == b"hello world"
            # The trailers come after the headers the client saw: wait for the charge to land.
            wait_for(lambda: counter(envoy, "charged_units_total", "usage", "tokens") == charged + USAGE - 1,
                     "the usage in the trailers to be charged")
    report(f"usage in trailers: {USAGE} tokens per response, free plan 1000 a day: statuses {statuses}")
    # As from headers: free 1000 -> 700, 400, 100, then -200; the 5th is denied.
    assert statuses == [200, 200, 200, 200, 429]
