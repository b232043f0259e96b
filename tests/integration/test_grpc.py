"""A denied gRPC call: the status gRPC clients expect for rate limiting, through a real Envoy and
a real gRPC client (grpcio)."""

import grpc

from conftest import filter_config, fresh_key, header_rule


def _call(envoy, key: str) -> grpc.StatusCode:
    with grpc.insecure_channel(f"{envoy.host}:{envoy.port}") as channel:
        say = channel.unary_unary("/demo.Echo/Say", request_serializer=bytes, response_deserializer=bytes)
        try:
            say(b"", metadata=[("x-key", key)], timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_a_denied_grpc_call_gets_resource_exhausted_not_unavailable(envoy_factory):
    envoy = envoy_factory(filter_config(header_rule("rpc", 1, "24h")), concurrency=2)
    key = fresh_key("grpc")
    assert envoy.request("/", {"x-key": key}).status == 200  # takes the one token
    # Before: 14 UNAVAILABLE (Envoy's mapping of 429), which gRPC clients retry at once elsewhere.
    assert _call(envoy, key) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert envoy.request("/", {"x-key": key}).status == 429, "plain HTTP still gets the deny status"


def test_the_grpc_status_of_a_denial_is_configurable(envoy_factory):
    envoy = envoy_factory(filter_config(header_rule("rpc", 1, "24h"), deny_response={"grpc_status": 14}))
    key = fresh_key("grpc14")
    envoy.request("/", {"x-key": key})
    assert _call(envoy, key) == grpc.StatusCode.UNAVAILABLE
