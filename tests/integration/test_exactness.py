"""a. The limit is exact across Envoy worker threads: capacity 50 admits exactly 50 of 400
concurrent requests on a fresh key, every round."""

from conftest import do_request, filter_config, fresh_key, header_rule, run_parallel

ROUNDS = 20
REQUESTS = 400
CONNECTIONS = 80  # >= 64 concurrent keep-alive connections, 5 requests each
CAPACITY = 50


def test_capacity_is_exact_under_concurrency(envoy_factory, report):
    envoy = envoy_factory(
        filter_config(header_rule("per-key", CAPACITY, "24h", refill_tokens=CAPACITY), key_prefix="rl"),
        concurrency=4,
    )
    per_conn = REQUESTS // CONNECTIONS
    rounds = []
    for rnd in range(ROUNDS):
        key = fresh_key(f"exact{rnd}")

        def work(_i, conn, key=key):
            return [do_request(conn, "/", {"x-key": key}).status for _ in range(per_conn)]

        statuses = run_parallel(CONNECTIONS, work, envoy)
        assert len(statuses) == REQUESTS
        rounds.append((statuses.count(200), statuses.count(429), len(statuses) - statuses.count(200) - statuses.count(429)))
    report(
        f"exactness: capacity {CAPACITY}, {REQUESTS} requests over {CONNECTIONS} connections, --concurrency 4, "
        f"{ROUNDS} rounds; admitted per round: {[r[0] for r in rounds]}"
    )
    assert all(other == 0 for _, _, other in rounds), rounds
    assert rounds == [(CAPACITY, REQUESTS - CAPACITY, 0)] * ROUNDS, rounds
    assert envoy.alive()
