"""Limit policies in a real Envoy: every algorithm exact under concurrency, plans (header and JWT
claim), header-driven cost, calendar resets, shadow mode, the status endpoint, the violation log."""

import base64
import calendar
import datetime
import json
import re
import time

import pytest

from conftest import clear_of_window_edge, counter, do_request, filter_config, fresh_key, run_parallel

ROUNDS = 20
REQUESTS = 400
CONNECTIONS = 80


def rule(name, limit=None, **extra):
    r = {"name": name, "key": [{"source": "header", "name": "x-key"}], **extra}
    if limit is not None:
        r["limit"] = limit
    return r


@pytest.mark.parametrize("limit", [
    {"algorithm": "gcra", "requests": 50, "period": "24h", "burst": 50},
    {"algorithm": "fixed_window", "requests": 50, "window": "day"},
    {"algorithm": "sliding_window", "requests": 50, "window": "24h"},
], ids=lambda l: l["algorithm"])
def test_every_algorithm_admits_exactly_its_limit_under_concurrency(envoy_factory, report, limit):
    envoy = envoy_factory(filter_config(rule("exact", limit)), concurrency=4)
    if limit["algorithm"] == "fixed_window":
        clear_of_window_edge(86400, 300)
    admitted = []
    for rnd in range(ROUNDS):
        key = fresh_key(f"{limit['algorithm']}{rnd}")
        statuses = run_parallel(
            CONNECTIONS, lambda _i, conn: [do_request(conn, "/", {"x-key": key}).status for _ in range(REQUESTS // CONNECTIONS)], envoy)
        assert sorted(set(statuses)) == [200, 429]
        admitted.append(statuses.count(200))
    report(f"exactness {limit['algorithm']}: limit 50, {REQUESTS} requests over {CONNECTIONS} connections, "
           f"--concurrency 4, {ROUNDS} rounds; admitted per round: {admitted}")
    assert admitted == [50] * ROUNDS


PLANS = {
    "default_plan": "free",
    "plans": {
        "free": {"limit": {"algorithm": "fixed_window", "requests": 2, "window": "1m"}},
        "premium": {"limit": {"algorithm": "fixed_window", "requests": 5, "window": "1m"}},
        "enterprise": {"unlimited": True},
    },
}


def admitted_of(envoy, headers, n=12):
    return sum(envoy.request("/", headers).status == 200 for _ in range(n))


def test_plans_from_a_header(envoy_factory):
    clear_of_window_edge(60, 20)  # PLANS count in 1-minute fixed windows
    envoy = envoy_factory(filter_config(rule("api", plan={"header": "x-plan"}, **PLANS)))
    assert admitted_of(envoy, {"x-key": fresh_key(), "x-plan": "free"}) == 2
    assert admitted_of(envoy, {"x-key": fresh_key(), "x-plan": "premium"}) == 5
    assert admitted_of(envoy, {"x-key": fresh_key(), "x-plan": "enterprise"}) == 12
    assert admitted_of(envoy, {"x-key": fresh_key(), "x-plan": "stolen-gold"}) == 2
    assert admitted_of(envoy, {"x-key": fresh_key()}) == 2


def jwt(claims):
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"Bearer {enc({'alg': 'none'})}.{enc(claims)}.sig"


def test_plans_from_a_jwt_claim(envoy_factory):
    clear_of_window_edge(60, 20)  # PLANS count in 1-minute fixed windows
    envoy = envoy_factory(filter_config(rule("api", plan={"jwt_claim": "plan"}, **PLANS)))
    premium = {"x-key": fresh_key(), "authorization": jwt({"sub": "a", "plan": "premium"})}
    assert admitted_of(envoy, premium) == 5
    free = {"x-key": fresh_key(), "authorization": jwt({"sub": "b", "plan": "free"})}
    assert admitted_of(envoy, free) == 2
    broken = {"x-key": fresh_key(), "authorization": "Bearer x.%%%.y"}
    assert admitted_of(envoy, broken) == 2


def test_cost_from_a_header_and_a_cost_above_the_capacity_is_refused_with_a_reason(envoy_factory):
    envoy = envoy_factory(filter_config(rule(
        "tokens", {"capacity": 10, "refill_period": "1h"}, cost={"header": "x-cost", "max": 100})))
    key = fresh_key()
    r = envoy.request("/", {"x-key": key, "x-cost": "7"})
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "3"
    too_big = envoy.request("/", {"x-key": key, "x-cost": "11"})
    assert too_big.status == 429
    assert too_big.header("x-ratelimit-reason") == 'cost 11 exceeds the capacity 10 of limit "tokens"'
    assert too_big.header("retry-after") is None, "retrying cannot help"
    assert envoy.request("/", {"x-key": key, "x-cost": "500"}).header("x-ratelimit-reason") == \
        "cost 500 from x-cost exceeds the maximum 100"
    r = envoy.request("/", {"x-key": key, "x-cost": "3"})
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "0", "refusals consumed nothing"
    r = envoy.request("/", {"x-key": key})
    assert r.status == 429 and r.header("retry-after") is not None


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def test_daily_and_monthly_quotas_announce_the_utc_calendar_reset(envoy_factory):
    clear_of_window_edge(86400, 60)  # the expected resets are computed from this side's clock
    envoy = envoy_factory(filter_config(rule("ai", limits=[
        {"name": "day", "algorithm": "fixed_window", "requests": 10, "window": "day"},
        {"name": "month", "algorithm": "fixed_window", "requests": 100, "window": "month"},
    ]), headers="ietf", status_path="/rl"))
    key = fresh_key()
    r = envoy.request("/", {"x-key": key})
    now = utc_now()
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    until_midnight = (midnight - now).total_seconds()
    # The daily quota has the lower remaining (9 < 99), so it is the one reported.
    m = re.fullmatch(r'"ai\.day";r=9;t=(\d+)', r.header("ratelimit"))
    assert m, r.header("ratelimit")
    assert abs(int(m.group(1)) - until_midnight) <= 2
    assert r.header("ratelimit-policy") == '"ai.day";q=10;w=86400'
    for _ in range(9):
        envoy.request("/", {"x-key": key})
    denied = envoy.request("/", {"x-key": key})
    assert denied.status == 429 and abs(int(denied.header("retry-after")) - until_midnight) <= 3

    status = json.loads(envoy.request("/rl", {"x-key": key}).body)
    month = next(l for l in status["limits"] if l["limit"] == "ai.month")
    first_next = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=32)).replace(day=1)
    assert abs(month["reset"] - (first_next - now).total_seconds()) <= 3
    assert month["window"] == calendar.monthrange(now.year, now.month)[1] * 86400
    assert month["remaining"] == 90


def test_shadow_mode_counts_logs_and_reports_but_never_denies(envoy_factory):
    envoy = envoy_factory(filter_config(
        rule("trial", {"capacity": 2, "refill_period": "1h"}, shadow=True), key_prefix="sh"))
    key = fresh_key()
    responses = [envoy.request("/", {"x-key": key}) for _ in range(5)]
    assert [r.status for r in responses] == [200] * 5
    assert responses[-1].header("x-ratelimit-remaining") == "0"
    assert counter(envoy, "requests_total", "sh", "trial", "shadow_denied") == 3
    assert counter(envoy, "requests_total", "sh", "trial", "denied") == 0
    deadline = time.time() + 5
    while "shadow-denied rule=\"trial\"" not in envoy.log() and time.time() < deadline:
        time.sleep(0.1)
    assert "ratelimit-wasm: shadow-denied rule=\"trial\"" in envoy.log()


def test_the_status_endpoint_reports_without_consuming(envoy_factory):
    envoy = envoy_factory(filter_config(
        rule("api", limits=[
            {"name": "second", "algorithm": "gcra", "requests": 10, "period": "1s", "burst": 10},
            {"name": "day", "algorithm": "fixed_window", "requests": 100, "window": "day"},
        ]),
        rule("ai", plan={"header": "x-plan"}, **PLANS),
        status_path="/ratelimit/status"))
    key = fresh_key()
    envoy.request("/", {"x-key": key, "x-plan": "premium"})
    for _ in range(3):
        s = envoy.request("/ratelimit/status?x=1", {"x-key": key, "x-plan": "premium"})
        assert s.status == 200 and s.header("content-type") == "application/json"
        body = json.loads(s.body)
        summary = [(l["rule"], l["limit"], l.get("plan"), l["algorithm"], l["quota"], l["remaining"]) for l in body["limits"]]
        assert summary == [
            ("api", "api.second", None, "gcra", 10, 9),
            ("api", "api.day", None, "fixed_window", 100, 99),
            ("ai", "ai", "premium", "fixed_window", 5, 4),
        ], body
    assert envoy.request("/ratelimit/status", {}).body == b'{"limits":[]}'
    # POST is an ordinary request, limited like any other.
    assert envoy.request("/ratelimit/status", {"x-key": key}, method="POST").status == 200


def test_the_status_endpoint_has_its_own_limit_per_client(envoy_factory):
    envoy = envoy_factory(filter_config(
        rule("api", limit={"capacity": 5, "refill_period": "1h"}),
        status_path="/rl", status_limit={"capacity": 3, "refill_period": "1h"}))
    key = fresh_key("status")
    calls = [envoy.request("/rl", {"x-key": key}) for _ in range(4)]
    assert [c.status for c in calls] == [200, 200, 200, 429]
    assert calls[3].header("retry-after") == "1200", "3 per hour: the next one in 20 minutes"
    # Status calls take nothing from the rules.
    assert [envoy.request("/", {"x-key": key}).status for _ in range(6)] == [200] * 5 + [429]


def test_the_violation_log_is_itself_rate_limited(envoy_factory):
    envoy = envoy_factory(filter_config(
        rule("api", {"capacity": 1, "refill_period": "1h"}),
        violation_log={"level": "warn", "max_per_second": 2}), concurrency=1)
    key = fresh_key("secret")
    statuses = [envoy.request("/", {"x-key": key}).status for _ in range(40)]
    assert statuses.count(429) == 39
    time.sleep(1.1)
    envoy.request("/", {"x-key": key})
    deadline = time.time() + 5
    lines = []
    while time.time() < deadline:
        lines = [l for l in envoy.log().splitlines() if "ratelimit-wasm: denied rule=\"api\"" in l]
        if any("suppressed_before=" in l for l in lines):
            break
        time.sleep(0.1)
    assert 2 <= len(lines) <= 6, lines
    assert all("[warning]" in l for l in lines), lines
    assert any("suppressed_before=" in l for l in lines), lines
    assert not any(key in l for l in lines), "the raw key is not logged by default"
