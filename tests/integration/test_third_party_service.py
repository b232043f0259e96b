"""A third-party rate limit service that answers the way Limitador does: no per-descriptor statuses,
the figures in `response_headers_to_add`, and headers for the upstream in `request_headers_to_add`.
Through a real Envoy: the service's headers reach the client (on 200s and on the 429), its request
headers reach the upstream, and the 429's Retry-After is never earlier than the service's reset."""

import threading
from concurrent import futures

import grpc
import pytest

from conftest import fresh_key

LIMIT = 3
RESET_SECONDS = 2400  # what the stand-in says is left of its window
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _header(key: str, value: str) -> bytes:
    """envoy.config.core.v3.HeaderValue {key = 1, value = 2}"""
    return _field(1, key.encode()) + _field(2, value.encode())


def rate_limit_response(over_limit: bool, response_headers: list, request_headers: list) -> bytes:
    """RateLimitResponse {overall_code = 1, response_headers_to_add = 3, request_headers_to_add = 4},
    with no statuses (field 2), as Limitador sends it."""
    body = _varint(1 << 3) + _varint(2 if over_limit else 1)
    body += b"".join(_field(3, _header(k, v)) for k, v in response_headers)
    body += b"".join(_field(4, _header(k, v)) for k, v in request_headers)
    return body


class StandIn:
    """Counts every call against one limit of LIMIT, like a service with a single hourly counter."""

    def __init__(self):
        self.calls = 0
        self.metadata: list[dict] = []
        self.lock = threading.Lock()

    def should_rate_limit(self, _request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
            used = self.calls
            self.metadata.append(dict(context.invocation_metadata()))
        remaining = max(LIMIT - used, 0)
        headers = [("X-RateLimit-Limit", f"{LIMIT}, {LIMIT};w=3600"), ("X-RateLimit-Remaining", str(remaining)),
                   ("X-RateLimit-Reset", str(RESET_SECONDS))]
        return rate_limit_response(used > LIMIT, headers, [("x-ratelimit-tier", "gold")])


@pytest.fixture
def stand_in_service():
    return StandIn()


@pytest.fixture
def stand_in(stand_in_service):
    service = stand_in_service
    handler = grpc.method_handlers_generic_handler("envoy.service.ratelimit.v3.RateLimitService", {
        "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
            service.should_rate_limit, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def test_the_headers_of_a_service_that_sends_no_statuses_reach_client_and_upstream(envoy_factory, stand_in, report):
    config = {"key_prefix": "tp", "global": {"cluster": "ratelimit_service", "domain": "edge", "timeout": "1s"},
              "rules": [{"name": "per-user", "global": True, "key": [{"source": "header", "name": "x-user"}],
                         "limit": {"algorithm": "fixed_window", "requests": LIMIT, "window": "1h"}}]}
    envoy = envoy_factory(config, rls_port=stand_in, upstream_echo="x-ratelimit-tier")
    user = {"x-user": fresh_key("tp")}
    admitted = [envoy.request("/", user) for _ in range(LIMIT)]
    denied = envoy.request("/", user)
    report(f"third-party service: 200 headers {admitted[-1].all_headers}; 429 headers {denied.all_headers}")

    assert [r.status for r in admitted] == [200] * LIMIT
    assert [r.headers.get("x-ratelimit-remaining") for r in admitted] == ["2", "1", "0"]
    assert all(r.headers.get("x-upstream-saw-x-ratelimit-tier") == "gold" for r in admitted), admitted[0].all_headers
    limits = [v for n, v in admitted[0].all_headers if n.lower() == "x-ratelimit-limit"]
    assert limits == [f"{LIMIT}, {LIMIT};w=3600"], "the service's figures, once"

    assert denied.status == 429
    assert denied.headers.get("x-ratelimit-reset") == str(RESET_SECONDS)
    # Before: Retry-After: 1 for an hour-long window; now never earlier than the service's reset.
    assert denied.headers.get("retry-after") == str(RESET_SECONDS)
    assert envoy.alive()


def test_a_service_that_ignores_lease_requests_is_asked_on_every_request(envoy_factory, stand_in,
                                                                         stand_in_service, report):
    config = {"key_prefix": "tp", "global": {"cluster": "ratelimit_service", "domain": "edge", "timeout": "1s"},
              "rules": [{"name": "per-user", "global": True, "key": [{"source": "header", "name": "x-user"}],
                         "limit": {"algorithm": "fixed_window", "requests": LIMIT, "window": "1h"},
                         "lease": {"size": 50, "validity": "20s"}}]}
    envoy = envoy_factory(config, rls_port=stand_in)
    user = {"x-user": fresh_key("tp")}
    statuses = [envoy.request("/", user).status for _ in range(LIMIT + 2)]
    # No quota in its answers: exactly a global rule without a lease, one call per request.
    assert statuses == [200] * LIMIT + [429, 429]
    assert stand_in_service.calls == LIMIT + 2
    asked = stand_in_service.metadata[0]
    report(f"third-party service and a leased rule: {stand_in_service.calls} calls for {len(statuses)} requests; "
           f"the first call's lease metadata: x-ratelimit-wasm-lease={asked.get('x-ratelimit-wasm-lease')}, "
           f"validity-ms={asked.get('x-ratelimit-wasm-lease-validity-ms')}")
    assert asked.get("x-ratelimit-wasm-lease") == "50"
    assert asked.get("x-ratelimit-wasm-lease-validity-ms") == "20000"
