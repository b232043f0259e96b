"""c. Exact limit headers; d. several rules on one request (all-or-nothing, most restrictive
reported)."""

import pytest

from conftest import filter_config, fresh_key, header_rule

LIMIT_HEADERS = ("ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
DENY = {"status": 429, "body": "slow down, please\n", "content_type": "text/x-test; charset=utf-8"}


def _one(resp, name):
    values = [v for k, v in resp.all_headers if k.lower() == name]
    assert len(values) == 1, f"{name}: {values} in {resp.all_headers}"
    return values[0]


def _t(value: str, prefix: str) -> int:
    """'<prefix><int>' -> int"""
    assert value.startswith(prefix), (value, prefix)
    return int(value[len(prefix):])


def test_headers_on_allowed_and_denied_responses(envoy_factory):
    envoy = envoy_factory(filter_config(
        header_rule("per-key", 5, "1m", refill_tokens=5, cost=1), headers="both", deny_response=DENY))
    h = {"x-key": fresh_key("hdr")}

    first = envoy.request("/", h)
    assert first.status == 200 and first.body == b"ok"
    assert _one(first, "ratelimit-policy") == '"per-key";q=5;w=60'
    assert _t(_one(first, "ratelimit"), '"per-key";r=4;t=') in (11, 12), first.all_headers
    assert _one(first, "x-ratelimit-limit") == "5"
    assert _one(first, "x-ratelimit-remaining") == "4"
    assert int(_one(first, "x-ratelimit-reset")) in (11, 12)
    assert "retry-after" not in first.headers

    for remaining in (3, 2, 1, 0):
        r = envoy.request("/", h)
        assert r.status == 200
        assert _one(r, "x-ratelimit-remaining") == str(remaining)

    denied = envoy.request("/", h)
    assert denied.status == 429
    assert denied.body == DENY["body"].encode()
    assert _one(denied, "content-type") == DENY["content_type"]
    retry_after = int(_one(denied, "retry-after"))
    assert retry_after in (11, 12), denied.all_headers
    assert _one(denied, "x-ratelimit-remaining") == "0"
    assert int(_one(denied, "x-ratelimit-reset")) == retry_after
    assert _one(denied, "x-ratelimit-limit") == "5"
    assert _one(denied, "ratelimit") == f'"per-key";r=0;t={retry_after}'
    assert _one(denied, "ratelimit-policy") == '"per-key";q=5;w=60'


def test_headers_none_emits_no_limit_headers_but_still_denies(envoy_factory):
    envoy = envoy_factory(filter_config(header_rule("per-key", 1, "1m"), headers="none"))
    h = {"x-key": fresh_key("none")}
    ok = envoy.request("/", h)
    assert ok.status == 200
    assert not [n for n in LIMIT_HEADERS if n in ok.headers], ok.all_headers
    denied = envoy.request("/", h)
    assert denied.status == 429
    assert denied.body == b"rate limited\n"  # default deny_response
    assert denied.header("content-type") == "text/plain"
    assert int(denied.header("retry-after")) >= 1
    assert not [n for n in LIMIT_HEADERS if n in denied.headers], denied.all_headers


@pytest.mark.parametrize("mode,present,absent", [
    ("ietf", ("ratelimit-policy", "ratelimit"), ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")),
    ("x-ratelimit", ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"), ("ratelimit-policy", "ratelimit")),
])
def test_header_modes(envoy_factory, mode, present, absent):
    envoy = envoy_factory(filter_config(header_rule("per-key", 1, "1m"), headers=mode))
    h = {"x-key": fresh_key(mode)}
    for expected in (200, 429):
        r = envoy.request("/", h)
        assert r.status == expected
        assert all(n in r.headers for n in present), r.all_headers
        assert not [n for n in absent if n in r.headers], r.all_headers
        if expected == 429:
            assert int(r.header("retry-after")) >= 1


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_denied_request_consumes_from_no_rule(envoy_factory, order):
    rule_a = header_rule("a", 100, "24h")
    rule_b = header_rule("b", 2, "24h", match={"headers": [{"name": "x-tier", "equals": "small"}]})
    rules = (rule_a, rule_b) if order == "a_first" else (rule_b, rule_a)
    envoy = envoy_factory(filter_config(*rules, headers="both"))
    key = fresh_key("two")
    small = {"x-key": key, "x-tier": "small"}

    # Both rules apply; the most restrictive (b) is reported.
    r1 = envoy.request("/", small)
    assert r1.status == 200
    assert _t(_one(r1, "ratelimit"), '"b";r=1;t=') >= 1
    assert _one(r1, "ratelimit-policy") == '"b";q=2;w=86400'
    assert _one(r1, "x-ratelimit-limit") == "2"
    assert _one(r1, "x-ratelimit-remaining") == "1"
    r2 = envoy.request("/", small)
    assert r2.status == 200
    assert _one(r2, "x-ratelimit-remaining") == "0"

    # b is exhausted: these are denied by b and must not consume from a.
    for _ in range(10):
        d = envoy.request("/", small)
        assert d.status == 429
        assert _one(d, "ratelimit").startswith('"b";r=0;t=')

    # Only a applies: 2 allowed before + this one = 3 consumed.
    other = {"x-key": key, "x-tier": "large"}
    r = envoy.request("/", other)
    assert r.status == 200
    assert _one(r, "x-ratelimit-limit") == "100"
    assert _one(r, "x-ratelimit-remaining") == "97"
    assert _one(r, "ratelimit").startswith('"a";r=97;t=')
    assert _one(r, "ratelimit-policy") == '"a";q=100;w=86400'
