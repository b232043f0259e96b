"""failure_mode "local" with real processes: two Envoys and our service. While the service is down,
each Envoy enforces the rule's fallback limit exactly in its own shared data; once the service is
back, the global limit applies again without a restart."""

import itertools

from conftest import clear_of_window_edge, counter, fresh_key
from processes import Redis, Service
from test_global import decisions, global_config, service_bin, stack  # noqa: F401 (fixtures)

GLOBAL_LIMIT = 10
FALLBACK_LIMIT = 3


def rule() -> dict:
    return {"name": "shared", "global": True, "failure_mode": "local",
            "key": [{"source": "header", "name": "x-key"}],
            "limit": {"algorithm": "fixed_window", "requests": GLOBAL_LIMIT, "window": "1m"},
            "fallback": {"algorithm": "fixed_window", "requests": FALLBACK_LIMIT, "window": "1m"}}


def admitted(envoys, key: str, per_envoy: int) -> list[int]:
    return [sum(e.request("/", {"x-key": key}).status == 200 for _ in range(per_envoy)) for e in envoys]


def test_each_envoy_enforces_its_fallback_while_the_service_is_down(envoy_factory, stack, tmp_path, report):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoys = [envoy_factory(global_config([rule()]), rls_port=service.grpc_port) for _ in range(2)]
    clear_of_window_edge(60, 40)
    up = admitted(envoys, fresh_key("up"), 10)
    service.stop()
    down = admitted(envoys, fresh_key("down"), 6)
    service.start()
    # The first calls after the restart may still meet the old connection: wait until the service
    # decides again (its own counter), with keys of their own.
    before = decisions(service)
    for n in itertools.count():
        envoys[n % 2].request("/", {"x-key": fresh_key("warm")})
        if decisions(service) > before:
            break
        assert n < 50, "the service never answered again"
    back = admitted(envoys, fresh_key("back"), 10)
    fallback_denied = [counter(e, "requests_total", "g", "shared.fallback", "denied") for e in envoys]
    report(f"fallback: global {GLOBAL_LIMIT}/1m, fallback {FALLBACK_LIMIT}/1m, 2 Envoys: admitted per Envoy "
           f"with the service up {up}, down {down}, back {back}; fallback denials per Envoy {fallback_denied}")
    assert sum(up) == GLOBAL_LIMIT
    assert down == [FALLBACK_LIMIT, FALLBACK_LIMIT]
    assert sum(back) == GLOBAL_LIMIT
