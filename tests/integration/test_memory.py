"""f. Memory stays bounded under a flood of distinct keys, and live state is never evicted."""

import collections

from conftest import counter, do_request, filter_config, header_rule, run_parallel

FLOOD = 100_000
CONNECTIONS = 32
# The table is created at start-up and traffic adds nothing to shared data; this allowance is
# for Envoy's own buffers and allocator (measured growth: under 1 MiB).
MAX_GROWTH_KIB = 8 * 1024
PREFIX = "mem"


def test_distinct_key_flood_keeps_memory_bounded_and_victim_limited(envoy_factory, report):
    envoy = envoy_factory(
        filter_config(header_rule("per-key", 1, "24h", refill_tokens=1), key_prefix=PREFIX, table_size=4096),
        concurrency=4,
    )
    victim = {"x-key": "victim"}
    assert envoy.request("/", victim).status == 200
    assert envoy.request("/", victim).status == 429
    rss_before = envoy.rss_kib()

    per_conn = FLOOD // CONNECTIONS

    def work(i, conn):
        counts = collections.Counter()
        for j in range(per_conn):
            counts[do_request(conn, "/", {"x-key": f"flood-{i}-{j}"}).status] += 1
        return [counts]

    counts = sum(run_parallel(CONNECTIONS, work, envoy, timeout=120), collections.Counter())
    rss_after = envoy.rss_kib()
    table_full = counter(envoy, "table_full_total", PREFIX, "per-key")
    report(
        f"memory: table_size 4096, --concurrency 4, {per_conn * CONNECTIONS} distinct keys: "
        f"VmRSS {rss_before} KiB -> {rss_after} KiB (growth {rss_after - rss_before} KiB); "
        f"statuses {dict(counts)}; table_full={table_full}"
    )
    assert sum(counts.values()) == per_conn * CONNECTIONS
    # when_table_full defaults to "allow": every first request of a fresh key is admitted.
    assert counts[200] == per_conn * CONNECTIONS, counts
    assert rss_after - rss_before < MAX_GROWTH_KIB
    assert envoy.request("/", victim).status == 429, "live state of 'victim' was evicted by the flood"
    assert table_full is not None and table_full > 0, envoy.stats("wasmcustom.")
    assert envoy.alive()
