"""Harness for the integration tests: real Envoy 1.40 (from .venv) loading the built filter.

Every Envoy a test starts is killed in teardown (and, should pytest itself die, by the kernel:
PR_SET_PDEATHSIG). No fixed ports: admin and the filtered listener bind port 0 and are discovered
through the admin API; the upstream listener gets a port picked by binding port 0 (retried if taken).
Only 127.0.0.1 is used.

Environment overrides (all optional):
  RATELIMIT_WASM   path of the .wasm to load (skips the cargo build)
  ENVOY_BIN        path of the envoy binary (default: .venv/bin/envoy)
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import struct
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN", REPO / ".venv" / "bin" / "envoy"))
# The bootstrap's stats_tags as the README ships them: they turn the labels the filter writes into
# its counter names into Prometheus labels.
STATS_TAGS = [{"tag_name": t, "regex": f"({t}=\\.=(.*?);\\.;)"} for t in ("key_prefix", "rule", "decision")]
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "ratelimit_wasm.wasm"
STARTUP_TIMEOUT = 60.0
UPSTREAM_BODY = "ok"

# ---------------------------------------------------------------------------------------------
# process helpers


def _pdeathsig():
    """preexec_fn: let the kernel SIGKILL Envoy if the test process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=15)


# ---------------------------------------------------------------------------------------------
# config rendering


def render_bootstrap(
    filter_config: dict | str,
    wasm_path: Path,
    upstream_port: int,
    *,
    vm_id: str | None = "ratelimit",
    root_id: str = "ratelimit",
    fail_open: bool = False,
    rls_port: int | None = None,
    native_ratelimit: dict | None = None,
    upstream_echo: str | None = None,
    external_upstream: int | None = None,
    route_timeout: str = "30s",
    upstream_response_headers: dict | None = None,
    ecds: tuple[str, Path] | None = None,
    as_struct: bool = False,
    rls_cluster: str = "ratelimit_service",
    upstream_trailers: bool = False,
) -> dict:
    """Same shape as envoy/demo.yaml: filtered listener -> router -> cluster -> second listener
    (direct_response 200 "ok"), or the server on port `external_upstream` when given. Returned as a
    dict; JSON is valid YAML, so it is written as JSON."""
    value = filter_config if isinstance(filter_config, str) else json.dumps(filter_config)
    vm_config: dict = {
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(wasm_path)}},
    }
    if vm_id is not None:
        vm_config["vm_id"] = vm_id

    def hcm(stat_prefix: str, route: dict, filters: list) -> dict:
        return {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat_prefix,
                "route_config": {
                    "name": stat_prefix,
                    "virtual_hosts": [
                        {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
                    ],
                },
                "http_filters": filters
                + [
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        },
                    }
                ],
            },
        }

    wasm_filter = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "ratelimit",
                "root_id": root_id,
                "fail_open": fail_open,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": json.loads(value)}
                if as_struct else {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
                "vm_config": vm_config,
            },
        },
    }
    filters = [wasm_filter]
    if ecds is not None:
        # As Istio delivers a WasmPlugin: the filter by name, its config from extension config
        # discovery (a file Envoy watches here, xDS from istiod there).
        name, path = ecds
        filters = [{"name": name, "config_discovery": {
            "config_source": {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"},
            "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]}}]
    route: dict = {"route": {"cluster": "upstream", "timeout": route_timeout}}
    if native_ratelimit is not None:
        # Envoy's own global rate limit filter, asking the same service (instead of ours).
        filters = [{
            "name": "envoy.filters.http.ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": native_ratelimit["domain"],
                "failure_mode_deny": True,
                "timeout": "1s",
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                "rate_limit_service": {
                    "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit_service"}},
                    "transport_api_version": "V3",
                },
            },
        }]
        route = {"route": {"cluster": "upstream", "timeout": "30s", "rate_limits": native_ratelimit["rate_limits"]}}
    extra_clusters = []
    if rls_port is not None:
        extra_clusters.append({
            "name": rls_cluster,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": rls_cluster,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": rls_port}}}}]}],
            },
        })
    upstream_route: dict = {"direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}}}
    added = dict(upstream_response_headers or {})
    if upstream_echo is not None:
        # The upstream answers with what it received in that request header, to show what reached it.
        added[f"x-upstream-saw-{upstream_echo}"] = f"%REQ({upstream_echo})%"
    if added:
        upstream_route["response_headers_to_add"] = [{"header": {"key": k, "value": v}} for k, v in added.items()]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "stats_config": {"stats_tags": STATS_TAGS},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {"filters": [hcm("ingress", route, filters)]}
                    ],
                },
                {
                    "name": "upstream",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                hcm("upstream", upstream_route, [])
                            ]
                        }
                    ],
                },
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    **({"typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            # HTTP/1.1 trailers are dropped unless asked for.
                            "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}},
                        }}} if upstream_trailers else {}),
                    # many client connections in the load tests -> many upstream connections
                    "circuit_breakers": {
                        "thresholds": [
                            {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
                        ]
                    },
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1",
                                                                   "port_value": external_upstream or upstream_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ] + extra_clusters,
        },
    }


# ---------------------------------------------------------------------------------------------
# a running Envoy


@dataclass
class Response:
    status: int
    headers: dict  # lower-case name -> value (last one wins); see `all_headers` for repeats
    all_headers: list
    body: bytes

    def header(self, name: str):
        return self.headers.get(name.lower())


@dataclass
class Envoy:
    proc: subprocess.Popen
    workdir: Path
    log_path: Path
    config_path: Path
    admin_url: str
    host: str
    port: int
    concurrency: int
    # Set when the ingress listener comes from a file (LDS), so its filter config can be pushed.
    relisten: "Callable[[dict | str], dict] | None" = None
    lds_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.proc)

    def push_filter_config(self, filter_config: dict | str, wait: bool = True) -> None:
        """Replace the filter's configuration at runtime, as Istio does on a WasmPlugin change: a
        new ingress listener through LDS (file-based here). With `wait`, returns once Envoy took it."""
        assert self.relisten and self.lds_path, "start the Envoy with dynamic=True"
        stat = "listener_manager.lds.update_success"
        before = self.stats(stat).get(stat, 0)
        _write_lds(self.lds_path, self.relisten(filter_config))
        if not wait:
            return
        deadline = time.monotonic() + 30
        while self.stats(stat).get(stat, 0) <= before:
            assert time.monotonic() < deadline, "Envoy did not take the new listener\n" + self.log()[-4000:]
        self.port = _listener_port(self.admin_url, "ingress")

    # --- memory and stats -----------------------------------------------------------------
    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.M)
        assert m, status
        return int(m.group(1))

    def admin_get(self, path: str) -> str:
        if path.startswith("/stats"):
            # The filter adds its counts to Envoy's counters every 100 ms (on each worker's tick).
            time.sleep(0.35)
        with urllib.request.urlopen(self.admin_url + path, timeout=30) as r:
            return r.read().decode()

    def prometheus(self) -> str:
        return self.admin_get("/stats/prometheus")

    def prometheus_samples(self, contains: str = "") -> dict[str, float]:
        """{'name{labels}': value} for every sample line whose text contains `contains`."""
        out = {}
        for line in self.prometheus().splitlines():
            if not line or line.startswith("#") or contains not in line:
                continue
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
        return out

    def stats(self, contains: str = "") -> dict[str, int]:
        """Envoy's own stat names (/stats?format=json), counters and gauges."""
        data = json.loads(self.admin_get("/stats?format=json"))
        return {
            s["name"]: s["value"]
            for s in data.get("stats", [])
            if "value" in s and contains in s["name"]
        }

    # --- requests -------------------------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, path: str = "/", headers: dict | None = None, method: str = "GET",
                conn: http.client.HTTPConnection | None = None) -> Response:
        own = conn is None
        c = conn or self.connect()
        try:
            return do_request(c, path, headers, method)
        finally:
            if own:
                c.close()


def do_request(conn: http.client.HTTPConnection, path: str = "/", headers: dict | None = None,
               method: str = "GET") -> Response:
    conn.request(method, path, headers=headers or {})
    r = conn.getresponse()
    body = r.read()
    all_headers = r.getheaders()
    return Response(r.status, {k.lower(): v for k, v in all_headers}, all_headers, body)


class EnvoyStartError(RuntimeError):
    def __init__(self, msg: str, returncode, log: str):
        super().__init__(f"{msg} (exit code {returncode})\n--- envoy log (tail) ---\n{log[-6000:]}")
        self.returncode = returncode
        self.log = log


def _write_lds(path: Path, listener: dict) -> None:
    """One LDS resource, written so that Envoy's file watch sees a single complete move."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "version_info": str(time.time_ns()),
        "resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}],
    }))
    os.replace(tmp, path)


def _listener_port(admin_url: str, name: str) -> int:
    with urllib.request.urlopen(admin_url + "/listeners?format=json", timeout=10) as r:
        data = json.loads(r.read())
    for ls in data.get("listener_statuses", []):
        if ls.get("name") == name:
            return int(ls["local_address"]["socket_address"]["port_value"])
    raise KeyError(name)


def start_envoy(
    filter_config: dict | str,
    wasm_path: Path,
    workdir: Path,
    *,
    concurrency: int = 2,
    log_level: str = "info",
    expect_failure: bool = False,
    dynamic: bool = False,
    **render_kw,
):
    """Start Envoy and wait until /ready. Returns an `Envoy`. With expect_failure=True, waits for
    Envoy to exit (or to become ready, which is an error) and returns (returncode, log) instead;
    the caller owns nothing then."""
    workdir.mkdir(parents=True, exist_ok=True)
    last_err = None
    for attempt in range(5):
        upstream_port = free_port()
        cfg_path = workdir / f"envoy-{attempt}.json"
        bootstrap = render_bootstrap(filter_config, wasm_path, upstream_port, **render_kw)
        relisten = lds_path = None
        if dynamic:
            # The ingress listener moves to a file Envoy watches (LDS), the rest stays static.
            def relisten(cfg, port=upstream_port):
                return render_bootstrap(cfg, wasm_path, port, **render_kw)["static_resources"]["listeners"][0]

            lds_path = workdir / f"lds-{attempt}.json"
            _write_lds(lds_path, bootstrap["static_resources"]["listeners"].pop(0))
            bootstrap["node"] = {"id": "test", "cluster": "test"}
            bootstrap["dynamic_resources"] = {"lds_config": {
                "path_config_source": {"path": str(lds_path)}, "resource_api_version": "V3"}}
        if render_kw.get("ecds") is not None:
            bootstrap["node"] = {"id": "test", "cluster": "test"}  # xDS needs a node, as a sidecar has
        cfg_path.write_text(json.dumps(bootstrap, indent=1))
        admin_path = workdir / f"admin-{attempt}.txt"
        log_path = workdir / f"envoy-{attempt}.log"
        cmd = [
            str(ENVOY_BIN), "-c", str(cfg_path), "--concurrency", str(concurrency),
            "--disable-hot-restart", "--admin-address-path", str(admin_path),
            "-l", log_level, "--log-path", str(log_path),
            # Envoy flushes its log file every 10 s by default; tests read it sooner.
            "--file-flush-interval-msec", "100",
        ]
        with open(workdir / f"envoy-{attempt}.stdout", "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=workdir, preexec_fn=_pdeathsig)
        try:
            env = _wait_ready(proc, admin_path, log_path, cfg_path, workdir, concurrency)
        except EnvoyStartError as e:
            _stop(proc)
            log = _read_logs(workdir, attempt)
            if "ddress already in use" in log and attempt < 4:
                last_err = e
                continue
            if expect_failure:
                return proc.returncode, log
            raise EnvoyStartError("Envoy did not start", proc.returncode, log) from None
        except BaseException:
            _stop(proc)
            raise
        if expect_failure:
            env.stop()
            raise AssertionError("Envoy started although it was expected to fail\n" + env.log()[-4000:])
        env.relisten, env.lds_path = relisten, lds_path
        return env
    raise last_err  # type: ignore[misc]


def _read_logs(workdir: Path, attempt: int) -> str:
    parts = []
    for p in (workdir / f"envoy-{attempt}.log", workdir / f"envoy-{attempt}.stdout"):
        if p.exists():
            parts.append(p.read_text(errors="replace"))
    return "\n".join(parts)


def _wait_ready(proc, admin_path: Path, log_path: Path, cfg_path: Path, workdir: Path, concurrency: int) -> Envoy:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    admin_url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EnvoyStartError("Envoy exited during startup", proc.returncode, "")
        if admin_url is None and admin_path.exists():
            text = admin_path.read_text().strip()
            if text:
                admin_url = "http://" + text
        if admin_url:
            try:
                with urllib.request.urlopen(admin_url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        port = _listener_port(admin_url, "ingress")
                        return Envoy(proc, workdir, log_path, cfg_path, admin_url, "127.0.0.1", port, concurrency)
            except (OSError, KeyError):
                pass
        time.sleep(0.05)
    raise EnvoyStartError("Envoy not ready in time", proc.poll(), "")


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def wasm_path() -> Path:
    """The filter, built once per session (cargo is a no-op when it is up to date)."""
    override = os.environ.get("RATELIMIT_WASM")
    if override:
        p = Path(override).resolve()
        assert p.is_file(), p
        return p
    subprocess.run(
        ["cargo", "build", "--release", "--target", "wasm32-wasip1"],
        cwd=REPO, check=True, stdin=subprocess.DEVNULL,
    )
    assert DEFAULT_WASM.is_file(), DEFAULT_WASM
    return DEFAULT_WASM


@pytest.fixture
def envoy_factory(wasm_path, tmp_path):
    """envoy_factory(filter_config, concurrency=2, ...) -> Envoy; all stopped in teardown."""
    started: list[Envoy] = []
    n = [0]

    def factory(filter_config, **kw):
        n[0] += 1
        env = start_envoy(filter_config, wasm_path, tmp_path / f"envoy{n[0]}", **kw)
        if isinstance(env, Envoy):
            started.append(env)
        return env

    yield factory
    for env in started:
        env.stop()
    # If a test failed, show where the logs are.
    for env in started:
        sys.stderr.write(f"[envoy pid {env.pid} log: {env.log_path}]\n")


@pytest.fixture(scope="session")
def report():
    """report(line): print a summary line (visible with -s) and, if $RATELIMIT_REPORT names a
    file, append it there at the end of the session, so figures can be quoted."""
    lines: list[str] = []

    def add(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    yield add
    path = os.environ.get("RATELIMIT_REPORT")
    if path and lines:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# load helpers


def run_parallel(n_conns: int, per_conn_work, envoy: Envoy, timeout: float = 30.0) -> list:
    """Open n_conns keep-alive connections (all connected before any request is sent), run
    per_conn_work(index, conn) -> list of results in one thread per connection, return all results.
    Exceptions in workers are re-raised."""
    barrier = threading.Barrier(n_conns)
    results: list = [None] * n_conns
    errors: list = []

    def worker(i: int) -> None:
        conn = envoy.connect(timeout=timeout)
        try:
            conn.connect()
            barrier.wait(timeout=timeout)
            results[i] = per_conn_work(i, conn)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out = []
    for r in results:
        out.extend(r or [])
    return out


# ---------------------------------------------------------------------------------------------
# filter config helpers


def header_rule(name: str, capacity: int, refill_period: str, *, header: str = "x-key",
                refill_tokens: int | None = None, match: dict | None = None, cost: int | None = None) -> dict:
    rule: dict = {
        "name": name,
        "key": [{"source": "header", "name": header}],
        "limit": {"capacity": capacity, "refill_period": refill_period},
    }
    if refill_tokens is not None:
        rule["limit"]["refill_tokens"] = refill_tokens
    if match is not None:
        rule["match"] = match
    if cost is not None:
        rule["cost"] = cost
    return rule


def filter_config(*rules: dict, **top) -> dict:
    return {**top, "rules": list(rules)}


def fresh_key(label: str = "k") -> str:
    return f"{label}-{os.getpid()}-{time.time_ns()}"


def clear_of_window_edge(window_s: int, needed_s: float) -> None:
    """Sleep, if needed, until at least `needed_s` is left of the current fixed window of `window_s`
    seconds (windows are aligned to the Unix epoch, in the filter and in the service). A test that
    counts requests in one window must not straddle two, or it fails by the time of day."""
    left = window_s - time.time() % window_s
    if left < needed_s:
        time.sleep(left + 0.05)


def counter(envoy: Envoy, metric: str, key_prefix: str, rule: str | None = None, decision: str | None = None):
    """Value of one of the filter's counters, e.g. counter(envoy, "requests_total", "rl", "login",
    "denied"); None if it does not exist. The labels travel in the name (README, Metrics)."""
    labels = [("key_prefix", key_prefix), ("rule", rule), ("decision", decision)]
    name = "".join(f"{k}=.={v};.;" for k, v in labels if v is not None) + "ratelimit_wasm_" + metric
    return custom_stat(envoy, name)


def custom_stat(envoy: Envoy, name: str):
    """Value of a proxy-wasm metric by the name the filter defined (Envoy stores it as
    'wasmcustom.<name>'); None if it does not exist."""
    return envoy.stats("wasmcustom.").get("wasmcustom." + name)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Polls an observable condition (not a stand-in for one), e.g. a counter Envoy flushes every
    100 ms, or a slot Envoy frees when it deletes a stream, a moment after the client saw its end."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def reset_connection(sock: socket.socket) -> None:
    """Closes with a TCP reset, as a client that goes away mid-request."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def loopback_http_server(handler: type[BaseHTTPRequestHandler]):
    """A threaded HTTP server (an upstream a test controls) on a loopback port chosen at run time,
    stopped on the way out; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
