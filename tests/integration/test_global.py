"""Global limits with real processes: Envoys running the filter, our ratelimit-service, Redis
(single and a 3-node Cluster), and Envoy's native global rate limit filter using our service."""

import json
import subprocess
import threading
import time

import pytest

from conftest import REPO, clear_of_window_edge, counter, do_request, fresh_key, run_parallel
from processes import SERVICE_BIN, Redis, Service, redis_cli

LIMIT = 50
REQUESTS = 400
CONNECTIONS = 100


@pytest.fixture(scope="session")
def service_bin():
    subprocess.run(["cargo", "build", "-q", "-p", "ratelimit-service"], cwd=REPO, check=True,
                   stdin=subprocess.DEVNULL, timeout=1800)
    assert SERVICE_BIN.is_file()
    return SERVICE_BIN


@pytest.fixture
def stack(service_bin, tmp_path):
    """Starts processes and stops every one of them at the end, whatever happened."""
    started = []

    def add(proc):
        started.append(proc)
        return proc.start()

    yield add
    for proc in reversed(started):
        proc.stop()


def global_config(rules, **top):
    return {"key_prefix": "g", "global": {"cluster": "ratelimit_service", "domain": "edge", "timeout": "1s",
                                          **top.pop("global", {})}, "rules": rules, **top}


def per_key_rule(name="shared", limit=LIMIT, window="day", **extra):
    return {"name": name, "global": True, "key": [{"source": "header", "name": "x-key"}],
            "limit": {"algorithm": "fixed_window", "requests": limit, "window": window}, **extra}


def exact_rounds(envoys, rounds, key_label, report, label):
    admitted = []
    per_conn = REQUESTS // CONNECTIONS
    clear_of_window_edge(86400, 180)  # per_key_rule's default day window
    for rnd in range(rounds):
        key = fresh_key(f"{key_label}{rnd}")
        results = []
        # Half the connections on each Envoy, all at once.
        chunks = [None] * len(envoys)

        def drive(i, envoy):
            chunks[i] = run_parallel(CONNECTIONS // len(envoys),
                                     lambda _j, conn: [do_request(conn, "/", {"x-key": key}).status
                                                       for _ in range(per_conn)], envoy, timeout=60)

        threads = [threading.Thread(target=drive, args=(i, e)) for i, e in enumerate(envoys)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in chunks:
            results.extend(c or [])
        assert len(results) == REQUESTS and set(results) <= {200, 429}, sorted(set(results))
        admitted.append(results.count(200))
    report(f"{label}: limit {LIMIT}, {REQUESTS} requests over {CONNECTIONS} connections, "
           f"{len(envoys)} Envoy(s) x --concurrency 2, {rounds} rounds; admitted per round: {admitted}")
    return admitted


def two_envoys_agree_exactly(envoy_factory, service, report, label):
    """Two Envoys (2 workers each) on one service: exactly LIMIT admitted, 10 rounds."""
    envoys = [envoy_factory(global_config([per_key_rule()]), concurrency=2, rls_port=service.grpc_port)
              for _ in range(2)]
    admitted = exact_rounds(envoys, 10, label.split()[0], report, f"global exactness ({label})")
    assert admitted == [LIMIT] * 10


def test_two_envoys_share_one_limit_through_the_service(envoy_factory, stack, tmp_path, report):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    two_envoys_agree_exactly(envoy_factory, service, report, "single Redis")


def test_allowed_and_denied_responses_carry_the_service_figures(envoy_factory, stack, tmp_path):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoy = envoy_factory(global_config([per_key_rule(limit=3, window="1m")]), rls_port=service.grpc_port)
    clear_of_window_edge(60, 20)
    key = {"x-key": fresh_key()}
    first = envoy.request("/", key)
    assert first.status == 200
    assert first.header("x-ratelimit-limit") == "3" and first.header("x-ratelimit-remaining") == "2"
    assert first.header("ratelimit-policy") == '"shared";q=3;w=60'
    assert 0 < int(first.header("x-ratelimit-reset")) <= 60
    envoy.request("/", key), envoy.request("/", key)
    denied = envoy.request("/", key)
    assert denied.status == 429
    assert denied.header("x-ratelimit-remaining") == "0"
    assert 1 <= int(denied.header("retry-after")) <= 60
    assert denied.header("x-ratelimit-reset") == denied.header("retry-after")


def decisions(service, domain="edge") -> int:
    """Descriptor decisions the service made for `domain` (its Prometheus counter)."""
    total = 0
    for line in service.metrics().splitlines():
        if line.startswith("ratelimit_service_decisions_total{") and f'domain="{domain}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_a_local_denial_costs_no_call(envoy_factory, stack, tmp_path):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    local = {"name": "local", "key": [{"source": "header", "name": "x-key"}],
             "limit": {"capacity": 1, "refill_period": "1h"}}
    envoy = envoy_factory(global_config([local, per_key_rule(limit=10, window="1h")]), rls_port=service.grpc_port)
    clear_of_window_edge(3600, 60)
    key = {"x-key": fresh_key()}
    assert [envoy.request("/", key).status for _ in range(3)] == [200, 429, 429]
    assert decisions(service) == 1


def test_a_global_denial_gives_the_local_tokens_back(envoy_factory, stack, tmp_path):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    local = {"name": "local", "key": [{"source": "header", "name": "x-key"}],
             "limit": {"capacity": 5, "refill_period": "24h"}}
    envoy = envoy_factory(global_config([local, per_key_rule(limit=2, window="1h")], status_path="/rl"),
                          rls_port=service.grpc_port)
    clear_of_window_edge(3600, 60)
    key = {"x-key": fresh_key()}
    assert [envoy.request("/", key).status for _ in range(4)] == [200, 200, 429, 429]
    standing = json.loads(envoy.request("/rl", key).body)["limits"]
    assert [(l["rule"], l["global"], l["remaining"]) for l in standing] == [("local", False, 3), ("shared", True, 0)]


def test_the_status_endpoint_shows_global_rules_without_consuming(envoy_factory, stack, tmp_path):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoy = envoy_factory(global_config([per_key_rule(limit=3, window="1h")], status_path="/rl"),
                          rls_port=service.grpc_port)
    clear_of_window_edge(3600, 60)
    key = {"x-key": fresh_key()}
    assert envoy.request("/", key).status == 200
    for _ in range(3):
        [entry] = json.loads(envoy.request("/rl", key).body)["limits"]
        assert {k: entry[k] for k in ("rule", "algorithm", "quota", "window", "remaining", "global")} == {
            "rule": "shared", "algorithm": "fixed_window", "quota": 3, "window": 3600, "remaining": 2, "global": True}
        assert 0 < entry["reset"] <= 3600
    # The three status calls took nothing: two requests are left.
    assert [envoy.request("/", key).status for _ in range(3)] == [200, 200, 429]
    service.stop()
    r = envoy.request("/rl", key)
    assert r.status == 200
    body = json.loads(r.body)
    assert body["limits"] == [] and body["global_error"].startswith("gRPC status"), body


def test_envoy_native_ratelimit_filter_uses_our_service(envoy_factory, stack, tmp_path):
    conf = tmp_path / "limits"
    conf.mkdir()
    (conf / "native.yaml").write_text(
        "domain: native\n"
        "descriptors:\n"
        "  - key: user\n"
        "    rate_limit:\n"
        "      unit: minute\n"
        "      requests_per_unit: 3\n")
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url, "--config", str(conf)))
    native = {"domain": "native", "rate_limits": [
        {"actions": [{"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]}]}
    envoy = envoy_factory({"rules": [{"name": "unused", "match": {"path": "/never"},
                                      "key": [{"source": "constant", "value": "x"}],
                                      "limit": {"capacity": 1, "refill_period": "1s"}}]},
                          rls_port=service.grpc_port, native_ratelimit=native)
    user = {"x-user": fresh_key()}
    assert [envoy.request("/", user).status for _ in range(4)] == [200, 200, 200, 429]
    assert envoy.request("/", {"x-user": fresh_key()}).status == 200


def test_redis_cluster_keeps_the_limit_exact(envoy_factory, stack, tmp_path, report):
    nodes = [stack(Redis(tmp_path / f"node{i}", cluster=True)) for i in range(3)]
    out = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                          "--cluster-replicas", "0", "--cluster-yes"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.time() + 30
    while "cluster_state:ok" not in redis_cli(nodes[0].port, "cluster", "info") and time.time() < deadline:
        time.sleep(0.2)
    urls = ",".join(n.url for n in nodes)
    service = stack(Service(tmp_path / "service", urls, "--redis-cluster"))
    two_envoys_agree_exactly(envoy_factory, service, report, "3-node Redis Cluster")


def test_redis_down_applies_the_failure_mode_and_decisions_resume(envoy_factory, stack, tmp_path):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url, "--redis-timeout-ms", "200"))
    rules = [per_key_rule("open", limit=2, window="1h", match={"path_prefix": "/open"}),
             per_key_rule("closed", limit=2, window="1h", match={"path_prefix": "/closed"}, failure_mode="deny")]
    envoy = envoy_factory(global_config(rules), rls_port=service.grpc_port)
    key = {"x-key": fresh_key()}
    assert envoy.request("/open", key).status == 200
    redis.stop()
    assert [envoy.request("/open", key).status for _ in range(3)] == [200, 200, 200]
    assert envoy.request("/closed", key).status == 429
    assert service.healthz() == 503
    assert counter(envoy, "global_failures_total", "g") >= 4
    redis.start()
    deadline = time.time() + 15
    while service.healthz() != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert service.healthz() == 200
    # Decisions resume without restarting anything (Redis came back empty).
    clear_of_window_edge(3600, 10)
    assert [envoy.request("/open", key).status for _ in range(3)] == [200, 200, 429]


def test_a_restarted_service_keeps_the_counts_in_redis(envoy_factory, stack, tmp_path):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoy = envoy_factory(global_config([per_key_rule(limit=5, window="1h")]), rls_port=service.grpc_port)
    clear_of_window_edge(3600, 60)
    key = {"x-key": fresh_key()}
    assert [envoy.request("/", key).status for _ in range(3)] == [200] * 3
    service.restart()
    assert [envoy.request("/", key).status for _ in range(3)] == [200, 200, 429]


def test_a_cluster_named_the_way_istio_names_it_reaches_the_service(envoy_factory, stack, tmp_path, report):
    # Envoy would send the cluster's name as the calls' :authority, and a server refuses one with
    # "|" (HTTP/2 PROTOCOL_ERROR): every call failed, and the rule failed open.
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    cluster = "outbound|8081||ratelimit.ratelimit.svc.cluster.local"
    config = global_config([per_key_rule(limit=2, window="1h")], **{"global": {"cluster": cluster}})
    envoy = envoy_factory(config, rls_port=service.grpc_port, rls_cluster=cluster)
    clear_of_window_edge(3600, 60)
    key = {"x-key": fresh_key("istio")}
    statuses = [envoy.request("/", key).status for _ in range(3)]
    report(f"global rule through a cluster named {cluster!r}: {statuses}")
    assert statuses == [200, 200, 429]
    assert decisions(service) == 3
    assert (counter(envoy, "global_failures_total", "g") or 0) == 0
