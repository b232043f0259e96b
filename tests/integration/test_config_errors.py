"""e. An invalid filter configuration stops Envoy from starting, and the log says why."""



BAD_CAPACITY = {
    "rules": [{"name": "r", "key": [{"source": "header", "name": "x"}], "limit": {"capacity": 0, "refill_period": "1s"}}]
}
UNKNOWN_FIELD = {
    "rulez": [{"name": "r", "key": [{"source": "header", "name": "x"}], "limit": {"capacity": 1, "refill_period": "1s"}}]
}


def _lines(log: str, fragment: str) -> list[str]:
    return [line for line in log.splitlines() if fragment in line]


def test_zero_capacity_is_refused(envoy_factory):
    rc, log = envoy_factory(BAD_CAPACITY, expect_failure=True)
    assert rc != 0
    hits = _lines(log, "ratelimit-wasm: invalid configuration: rules[0].limit.capacity: ")
    assert hits, log[-4000:]
    print(hits[0])


def test_unknown_field_is_refused(envoy_factory):
    rc, log = envoy_factory(UNKNOWN_FIELD, expect_failure=True)
    assert rc != 0
    hits = [line for line in _lines(log, "ratelimit-wasm: invalid configuration: ") if "rulez" in line]
    assert hits, log[-4000:]
    print(hits[0])


def test_malformed_json_is_refused(envoy_factory):
    rc, log = envoy_factory('{"rules": [', expect_failure=True)
    assert rc != 0
    assert _lines(log, "ratelimit-wasm: invalid configuration: "), log[-4000:]


def test_a_configuration_given_as_a_struct_says_to_give_a_string(envoy_factory):
    # An easy mistake in Envoy YAML: the filter JSON as a google.protobuf.Struct.
    rc, log = envoy_factory(UNKNOWN_FIELD | {"rules": BAD_CAPACITY["rules"]}, expect_failure=True, as_struct=True)
    assert rc != 0
    hits = _lines(log, "ratelimit-wasm: invalid configuration: the configuration is not JSON")
    assert hits and "google.protobuf.StringValue" in hits[0], log[-4000:]
