"""Each local rule keeps its buckets in its own share of the table: a flood of new keys on one rule
fills that rule's share only, and another rule goes on limiting new clients exactly."""

import collections

from conftest import clear_of_window_edge, counter, do_request, filter_config, fresh_key, run_parallel

PREFIX = "shares"
FLOOD = 3_000
CLIENTS = 50
LOGINS_EACH = 5


def config() -> dict:
    api = {
        "name": "api",
        "match": {"path_prefix": "/api/"},
        "key": [{"source": "header", "name": "x-api-key"}],
        # A sliding window pins a slot for two windows: the longest-lived state a key can leave.
        "limit": {"algorithm": "sliding_window", "requests": 100, "window": "24h"},
    }
    login = {
        "name": "login",
        "match": {"path": "/login"},
        "key": [{"source": "header", "name": "x-user"}],
        "limit": {"algorithm": "fixed_window", "requests": 3, "window": "1h"},
    }
    return filter_config(api, login, key_prefix=PREFIX, table_size=1024)


def test_a_flood_on_one_rule_leaves_another_rule_limiting_new_clients_exactly(envoy_factory, report):
    envoy = envoy_factory(config(), concurrency=2)
    run = fresh_key("flood")

    def flood(i, conn):
        return [do_request(conn, "/api/items", {"x-api-key": f"{run}-{i}-{j}"}).status for j in range(FLOOD // 20)]

    flood_statuses = collections.Counter(run_parallel(20, flood, envoy, timeout=120))
    api_full = counter(envoy, "table_full_total", PREFIX, "api")
    assert api_full and api_full > 0, "the flood should have filled the api rule's 512 slots"

    clear_of_window_edge(3600, 60)
    users = [fresh_key(f"user{c}") for c in range(CLIENTS)]

    def logins(i, conn):
        return [(users[i], do_request(conn, "/login", {"x-user": users[i]}).status) for _ in range(LOGINS_EACH)]

    results = run_parallel(CLIENTS, logins, envoy)
    admitted = collections.Counter(user for user, status in results if status == 200)
    login_full = counter(envoy, "table_full_total", PREFIX, "login")
    report(
        f"table shares: table_size 1024 over 2 rules, --concurrency 2; {FLOOD} new x-api-key on /api/ "
        f"(sliding 100/24h): statuses {dict(flood_statuses)}, api.table_full={api_full}; then {CLIENTS} new "
        f"users x {LOGINS_EACH} /login (3/1h): admitted {sum(admitted.values())}, login.table_full={login_full}"
    )
    assert [admitted[u] for u in users] == [3] * CLIENTS
    assert login_full == 0
    assert envoy.alive()
