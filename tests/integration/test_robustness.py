"""g. Missing, huge and non-UTF-8 key parts never break the filter."""

import http.client

from conftest import filter_config, fresh_key, header_rule


def _raw_request(envoy, name: str, value: bytes) -> int:
    conn = envoy.connect()
    try:
        conn.putrequest("GET", "/")
        conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _limited_normally(envoy) -> None:
    """The filter still works: a fresh key gets its 1 token, then 429."""
    h = {"x-key": fresh_key("after")}
    assert [envoy.request("/", h).status for _ in range(2)] == [200, 429]


def test_request_without_key_is_not_limited(envoy_factory):
    envoy = envoy_factory(filter_config(header_rule("per-key", 1, "24h")))
    conn = envoy.connect()
    try:
        statuses = [envoy.request("/", {}, conn=conn).status for _ in range(50)]
    finally:
        conn.close()
    assert statuses == [200] * 50
    _limited_normally(envoy)


def test_huge_and_non_utf8_key_values(envoy_factory, report):
    envoy = envoy_factory(filter_config(header_rule("per-key", 1, "24h")))
    huge = ("h" * 50_000 + fresh_key()).encode()
    non_utf8 = b"\xff\xfe\x80caf\xe9-" + fresh_key().encode()
    got = {}
    for label, value in (("huge", huge), ("non_utf8", non_utf8)):
        statuses = [_raw_request(envoy, "x-key", value) for _ in range(3)]
        got[label] = statuses
        assert statuses[0] == 200, (label, statuses)
        assert set(statuses) <= {200, 429}, (label, statuses)
        assert envoy.alive()
    report(f"robustness: statuses for the same key sent 3 times: {got}")
    _limited_normally(envoy)
    assert envoy.alive()
