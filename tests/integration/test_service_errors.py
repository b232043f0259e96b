"""A global rule whose service cannot be reached says why, in words a user can act on: the first
failure of each worker is logged at error level with what to check; no 'host status 4'."""

from conftest import free_port, fresh_key, wait_for


def config(cluster: str = "ratelimit_service") -> dict:
    return {"key_prefix": "errs", "global": {"cluster": cluster, "domain": "edge", "timeout": "1s"},
            "rules": [{"name": "g", "global": True, "key": [{"source": "header", "name": "x-key"}],
                       "limit": {"algorithm": "fixed_window", "requests": 2, "window": "1m"}}]}


def error_lines(envoy, fragment: str) -> list[str]:
    """Envoy's log lines with `fragment`, once there is one (the log is flushed every 100 ms)."""
    def lines() -> list[str]:
        return [line for line in envoy.log().splitlines() if fragment in line]

    wait_for(lines, f"a log line with {fragment!r}", timeout=5)
    return lines()


def test_a_missing_cluster_is_named_with_the_field_to_fix(envoy_factory):
    envoy = envoy_factory(config("nope"), concurrency=1)
    assert envoy.request("/", {"x-key": fresh_key()}).status == 200  # failure_mode allow
    lines = error_lines(envoy, "ratelimit-wasm: the rate limit service failed (first failure")
    assert lines and "[error]" in lines[0], envoy.log()[-3000:]
    assert 'no cluster named "nope"' in lines[0] and "global.cluster" in lines[0]
    assert "host status" not in envoy.log()


def test_a_refused_connection_says_unavailable_with_envoys_reason(envoy_factory):
    envoy = envoy_factory(config(), concurrency=1, rls_port=free_port())  # nothing listens there
    assert envoy.request("/", {"x-key": fresh_key()}).status == 200
    lines = error_lines(envoy, "ratelimit-wasm: the rate limit service failed (first failure")
    assert lines, envoy.log()[-3000:]
    assert "UNAVAILABLE" in lines[0] and "connect" in lines[0].lower(), lines[0]
    print(lines[0])
