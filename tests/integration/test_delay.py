"""Delay instead of reject, through a real Envoy (--concurrency 4): a token bucket of 10 per second
with max_delay 1s. Requests beyond the bucket wait for their turn and reach the upstream spaced by
the refill interval, never more than the bucket allows in any interval; those whose turn is more
than a second away are denied; a client that leaves while waiting gives its turn back."""

import json
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import counter, do_request, fresh_key, loopback_http_server, reset_connection, run_parallel, wait_for

RATE = 10  # per second
CLIENTS = 30
# Arrival times are taken at the upstream, after Envoy released the request: allow this much
# delivery jitter when checking the bucket's bound on them.
JITTER = 0.02


class RecordingUpstream:
    """Answers at once and records when each request arrived."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrivals = []
        self.port = 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with upstream.lock:
                    upstream.arrivals.append(time.monotonic())
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args):
                pass

        return Handler


@pytest.fixture
def upstream():
    u = RecordingUpstream()
    with loopback_http_server(u.handler()) as u.port:
        yield u


def config() -> dict:
    return {"key_prefix": "delay", "rules": [{
        "name": "smooth", "key": [{"source": "header", "name": "x-key"}],
        "limit": {"capacity": 1, "refill_tokens": RATE, "refill_period": "1s", "max_delay": "1s"}}]}


def test_requests_beyond_the_bucket_wait_for_their_turn_and_arrive_spaced(envoy_factory, upstream, report):
    envoy = envoy_factory(config(), concurrency=4, external_upstream=upstream.port)
    key = fresh_key("delay")
    started = time.monotonic()
    statuses = run_parallel(CLIENTS, lambda _i, conn: [do_request(conn, "/", {"x-key": key}).status], envoy,
                            timeout=30)
    arrivals = sorted(upstream.arrivals)
    admitted = statuses.count(200)
    # The bucket's bound, on upstream arrival times: 1 at once plus RATE per second.
    for i, first in enumerate(arrivals):
        for j in range(i, len(arrivals)):
            allowed = 1 + int((arrivals[j] - first + JITTER) * RATE)
            assert j - i + 1 <= allowed, f"{j - i + 1} arrivals in {arrivals[j] - first:.3f}s"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # The k-th waiting request's turn is k refill intervals after the first request was decided;
    # its arrival minus the first's, minus that, is its lateness (give or take delivery jitter).
    lateness = sorted((arrivals[k] - arrivals[0] - k / RATE) * 1000 for k in range(1, len(arrivals)))
    report(f"delay: token bucket 1 + {RATE}/s, max_delay 1s, {CLIENTS} clients at once, --concurrency 4: "
           f"{admitted} admitted over {arrivals[-1] - arrivals[0]:.3f}s, {statuses.count(429)} denied; "
           f"gaps ms {[round(g * 1000) for g in gaps]}; lateness against the turns, ms: median "
           f"{statistics.median(lateness):.1f}, max {lateness[-1]:.1f}; whole run {time.monotonic() - started:.2f}s")
    assert set(statuses) <= {200, 429}
    # 1 at once, 10 within the second, the rest more than a second away: denied.
    assert admitted >= 1 + RATE and statuses.count(429) >= 1
    assert counter(envoy, "delayed_total", "delay", "smooth") >= RATE
    assert lateness[-1] < 50, lateness


def test_a_client_that_leaves_while_waiting_gives_its_turn_back(envoy_factory, upstream):
    # One per second, so that nothing comes due while the test looks: 1 at once, then turns at
    # 1 s .. 10 s; the status endpoint's reset says when the last turn is.
    cfg = {"key_prefix": "leave", "status_path": "/rl", "status_limit": {"capacity": 1000, "refill_period": "1s"},
           "rules": [{"name": "slow", "key": [{"source": "header", "name": "x-key"}],
                      "limit": {"capacity": 1, "refill_period": "1s", "max_delay": "10s"}}]}
    envoy = envoy_factory(cfg, concurrency=1, external_upstream=upstream.port)
    key = fresh_key("leave")

    def reset_seconds():
        return json.loads(envoy.request("/rl", {"x-key": key}).body)["limits"][0]["reset"]

    assert envoy.request("/", {"x-key": key}).status == 200  # the one token
    waiting = []
    for _ in range(10):
        s = socket.create_connection((envoy.host, envoy.port))
        s.sendall(f"GET / HTTP/1.1\r\nhost: x\r\nx-key: {key}\r\n\r\n".encode())
        waiting.append(s)
    wait_for(lambda: (counter(envoy, "delayed_total", "leave", "slow") or 0) == 10,
             "ten turns to be reserved")
    before = reset_seconds()
    for s in waiting[5:]:
        reset_connection(s)
    wait_for(lambda: counter(envoy, "delay_abandoned_total", "leave") == 5,
             "the five resets to give their turns back")
    after = reset_seconds()
    for s in waiting[:5]:
        s.close()
    assert before >= 10 and after <= before - 4, (before, after)
