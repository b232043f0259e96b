#!/usr/bin/env python3
"""`make bench`: ratelimit-wasm side by side with plain Envoy and Envoy's native local_ratelimit.

Everything runs on 127.0.0.1 with ports chosen at run time. One upstream Envoy process
(direct_response 200 "ok") serves every filtered Envoy, so the upstream's CPU is never counted:
CPU figures are utime+stime (/proc/PID/stat) of the filtered Envoy's PID only, over a fixed number
of requests sent by h2load (HTTP/1.1, fixed concurrency). Variants run interleaved, round after
round, and the table reports medians and ratios.

Sections: speed (CPU per request, throughput), memory (RSS before/after 1M distinct keys through
ratelimit-wasm), accuracy (admitted vs limit under concurrency), profile (probe filter variants
that split the cost of a wasm filter, its host calls, and ratelimit-wasm's own work), global
(latency p50/p99 of ours' global rule vs Envoy's native ratelimit filter, both asking
ratelimit-service with a redis-server; the service's decisions per second on one CPU, driven by
service/examples/rls_load.rs), idempotency (CPU per request when every POST claims a new
Idempotency-Key, vs the same requests without the entry; wrk with bench/idem.lua), settle (added
latency p50/p99 of a cost charged from the response, vs a constant cost; wrk --latency), leases
(one rule local, global with a call per request, and global with quota leases: Envoy CPU per
request, latency p50/p99, service calls per 1,000 requests, against issue 13's targets).

Only Python's standard library is used. Options: --quick (fewer rounds/requests, for trying it),
--out FILE (default BENCHMARKS.md at the repository root; "-" for none), --skip SECTIONS,
--skip-global, --only SECTIONS (run just these, e.g. `--only idempotency,settle --out /tmp/x.md`;
the probe builds and host-call counts are done only with speed). Environment: RATELIMIT_WASM (the
module to measure, default target/wasm32-wasip1/release/ratelimit_wasm.wasm), RATELIMIT_SERVICE_DIR
(prebuilt ratelimit-service and rls_load, instead of building them), ENVOY_BIN.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENVOY = Path(os.environ.get("ENVOY_BIN", REPO / ".venv" / "bin" / "envoy"))
# RATELIMIT_WASM: measure another build of the module (e.g. a copy, so a rebuild during the run
# does not change what is measured).
WASM = Path(os.environ.get("RATELIMIT_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "ratelimit_wasm.wasm"))
NOOP_DIR = REPO / "bench" / "noop-filter"
NOOP_TARGET = REPO / "target" / "bench-noop"
NOOP_WASM = NOOP_TARGET / "wasm32-wasip1" / "release" / "noop_filter.wasm"
# ratelimit-wasm built with no-op proxy_on_done / proxy_on_log exports (feature done-log-exports).
END_TARGET = REPO / "target" / "bench-ours-end"
END_WASM = END_TARGET / "wasm32-wasip1" / "release" / "ratelimit_wasm.wasm"
# ratelimit-wasm built with opt-level 3 (`make build OPT_LEVEL=3`) instead of the default "s".
O3_TARGET = REPO / "target" / "bench-ours-o3"
O3_WASM = O3_TARGET / "wasm32-wasip1" / "release" / "ratelimit_wasm.wasm"
FLOOD_LUA = REPO / "bench" / "flood.lua"
IDEM_LUA = REPO / "bench" / "idem.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")

BIG = 1_000_000_000  # a limit that never denies during the run (capacity is a u32)
HOT_KEY = "bench-key"
EXHAUSTED_KEY = "exhausted"


def wasm_stat(metric: str, rule: str | None = None, decision: str | None = None) -> str:
    """Envoy's full name of one of the filter's counters under the bench's key prefix (the labels
    travel in the name: README, Metrics)."""
    labels = [("key_prefix", "bench"), ("rule", rule), ("decision", decision)]
    return "wasmcustom." + "".join(f"{k}=.={v};.;" for k, v in labels if v) + "ratelimit_wasm_" + metric

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# tools


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in (("h2load", "nghttp2-client"), ("wrk", "wrk")) if not shutil.which(tool)]
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = sudo + ["apt-get", "install", "-y", "-qq", *missing]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def callcounts(workdir: Path) -> dict:
    """Host calls per request made by ratelimit-wasm's core (bench/callcount, run natively)."""
    allowed, denied = workdir / "callcount-allowed.json", workdir / "callcount-denied.json"
    allowed.write_text(json.dumps(ours_config(BIG, "1s")))
    denied.write_text(json.dumps(ours_config(1, "24h")))
    out = subprocess.run(
        ["cargo", "run", "-q", "--release", "--target-dir", str(REPO / "target" / "bench-callcount"), "--",
         str(allowed), str(denied)],
        cwd=REPO / "bench" / "callcount", check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def build_noop() -> None:
    subprocess.run(
        ["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "--target-dir", str(NOOP_TARGET)],
        cwd=NOOP_DIR, check=True, stdin=subprocess.DEVNULL,
    )


def build_ours_end() -> None:
    subprocess.run(
        ["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "--features", "done-log-exports",
         "--target-dir", str(END_TARGET)],
        cwd=REPO, check=True, stdin=subprocess.DEVNULL,
    )


def build_ours_o3() -> None:
    subprocess.run(
        ["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "--target-dir", str(O3_TARGET)],
        cwd=REPO, check=True, stdin=subprocess.DEVNULL, env={**os.environ, "CARGO_PROFILE_RELEASE_OPT_LEVEL": "3"},
    )


# ---------------------------------------------------------------------------------------------
# Envoy configs


def hcm(stat_prefix: str, route_action: dict, filters: list) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route_action}]}],
            },
            "http_filters": filters + [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    }


def bootstrap(listener: dict, clusters: list) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def upstream_config() -> dict:
    return bootstrap({
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        # x-usage-tokens: what the ours-usage variant charges from the response, 1 more than its estimate,
        # so each response is a charge (a CAS); the others ignore it.
        "filter_chains": [{"filters": [hcm("upstream", {
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            "response_headers_to_add": [{"header": {"key": "x-usage-tokens", "value": "2"}}]}, [])]}],
    }, [])


def wasm_filter(wasm: Path, configuration: str, vm_id: str) -> dict:
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": vm_id,
                "root_id": vm_id,
                "fail_open": False,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
                "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(wasm)}}},
            },
        },
    }


def ours_config(capacity: int, refill_period: str, table_size: int = 65536, headers: str = "x-ratelimit",
                limit: dict | None = None, cost: dict | None = None) -> dict:
    # x-ratelimit: the same three X-RateLimit-* headers native local_ratelimit sends (like for like).
    return {
        "key_prefix": "bench",
        "table_size": table_size,
        "headers": headers,
        "rules": [{
            "name": "per-key",
            "key": [{"source": "header", "name": "x-key"}],
            "limit": limit or {"capacity": capacity, "refill_period": refill_period},
            **({"cost": cost} if cost else {}),
        }],
    }


def ours_filter(capacity: int, refill_period: str, table_size: int = 65536, headers: str = "x-ratelimit",
                wasm: Path = WASM, limit: dict | None = None, cost: dict | None = None) -> dict:
    return wasm_filter(wasm, json.dumps(ours_config(capacity, refill_period, table_size, headers, limit, cost)),
                       "ratelimit")


# The idempotency section's entry: every POST, keys shared by everybody, remembered 1 h. Its table
# (own slots, up to 4 keys each) is the largest allowed: a key goes to the one slot its hash picks,
# so with K random keys over S slots some slot holds 5+ keys once K is a sizeable share of S (K = S
# gives ~1,000 of 65,536 slots overflowing); at 1,048,576 slots the ~60,000 keys of a run overflow
# none (expected < 0.01), so every request is a first one and the bench can assert it.
IDEM_TABLE_SIZE = 1_048_576


def ours_idem_config() -> dict:
    """ours' config (the same rule as the `ours` variant) plus one idempotency entry."""
    return {**ours_config(BIG, "1s"), "idempotency": [{
        "name": "bench",
        "match": {"methods": ["POST"]},
        "scope": [{"source": "constant", "value": "all"}],
        "ttl": "1h",
        "table_size": IDEM_TABLE_SIZE,
    }]}


def native_filter(capacity: int, fill_interval: str) -> dict:
    bucket = {"max_tokens": capacity, "tokens_per_fill": capacity, "fill_interval": fill_interval}
    pct = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "native_rl",
            # The default bucket (requests without x-key); not consumed when a descriptor matched.
            "token_bucket": {"max_tokens": BIG, "tokens_per_fill": BIG, "fill_interval": "1s"},
            "always_consume_default_token_bucket": False,
            "filter_enabled": {"runtime_key": "rl_enabled", "default_value": pct},
            "filter_enforced": {"runtime_key": "rl_enforced", "default_value": pct},
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            # Blank value: one dynamic bucket per distinct x-key value (LRU of max_dynamic_descriptors).
            "descriptors": [{"entries": [{"key": "x-key"}], "token_bucket": bucket}],
            "max_dynamic_descriptors": 1_000_000,
        },
    }


NATIVE_ROUTE_RATE_LIMITS = [{"actions": [{"request_headers": {"header_name": "x-key", "descriptor_key": "x-key"}}]}]


def filtered_config(kind: str, upstream_port: int, **kw) -> dict:
    route: dict = {"cluster": "upstream", "timeout": "30s"}
    if kind == "plain":
        filters = []
    elif kind == "native":
        filters = [native_filter(kw["capacity"], kw["period"])]
        route["rate_limits"] = NATIVE_ROUTE_RATE_LIMITS
    elif kind == "ours":
        filters = [ours_filter(kw["capacity"], kw["period"], kw.get("table_size", 65536), kw.get("headers", "x-ratelimit"),
                               kw.get("wasm", WASM), kw.get("limit"), kw.get("cost"))]
    elif kind == "ours-idem":
        filters = [wasm_filter(WASM, json.dumps(ours_idem_config()), "ratelimit")]
    elif kind == "probe":
        filters = [wasm_filter(NOOP_WASM, kw["steps"], "probe")]
    elif kind == "ours-global":
        filters = [wasm_filter(WASM, json.dumps(ours_global_config()), "ratelimit")]
    elif kind == "ours-json":  # a whole config of ours, as a dict
        filters = [wasm_filter(kw.get("wasm", WASM), json.dumps(kw["config"]), "ratelimit")]
    elif kind == "native-global":
        filters = [native_global_filter()]
        route["rate_limits"] = NATIVE_ROUTE_RATE_LIMITS
    else:
        raise ValueError(kind)
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "5s",
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]},
        "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
    }
    listener = {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [hcm("ingress", {"route": route}, filters)]}],
    }
    clusters = [cluster]
    if kw.get("rls_port"):
        clusters.append(rls_cluster(kw["rls_port"]))
    return bootstrap(listener, clusters)


# Global section: one rule (ours) or one route action (native) per x-key, decided by the service.
GLOBAL_DOMAIN = "bench"


def ours_global_config() -> dict:
    return {
        "key_prefix": "bench",
        "headers": "x-ratelimit",
        # deny on failure: a failed call shows up as a non-2xx reply in wrk's count, not as a fast "allow".
        "global": {"cluster": "ratelimit_service", "domain": GLOBAL_DOMAIN, "timeout": "1s", "failure_mode": "deny"},
        "rules": [{
            "name": "g",
            "global": True,
            "key": [{"source": "header", "name": "x-key"}],
            "limit": {"algorithm": "fixed_window", "requests": BIG, "window": "1s"},
        }],
    }


def native_global_filter() -> dict:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": GLOBAL_DOMAIN,
            "failure_mode_deny": True,
            "timeout": "1s",
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit_service"}},
                "transport_api_version": "V3",
            },
        },
    }


# The native filter sends no limit override: the service takes it from this file (--config).
SERVICE_LIMITS_YAML = f"""domain: {GLOBAL_DOMAIN}
descriptors:
  - key: x-key
    rate_limit: {{unit: second, requests_per_unit: {BIG}}}
"""


def rls_cluster(port: int) -> dict:
    return {
        "name": "ratelimit_service",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": "ratelimit_service", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


# ---------------------------------------------------------------------------------------------
# running Envoy


def _pdeathsig():
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


# With 2+ CPUs: the load generator and the upstream run on the last CPU; a 1-worker Envoy under test
# runs on CPU 0, so it does not share its CPU with them (2-worker Envoys are not pinned).
PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
LOAD_CPU = str((os.cpu_count() or 1) - 1)


def pinned(cmd: list[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if PIN and cpu is not None else cmd


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class Envoy:
    def __init__(self, name: str, config: dict, concurrency: int, workdir: Path, cpu: str | None = None):
        self.name, self.concurrency = name, concurrency
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "envoy.json"
        cfg.write_text(json.dumps(config, indent=1))
        self.admin_path = d / "admin.txt"
        self.log_path = d / "envoy.log"
        self.proc = subprocess.Popen(
            pinned([str(ENVOY), "-c", str(cfg), "--concurrency", str(concurrency), "--disable-hot-restart",
                    "--admin-address-path", str(self.admin_path), "-l", "warning", "--log-path", str(self.log_path)], cpu),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d,
            preexec_fn=_pdeathsig,
        )
        self.pid = self.proc.pid
        self.admin = ""
        self.port = 0

    def wait_ready(self, timeout: float = 120.0) -> "Envoy":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: Envoy exited ({self.proc.returncode}):\n{self.log_path.read_text()[-4000:]}")
            if not self.admin and self.admin_path.exists():
                text = self.admin_path.read_text().strip()
                self.admin = f"http://{text}" if text else ""
            if self.admin:
                with contextlib.suppress(OSError, KeyError, ValueError):
                    if urllib.request.urlopen(self.admin + "/ready", timeout=2).status == 200:
                        data = json.loads(urllib.request.urlopen(self.admin + "/listeners?format=json", timeout=5).read())
                        for ls in data["listener_statuses"]:
                            if ls["name"] == "ingress":
                                self.port = int(ls["local_address"]["socket_address"]["port_value"])
                                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: Envoy not ready in {timeout}s")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{self.pid}/status").read_text(), re.M)
        return int(m.group(1)) if m else 0

    def stat(self, name: str) -> int:
        data = json.loads(urllib.request.urlopen(
            self.admin + "/stats?format=json&filter=" + urllib.parse.quote(f"^{re.escape(name)}$"), timeout=10).read())
        for s in data.get("stats", []):
            if s.get("name") == name:
                return int(s.get("value", 0))
        return 0

    def settled_rss_kib(self, timeout: float = 20.0) -> int:
        """RSS once it stops moving (3 samples 0.5 s apart within 256 KiB): start-up work such as
        creating the table's slots in every worker has finished by then."""
        samples = [self.rss_kib()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            samples.append(self.rss_kib())
            last = samples[-3:]
            if len(last) == 3 and max(last) - min(last) <= 256:
                break
        return samples[-1]

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        stop_process(self.proc)


def request(envoy: Envoy, key: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    try:
        c.request("GET", "/", headers={"x-key": key})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def response_headers(envoy: Envoy, key: str) -> tuple[int, list]:
    c = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    try:
        c.request("GET", "/", headers={"x-key": key})
        r = c.getresponse()
        r.read()
        return r.status, [(k.lower(), v) for k, v in r.getheaders() if "ratelimit" in k.lower() or k.lower() == "retry-after"]
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# load


def h2load(envoy: Envoy, n: int, clients: int, threads: int, key: str) -> dict:
    cmd = pinned(["h2load", "--h1", "-n", str(n), "-c", str(clients), "-t", str(threads), "-H", f"x-key: {key}", envoy.url()], LOAD_CPU)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not (m and st and done):
        raise RuntimeError("cannot parse h2load output:\n" + out)
    return {"rps": float(m.group(3)), "done": int(done.group(1)), "2xx": int(st.group(1)), "4xx": int(st.group(3)),
            "5xx": int(st.group(4))}


def measured_run(envoy: Envoy, n: int, clients: int, threads: int, key: str) -> dict:
    cpu0 = envoy.cpu_seconds()
    r = h2load(envoy, n, clients, threads, key)
    cpu1 = envoy.cpu_seconds()
    r["us_per_req"] = (cpu1 - cpu0) / max(r["done"], 1) * 1e6
    return r


# ---------------------------------------------------------------------------------------------
# sections


SPEED_VARIANTS = [
    # name, kind, kwargs, key, expected status class
    ("plain", "plain", {}, HOT_KEY, "2xx"),
    ("native", "native", {"capacity": BIG, "period": "1s"}, HOT_KEY, "2xx"),
    ("ours", "ours", {"capacity": BIG, "period": "1s"}, HOT_KEY, "2xx"),
    ("ours-both", "ours", {"capacity": BIG, "period": "1s", "headers": "both"}, HOT_KEY, "2xx"),
    ("native-429", "native", {"capacity": 1, "period": "86400s"}, EXHAUSTED_KEY, "4xx"),
    ("ours-429", "ours", {"capacity": 1, "period": "24h"}, EXHAUSTED_KEY, "4xx"),
    ("noop-wasm", "probe", {"steps": ""}, HOT_KEY, "2xx"),
    ("noop+calls", "probe", {"steps": "time,header,shared,resp3"}, HOT_KEY, "2xx"),
    ("noop+resp5", "probe", {"steps": "resp5"}, HOT_KEY, "2xx"),
    ("noop-429", "probe", {"steps": "deny"}, HOT_KEY, "4xx"),
    ("noop-429+reads", "probe", {"steps": "time,header,sharedget,deny"}, HOT_KEY, "4xx"),
    ("ours-end", "ours", {"capacity": BIG, "period": "1s", "wasm": END_WASM}, HOT_KEY, "2xx"),
    ("ours-o3", "ours", {"capacity": BIG, "period": "1s", "wasm": O3_WASM}, HOT_KEY, "2xx"),
    ("ours-o3-429", "ours", {"capacity": 1, "period": "24h", "wasm": O3_WASM}, EXHAUSTED_KEY, "4xx"),
    # A usage cost charged from the response (1 token, the estimate): the settle moment's CAS.
    ("ours-usage", "ours", {"capacity": BIG, "period": "1s", "cost": {"response_header": "x-usage-tokens", "max": 1000}},
     HOT_KEY, "2xx"),
    # A concurrency limit that never denies: acquire at the request, release at its end.
    ("ours-conc", "ours", {"capacity": BIG, "period": "1s",
                           "limit": {"algorithm": "concurrency", "max_in_flight": 1_000_000}}, HOT_KEY, "2xx"),
]

# The 429 rows are about 3x faster per request: they get 3x the requests, so their CPU figures
# rest on as many clock ticks as the others' (the CPU clock counts in 10 ms ticks).
def requests_for(name: str, n: int) -> int:
    return 3 * n if "429" in name else n


def perf_split(e: Envoy, n: int, clients: int, workdir: Path) -> dict:
    """Shares of the Envoy process's CPU samples by object: [JIT] is the wasm code V8 compiled (the
    filter's own instructions and the SDK); envoy is the host (stripped, so no symbols)."""
    data = workdir / f"perf-{e.name}.data"
    p = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", str(e.pid), "-o", str(data)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run = measured_run(e, n, clients, 2, HOT_KEY)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "-g", "none", "--stdio"],
                         capture_output=True, text=True, timeout=120).stdout
    shares: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
        if m:
            dso = m.group(2)
            dso = "[JIT] (wasm)" if dso.startswith("[JIT]") else dso
            shares[dso] = shares.get(dso, 0.0) + float(m.group(1))
    return {"us_per_req": run["us_per_req"], "shares": shares}


def speed(workdir: Path, upstream: Envoy, rounds: int, n: int, clients: int, workers_list: list[int],
          results: dict, rss_start: dict, perf_out: dict | None = None) -> None:
    envoys: dict[tuple[str, int], Envoy] = {}
    try:
        for workers in workers_list:
            for name, kind, kw, _, _ in SPEED_VARIANTS:
                envoys[(name, workers)] = Envoy(f"{name}-w{workers}", filtered_config(kind, upstream.port, **kw), workers,
                                                workdir, cpu="0" if workers == 1 else None)
        for e in envoys.values():
            e.wait_ready()
        # Header check (what each variant sends back) and exhaustion of the 429 key.
        for (name, workers), e in envoys.items():
            for _ in range(3):
                status, hdrs = response_headers(e, HOT_KEY if "429" not in name else EXHAUSTED_KEY)
            results.setdefault("headers", {})[name] = (status, hdrs)
        log("speed: warm-up")
        for (name, workers), e in envoys.items():
            key = next(v[3] for v in SPEED_VARIANTS if v[0] == name)
            h2load(e, max(n // 5, 2000), clients, 2, key)
        for (name, workers), e in envoys.items():
            rss_start[(name, workers)] = e.rss_kib()
        order = list(envoys)
        rng = random.Random(42)
        for r in range(rounds):
            rng.shuffle(order)
            for name, workers in order:
                e = envoys[(name, workers)]
                spec = next(v for v in SPEED_VARIANTS if v[0] == name)
                res = measured_run(e, requests_for(name, n), clients, 2, spec[3])
                if res[spec[4]] != res["done"]:
                    raise RuntimeError(f"{name} w{workers}: expected all {spec[4]}, got {res}")
                results.setdefault((name, workers), []).append(res)
            log(f"speed: round {r + 1}/{rounds} done")
        # Contention on the one hot key: how often a worker's compare-and-swap lost to another's.
        for (name, workers), e in envoys.items():
            if name.startswith("ours"):
                results.setdefault("cas", {})[(name, workers)] = {
                    "retries": e.stat(wasm_stat("cas_retries_total")),
                    "requests": e.stat(wasm_stat("requests_total", "per-key", "allowed"))
                    + e.stat(wasm_stat("requests_total", "per-key", "denied"))}
        if perf_out is not None and shutil.which("perf"):
            for name in ("ours", "noop+calls", "native"):
                if (name, 1) in envoys:
                    with contextlib.suppress(Exception):
                        perf_out[name] = perf_split(envoys[(name, 1)], n, clients, workdir)
    finally:
        for e in envoys.values():
            e.stop()


def memory(workdir: Path, upstream: Envoy, keys: int, table_size: int) -> dict:
    small = Envoy("memory-ours-t8", filtered_config("ours", upstream.port, capacity=100, period="1s", table_size=8), 2, workdir)
    e = Envoy("memory-ours", filtered_config("ours", upstream.port, capacity=100, period="1s", table_size=table_size), 2, workdir)
    try:
        small.wait_ready()
        e.wait_ready()
        small_kib = small.settled_rss_kib()
        small.stop()
        before = e.settled_rss_kib()
        threads, conns = 2, 32
        quota = keys // threads
        t0 = time.monotonic()
        wrk = subprocess.Popen(["wrk", "-t", str(threads), "-c", str(conns), "-d", "600s", "-s", str(FLOOD_LUA), e.url(),
                                "--", str(quota)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target = quota * threads
        completed = 0
        while wrk.poll() is None:
            time.sleep(0.5)
            completed = e.stat("http.ingress.downstream_rq_completed")
            if completed >= target - conns:  # each thread stops at its quota; the last few may be in flight
                time.sleep(0.5)
                wrk.send_signal(signal.SIGINT)
                break
        wrk.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        time.sleep(1)
        completed = e.stat("http.ingress.downstream_rq_completed")
        after = e.rss_kib()
        wasm = {k: e.stat(wasm_stat(*spec)) for k, spec in {
            "per-key.allowed": ("requests_total", "per-key", "allowed"),
            "per-key.denied": ("requests_total", "per-key", "denied"),
            "per-key.table_full": ("table_full_total", "per-key"),
            "slot_reclaimed": ("slot_reclaimed_total",),
            "store_errors": ("store_errors_total",)}.items()}
        return {"small_kib": small_kib, "before_kib": before, "after_kib": after, "requests": completed, "seconds": elapsed,
                "table_size": table_size, "wasm": wasm}
    finally:
        small.stop()
        e.stop()


def burst(envoy: Envoy, key: str, conns: int, total: int) -> list[int]:
    per = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    barrier = threading.Barrier(conns)
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
        c.connect()
        got = []
        try:
            barrier.wait(timeout=30)
            for _ in range(per[i]):
                c.request("GET", "/", headers={"x-key": key})
                r = c.getresponse()
                r.read()
                got.append(r.status)
        finally:
            c.close()
        with lock:
            statuses.extend(got)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return statuses


def accuracy(workdir: Path, upstream: Envoy, rounds: int, limit: int, total: int, conns: int, workers: int) -> dict:
    envoys = {
        "ours": Envoy(f"acc-ours-w{workers}", filtered_config("ours", upstream.port, capacity=limit, period="24h"), workers, workdir),
        "native": Envoy(f"acc-native-w{workers}", filtered_config("native", upstream.port, capacity=limit, period="86400s"), workers, workdir),
    }
    out: dict[str, list[int]] = {k: [] for k in envoys}
    try:
        for e in envoys.values():
            e.wait_ready()
        for r in range(rounds):
            for name, e in envoys.items():
                statuses = burst(e, f"acc-{r}-{time.time_ns()}", conns, total)
                out[name].append(sum(1 for s in statuses if s == 200))
    finally:
        for e in envoys.values():
            e.stop()
    return out


# ---------------------------------------------------------------------------------------------
# delay: how late a held request is released against the turn the bucket reserved for it

DELAY_RATE = 20  # per second: one turn every 50 ms


def delay_lateness(workdir: Path, upstream: Envoy, rounds: int, waiting: int, workers: int) -> dict:
    """`waiting` + 1 requests at once on a bucket of 1 refilled DELAY_RATE per second: one passes,
    the others wait for turns 1/DELAY_RATE apart. The k-th completion after the first, minus k turns,
    is the k-th request's lateness (completion times taken by the client, so loopback latency is in
    both and cancels)."""
    limit = {"capacity": 1, "refill_tokens": DELAY_RATE, "refill_period": "1s",
             "max_delay": f"{(waiting + 1) * 1000 // DELAY_RATE}ms", "max_queued": waiting + 1}
    e = Envoy(f"delay-w{workers}", filtered_config("ours", upstream.port, capacity=1, period="1s", limit=limit),
              workers, workdir).wait_ready()
    lateness_ms: list[float] = []
    try:
        for r in range(rounds):
            key, done, lock = f"delay-{r}-{time.time_ns()}", [], threading.Lock()
            barrier = threading.Barrier(waiting + 1)

            def one() -> None:
                c = http.client.HTTPConnection("127.0.0.1", e.port, timeout=30)
                c.connect()
                try:
                    barrier.wait(timeout=30)
                    c.request("GET", "/", headers={"x-key": key})
                    resp = c.getresponse()
                    resp.read()
                    if resp.status == 200:
                        with lock:
                            done.append(time.monotonic())
                finally:
                    c.close()

            ts = [threading.Thread(target=one) for _ in range(waiting + 1)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            done.sort()
            lateness_ms += [(done[k] - done[0] - k / DELAY_RATE) * 1000 for k in range(1, len(done))]
    finally:
        e.stop()
    lateness_ms.sort()
    pick = lambda q: lateness_ms[min(len(lateness_ms) - 1, int(q * len(lateness_ms)))] if lateness_ms else float("nan")
    return {"workers": workers, "rounds": rounds, "samples": len(lateness_ms), "median": pick(0.5),
            "p99": pick(0.99), "max": lateness_ms[-1] if lateness_ms else float("nan"),
            "min": lateness_ms[0] if lateness_ms else float("nan")}


# ---------------------------------------------------------------------------------------------
# idempotency: CPU per request when every request claims a new Idempotency-Key (issue 12's bench)

IDEM_VARIANTS = [("plain", "plain"), ("ours", "ours"), ("ours-idem", "ours-idem")]
IDEM_CLAIMED = ("idempotency_requests_total", "bench", "first")


def wrk_counted(envoy: Envoy, total: int, clients: int, threads: int, run_id: str, timeout: float = 120.0) -> dict:
    """wrk with bench/idem.lua until each thread has had total/threads responses (the script prints a
    line per finished thread; wrk is then interrupted, as it would otherwise wait out its -d)."""
    quota = total // threads
    cmd = pinned(["wrk", "-t", str(threads), "-c", str(clients), "-d", "600s", "-s", str(IDEM_LUA), envoy.url(),
                  "--", str(quota), run_id], LOAD_CPU)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, finished = [], 0
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        for line in p.stdout:
            out.append(line)
            if line.strip() == "idem-done":
                finished += 1
                if finished == threads:
                    p.send_signal(signal.SIGINT)
                    break
        rest, _ = p.communicate(timeout=60)
        out.append(rest)
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
    text = "".join(out)
    if finished != threads:
        raise RuntimeError(f"wrk (idem.lua) did not finish its {total} requests:\n{text}")
    done = re.search(r"(\d+) requests in", text)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if not done:
        raise RuntimeError("cannot parse wrk output:\n" + text)
    return {"wrk_requests": int(done.group(1)), "non2xx": int(bad.group(1)) if bad else 0}


def idem_run(e: Envoy, total: int, clients: int, run_id: str) -> dict:
    """CPU per request over one wrk_counted run; requests = what the Envoy received (its own counter),
    and how many of them claimed an Idempotency-Key (the filter's counter)."""
    rq0, claimed0 = e.stat("http.ingress.downstream_rq_total"), e.stat(wasm_stat(*IDEM_CLAIMED))
    cpu0, t0 = e.cpu_seconds(), time.monotonic()
    res = wrk_counted(e, total, clients, 2, run_id)
    wall = time.monotonic() - t0
    time.sleep(0.1)  # the requests wrk left in flight end
    cpu1 = e.cpu_seconds()
    time.sleep(0.3)  # the filter adds its counts to Envoy's counters every 100 ms
    res["requests"] = e.stat("http.ingress.downstream_rq_total") - rq0
    res["claimed"] = e.stat(wasm_stat(*IDEM_CLAIMED)) - claimed0
    res["us_per_req"] = (cpu1 - cpu0) / max(res["requests"], 1) * 1e6
    res["rps"] = res["wrk_requests"] / wall
    return res


def idempotency_section(workdir: Path, upstream: Envoy, rounds: int, n: int, clients: int) -> dict:
    out: dict = {"rounds": rounds, "requests": n, "clients": clients, "table_size": IDEM_TABLE_SIZE,
                 "config": ours_idem_config()["idempotency"][0]}
    envoys = {name: Envoy(f"idem-{name}", filtered_config(kind, upstream.port, capacity=BIG, period="1s"), 1, workdir,
                          cpu="0") for name, kind in IDEM_VARIANTS}
    t_start = time.monotonic()
    try:
        for e in envoys.values():
            e.wait_ready()
        # The entry is live: a POST with a new key passes and a retry gets the kept response, replayed.
        e = envoys["ours-idem"]
        probe = []
        for _ in range(2):
            c = http.client.HTTPConnection("127.0.0.1", e.port, timeout=30)
            try:
                c.request("POST", "/", headers={"x-key": HOT_KEY, "idempotency-key": "probe-1"})
                r = c.getresponse()
                probe.append((r.status, r.getheader("idempotent-replayed"), r.read()))
            finally:
                c.close()
        if probe[0][0] != 200 or probe[0][1] is not None or probe[1] != (200, "true", probe[0][2]):
            raise RuntimeError(f"idempotency entry not in effect: first and retry gave {probe}; log {e.log_path}")
        out["probe"] = probe
        log("idempotency: warm-up")
        for name, e in envoys.items():
            wrk_counted(e, max(n // 5, 2000), clients, 2, f"w{name}")
        order = [name for name, _ in IDEM_VARIANTS]
        rng = random.Random(12)
        runs: dict[str, list[dict]] = {name: [] for name in order}
        for r in range(rounds):
            rng.shuffle(order)
            for name in order:
                res = idem_run(envoys[name], n, clients, f"r{r}{name}")
                # Every request answered 200; with the entry each one claimed its own new key.
                want = res["requests"] if name == "ours-idem" else 0
                if res["non2xx"] or res["claimed"] != want or res["requests"] < n:
                    raise RuntimeError(f"idempotency {name}: expected {n}+ requests, all 2xx, {want} keys claimed; got {res}")
                runs[name].append(res)
            log(f"idempotency: round {r + 1}/{rounds} done")
        out["runs"] = runs
        e = envoys["ours-idem"]
        out["counters"] = {k: e.stat(wasm_stat(*spec)) for k, spec in {
            "first": IDEM_CLAIMED,
            "replayed": ("idempotency_requests_total", "bench", "replayed"),
            "in_flight": ("idempotency_requests_total", "bench", "in_flight"),
            "table_full": ("idempotency_table_full_total", "bench"),
            "released": ("idempotency_released_total", "bench"),
            "store_errors": ("idempotency_store_errors_total", "bench")}.items()}
        out["counters"]["requests"] = e.stat("http.ingress.downstream_rq_total")
        if out["counters"]["table_full"] or out["counters"]["store_errors"]:
            raise RuntimeError(f"idempotency: keys went unprotected: {out['counters']}")
        out["rss_kib"] = {name: e.rss_kib() for name, e in envoys.items()}
    finally:
        for e in envoys.values():
            e.stop()
    out["elapsed_s"] = time.monotonic() - t_start
    log(f"idempotency: done in {out['elapsed_s']:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------
# settle: added latency of a cost charged from the response (local), against the same rule with a constant cost

SETTLE_VARIANTS = ("ours", "ours-usage")


def settle_section(workdir: Path, upstream: Envoy, rounds: int, seconds: int, concurrencies: list[int]) -> dict:
    specs = {v[0]: v for v in SPEED_VARIANTS if v[0] in SETTLE_VARIANTS}
    envoys = {name: Envoy(f"settle-{name}", filtered_config(specs[name][1], upstream.port, **specs[name][2]), 1, workdir,
                          cpu="0") for name in SETTLE_VARIANTS}
    out: dict = {"rounds": rounds, "seconds": seconds, "concurrencies": concurrencies}
    t_start = time.monotonic()
    try:
        for e in envoys.values():
            e.wait_ready()
        out["headers"] = {name: response_headers(e, HOT_KEY) for name, e in envoys.items()}
        log("settle: warm-up")
        for e in envoys.values():
            wrk_latency(e, max(concurrencies), 2, 2, HOT_KEY)
        order = [(name, c) for name in SETTLE_VARIANTS for c in concurrencies]
        rng = random.Random(21)
        runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in concurrencies} for name in SETTLE_VARIANTS}
        for r in range(rounds):
            rng.shuffle(order)
            for name, c in order:
                res = wrk_latency(envoys[name], c, min(2, c), seconds, HOT_KEY)
                if res["non2xx"] or res["socket_errors"]:
                    raise RuntimeError(f"settle {name} -c {c}: {res}")
                res["round"] = r
                runs[name][c].append(res)
            log(f"settle: round {r + 1}/{rounds} done")
        out["latency"] = runs
        # The usage variant charged from every response: the upstream's x-usage-tokens (2) is 1 unit
        # beyond the estimate (1), so it charged 1 unit per allowed request, less those wrk left in
        # flight when each run ended (reset before their response: at most its connections per run).
        # The counters lag by up to 100 ms.
        time.sleep(0.3)
        out["charged"] = {name: (e.stat(wasm_stat("requests_total", "per-key", "allowed")),
                                 e.stat(wasm_stat("charged_units_total", "per-key"))) for name, e in envoys.items()}
        out["in_flight_bound"] = max(concurrencies) + rounds * sum(concurrencies) + 1  # warm-up, runs, header check
        allowed, charged = out["charged"]["ours-usage"]
        if allowed == 0 or not 0 <= allowed - charged <= out["in_flight_bound"] or out["charged"]["ours"][1] != 0:
            raise RuntimeError(f"settle: expected ours-usage to charge 1 unit per answered request, ours none: "
                               f"{out['charged']}")
    finally:
        for e in envoys.values():
            e.stop()
    out["elapsed_s"] = time.monotonic() - t_start
    log(f"settle: done in {out['elapsed_s']:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------
# global: ratelimit-service (Redis) behind ours' global rule and behind Envoy's native ratelimit filter

SERVICE_TARGET = REPO / "target" / "bench-service"
# RATELIMIT_SERVICE_DIR: a directory holding prebuilt `ratelimit-service` and `rls_load` binaries
# (e.g. copies, so a change under service/ during the run changes nothing); no build then.
SERVICE_DIR = os.environ.get("RATELIMIT_SERVICE_DIR")
SERVICE_BIN = Path(SERVICE_DIR) / "ratelimit-service" if SERVICE_DIR else SERVICE_TARGET / "release" / "ratelimit-service"
RLS_LOAD_BIN = Path(SERVICE_DIR) / "rls_load" if SERVICE_DIR else SERVICE_TARGET / "release" / "examples" / "rls_load"
# The root [profile.release] (lto, 1 codegen unit) is for the wasm filter and takes minutes for the
# service; these overrides apply to this build only, in its own target dir.
SERVICE_BUILD_ENV = {"CARGO_PROFILE_RELEASE_LTO": "false", "CARGO_PROFILE_RELEASE_CODEGEN_UNITS": "16"}


def build_service() -> float:
    """Builds ratelimit-service and the load client (service/examples/rls_load.rs); returns seconds."""
    if SERVICE_DIR:
        for b in (SERVICE_BIN, RLS_LOAD_BIN):
            if not b.exists():
                raise RuntimeError(f"RATELIMIT_SERVICE_DIR: {b} not found")
        return 0.0
    t0 = time.monotonic()
    subprocess.run(
        ["cargo", "build", "-q", "--release", "-p", "ratelimit-service", "--bin", "ratelimit-service",
         "--example", "rls_load", "--target-dir", str(SERVICE_TARGET)],
        cwd=REPO, check=True, stdin=subprocess.DEVNULL, env={**os.environ, **SERVICE_BUILD_ENV},
    )
    return time.monotonic() - t0


def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listens on 127.0.0.1:{port} after {timeout}s")


class Proc:
    """A helper process (redis-server, ratelimit-service), killed by the kernel should this script die."""

    def __init__(self, name: str, cmd: list[str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=workdir, preexec_fn=_pdeathsig)
        self.pid = self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        stop_process(self.proc)


def start_redis(workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    r = Proc("redis", [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--dir", str(workdir)], workdir)
    wait_port(port, r.proc, "redis-server")
    return r, port


def start_service(name: str, workdir: Path, redis_port: int, limits: Path, cpu: str | None) -> tuple[Proc, int, int]:
    grpc, http_ = free_port(), free_port()
    cmd = [str(SERVICE_BIN), "--grpc-addr", f"127.0.0.1:{grpc}", "--http-addr", f"127.0.0.1:{http_}",
           "--redis-url", f"redis://127.0.0.1:{redis_port}", "--config", str(limits)]
    s = Proc(name, pinned(cmd, cpu), workdir)
    wait_port(grpc, s.proc, name)
    wait_port(http_, s.proc, name)
    return s, grpc, http_


def service_decisions(http_port: int) -> int:
    """ratelimit_service_decisions_total for the bench domain, all codes."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    total = 0
    for m in re.finditer(r'^ratelimit_service_decisions_total\{domain="' + GLOBAL_DOMAIN + r'",code="[^"]*"\} (\d+)', text, re.M):
        total += int(m.group(1))
    return total


def wrk_latency(envoy: Envoy, clients: int, threads: int, seconds: int, key: str) -> dict:
    """wrk --latency: p50/p99 in ms, req/s, and non-2xx replies."""
    cmd = pinned(["wrk", "--latency", "-t", str(threads), "-c", str(clients), "-d", f"{seconds}s",
                  "-H", f"x-key: {key}", envoy.url()], LOAD_CPU)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    pct = {}
    for p, v, unit in re.findall(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        pct[p] = float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (rps and total and "50" in pct and "99" in pct):
        raise RuntimeError("cannot parse wrk output:\n" + out)
    return {"p50": pct["50"], "p99": pct["99"], "rps": float(rps.group(1)), "requests": int(total.group(1)),
            "non2xx": int(bad.group(1)) if bad else 0, "socket_errors": sum(map(int, errs.groups())) if errs else 0}


def rls_cluster_stats(e: Envoy) -> dict:
    """The service's cluster as this Envoy saw it: connections opened, calls, and the calls' latency
    (`upstream_rq_time`, ms, cumulative over the Envoy's life: P50, P99, P99.9 and the largest)."""
    data = json.loads(urllib.request.urlopen(e.admin + "/stats?format=json&filter=" +
                                             urllib.parse.quote("^cluster\\.ratelimit_service\\."), timeout=10).read())
    out: dict = {}
    for st in data.get("stats", []):
        name = st.get("name", "")
        if name.rsplit(".", 1)[-1] in ("upstream_cx_total", "upstream_rq_total", "upstream_cx_destroy"):
            out[name.rsplit(".", 1)[-1]] = int(st.get("value", 0))
        if "histograms" in st:
            qs = st["histograms"].get("supported_quantiles", [])
            for h in st["histograms"].get("computed_quantiles", []):
                if h.get("name", "").endswith("upstream_rq_time"):
                    cum = {q: v.get("cumulative") for q, v in zip(qs, h.get("values", []))}
                    out["rq_time_ms"] = {k: cum.get(q) for k, q in (("p50", 50), ("p99", 99), ("p999", 99.9), ("max", 100))}
    return out


GLOBAL_VARIANTS = [("plain", "plain"), ("ours-global", "ours-global"), ("native-global", "native-global")]


def global_section(workdir: Path, upstream: Envoy, rounds: int, seconds: int, concurrencies: list[int], load_runs: int,
                   load_seconds: float) -> dict:
    if not shutil.which("redis-server"):
        raise RuntimeError("redis-server not found (`make setup-redis` installs it)")
    t_start = time.monotonic()
    out: dict = {"rounds": rounds, "seconds": seconds, "concurrencies": concurrencies, "build_s": build_service()}
    gdir = workdir / "global"
    gdir.mkdir(parents=True, exist_ok=True)
    limits = gdir / "limits.yaml"
    limits.write_text(SERVICE_LIMITS_YAML)
    procs: list = []
    envoys: dict[str, Envoy] = {}
    try:
        redis, redis_port = start_redis(gdir)
        procs.append(redis)
        # Latency: the service is not pinned (its runtime gets one worker thread per CPU).
        svc, grpc, http_ = start_service("service-latency", gdir, redis_port, limits, None)
        procs.append(svc)
        for name, kind in GLOBAL_VARIANTS:
            envoys[name] = Envoy(f"global-{name}", filtered_config(kind, upstream.port, rls_port=grpc), 1, gdir, cpu="0")
        for e in envoys.values():
            e.wait_ready()
        # Each variant must really ask the service: one request each, counted by the service.
        out["headers"] = {}
        for name, e in envoys.items():
            before = service_decisions(http_)
            status, hdrs = response_headers(e, HOT_KEY)
            asked = service_decisions(http_) - before
            out["headers"][name] = (status, hdrs, asked)
            if status != 200 or asked != (0 if name == "plain" else 1):
                raise RuntimeError(f"global {name}: status {status}, {asked} service decisions for one request; "
                                   f"Envoy log {e.log_path}")
        log("global: warm-up")
        for e in envoys.values():
            wrk_latency(e, max(concurrencies), 2, 2, HOT_KEY)
        order = [(n, c) for n, _ in GLOBAL_VARIANTS for c in concurrencies]
        rng = random.Random(7)
        runs: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in concurrencies} for n, _ in GLOBAL_VARIANTS}
        for r in range(rounds):
            rng.shuffle(order)
            for name, c in order:
                before = service_decisions(http_)
                res = wrk_latency(envoys[name], c, min(2, c), seconds, HOT_KEY)
                res["decisions"] = service_decisions(http_) - before
                if res["non2xx"] or res["socket_errors"]:
                    raise RuntimeError(f"global {name} -c {c}: {res}")
                runs[name][c].append(res)
            log(f"global: latency round {r + 1}/{rounds} done")
        out["latency"] = runs
        with contextlib.suppress(OSError, ValueError, KeyError):
            out["cluster"] = {name: rls_cluster_stats(e) for name, e in envoys.items() if name != "plain"}
        for e in envoys.values():
            e.stop()
        svc.stop()

        # Decisions per second on one core: the service on CPU 1 alone; load client and Redis on CPU 0.
        svc1, grpc1, http1 = start_service("service-1cpu", gdir, redis_port, limits, "1")
        procs.append(svc1)
        if PIN:
            subprocess.run(["taskset", "-a", "-pc", "0", str(redis.pid)], check=True, stdout=subprocess.DEVNULL)
        load = []
        for i in range(load_runs):
            cpu0, rcpu0, t0 = svc1.cpu_seconds(), redis.cpu_seconds(), time.monotonic()
            cmd = pinned([str(RLS_LOAD_BIN), "--addr", f"127.0.0.1:{grpc1}", "--domain", GLOBAL_DOMAIN, "--tasks", "64",
                          "--connections", "2", "--keys", "16", "--seconds", str(load_seconds), "--warmup", "1"], "0")
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=load_seconds + 60)
            if p.returncode != 0:
                raise RuntimeError(f"rls_load failed: {p.stderr}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            wall = time.monotonic() - t0
            res["service_cpu_busy"] = (svc1.cpu_seconds() - cpu0) / wall
            res["redis_cpu_busy"] = (redis.cpu_seconds() - rcpu0) / wall
            # CPU per decision: busy fraction / decisions per second (warm-up and measured parts had the same load).
            res["service_us_per_decision"] = res["service_cpu_busy"] / max(res["per_sec"], 1) * 1e6
            res["redis_us_per_decision"] = res["redis_cpu_busy"] / max(res["per_sec"], 1) * 1e6
            if res["errors"] or res["over_limit"]:
                raise RuntimeError(f"rls_load: {res}")
            load.append(res)
            log(f"global: decisions run {i + 1}/{load_runs}: {res['per_sec']:,.0f}/s")
        out["load"] = load
        out["redis_cpu"] = "0" if PIN else "unpinned"
        out["elapsed_s"] = time.monotonic() - t_start
        log(f"global: done in {out['elapsed_s']:.0f} s (build {out['build_s']:.0f} s)")
    finally:
        for e in envoys.values():
            e.stop()
        for p in reversed(procs):
            p.stop()
    return out


# ---------------------------------------------------------------------------------------------
# leases: one rule decided locally, by the service on every request, and from quota leases (issue 13's bench)

LEASE_SPEC = {"size": 100, "refresh_below": 25, "validity": "10s"}
# Never reached in a run: a window of a minute, so a lease is cut by the window's end at most once a minute.
LEASE_LIMIT = {"algorithm": "fixed_window", "requests": BIG, "window": "1m"}
LEASE_VARIANTS = ("plain", "local", "global", "hybrid")


def ours_lease_config(mode: str) -> dict:
    """The same rule (rule `g`, one key per x-key, LEASE_LIMIT) decided locally (`local`), by the
    service on every request (`global`), or from leases of LEASE_SPEC (`hybrid`)."""
    rule: dict = {"name": "g", "key": [{"source": "header", "name": "x-key"}], "limit": LEASE_LIMIT}
    cfg: dict = {"key_prefix": "bench", "headers": "x-ratelimit", "rules": [rule]}
    if mode in ("global", "hybrid"):
        # deny on failure: a failed call shows up as a non-2xx reply in wrk's count, not as a fast "allow".
        cfg["global"] = {"cluster": "ratelimit_service", "domain": GLOBAL_DOMAIN, "timeout": "1s", "failure_mode": "deny"}
        rule["global"] = True
    if mode == "hybrid":
        rule["lease"] = LEASE_SPEC
    return cfg


LEASE_COUNTERS = {"served": "lease_served_total", "granted": "lease_granted_units_total",
                  "refreshes": "lease_refreshes_total"}


def lease_counters(e: Envoy) -> dict:
    c = {k: e.stat(wasm_stat(m, "g")) for k, m in LEASE_COUNTERS.items()}
    c["allowed"] = e.stat(wasm_stat("requests_total", "g", "allowed"))
    c["failures"] = e.stat(wasm_stat("global_failures_total"))
    c["requests"] = e.stat("http.ingress.downstream_rq_total")
    return c


def lease_run(e: Envoy, clients: int, seconds: int, http_port: int) -> dict:
    """wrk_latency plus the Envoy's CPU per request, the service's decisions (calls) and the filter's
    lease counters over the run."""
    c0, dec0, cpu0 = lease_counters(e), service_decisions(http_port), e.cpu_seconds()
    res = wrk_latency(e, clients, min(2, clients), seconds, HOT_KEY)
    time.sleep(0.1)  # the requests wrk left in flight end
    cpu1 = e.cpu_seconds()
    time.sleep(0.3)  # the filter adds its counts to Envoy's counters every 100 ms
    res["calls"] = service_decisions(http_port) - dec0
    c1 = lease_counters(e)
    res.update({k: c1[k] - c0[k] for k in c1})
    res["us_per_req"] = (cpu1 - cpu0) / max(res["requests"], 1) * 1e6
    return res


def leases_section(workdir: Path, upstream: Envoy, rounds: int, seconds: int, concurrencies: list[int]) -> dict:
    if not shutil.which("redis-server"):
        raise RuntimeError("redis-server not found (`make setup-redis` installs it)")
    t_start = time.monotonic()
    out: dict = {"rounds": rounds, "seconds": seconds, "concurrencies": concurrencies, "build_s": build_service(),
                 "lease": LEASE_SPEC, "limit": LEASE_LIMIT}
    ldir = workdir / "leases"
    ldir.mkdir(parents=True, exist_ok=True)
    limits = ldir / "limits.yaml"
    limits.write_text(SERVICE_LIMITS_YAML)
    procs: list = []
    envoys: dict[str, Envoy] = {}
    try:
        redis, redis_port = start_redis(ldir)
        procs.append(redis)
        svc, grpc, http_ = start_service("service-leases", ldir, redis_port, limits, None)
        procs.append(svc)
        for name in LEASE_VARIANTS:
            cfg = (filtered_config("plain", upstream.port) if name == "plain" else
                   filtered_config("ours-json", upstream.port, config=ours_lease_config(name), rls_port=grpc))
            envoys[name] = Envoy(f"leases-{name}", cfg, 1, ldir, cpu="0")
        for e in envoys.values():
            e.wait_ready()
        # Each variant does what it says: local and plain never call, global calls on every request,
        # hybrid calls for its first request (which brings a lease) and then spends the lease.
        checks = {}
        for name, e in envoys.items():
            before = service_decisions(http_)
            first = [request(e, HOT_KEY) for _ in range(1)]
            asked_first = service_decisions(http_) - before
            rest = [request(e, HOT_KEY) for _ in range(9)]
            time.sleep(0.3)
            asked = service_decisions(http_) - before
            checks[name] = (first + rest, asked_first, asked)
            want = {"plain": (0, 0), "local": (0, 0), "global": (1, 10), "hybrid": (1, 1)}[name]
            if any(s != 200 for s in first + rest) or (asked_first, asked) != want:
                raise RuntimeError(f"leases {name}: statuses {first + rest}, service calls {asked_first} for the first "
                                   f"request and {asked} for 10 (want {want}); Envoy log {e.log_path}")
        out["checks"] = checks
        log("leases: warm-up")
        for e in envoys.values():
            wrk_latency(e, max(concurrencies), 2, 2, HOT_KEY)
        time.sleep(0.4)  # the warm-up's counts reach Envoy's counters before the first run reads them
        order = [(n, c) for n in LEASE_VARIANTS for c in concurrencies]
        rng = random.Random(13)
        runs: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in concurrencies} for n in LEASE_VARIANTS}
        for r in range(rounds):
            rng.shuffle(order)
            for name, c in order:
                res = lease_run(envoys[name], c, seconds, http_)
                if res["non2xx"] or res["socket_errors"] or res["failures"]:
                    raise RuntimeError(f"leases {name} -c {c}: {res}")
                if name in ("plain", "local") and res["calls"]:
                    raise RuntimeError(f"leases {name} -c {c}: {res['calls']} service calls")
                if name == "hybrid" and not res["served"]:
                    raise RuntimeError(f"leases hybrid -c {c}: no request served from a lease: {res}")
                res["round"] = r
                runs[name][c].append(res)
            log(f"leases: round {r + 1}/{rounds} done")
        out["latency"] = runs
        out["counters"] = {n: lease_counters(e) for n, e in envoys.items() if n != "plain"}
        with contextlib.suppress(OSError, ValueError, KeyError):
            out["cluster"] = {n: rls_cluster_stats(envoys[n]) for n in ("global", "hybrid")}
    finally:
        for e in envoys.values():
            e.stop()
        for p in reversed(procs):
            p.stop()
    out["elapsed_s"] = time.monotonic() - t_start
    log(f"leases: done in {out['elapsed_s']:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ver = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version: (\S+)", ver)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "envoy": m.group(1) if m else ver.strip(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load": os.getloadavg(),
        "git": git_state(),
    }


def git_state() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    return head + (" + uncommitted changes in src/" if dirty else "")


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = f[:7]
    return (user + nice + system + irq + softirq) / CLK_TCK


def own_seconds() -> float:
    """CPU time of this script and every child it waited for (Envoys, h2load, wrk, perf, cargo)."""
    import resource
    ch, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return ch.ru_utime + ch.ru_stime + me.ru_utime + me.ru_stime


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def render_global(g: dict) -> list[str]:
    L: list[str] = []
    lat = g["latency"]
    names = [n for n, _ in GLOBAL_VARIANTS]
    concs = g["concurrencies"]
    m = {(n, c): (med([r["p50"] for r in lat[n][c]]), med([r["p99"] for r in lat[n][c]]), med([r["rps"] for r in lat[n][c]]))
         for n in names for c in concs if lat[n][c]}
    L.append("## Global: through a Redis-backed rate limit service\n")
    L.append(f"One `ratelimit-service` (this repository's `service/`, built with `--release` minus LTO; the build took "
             f"{g['build_s']:.0f} s in this run, the whole section {g.get('elapsed_s', 0):.0f} s) with one `redis-server` (`--save '' --appendonly no`), all on "
             "127.0.0.1. Three Envoys with 1 worker each, the same route to the upstream Envoy:\n")
    L.append("- **plain**: no filter (the baseline);")
    L.append("- **ours-global**: ratelimit-wasm with one global rule per `x-key` (`fixed_window`, "
             f"{BIG:,} per 1s: never denies; `global.timeout` 1s, `failure_mode` deny); each request makes one "
             "`ShouldRateLimit` call (descriptor `rule=g, x-key=<value>` with the limit as override);")
    L.append("- **native-global**: Envoy's `envoy.filters.http.ratelimit` (domain `bench`, route `rate_limits` action "
             "`request_headers` x-key -> `x-key`, gRPC V3 to the same cluster, `failure_mode_deny`, "
             "`enable_x_ratelimit_headers: DRAFT_VERSION_03`); the service takes the limit from a YAML file "
             f"(`descriptors: [{{key: x-key, rate_limit: {{unit: second, requests_per_unit: {BIG}}}}}]`).\n")
    L.append(f"Load: wrk `--latency -d {g['seconds']}s` with {' and '.join(f'`-c {c}`' for c in concs)} connections "
             "(closed loop: each connection sends its next request when the previous answer arrives, so with 1 "
             "connection the latency is one request's own path, and with more it includes queueing), one `x-key` "
             f"value, {g['rounds']} rounds in shuffled order after a warm-up; medians over the rounds. Latency is "
             "wrk's, from sending the request to the end of the response.\n")
    L.append("| variant | connections | p50 ms | p99 ms | req/s | added p50 ms (vs plain) | added p99 ms (vs plain) | service calls per request |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in concs:
        for n in names:
            if (n, c) not in m:
                continue
            p50, p99, rps = m[(n, c)]
            dec = sum(r["decisions"] for r in lat[n][c]) / max(sum(r["requests"] for r in lat[n][c]), 1)
            add50 = "-" if n == "plain" else f"{p50 - m[('plain', c)][0]:+.3f}"
            add99 = "-" if n == "plain" else f"{p99 - m[('plain', c)][1]:+.3f}"
            L.append(f"| {n} | {c} | {p50:.3f} | {p99:.3f} | {rps:,.0f} | {add50} | {add99} | {dec:.2f} |")
    L.append("")
    L.append("| ours / native | connections | total p50 | total p99 | added p50 | added p99 | req/s |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for c in concs:
        if not all((n, c) in m for n in names):
            continue
        o, nat, pl = m[("ours-global", c)], m[("native-global", c)], m[("plain", c)]
        a50, n50, a99, n99 = o[0] - pl[0], nat[0] - pl[0], o[1] - pl[1], nat[1] - pl[1]
        r50 = f"**{a50 / n50:.2f}x**" if n50 > 0 else "n/a"
        r99 = f"**{a99 / n99:.2f}x**" if n99 > 0 else "n/a"
        L.append(f"| ours / native | {c} | {o[0] / nat[0]:.2f}x | {o[1] / nat[1]:.2f}x | {r50} | {r99} | {o[2] / nat[2]:.2f}x |")
    L.append("")
    L.append("Per round, p50 / p99 ms:\n")
    for c in concs:
        for n in names:
            L.append(f"- {n}, {c} connection(s): " + ", ".join(f"{r['p50']:.3f} / {r['p99']:.3f}" for r in lat[n][c]))
    L.append("")
    if cl := g.get("cluster"):
        L.append("The service's cluster as each Envoy saw it over its life (warm-up included): Envoy's "
                 "`cluster.ratelimit_service.upstream_rq_time` (ms, from the call's start to its answer) and the "
                 "connections it opened. A tail near 40 ms is the signature of Nagle's algorithm on one side of a "
                 "connection meeting delayed ACKs on the other (Linux delays an ACK by at least 40 ms).\n")
        for n, c in cl.items():
            t = c.get("rq_time_ms") or {}
            fmt = lambda v: "-" if v is None else f"{v:.1f}"
            L.append(f"- {n}: {c.get('upstream_rq_total', 0):,} calls over {c.get('upstream_cx_total', 0)} connection(s); "
                     f"P50 {fmt(t.get('p50'))}, P99 {fmt(t.get('p99'))}, P99.9 {fmt(t.get('p999'))}, max {fmt(t.get('max'))}")
        L.append("")
    L.append(f"All of these processes (Envoys, upstream, service, Redis, wrk) share the machine's {os.cpu_count()} CPUs: "
             "the Envoy under test on CPU 0, wrk and the upstream on CPU 1, the service (one tokio worker per CPU) and "
             "Redis unpinned. Absolute latencies include that scheduling; compare the variants of the same run.\n")
    if hd := g.get("headers"):
        L.append("Headers each variant returned (one request):\n")
        for n, (status, hdrs, _) in hd.items():
            if n == "plain":
                continue
            L.append(f"- {n}: {status} " + ("; ".join(f"{k}: {v}" for k, v in hdrs) or "(none)"))
        L.append("")
    if load := g.get("load"):
        x = load[0]
        L.append("### Service decisions per second on one core\n")
        L.append(f"A fresh service process pinned to CPU 1 (`taskset -c 1`, so its tokio runtime has 1 worker thread), "
                 f"driven by `service/examples/rls_load.rs` (tonic client, {x['tasks']} concurrent calls over "
                 f"{x['connections']} HTTP/2 connections, one descriptor per call shaped like ours' (`rule=g`, "
                 f"`x-key=k0..k{x['keys'] - 1}`, limit override), 1 s warm-up then {x['seconds']:.0f} s measured) pinned "
                 f"to CPU 0, with Redis on CPU {g['redis_cpu']}: the service's core is its own, and the load client and "
                 f"Redis share the other. {len(load)} run(s), medians.\n")
        busy = med([r["service_cpu_busy"] for r in load])
        us = med([r["service_us_per_decision"] for r in load])
        rus = med([r["redis_us_per_decision"] for r in load])
        ps = [r["per_sec"] for r in load]
        mid = sorted(load, key=lambda r: r["per_sec"])[len(load) // 2]
        L.append("| decisions/s measured | min-max | service CPU busy | service CPU us/decision | one core's capacity (1 s / CPU per decision) | Redis CPU us/decision | call latency p50 / p99 ms |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        L.append(f"| {med(ps):,.0f} | {min(ps):,.0f}-{max(ps):,.0f} | {busy * 100:.0f}% | {us:.1f} | **{1e6 / us:,.0f}** | "
                 f"{rus:.1f} | {mid['p50_us'] / 1000:.2f} / {mid['p99_us'] / 1000:.2f} |")
        L.append("")
        L.append("CPU = utime+stime from `/proc/PID/stat` over the client's run (warm-up included, same load) / wall "
                 "time. When the service's core is not fully busy, the measured rate is bounded by the load client "
                 "and Redis on the other CPU, and one core's capacity is the service CPU per decision turned into a "
                 "rate (a machine with more cores would give the client and Redis their own).\n")
    return L


LEASE_TARGETS = {"cpu_ratio": 1.15, "p50_ms": 0.05, "no_call": 0.95}


def lease_summary(d: dict) -> dict:
    """Medians, per-round pairs against local, and the issue's three targets, from leases_section()."""
    lat, concs = d["latency"], d["concurrencies"]
    s: dict = {"m": {}, "pairs": {}, "calls": {}, "targets": []}
    for n in LEASE_VARIANTS:
        for c in concs:
            rs = lat[n][c]
            s["m"][(n, c)] = {k: med([r[k] for r in rs]) for k in ("us_per_req", "p50", "p99", "rps")}
            req = sum(r["requests"] for r in rs)
            s["calls"][(n, c)] = {"per_1000": sum(r["calls"] for r in rs) / max(req, 1) * 1000,
                                  "served": sum(r["served"] for r in rs) / max(req, 1), "requests": req}
    for n in ("global", "hybrid"):
        for c in concs:
            a, b = lat[n][c], lat["local"][c]
            s["pairs"][(n, c)] = {
                "cpu": [x["us_per_req"] / y["us_per_req"] for x, y in zip(a, b)],
                "p50": [x["p50"] - y["p50"] for x, y in zip(a, b)],
                "p99": [x["p99"] - y["p99"] for x, y in zip(a, b)],
            }
    t = LEASE_TARGETS
    for c in concs:
        ratio = s["m"][("hybrid", c)]["us_per_req"] / s["m"][("local", c)]["us_per_req"]
        s["targets"].append((f"hybrid CPU per request within {t['cpu_ratio']:.2f}x of local, {c} connection(s)",
                             f"{ratio:.2f}x (rounds {min(s['pairs'][('hybrid', c)]['cpu']):.2f}-"
                             f"{max(s['pairs'][('hybrid', c)]['cpu']):.2f}x)", ratio <= t["cpu_ratio"]))
    for c in concs:
        diff = s["m"][("hybrid", c)]["p50"] - s["m"][("local", c)]["p50"]
        pr = s["pairs"][("hybrid", c)]["p50"]
        s["targets"].append((f"hybrid p50 within {t['p50_ms']:.2f} ms of local, {c} connection(s)",
                             f"{diff:+.3f} ms (rounds {min(pr):+.3f} to {max(pr):+.3f})", diff <= t["p50_ms"]))
    req = sum(s["calls"][("hybrid", c)]["requests"] for c in concs)
    served = sum(r["served"] for c in concs for r in lat["hybrid"][c]) / max(req, 1)
    calls = sum(r["calls"] for c in concs for r in lat["hybrid"][c]) / max(req, 1)
    s["targets"].append((f">= {t['no_call'] * 100:.0f}% of requests without a call (hybrid, every measured run)",
                         f"{served * 100:.1f}% served from a lease ({calls * 1000:.1f} calls per 1,000 requests, "
                         f"background refreshes included)", served >= t["no_call"]))
    return s


def render_leases(d: dict) -> list[str]:
    L: list[str] = []
    lat, concs = d["latency"], d["concurrencies"]
    s = lease_summary(d)
    m = s["m"]
    L.append("## Quota leases: hybrid vs local vs global-per-request\n")
    L.append(f"The same rule three ways, each in its own Envoy with 1 worker (pinned to CPU 0), the same route to the "
             f"upstream: rule `g`, one key per `x-key`, `{json.dumps(d['limit'])}` (never reached in the run), headers "
             "`x-ratelimit`. One `ratelimit-service` with one `redis-server`, as in the Global section (both unpinned).\n")
    L.append("- **plain**: no filter (the latency baseline);")
    L.append("- **local**: the rule as a local limit (shared data);")
    L.append("- **global**: `\"global\": true`, no lease: one `ShouldRateLimit` call per request (`timeout` 1s, "
             "`failure_mode` deny);")
    L.append(f"- **hybrid**: `\"global\": true` and `\"lease\": {json.dumps(d['lease'])}`: requests spend the key's "
             "lease in shared data; a refresh goes out in the background when it is down to `refresh_below`.\n")
    L.append(f"Load: wrk `--latency -d {d['seconds']}s` `GET /` with one `x-key` value at "
             f"{' and '.join(f'`-c {c}`' for c in concs)} connections (closed loop), {d['rounds']} rounds in shuffled "
             "order after a warm-up; medians over the rounds, ratios and differences paired within each round. CPU = "
             "utime+stime of the Envoy's PID over the run / requests it received (`downstream_rq_total`). Service "
             "calls = the service's `ratelimit_service_decisions_total{domain=\"bench\"}` after - before each run "
             "(every call, background refreshes included); served from a lease = the filter's "
             "`ratelimit_wasm_lease_served_total{rule=\"g\"}`.\n")
    L.append("| variant | connections | CPU us/req | vs local | p50 ms | p99 ms | added p50 ms (vs plain) | added p99 ms | "
             "req/s | service calls per 1,000 requests | served from a lease |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in concs:
        pl = m[("plain", c)]
        for n in LEASE_VARIANTS:
            x, k = m[(n, c)], s["calls"][(n, c)]
            vs = "-" if n in ("plain", "local") else f"**{x['us_per_req'] / m[('local', c)]['us_per_req']:.2f}x**"
            add50 = "-" if n == "plain" else f"{x['p50'] - pl['p50']:+.3f}"
            add99 = "-" if n == "plain" else f"{x['p99'] - pl['p99']:+.3f}"
            served = f"{k['served'] * 100:.1f}%" if n == "hybrid" else "-"
            L.append(f"| {n} | {c} | {x['us_per_req']:.1f} | {vs} | {x['p50']:.3f} | {x['p99']:.3f} | {add50} | {add99} | "
                     f"{x['rps']:,.0f} | {k['per_1000']:.1f} | {served} |")
    L.append("")
    L.append("| vs local, paired per round | connections | CPU ratio (median, range) | p50 difference ms | p99 difference ms |")
    L.append("|---|---:|---:|---:|---:|")
    for n in ("hybrid", "global"):
        for c in concs:
            p = s["pairs"][(n, c)]
            L.append(f"| {n} / local | {c} | {med(p['cpu']):.2f}x ({min(p['cpu']):.2f}-{max(p['cpu']):.2f}) | "
                     f"{med(p['p50']):+.3f} ({min(p['p50']):+.3f} to {max(p['p50']):+.3f}) | "
                     f"{med(p['p99']):+.3f} ({min(p['p99']):+.3f} to {max(p['p99']):+.3f}) |")
    L.append("")
    L.append("Issue 13's targets:\n")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    for what, val, ok in s["targets"]:
        L.append(f"| {what} | {val} | {'**yes**' if ok else '**no**'} |")
    L.append("")
    L.append("Per round, CPU us/req, p50 / p99 ms, service calls per 1,000 requests:\n")
    for c in concs:
        for n in LEASE_VARIANTS:
            L.append(f"- {n}, {c} connection(s): " + ", ".join(
                f"{r['us_per_req']:.1f}, {r['p50']:.3f} / {r['p99']:.3f}, {r['calls'] / max(r['requests'], 1) * 1000:.1f}"
                for r in lat[n][c]))
    L.append("")
    if cs := d.get("counters"):
        h = cs["hybrid"]
        L.append(f"The hybrid Envoy's counters over its life (checks and warm-up included): {h['requests']:,} requests, "
                 f"{h['served']:,} served from a lease, {h['granted']:,} units granted, {h['refreshes']:,} background "
                 f"refreshes, {h['failures']} failed calls"
                 + "".join(f"; {n}'s calls to the service (Envoy's `upstream_rq_time` over its life): P99 "
                           f"{c['rq_time_ms']['p99'] or 0:.1f} ms, P99.9 {c['rq_time_ms']['p999'] or 0:.1f} ms, max "
                           f"{c['rq_time_ms']['max'] or 0:.1f} ms"
                           for n, c in d.get("cluster", {}).items() if c.get("rq_time_ms"))
                 + f". All of these processes share the machine's "
                 f"{os.cpu_count()} CPUs (the Envoy under test on CPU 0, wrk and the upstream on the other); compare the "
                 "variants of the same run.\n")
    return L


def paired_runs(res: dict, a: str, b: str, workers_list: list[int]):
    """(workers, runs of a, runs of b) for each worker count both variants ran with; run i of each
    comes from the same round."""
    for workers in workers_list:
        ra, rb = res.get((a, workers)), res.get((b, workers))
        if ra and rb:
            yield workers, ra, rb


def render_idempotency(d: dict) -> list[str]:
    L: list[str] = []
    runs = d["runs"]
    names = [n for n, _ in IDEM_VARIANTS]
    m = {n: (med([r["us_per_req"] for r in runs[n]]), med([r["rps"] for r in runs[n]])) for n in names if runs.get(n)}
    L.append("## Idempotency keys: CPU per request, first requests\n")
    L.append(f"Three Envoys with 1 worker each (pinned to CPU 0), the same route to the upstream. Load: wrk `-c {d['clients']} "
             f"-t 2` with `bench/idem.lua`: `POST /` with `x-key: {HOT_KEY}` and an `Idempotency-Key` new on every request, "
             f"{d['requests']:,} requests per run (each wrk thread stops at its share), {d['rounds']} rounds in shuffled "
             "order after a warm-up; CPU = utime+stime of the Envoy's PID over the run / requests it received. All three "
             "get the very same requests:\n")
    L.append("- **plain**: no filter;")
    L.append("- **ours**: the `ours` rule of the Speed section (1 rule per x-key, never denies), no idempotency entry "
             "(the filter ignores the header);")
    L.append(f"- **ours-idem**: the same rule plus `\"idempotency\": [{json.dumps(d['config'])}]`: each request claims its "
             "key (a CAS on its slot), goes on to the upstream, and at stream end completes its record with the response "
             "kept (status 200, `content-type`, body `ok`: a second CAS). The table is the largest allowed so that no "
             "slot ever holds 5 live keys during the run (keys live 1 h: a run leaves them all behind).\n")
    L.append("| variant | CPU us/req (median) | min-max | req/s (median) | CPU vs plain | CPU vs ours |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for n in names:
        if n not in m:
            continue
        us, rps = m[n]
        xs = [r["us_per_req"] for r in runs[n]]
        vs_ours = "-" if n != "ours-idem" or "ours" not in m else f"{us / m['ours'][0]:.2f}x"
        L.append(f"| {n} | {us:.1f} | {min(xs):.1f}-{max(xs):.1f} | {rps:,.0f} | {us / m['plain'][0]:.2f}x | {vs_ours} |")
    L.append("")
    if runs.get("ours-idem") and runs.get("ours"):
        ratio = [a["us_per_req"] / b["us_per_req"] for a, b in zip(runs["ours-idem"], runs["ours"])]
        diff = [a["us_per_req"] - b["us_per_req"] for a, b in zip(runs["ours-idem"], runs["ours"])]
        rps = [a["rps"] / b["rps"] for a, b in zip(runs["ours-idem"], runs["ours"])]
        L.append(f"Paired within each round (median of rounds, range): ours-idem / ours CPU per request **{med(ratio):.2f}x** "
                 f"({min(ratio):.2f}-{max(ratio):.2f}), req/s {med(rps):.2f}x; an idempotency key claimed and completed "
                 f"adds **{med(diff):.1f} us** of Envoy CPU per request ({min(diff):.1f} to {max(diff):.1f}).\n")
    c = d["counters"]
    L.append(f"Every request claimed a key (asserted per run: the `first` count equals the requests the Envoy received). "
             f"ours-idem's counters over its life: `first` {c['first']:,} of {c['requests']:,} requests received (the "
             f"rest: the check before the warm-up, a retry that got the kept response: `replayed` {c['replayed']:,}), "
             f"`in_flight` {c['in_flight']:,}, `table_full` {c['table_full']:,}, `store_errors` {c['store_errors']:,}, "
             f"`released` {c['released']:,} (requests wrk left in flight when it stopped, reset before their response)."
             + (f" RSS at the end: ours-idem {d['rss_kib']['ours-idem'] / 1024:.1f} MiB with {c['first']:,} kept "
                f"records, ours {d['rss_kib']['ours'] / 1024:.1f} MiB." if d.get("rss_kib") else "") + "\n")
    return L


def render_settle(d: dict) -> list[str]:
    L: list[str] = []
    lat = d["latency"]
    concs = d["concurrencies"]
    L.append("## Settle-phase charge: added latency (local)\n")
    L.append("Two Envoys with 1 worker each (pinned to CPU 0), the same route: **ours** (the Speed section's rule, a "
             "constant cost of 1) and **ours-usage** (the same rule with `cost: {\"response_header\": \"x-usage-tokens\", "
             "\"max\": 1000}`: 1 unit taken at admission, and when the response headers arrive the upstream's "
             "`x-usage-tokens: 2` charges 1 more, a second CAS on the bucket). Load: wrk `--latency` `GET /` with one "
             f"`x-key`, `-d {d['seconds']}s` at {' and '.join(f'`-c {c}`' for c in concs)} connections (closed loop; with 1 "
             f"connection the latency is one request's own path), {d['rounds']} rounds in shuffled order after a "
             "warm-up; medians, and differences paired within each round. Latency is wrk's (request sent to response "
             "ended).\n")
    L.append("| variant | connections | p50 us | p99 us | req/s |")
    L.append("|---|---:|---:|---:|---:|")
    for c in concs:
        for n in SETTLE_VARIANTS:
            rs = lat[n][c]
            L.append(f"| {n} | {c} | {med([r['p50'] for r in rs]) * 1000:.0f} | {med([r['p99'] for r in rs]) * 1000:.0f} | "
                     f"{med([r['rps'] for r in rs]):,.0f} |")
    L.append("")
    L.append("| ours-usage vs ours | connections | added p50 us (median of rounds, range) | added p99 us | p50 ratio | req/s ratio |")
    L.append("|---|---:|---:|---:|---:|---:|")
    heads = []
    for c in concs:
        a, b = lat["ours-usage"][c], lat["ours"][c]
        d50 = [(x["p50"] - y["p50"]) * 1000 for x, y in zip(a, b)]
        d99 = [(x["p99"] - y["p99"]) * 1000 for x, y in zip(a, b)]
        r50 = [x["p50"] / y["p50"] for x, y in zip(a, b)]
        rps = [x["rps"] / y["rps"] for x, y in zip(a, b)]
        heads.append(f"**{med(d50):.1f} us p50** at {c} connection(s) (rounds {min(d50):+.1f} to {max(d50):+.1f})")
        L.append(f"| settle-phase charge | {c} | **{med(d50):+.1f}** ({min(d50):+.1f} to {max(d50):+.1f}) | "
                 f"{med(d99):+.1f} ({min(d99):+.1f} to {max(d99):+.1f}) | {med(r50):.2f}x | {med(rps):.2f}x |")
    L.append("")
    if heads:
        L.append(f"The settle-phase charge adds {' and '.join(heads)}; p99 differences are within the rounds' noise "
                 "on this shared machine unless their range excludes 0. "
                 f"Counters: ours-usage allowed {d['charged']['ours-usage'][0]:,} requests and charged "
                 f"{d['charged']['ours-usage'][1]:,} units from responses (1 per response; asserted equal but for the "
                 f"requests wrk left in flight at the end of its runs, at most {d['in_flight_bound']}).\n")
    return L


def render(res: dict, mem: dict | None, acc: dict, mach: dict, params: dict, elapsed: float) -> str:
    L: list[str] = []
    L.append("# Benchmarks: ratelimit-wasm vs Envoy's native filters\n")
    L.append("Generated by `make bench` (`bench/bench.py`); re-run it to refresh this file. Figures from one run,")
    L.append("variants interleaved in shuffled order each round; medians over the rounds, ratios of medians.\n")
    L.append(f"- Run: {mach['date']}, took {elapsed / 60:.1f} min; load average at the end {mach['load'][0]:.2f}")
    if "others_cpu" in params:
        L.append(f"- Other processes on the machine used {params['others_cpu']:.0f} CPU-seconds during the run "
                 f"({params['others_cpu'] / max(elapsed * (os.cpu_count() or 1), 1) * 100:.0f}% of its capacity; "
                 "a quiet run is near 0%)")
    L.append(f"- Machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['mem_gib']} GiB, Linux {mach['kernel']}")
    L.append(f"- ratelimit-wasm: commit {mach['git']}" + (f" (module {params['wasm']}, from RATELIMIT_WASM)" if "wasm" in params else ""))
    if skipped := params.get("skipped"):
        L.append(f"- Sections skipped in this run: {', '.join(skipped)}")
    L.append(f"- Envoy {mach['envoy']} (V8 Wasm runtime); load generators h2load (HTTP/1.1) and wrk, on the same machine\n")

    speed_start = len(L)
    L.append("## Speed: Envoy CPU per request and throughput\n")
    L.append(f"{params['rounds']} rounds x {params['requests']:,} requests per variant, h2load `--h1 -c {params['clients']} -t 2`, "
             f"one `x-key` value for every request (`{HOT_KEY}`; the 429 rows use a key exhausted beforehand). "
             "CPU = utime+stime of the filtered Envoy's PID over the run (the upstream is a separate Envoy process, not counted).\n")
    L.append("| variant | workers | CPU us/req (median) | min-max | req/s (median) | CPU vs plain | CPU vs native | req/s vs native |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = {
        "plain": "plain Envoy (router only)",
        "native": "native local_ratelimit, per-key, headers DRAFT_VERSION_03",
        "ours": "ratelimit-wasm, 1 rule per x-key, headers x-ratelimit (as native)",
        "ours-both": "ratelimit-wasm, same, headers both (IETF + X-RateLimit, 5 headers)",
        "native-429": "native local_ratelimit, over limit (429)",
        "ours-429": "ratelimit-wasm, over limit (429)",
        "noop-wasm": "probe: no-op Rust wasm filter",
        "noop+calls": "probe: no-op + ours' host calls (allowed path: time, header, get+set shared data, 3 response headers)",
        "noop+resp5": "probe: no-op + 5 response headers set",
        "noop-429": "probe: wasm filter that only sends ours' 429 reply",
        "noop-429+reads": "probe: the same 429 after ours' reads (time, x-key header, get shared data)",
        "ours-end": "ratelimit-wasm as `ours`, also exporting no-op proxy_on_done and proxy_on_log",
        "ours-o3": "ratelimit-wasm as `ours`, built with opt-level 3 (`make build OPT_LEVEL=3`)",
        "ours-o3-429": "ratelimit-wasm built with opt-level 3, over limit (429)",
        "ours-conc": "ratelimit-wasm, the rule's limit a concurrency limit (max_in_flight 1,000,000): a unit taken and released per request",
        "ours-usage": "ratelimit-wasm, the rule's cost charged from the response's x-usage-tokens (a settle-moment CAS per request)",
    }
    native_of = {"ours": "native", "ours-both": "native", "ours-429": "native-429", "native": "native", "native-429": "native-429",
                 "ours-end": "native", "ours-o3": "native", "ours-o3-429": "native-429", "ours-conc": "native", "ours-usage": "native"}
    summary = {}
    for workers in params["workers"]:
        for name, *_ in SPEED_VARIANTS:
            runs = res.get((name, workers))
            if not runs:
                continue
            us = [r["us_per_req"] for r in runs]
            rps = [r["rps"] for r in runs]
            summary[(name, workers)] = (med(us), med(rps))
    for workers in params["workers"]:
        plain_us, _ = summary.get(("plain", workers), (float("nan"), 0))
        for name, *_ in SPEED_VARIANTS:
            if (name, workers) not in summary:
                continue
            us, rps = summary[(name, workers)]
            runs = res[(name, workers)]
            lo, hi = min(r["us_per_req"] for r in runs), max(r["us_per_req"] for r in runs)
            nat = native_of.get(name)
            vs_native = vs_native_rps = "-"
            if nat and nat != name and (nat, workers) in summary:
                vs_native = f"{us / summary[(nat, workers)][0]:.2f}x"
                vs_native_rps = f"{rps / summary[(nat, workers)][1]:.2f}x"
            L.append(f"| {labels[name]} | {workers} | {us:.1f} | {lo:.1f}-{hi:.1f} | {rps:,.0f} | {us / plain_us:.2f}x | {vs_native} | {vs_native_rps} |")
    L.append("")
    L.append("Target: ratelimit-wasm's CPU per request within 1.3x of native local_ratelimit with headers on. "
             "Paired ratios: ours / other computed within each round (the two ran minutes apart at most), then "
             "the median and range over the rounds; this cancels most of the machine's drift.\n")
    L.append("| comparison | workers | CPU/req ratio, median of rounds | range | req/s ratio, median | verdict |")
    L.append("|---|---:|---:|---:|---:|---|")
    for a, b, what in (("ours", "native", "ours / native, allowed"), ("ours-both", "native", "ours with both header sets / native, allowed"),
                       ("ours-429", "native-429", "ours / native, 429"),
                       ("ours", "plain", "ours / plain, allowed"), ("native", "plain", "native / plain, allowed"),
                       ("noop-wasm", "plain", "no-op wasm / plain"),
                       ("ours-end", "ours", "ours exporting proxy_on_done + proxy_on_log / ours, allowed"),
                       ("ours-conc", "ours", "concurrency limit / token bucket, allowed"),
                       ("ours-usage", "ours", "cost charged from the response / constant cost, allowed"),
                       ("ours", "ours-o3", "ours (opt-level s) / ours at opt-level 3, allowed"),
                       ("ours-429", "ours-o3-429", "ours (opt-level s) / ours at opt-level 3, 429")):
        for workers, ra, rb in paired_runs(res, a, b, params["workers"]):
            cpu = [x["us_per_req"] / y["us_per_req"] for x, y in zip(ra, rb)]
            rps = [x["rps"] / y["rps"] for x, y in zip(ra, rb)]
            verdict = ""
            if b.startswith("native") and a.startswith("ours"):
                verdict = "meets 1.3x" if med(cpu) <= 1.3 else "misses 1.3x"
            L.append(f"| {what} | {workers} | **{med(cpu):.2f}x** | {min(cpu):.2f}-{max(cpu):.2f} | {med(rps):.2f}x | {verdict} |")
    L.append("")

    if "headers" in res:
        L.append("Headers each variant returned (last of 3 requests on its key):\n")
        for name, (status, hdrs) in res["headers"].items():
            if name in ("plain", "noop-wasm"):
                continue
            shown = "; ".join(f"{k}: {v}" for k, v in hdrs) or "(none)"
            L.append(f"- {name}: {status} {shown}")
        L.append("")

    L.append("### Where ratelimit-wasm's time goes (allowed path)\n")
    L.append("Differences of the medians above (CPU us per request; each median is +-10% noisy, so differences of a few "
             "us are within noise). The probe filter (`bench/noop-filter`) is a no-op proxy-wasm 0.2.5 filter that can "
             "make the same host calls as ours with none of its logic.\n")
    L.append("| workers | wasm filter itself (noop - plain) | host calls (noop+calls - noop) | of which 5 response headers (noop+resp5 - noop) | ours' own work (ours - noop+calls) | ours - plain |")
    L.append("|---:|---:|---:|---:|---:|---:|")
    for workers in params["workers"]:
        g = lambda n: summary.get((n, workers), (float("nan"), 0))[0]  # noqa: E731
        L.append(f"| {workers} | {g('noop-wasm') - g('plain'):.1f} | {g('noop+calls') - g('noop-wasm'):.1f} | "
                 f"{g('noop+resp5') - g('noop-wasm'):.1f} | {g('ours') - g('noop+calls'):.1f} | {g('ours') - g('plain'):.1f} |")
    L.append("")
    L.append("Over-limit path: ours' own work + its time/header/get_shared_data calls = ours-429 - noop-429:")
    for workers in params["workers"]:
        g = lambda n: summary.get((n, workers), (float("nan"), 0))[0]  # noqa: E731
        L.append(f"- {workers} worker(s): noop-429 - native-429 = {g('noop-429') - g('native-429'):.1f} us (a wasm filter "
                 f"answering at all), ours-429 - noop-429 = {g('ours-429') - g('noop-429'):.1f} us")
    L.append("")
    L.append("Paired differences (CPU us per request, computed within each round, then the median and range over the "
             "rounds): the 429 path's own work, split into the three reads any exact limiter makes (time, the key "
             "header, the bucket's shared data) and the rest; and what exporting proxy_on_done / proxy_on_log costs.\n")
    L.append("| difference | workers | median of rounds | range |")
    L.append("|---|---:|---:|---:|")
    for a, b, what in (("ours-429", "noop-429", "429 own work: ours-429 - noop-429"),
                       ("noop-429+reads", "noop-429", "of which the three reads: noop-429+reads - noop-429"),
                       ("ours-429", "noop-429+reads", "of which ours' code: ours-429 - noop-429+reads"),
                       ("ours-end", "ours", "done/log exports: ours-end - ours (allowed)"),
                       ("ours", "ours-o3", "opt-level s vs 3: ours - ours-o3 (allowed)"),
                       ("ours-429", "ours-o3-429", "opt-level s vs 3: ours-429 - ours-o3-429")):
        for workers, ra, rb in paired_runs(res, a, b, params["workers"]):
            d = [x["us_per_req"] - y["us_per_req"] for x, y in zip(ra, rb)]
            L.append(f"| {what} | {workers} | **{med(d):.1f}** | {min(d):.1f} to {max(d):.1f} |")
    L.append("")
    if cas := res.get("cas"):
        L.append("CAS retries on the one hot key (ours' `cas_retries` counter over every request the variant served; a "
                 "retry is one more get + set pair after another worker changed the slot first; the 429 path only reads):\n")
        for (name, workers), c in sorted(cas.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            per_k = c["retries"] / max(c["requests"], 1) * 1000
            L.append(f"- {labels[name]}, {workers} worker(s): {c['retries']:,} retries in {c['requests']:,} requests "
                     f"({per_k:.1f} per 1,000)")
        L.append("")
    if cc := params.get("callcount"):
        L.append("Host calls per request made by ours, counted by running its core natively on the same configs against "
                 "the in-memory store that imitates Envoy's shared data (`bench/callcount`, which runs the request's "
                 "moments as the glue does: decide, then settle or the local reply, then end); the wasm glue adds 1 "
                 "get_current_time per request, and turns the headers into one replace_header_map_value each "
                 "(allowed) or one send_local_response (denied; its headers include content-type). Each value the host returns (header, shared data) is "
                 "copied into the VM through one more host-to-VM call (`proxy_on_memory_allocate`).\n")
        L.append("The core reports one count per request; the glue adds them up in wasm memory and makes one "
                 "increment_metric host call per counter every 100 ms, not one per request.\n")
        L.append("| scenario | get_header_map_value | get_shared_data | set_shared_data | counts (not host calls) | response headers |")
        L.append("|---|---:|---:|---:|---:|---:|")
        names = {"hot": "allowed, key already in the table (speed section)", "fresh": "allowed, new key every request (memory flood)",
                 "denied": "over limit (429 rows)"}
        for k in ("hot", "fresh", "denied"):
            c = cc[k]
            L.append(f"| {names[k]} | {c['get_header_map_value']:g} | {c['get_shared_data']:g} | {c['set_shared_data']:g} | "
                     f"{c['increment_metric']:.2f} | {c['response_headers_rendered']:g} |")
        L.append("")

    if pf := params.get("perf"):
        L.append("`perf record -e cpu-clock` on the 1-worker Envoy during one extra run (hardware counters are not "
                 "available on this VM; Envoy's binary is stripped, so only the split by object is meaningful):\n")
        L.append("| variant | CPU us/req in that run | envoy (host) | kernel | [JIT] (wasm code) | libc | other |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, d in pf.items():
            sh = d["shares"]
            known = ("envoy", "[kernel.kallsyms]", "[JIT] (wasm)", "libc.so.6")
            other = sum(v for k, v in sh.items() if k not in known)
            L.append(f"| {labels[name]} | {d['us_per_req']:.1f} | {sh.get('envoy', 0):.1f}% | "
                     f"{sh.get('[kernel.kallsyms]', 0):.1f}% | {sh.get('[JIT] (wasm)', 0):.1f}% "
                     f"({sh.get('[JIT] (wasm)', 0) / 100 * d['us_per_req']:.1f} us) | {sh.get('libc.so.6', 0):.1f}% | {other:.1f}% |")
        L.append("")
    if "speed" in params.get("skipped", ()):
        del L[speed_start:]

    if rss := params.get("rss_start"):
        L.append("## Memory\n")
        L.append("RSS after the warm-up of the speed section (same configs):\n")
        L.append("| variant | workers | RSS MiB |")
        L.append("|---|---:|---:|")
        for (name, workers), kib in sorted(rss.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if "429" in name:
                continue
            L.append(f"| {labels[name]} | {workers} | {kib / 1024:.1f} |")
        L.append("")
        for workers in params["workers"]:
            if ("ours", workers) in rss and ("noop-wasm", workers) in rss:
                d = (rss[("ours", workers)] - rss[("noop-wasm", workers)]) / 1024
                L.append(f"- {workers} worker(s): ours (65,536 slots) - no-op wasm filter = {d:.1f} MiB "
                         "(the table, about 8 MiB, and what V8 needed to compile ours' larger module, which "
                         "Envoy's allocator keeps)")
            if ("ours", workers) in rss and ("ours-o3", workers) in rss:
                d = (rss[("ours-o3", workers)] - rss[("ours", workers)]) / 1024
                L.append(f"- {workers} worker(s): ours built at opt-level 3 - ours (opt-level s) = {d:.1f} MiB")
        L.append("")
    if mem:
        slots = mem["table_size"]
        bound = slots * 128 / 2**20
        growth = (mem["after_kib"] - mem["before_kib"]) / 1024
        L.append(f"Flood: {mem['requests']:,} requests, each with a distinct `x-key`, through ours (table_size {slots:,}, "
                 f"capacity 100 per 1s, 2 workers, wrk `-c 32 -t 2` with `bench/flood.lua`) in {mem['seconds']:.0f} s "
                 f"({mem['requests'] / mem['seconds']:,.0f} req/s):\n")
        table_cost = (mem["before_kib"] - mem["small_kib"]) / 1024
        L.append("| RSS, table of 8 slots | RSS before (65,536 slots) | table cost (difference) | README bound (128 B x slots) | RSS after the flood | growth during the flood |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        L.append(f"| {mem['small_kib'] / 1024:.1f} MiB | {mem['before_kib'] / 1024:.1f} MiB | {table_cost:.1f} MiB "
                 f"({table_cost * 2**20 / slots:.0f} B/slot) | {bound:.1f} MiB | {mem['after_kib'] / 1024:.1f} MiB | {growth:+.1f} MiB |")
        L.append("")
        w = mem["wasm"]
        L.append(f"Filter counters after the flood: allowed {w['per-key.allowed']:,}, denied {w['per-key.denied']:,}, "
                 f"table_full {w['per-key.table_full']:,}, slot_reclaimed {w['slot_reclaimed']:,}, store_errors {w['store_errors']:,}. "
                 "Growth that remains is Envoy's own (connections, stats, allocator), not shared data: the table's "
                 "keys all exist from start-up.\n")

    if acc:
        L.append("## Accuracy: admitted vs limit under concurrency\n")
        a = params["accuracy"]
        L.append(f"Limit {a['limit']} per key, no refill during the test (ours: capacity {a['limit']} per 24h; native: "
                 f"{a['limit']} tokens per 86400 s, per-key descriptor). Each round: {a['total']} requests over {a['conns']} "
                 f"concurrent keep-alive connections (all connected, then released together) on a fresh key; "
                 f"{a['rounds']} rounds per variant, interleaved.\n")
        L.append("| filter | workers | admitted per round | min / median / max | rounds over the limit |")
        L.append("|---|---:|---|---|---:|")
        for workers, per in acc.items():
            for name, xs in per.items():
                over = sum(1 for x in xs if x > a["limit"])
                L.append(f"| {labels[name].split(',')[0]} | {workers} | {' '.join(map(str, xs))} | {min(xs)} / {med(xs):g} / {max(xs)} | {over} of {len(xs)} |")
        L.append("")

    if d := params.get("delay"):
        L.append("## Delay: held requests released against their turns\n")
        L.append(f"A token bucket of 1 refilled {DELAY_RATE} per second with `max_delay`: 21 requests at once on a fresh key, "
                 f"1 passes, 20 wait for turns {1000 // DELAY_RATE} ms apart. Lateness of the k-th completion = its time after "
                 "the first completion minus k turns (client-side clock; the worker's tick runs every 5 ms while "
                 "requests wait).\n")
        L.append("| workers | rounds | samples | min ms | median ms | p99 ms | max ms |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for x in d:
            L.append(f"| {x['workers']} | {x['rounds']} | {x['samples']} | {x['min']:.1f} | {x['median']:.1f} | "
                     f"{x['p99']:.1f} | {x['max']:.1f} |")
        L.append("")

    if d := params.get("idempotency"):
        L.extend(render_idempotency(d))
    if d := params.get("settle"):
        L.extend(render_settle(d))

    if d := params.get("leases"):
        L.extend(render_leases(d))
    elif err := params.get("leases_error"):
        L.append("## Quota leases: hybrid vs local vs global-per-request\n")
        L.append(f"Not measured in this run: {err}\n")

    if g := params.get("global"):
        L.extend(render_global(g))
    elif err := params.get("global_error"):
        L.append("## Global: through a Redis-backed rate limit service\n")
        L.append(f"Not measured in this run: {err}\n")

    L.append("## Not measured\n")
    if "global" not in params and "global_error" not in params:
        L.append("- The global path (ratelimit-service with Redis, ours vs Envoy's native `envoy.filters.http.ratelimit`): "
                 "skipped in this run (`--skip global`).")
    L.append("- Latency percentiles of the local filters: on a 2-CPU machine shared by Envoy, its upstream and the load "
             "generator they mostly measure scheduling; CPU per request is the figure to compare. (The Global section "
             "reports latency because there the request waits for a network call, which dominates; the Settle section "
             "compares two variants of ours run interleaved, where only the difference means something.)\n")
    L.append("## How it was measured\n")
    L.append("- One upstream Envoy process (direct_response 200 \"ok\", 2 workers) behind every filtered Envoy. Each "
             "variant is its own Envoy process with listener -> [filter] -> router -> cluster `upstream`, started once, "
             "warmed up, then measured round after round in shuffled order. CPU per request = (utime+stime of that "
             "process from `/proc/PID/stat` after - before) / requests completed.")
    L.append("- Native: `envoy.filters.http.local_ratelimit` with `descriptors: [{entries: [{key: x-key}]}]` (blank value: "
             "one bucket per distinct value), `max_dynamic_descriptors: 1000000`, route `rate_limits` action "
             "`request_headers` (x-key -> descriptor key x-key), `enable_x_ratelimit_headers: DRAFT_VERSION_03`, "
             "`always_consume_default_token_bucket: false` (one bucket per request, as ours).")
    L.append("- Ours: one rule keyed by header `x-key`, `headers: x-ratelimit` (the same three headers as native; the "
             "`ours-both` rows add the two IETF headers), table_size 65,536. Allowed path: capacity "
             f"{BIG:,} per 1 s (never denies) on both sides.")
    L.append("- CPU placement (2+ CPUs): h2load and the upstream Envoy run on the last CPU (`taskset`), 1-worker Envoys "
             "under test on CPU 0; 2-worker Envoys are not pinned, so they share CPUs with the load generator.")
    L.append("- Host-call counts: `bench/callcount` (native Rust, the crate's core against its in-memory store). "
             "Profile: `perf record -e cpu-clock` on the Envoy PID; probe variants: `bench/noop-filter`.")
    L.append("- Machine noise: Envoy's absolute figures move +-25% from run to run here; compare the ratios, which come "
             "from interleaved runs.")
    return "\n".join(L) + "\n"


SECTIONS = ("speed", "memory", "accuracy", "delay", "idempotency", "settle", "leases", "global")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--requests", type=int)
    ap.add_argument("--flood-keys", type=int)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: " + ",".join(SECTIONS))
    ap.add_argument("--skip-global", action="store_true", help="same as --skip global")
    ap.add_argument("--only", default="", help="comma-separated sections to run, the others skipped (e.g. "
                    "idempotency,settle); write such a partial run elsewhere (--out /tmp/x.md), not over BENCHMARKS.md")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 9)
    requests = args.requests or (5000 if args.quick else 10000)
    flood_keys = args.flood_keys or (100_000 if args.quick else 1_000_000)
    skip = set(filter(None, args.skip.split(",")))
    if args.skip_global:
        skip.add("global")
    if args.only:
        only = set(filter(None, args.only.split(",")))
        if only - set(SECTIONS):
            ap.error(f"--only: unknown section(s) {','.join(sorted(only - set(SECTIONS)))}; sections: {','.join(SECTIONS)}")
        skip |= set(SECTIONS) - only
    if unknown := skip - set(SECTIONS):
        ap.error(f"--skip: unknown section(s) {','.join(sorted(unknown))}; sections: {','.join(SECTIONS)}")
    t_start = time.monotonic()
    busy0, own0 = busy_seconds(), own_seconds()

    for p in (ENVOY, WASM):
        if not p.exists():
            log(f"missing {p}: run `make setup build` first")
            return 1
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="ratelimit-bench-"))
    cc = {}
    if "speed" not in skip:  # the probe and variant builds and the host-call counts are the speed section's
        build_noop()
        build_ours_end()
        build_ours_o3()
        try:
            cc = callcounts(workdir)
        except (subprocess.CalledProcessError, ValueError) as e:  # the core's API moved: report, don't abort
            log(f"callcount failed, its table is skipped: {getattr(e, 'stderr', '') or e}")
            cc = {}
    upstream = Envoy("upstream", upstream_config(), 2, workdir, cpu=LOAD_CPU).wait_ready()
    params: dict = {"rounds": rounds, "requests": requests, "clients": 32, "workers": [1, 2], "callcount": cc,
                    "skipped": sorted(skip)}
    if "RATELIMIT_WASM" in os.environ:
        params["wasm"] = str(WASM)
    res: dict = {}
    mem = None
    acc: dict = {}
    try:
        if "speed" not in skip:
            rss_start: dict = {}
            perf_out: dict = {}
            speed(workdir, upstream, rounds, requests, params["clients"], params["workers"], res, rss_start, perf_out)
            params["rss_start"] = rss_start
            params["perf"] = perf_out
        if "memory" not in skip:
            log(f"memory: flooding {flood_keys:,} distinct keys")
            mem = memory(workdir, upstream, flood_keys, 65536)
        if "accuracy" not in skip:
            params["accuracy"] = {"limit": 50, "total": 400, "conns": 64, "rounds": 3 if args.quick else 8}
            for workers in (2, 4):
                log(f"accuracy: {workers} workers")
                a = params["accuracy"]
                acc[workers] = accuracy(workdir, upstream, a["rounds"], a["limit"], a["total"], a["conns"], workers)
        if "delay" not in skip:
            log("delay: lateness of held requests against their turns")
            params["delay"] = [delay_lateness(workdir, upstream, rounds=2 if args.quick else 5, waiting=20, workers=w)
                               for w in (1, 2)]
        if "idempotency" not in skip:
            log("idempotency: CPU per request, every request a new Idempotency-Key")
            params["idempotency"] = idempotency_section(workdir, upstream, rounds=2 if args.quick else 5,
                                                        n=5000 if args.quick else 10000, clients=params["clients"])
        if "settle" not in skip:
            log("settle: latency of a cost charged from the response")
            params["settle"] = settle_section(workdir, upstream, rounds=2 if args.quick else 6,
                                              seconds=2, concurrencies=[1, 16])
        if "leases" not in skip:
            log("leases: hybrid (global + lease) vs local vs global, CPU, latency and service calls")
            try:
                params["leases"] = leases_section(workdir, upstream, rounds=2 if args.quick else 4,
                                                  seconds=4 if args.quick else 5, concurrencies=[1, 16])
            except Exception as e:  # report it, keep the other sections' results
                log(f"leases section failed, skipped: {e}")
                params["leases_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if "global" not in skip:
            log("global: building ratelimit-service and its load client")
            try:
                params["global"] = global_section(workdir, upstream, rounds=2 if args.quick else 3,
                                                  seconds=4 if args.quick else 6, concurrencies=[1, 16],
                                                  load_runs=1 if args.quick else 3, load_seconds=3 if args.quick else 5)
            except Exception as e:  # report it, keep the other sections' results
                log(f"global section failed, skipped: {e}")
                params["global_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        upstream.stop()
    params["others_cpu"] = max(0.0, (busy_seconds() - busy0) - (own_seconds() - own0))
    text = render(res, mem, acc, machine(), params, time.monotonic() - t_start)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
        log(f"wrote {args.out}; Envoy logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
