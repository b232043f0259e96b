"""deploy/monitoring with the real tools: the alert rules through promtool (check and unit tests), and
the Grafana dashboard's every query through a real Prometheus scraping two real Envoys and the real
ratelimit-service during a short run. One Envoy has the stats_tags the README gives for plain Envoy;
the other has the stats config Istio renders from deploy/istio/telemetry-labels.yaml, so the
dashboard is checked against what an Istio proxy exports too (other tag names, a stats inclusion
list, Istio's cluster names)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import conftest
from conftest import REPO, _pdeathsig, _stop, free_port, fresh_key, wait_for
from processes import SERVICE_BIN, Redis, Service
from test_global import stack  # noqa: F401 (fixture)

MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
TELEMETRY = REPO / "deploy" / "istio" / "telemetry-labels.yaml"
RATE_INTERVAL = "1m"  # what $__rate_interval stands for: many 1 s scrapes, and longer than the run


# ---------------------------------------------------------------------------------------------
# alerts


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", "alerts.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_must_not():
    alerts = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    cases = [c for t in yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    stays_quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts and fires == alerts and stays_quiet == alerts, (alerts, fires, stays_quiet)


# ---------------------------------------------------------------------------------------------
# Istio's stats config, rendered as istio-agent renders it


def istio_stats_config(telemetry: dict) -> dict:
    """The bootstrap's stats_config for a proxy whose ProxyConfig is `telemetry`'s defaultConfig, as
    istio/istio renders it (pkg/bootstrap/config.go getStatsOptions and
    tools/packaging/common/envoy_bootstrap.json, at 86c9f01fd735, the same in 1.24.0 and 1.28.0):
    Istio's own tags with default tags off, one "(<tag>=\\.=(.*?);\\.;)" tag per extraStatTags
    entry, and an inclusion list of the user's patterns followed by the ones Istio requires."""
    proxy = telemetry["spec"]["meshConfig"]["defaultConfig"]
    matcher = proxy.get("proxyStatsMatcher", {})
    tag = lambda name, regex: {"tag_name": name, "regex": regex}  # noqa: E731
    istio_tags_before = [
        tag("cluster_name", r"^cluster(\.(.+);)"),
        tag("http_conn_manager_prefix", r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"),
        tag("thread_name", r"^server(\.(.+))\.watchdog"),
        tag("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
        tag("response_code", r"_rq(_(\d{3}))$"),
        tag("response_code_class", r"_rq(_(\dxx))$"),
        tag("http_conn_manager_listener_prefix",
            r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
        tag("listener_address", r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
        tag("mongo_prefix", r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"),
    ]
    extra = [tag(t, f"({t}=\\.=(.*?);\\.;)") for t in dict.fromkeys(proxy.get("extraStatTags", []))]
    istio_tags_after = [
        tag("cache", r"(cache\.(.+?)\.)"),
        tag("component", r"(component\.(.+?)\.)"),
        tag("tag", r"(tag\.(.+?);\.)"),
        tag("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
        tag("authz_enforce_result", r"rbac(\.(allowed|denied))"),
        tag("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
        tag("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
    ]
    prefixes = matcher.get("inclusionPrefixes", []) + "cluster_manager,listener_manager,server,cluster.xds-grpc,wasm".split(",")
    suffixes = matcher.get("inclusionSuffixes", []) + "rbac.allowed,rbac.denied,shadow_allowed,shadow_denied".split(",")
    regexps = matcher.get("inclusionRegexps", []) + [r"vhost\..*\.route\..*"]
    patterns = ([{"prefix": "reporter="}] + [{"prefix": p} for p in prefixes] + [{"suffix": s} for s in suffixes]
                + [{"safe_regex": {"regex": r}} for r in regexps] + [{"prefix": "component"}, {"prefix": "istio"}])
    return {"use_all_default_tags": False, "stats_tags": istio_tags_before + extra + istio_tags_after,
            "stats_matcher": {"inclusion_list": {"patterns": patterns}}}


def istio_rls_cluster(telemetry: dict) -> str:
    """The rate limit service's cluster as Istio names it, from the stats prefix the manifest includes."""
    [prefix] = telemetry["spec"]["meshConfig"]["defaultConfig"]["proxyStatsMatcher"]["inclusionPrefixes"]
    return prefix.removeprefix("cluster.")


def istio_callable_cluster(telemetry: dict) -> str:
    """The name the Istio-form Envoy's service cluster is called by here. Istio calls it
    outbound|8081||<host>, but the filter sends global.cluster as the call's :authority, which the
    service's HTTP/2 stack refuses with '|' in it (PROTOCOL_ERROR: every call fails), so the cluster
    is named <host> here while its stats name is Istio's, which is what the dashboard reads."""
    return istio_rls_cluster(telemetry).split("||", 1)[1]


def as_istio_proxy(render, telemetry: dict):
    """Wraps conftest's render_bootstrap: Istio's stats config, and the service's cluster under the
    stats name Istio gives it (alt_stat_name: its name followed by ';')."""
    def rendered(*args, **kw):
        bootstrap = render(*args, **kw)
        bootstrap["stats_config"] = istio_stats_config(telemetry)
        for c in bootstrap["static_resources"]["clusters"]:
            if c["name"] == "ratelimit_service":
                c["name"] = c["load_assignment"]["cluster_name"] = istio_callable_cluster(telemetry)
                c["alt_stat_name"] = istio_rls_cluster(telemetry) + ";"
        return bootstrap

    return rendered


# ---------------------------------------------------------------------------------------------
# a real Prometheus


class Prometheus:
    """prometheus on a loopback port chosen at run time, scraping every second; stopped at the end."""

    def __init__(self, workdir: Path, scrape: dict[str, tuple[str, list[str]]], rule_files: list[Path]):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "metrics_path": path, "static_configs": [{"targets": targets}]}
                               for job, (path, targets) in scrape.items()],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Prometheus":
        for attempt in range(5):
            port = free_port()
            log = self.workdir / f"prometheus-{attempt}.log"
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={self.config_path}", f"--web.listen-address=127.0.0.1:{port}",
                 f"--storage.tsdb.path={self.workdir / f'data-{attempt}'}", "--log.level=warn"],
                stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200:
                        return self
                time.sleep(0.05)
            self.stop()
            if "address already in use" not in log.read_text(errors="replace"):
                raise AssertionError("prometheus did not start\n" + log.read_text(errors="replace")[-3000:])
        raise AssertionError("prometheus found no free port")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def api(self, path: str, **params) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path} {params}: HTTP {e.code} {e.read().decode(errors='replace')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]


# ---------------------------------------------------------------------------------------------
# the dashboard


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [(p["title"], t["refId"], t["expr"]) for p in panels for t in p.get("targets", [])]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """The expression Grafana sends: its template variables replaced."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# What the run below makes happen, so these panels must show more than zero on both proxies (the
# others must return series: counters that did not move, e.g. CAS retries, are zero).
MOVED = {("Allowed per rule", "A"), ("Denied per rule", "A"), ("Shadow-denied per rule", "A"),
         ("Denied share per rule", "A"), ("Table full", "A"), ("Slots reclaimed", "A"),
         ("Global call failures", "A"), ("Global call latency", "A"), ("Global call latency", "B"),
         ("Global calls", "A"), ("Service decisions", "A"), ("Service Redis errors", "A"),
         ("Served from leases", "A"), ("Lease refreshes", "A"), ("Lease units", "A"), ("Lease units", "B"),
         ("Idempotency outcomes", "A"), ("Idempotency table full", "A")}


def filter_config(key_prefix: str, cluster: str) -> dict:
    user = {"source": "header", "name": "x-user"}
    return {
        "key_prefix": key_prefix,
        "global": {"cluster": cluster, "domain": "monitoring", "timeout": "2s"},
        "rules": [
            # Denials, and (8 slots, every fresh key leaves its bucket live for an hour) a full table.
            {"name": "login", "match": {"path_prefix": "/login"}, "key": [user], "table_size": 8,
             "limit": {"capacity": 2, "refill_period": "1h"}},
            {"name": "trial", "shadow": True, "match": {"path_prefix": "/trial"}, "key": [user],
             "limit": {"capacity": 1, "refill_period": "1h"}},
            # Buckets full again 100 ms after use: their slots are reclaimed for fresh keys.
            {"name": "burst", "match": {"path_prefix": "/burst"}, "key": [user], "table_size": 8,
             "limit": {"capacity": 1, "refill_period": "100ms"}},
            {"name": "api", "global": True, "match": {"path_prefix": "/api"}, "key": [user],
             "limit": {"algorithm": "fixed_window", "requests": 1000, "window": "1h"}},
            # A lease of 10 units, refreshed in the background once down to 5: most requests need no call.
            {"name": "leased", "global": True, "match": {"path_prefix": "/lease"},
             "key": [{"source": "header", "name": "x-lease"}],
             "limit": {"algorithm": "fixed_window", "requests": 100000, "window": "1h"},
             "lease": {"size": 10, "refresh_below": 5}},
        ],
        # Idempotency keys of POSTs per tenant; 8 slots of 4 keys each, so a tenant's 33rd live key
        # (or sooner: keys go to the slot their hash picks) finds its slot full.
        "idempotency": [{"name": "pay", "match": {"methods": ["POST"], "path_prefix": "/pay"},
                         "scope": [{"source": "header", "name": "x-tenant"}], "table_size": 8}],
    }


@pytest.fixture(scope="session")
def service_bin() -> Path:
    """ratelimit-service, built like test_global.py does unless RATELIMIT_SERVICE_BIN names a build."""
    override = os.environ.get("RATELIMIT_SERVICE_BIN")
    if override:
        return Path(override).resolve()
    subprocess.run(["cargo", "build", "-q", "-p", "ratelimit-service"], cwd=REPO, check=True,
                   stdin=subprocess.DEVNULL, timeout=1800)
    return SERVICE_BIN




def drive(envoy, key_prefix: str) -> None:
    """Allowed, denied, shadow-denied, table-full and global calls, requests served from a lease and
    its refreshes, idempotency keys claimed, replayed, reused and not tracked (table full), on one Envoy."""
    user = {"x-user": fresh_key("u")}
    assert [envoy.request("/login", user).status for _ in range(3)] == [200, 200, 429]
    assert [envoy.request("/trial", user).status for _ in range(2)] == [200, 200]  # shadow: never denied
    assert [envoy.request("/api", {"x-user": fresh_key("g")}).status for _ in range(3)] == [200] * 3
    for _ in range(30):  # more fresh keys than the rule's 8 slots
        assert envoy.request("/login", {"x-user": fresh_key("f")}).status == 200  # when_table_full: allow

    # One key's lease: the first request calls, the next ones spend the lease, refreshed on the way.
    leased = {"x-lease": fresh_key("l")}
    with contextlib.closing(envoy.connect()) as conn:
        assert [envoy.request("/lease", leased, conn=conn).status for _ in range(30)] == [200] * 30
    wait_for(lambda: (conftest.counter(envoy, "lease_refreshes_total", key_prefix, "leased") or 0) > 0
             and (conftest.counter(envoy, "lease_served_total", key_prefix, "leased") or 0) >= 20,
             f"requests served from the lease, and its refresh, in {key_prefix}")

    # Idempotency keys: one claimed, then replayed once its first request completed (a retry before
    # that gets 409, in flight), then reused on another path (422).
    tenant = fresh_key("t")
    def pay(key: str, path: str = "/pay"):
        return envoy.request(path, {"x-tenant": tenant, "idempotency-key": key, "content-length": "0"}, method="POST")
    key = fresh_key("once")
    first = pay(key)
    assert first.status == 200 and "idempotent-replayed" not in first.headers
    retry = []
    def completed() -> bool:
        retry[:] = [pay(key)]
        return retry[0].status != 409
    wait_for(completed, f"the first request's key to complete in {key_prefix}")
    assert retry[0].status == 200 and retry[0].headers.get("idempotent-replayed") == "true", retry[0].headers
    assert pay(key, "/pay/other").status == 422
    # 60 more keys of the tenant, 32 places in its 8 slots: some find their slot full (and go on).
    assert [pay(fresh_key("k")).status for _ in range(60)] == [200] * 60
    wait_for(lambda: (conftest.counter(envoy, "idempotency_table_full_total", key_prefix, "pay") or 0) > 0,
             f"an idempotency key finding its slot full in {key_prefix}")


def test_every_dashboard_query_returns_series_from_a_real_prometheus(envoy_factory, stack, service_bin,
                                                                     tmp_path, monkeypatch, report):
    telemetry = yaml.safe_load(TELEMETRY.read_text())
    istio_cluster = istio_rls_cluster(telemetry)
    redis = stack(Redis(tmp_path / "redis"))
    service = Service(tmp_path / "service", redis.url, "--redis-timeout-ms", "200")
    service.args[0] = str(service_bin)
    stack(service)

    plain = envoy_factory(filter_config("mon", "ratelimit_service"), rls_port=service.grpc_port)
    with monkeypatch.context() as m:
        m.setattr(conftest, "render_bootstrap", as_istio_proxy(conftest.render_bootstrap, telemetry))
        istio = envoy_factory(filter_config("mon-istio", istio_callable_cluster(telemetry)), rls_port=service.grpc_port)

    envoys = {"mon": plain, "mon-istio": istio}
    admin = lambda e: e.admin_url.removeprefix("http://")  # noqa: E731
    prom = stack(Prometheus(
        tmp_path / "prometheus",
        {"envoy": ("/stats/prometheus", [admin(plain), admin(istio)]),
         "ratelimit-service": ("/metrics", [f"127.0.0.1:{service.http_port}"])},
        [MONITORING / "alerts.yaml"]))

    # Counters must move after Prometheus's first sample of them, or rate() sees no increase. The
    # service's per-domain series only exist from a domain's first decision: make one first.
    for envoy in envoys.values():
        assert envoy.request("/api", {"x-user": fresh_key("g")}).status == 200

    def scraped() -> bool:
        prefixes = {s["metric"].get("key_prefix") for s in prom.query("ratelimit_wasm_requests_total")}
        return set(envoys) <= prefixes and len(prom.query("ratelimit_service_decisions_total")) > 0
    wait_for(scraped, "Prometheus's first scrape of both Envoys and the service", timeout=30)

    for prefix, envoy in envoys.items():
        drive(envoy, prefix)

    def reclaimed(envoy, key_prefix) -> bool:
        for _ in range(10):
            envoy.request("/burst", {"x-user": fresh_key("b")})
        return (conftest.counter(envoy, "slot_reclaimed_total", key_prefix) or 0) > 0
    for prefix, envoy in envoys.items():
        wait_for(lambda: reclaimed(envoy, prefix), f"a reclaimed slot in {prefix}", timeout=20)

    # Redis gone: the service's calls to it fail, so do the filter's calls to the service.
    redis.stop()
    def failed(envoy, key_prefix) -> bool:
        assert envoy.request("/api", {"x-user": fresh_key("g")}).status == 200  # failure_mode: allow
        return (conftest.counter(envoy, "global_failures_total", key_prefix) or 0) > 0
    for prefix, envoy in envoys.items():
        wait_for(lambda: failed(envoy, prefix), f"a failed global call in {prefix}", timeout=20)

    # The Istio proxy exports the labels, the rest of Istio's tags left its counters alone.
    istio_samples = istio.prometheus_samples("ratelimit_wasm_requests_total{")
    assert any('key_prefix="mon-istio"' in s and 'rule="login"' in s and 'decision="denied"' in s and v == 1
               for s, v in istio_samples.items()), istio_samples

    variable_sets = {
        "plain Envoy": {"key_prefix": "mon", "rule": ".*", "rls_cluster": "ratelimit_service",
                        "__rate_interval": RATE_INTERVAL},
        "Istio": {"key_prefix": "mon-istio", "rule": "login|trial|burst|api|leased", "rls_cluster": istio_cluster,
                  "__rate_interval": RATE_INTERVAL},
    }
    queries = dashboard_queries()
    assert {(title, ref) for title, ref, _ in queries} >= MOVED

    def results(variables) -> dict[tuple[str, str], list[dict]]:
        return {(title, ref): prom.query(substitute(expr, variables)) for title, ref, expr in queries}

    def zero(res) -> list:
        """The panels of MOVED still at zero, and the idempotency outcomes the run made but the
        panel does not show yet."""
        shown = {s["metric"].get("decision") for s in res[("Idempotency outcomes", "A")] if float(s["value"][1]) > 0}
        return sorted(q for q in MOVED if not any(float(s["value"][1]) > 0 for s in res[q])) + sorted(
            f"Idempotency outcomes {d}" for d in {"first", "replayed", "mismatch"} - shown)

    def moved(res) -> bool:
        return not zero(res)

    last: dict = {}
    for name, variables in variable_sets.items():
        def settled(name=name, variables=variables) -> bool:
            last[name] = results(variables)
            return moved(last[name])
        with contextlib.suppress(AssertionError):
            wait_for(settled, f"the dashboard's panels to show the run ({name})", timeout=20)
        res = last[name]
        empty = [q for q, r in res.items() if not r]
        still = zero(res)
        assert not empty and not still, f"{name}: empty {empty}, zero {still}: " + json.dumps(
            {f"{t} {r}": v for (t, r), v in res.items()}, indent=1)[:6000]
        report(f"monitoring ({name}): " + ", ".join(
            f"{t}/{r}={max(float(s['value'][1]) for s in v):.3g}" for (t, r), v in sorted(res.items())))

    # The dashboard's variables list what the run produced.
    keys = set(prom.api("label/key_prefix/values", **{"match[]": "ratelimit_wasm_requests_total"}))
    rules = set(prom.api("label/rule/values", **{"match[]": 'ratelimit_wasm_requests_total{key_prefix=~"mon.*"}'}))
    assert set(envoys) <= keys and {"login", "trial", "burst", "api", "leased"} <= rules, (keys, rules)

    # The alert rules load and evaluate in a real Prometheus over real series.
    def evaluated() -> bool:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return bool(rules) and all(r["health"] == "ok" for r in rules)
    wait_for(evaluated, "every alert rule to be evaluated without error", timeout=10)
