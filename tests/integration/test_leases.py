"""Quota leases with real processes: three Envoys (2 workers each) with a leased global rule, our
ratelimit-service and Redis. Across the fleet the admitted requests never exceed the limit (and
fall short of it by at most one lease per Envoy), most requests need no call, leased units are
still spent while the service is down, and leases resume when it is back."""

import threading

from conftest import clear_of_window_edge, counter, do_request, fresh_key, run_parallel, wait_for
from processes import Redis, Service
from test_global import decisions, global_config, service_bin, stack  # noqa: F401 (fixtures)

LEASE = 20


def leased_rule(limit: int, window: str = "day", failure_mode: str = "deny", size: int = LEASE) -> dict:
    return {"name": "api", "global": True, "failure_mode": failure_mode,
            "key": [{"source": "header", "name": "x-key"}],
            "limit": {"algorithm": "fixed_window", "requests": limit, "window": window},
            "lease": {"size": size, "refresh_below": size // 2, "validity": "30s"}}


def drive(envoys, key: str, per_envoy_conns: int, per_conn: int) -> list[int]:
    """Every Envoy at once, `per_envoy_conns` connections each, `per_conn` requests per connection."""
    chunks: list = [None] * len(envoys)

    def one(i, envoy):
        chunks[i] = run_parallel(per_envoy_conns, lambda _j, conn: [do_request(conn, "/", {"x-key": key}).status
                                                                     for _ in range(per_conn)], envoy, timeout=60)

    threads = [threading.Thread(target=one, args=(i, e)) for i, e in enumerate(envoys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s for c in chunks for s in (c or [])]


def test_three_envoys_never_admit_more_than_the_limit_and_strand_at_most_a_lease_each(
        envoy_factory, stack, tmp_path, report):  # noqa: F811
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    limit = 200
    envoys = [envoy_factory(global_config([leased_rule(limit)]), concurrency=2, rls_port=service.grpc_port)
              for _ in range(3)]
    clear_of_window_edge(86400, 300)
    admitted = []
    for rnd in range(5):
        statuses = drive(envoys, fresh_key(f"lease{rnd}"), per_envoy_conns=10, per_conn=15)
        assert len(statuses) == 450 and set(statuses) <= {200, 429}, sorted(set(statuses))
        admitted.append(statuses.count(200))
    report(f"leases: limit {limit}/day, lease {LEASE}, 3 Envoys x 2 workers, 450 requests per round on a fresh "
           f"key: admitted per round {admitted} (bound: {limit - 3 * LEASE}..{limit})")
    assert all(limit - 3 * LEASE <= a <= limit for a in admitted), admitted


def test_most_requests_on_a_hot_key_need_no_call(envoy_factory, stack, tmp_path, report):  # noqa: F811
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoys = [envoy_factory(global_config([leased_rule(1_000_000, size=100)]), concurrency=2,
                            rls_port=service.grpc_port) for _ in range(3)]
    key = fresh_key("hot")
    before = decisions(service)
    statuses = drive(envoys, key, per_envoy_conns=4, per_conn=250)
    calls = decisions(service) - before
    served = sum(counter(e, "lease_served_total", "g", "api") or 0 for e in envoys)
    report(f"leases: hot key, 3 Envoys x 2 workers, {len(statuses)} requests, lease 100: {calls} calls to the "
           f"service ({100 * (1 - calls / len(statuses)):.1f}% of requests without a call); "
           f"{served} decided from leases by the counters' last flush")
    assert statuses.count(200) == len(statuses) == 3000
    assert calls <= 0.10 * len(statuses), calls


def test_leased_units_outlive_the_service_and_leases_resume_when_it_is_back(
        envoy_factory, stack, tmp_path, report):  # noqa: F811
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoy = envoy_factory(global_config([leased_rule(1_000_000)]), concurrency=1, rls_port=service.grpc_port)
    key = {"x-key": fresh_key("outage")}
    conn = envoy.connect()
    assert do_request(conn, "/", key).status == 200  # its call brings a lease of LEASE units
    service.stop()
    after_stop = []
    while len(after_stop) < 3 * LEASE and (not after_stop or after_stop[-1] == 200):
        after_stop.append(do_request(conn, "/", key).status)
    # The lease's units, then the failure mode (deny) once they are spent and the service cannot answer.
    report(f"leases: service stopped after the first request: {after_stop.count(200)} admitted from the lease, "
           f"then {after_stop[-1]}")
    assert after_stop.count(200) == LEASE and after_stop[-1] == 429
    service.start()
    wait_for(lambda: do_request(envoy.connect(), "/", key).status == 200, "an admission once the service is back")
    served_before = counter(envoy, "lease_served_total", "g", "api") or 0
    statuses = [do_request(conn, "/", key).status for _ in range(LEASE)]
    assert statuses == [200] * LEASE
    wait_for(lambda: (counter(envoy, "lease_served_total", "g", "api") or 0) > served_before,
             "requests decided from a lease again, without a restart")
