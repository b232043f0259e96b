"""Concurrency limits through a real Envoy (--concurrency 4) in front of a slow upstream that counts
how many requests it holds at once: never more than max_in_flight of a key reach it, every request
is answered, and every ending frees its slot (a response, a client reset, an upstream timeout)."""

import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import do_request, fresh_key, loopback_http_server, reset_connection, run_parallel, wait_for

MAX_IN_FLIGHT = 12
HOLD_SECONDS = 0.3
CLIENTS = 100
ROUNDS = 5


class SlowUpstream:
    """Holds every request HOLD_SECONDS (the slow backend being protected) and records the most it
    held at once per key (x-key)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = collections.Counter()
        self.most = collections.Counter()
        self.port = 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                key = self.headers.get("x-key", "")
                with upstream.lock:
                    upstream.current[key] += 1
                    upstream.most[key] = max(upstream.most[key], upstream.current[key])
                try:
                    time.sleep(HOLD_SECONDS)
                    self.send_response(200)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # Envoy gave up on this request (the client reset, or a timeout)
                finally:
                    with upstream.lock:
                        upstream.current[key] -= 1

            def log_message(self, *_args):
                pass

        return Handler


@pytest.fixture
def upstream():
    u = SlowUpstream()
    with loopback_http_server(u.handler()) as u.port:
        yield u


def config() -> dict:
    return {
        "key_prefix": "conc",
        "status_path": "/rl",
        "status_limit": {"capacity": 10000, "refill_period": "1s"},
        "rules": [{"name": "slow", "key": [{"source": "header", "name": "x-key"}],
                   "limit": {"algorithm": "concurrency", "max_in_flight": MAX_IN_FLIGHT}}],
    }


def free_slots(envoy, key: str) -> int:
    return json.loads(envoy.request("/rl", {"x-key": key}).body)["limits"][0]["remaining"]


def test_a_key_never_has_more_than_max_in_flight_at_the_upstream(envoy_factory, upstream, report):
    envoy = envoy_factory(config(), concurrency=4, external_upstream=upstream.port)
    rounds = []
    for rnd in range(ROUNDS):
        key = fresh_key(f"conc{rnd}")
        statuses = run_parallel(CLIENTS, lambda _i, conn: [do_request(conn, "/", {"x-key": key}).status], envoy,
                                timeout=60)
        counts = collections.Counter(statuses)
        assert sum(counts.values()) == CLIENTS and set(counts) <= {200, 429}, counts
        assert counts[200] >= MAX_IN_FLIGHT
        rounds.append((counts[200], upstream.most[key]))
        wait_for(lambda: free_slots(envoy, key) == MAX_IN_FLIGHT, "every slot to be free again")
    report(f"concurrency: max_in_flight {MAX_IN_FLIGHT}, {CLIENTS} clients at once on a fresh key, upstream holds "
           f"{HOLD_SECONDS}s, --concurrency 4, {ROUNDS} rounds: (admitted, most at the upstream at once) {rounds}")
    assert all(most <= MAX_IN_FLIGHT for _, most in rounds)


def test_clients_that_reset_mid_request_free_their_slots(envoy_factory, upstream):
    envoy = envoy_factory(config(), concurrency=4, external_upstream=upstream.port)
    key = fresh_key("reset")
    sockets = []
    for _ in range(MAX_IN_FLIGHT):
        s = socket.create_connection((envoy.host, envoy.port))
        s.sendall(f"GET / HTTP/1.1\r\nhost: x\r\nx-key: {key}\r\n\r\n".encode())
        sockets.append(s)
    wait_for(lambda: free_slots(envoy, key) == 0, "the requests to hold every slot")
    assert envoy.request("/", {"x-key": key}).status == 429
    for s in sockets:
        reset_connection(s)
    wait_for(lambda: free_slots(envoy, key) == MAX_IN_FLIGHT, "the resets to free every slot")


def test_an_upstream_timeout_frees_its_slot(envoy_factory, upstream):
    # The route gives the 300 ms upstream 100 ms.
    envoy = envoy_factory(config(), concurrency=4, external_upstream=upstream.port, route_timeout="0.1s")
    key = fresh_key("timeout")
    statuses = run_parallel(MAX_IN_FLIGHT, lambda _i, conn: [do_request(conn, "/", {"x-key": key}).status], envoy)
    assert statuses == [504] * MAX_IN_FLIGHT
    wait_for(lambda: free_slots(envoy, key) == MAX_IN_FLIGHT, "the timed-out request to free its slot")
