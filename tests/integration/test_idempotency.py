"""Idempotency keys through a real Envoy (two workers) in front of an upstream the test controls:
duplicates at once reach the upstream exactly once, a retry after completion gets the stored
response, a key reused on another request gets 422, a failed request frees its key, and a key is
forgotten after its TTL."""

import threading
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import counter, do_request, fresh_key, loopback_http_server, run_parallel, wait_for
from processes import Redis, Service
from test_global import service_bin, stack  # noqa: F401 (fixtures)

PREFIX = "idem"


class PaymentsUpstream:
    """Counts the requests per key that reach it; answers 201 with a JSON body, or the status the
    request asks for in `x-answer`. While `hold` is clear it keeps every request waiting, so the
    duplicates of a first request arrive while it is still in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.hold = threading.Event()
        self.hold.set()
        self.port = 0

    def count(self, key: str) -> int:
        with self.lock:
            return self.seen.get(key, 0)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                key = self.headers.get("idempotency-key", "")
                with upstream.lock:
                    upstream.seen[key] = upstream.seen.get(key, 0) + 1
                    n = upstream.seen[key]
                upstream.hold.wait(timeout=30)
                status = int(self.headers.get("x-answer", "201"))
                body = f'{{"payment": "{key}", "attempt": {n}}}'.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("location", f"/payments/{n}")
                self.send_header("x-not-replayed", "1")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        return Handler


@pytest.fixture
def upstream():
    u = PaymentsUpstream()
    with loopback_http_server(u.handler()) as u.port:
        yield u


def config(ttl: str = "1h") -> dict:
    return {"key_prefix": PREFIX, "rules": [], "idempotency": [{
        "name": "payments", "match": {"methods": ["POST"], "path_prefix": "/payments"},
        "scope": [{"source": "header", "name": "x-api-key"}],
        "ttl": ttl, "replay_headers": ["content-type", "location"]}]}


def post(conn, key: str, path: str = "/payments", answer: int | None = None, api_key: str = "acme"):
    headers = {"idempotency-key": key, "x-api-key": api_key, "content-length": "0"}
    if answer is not None:
        headers["x-answer"] = str(answer)
    return do_request(conn, path, headers, method="POST")


def duplicates_at_once(upstream, envoys, key: str, per_envoy: int) -> list:
    """`per_envoy` POSTs with `key` on each Envoy, all at once, while the upstream holds every
    request it gets: the duplicates are answered before the first can complete. Their responses."""
    upstream.hold.clear()
    refused = threading.Semaphore(0)
    results: list = []
    lock = threading.Lock()

    def client(envoy):
        def work(_i, conn):
            r = post(conn, key)
            if r.status == 409:
                refused.release()
            return [r]
        got = run_parallel(per_envoy, work, envoy, timeout=60)
        with lock:
            results.extend(got)

    runners = [threading.Thread(target=client, args=(e,)) for e in envoys]
    for t in runners:
        t.start()
    try:
        for _ in range(per_envoy * len(envoys) - 1):
            assert refused.acquire(timeout=30), "fewer duplicates than sent were refused"
    finally:
        upstream.hold.set()
        for t in runners:
            t.join(timeout=60)
    return results


def test_a_hundred_duplicates_at_once_reach_the_upstream_exactly_once(envoy_factory, upstream, report):
    envoy = envoy_factory(config(), concurrency=2, external_upstream=upstream.port)
    key = fresh_key("pay")
    results = duplicates_at_once(upstream, [envoy], key, 100)
    statuses = sorted(r.status for r in results)
    report(f"idempotency: 100 concurrent POSTs with one key on 2 workers: statuses {statuses.count(201)} x 201, "
           f"{statuses.count(409)} x 409; the upstream saw {upstream.count(key)}")
    assert statuses == [201] + [409] * 99
    assert upstream.count(key) == 1
    conflict = next(r for r in results if r.status == 409)
    assert conflict.headers["content-type"] == "application/problem+json"
    assert b"outstanding" in conflict.body


def test_a_retry_after_completion_gets_the_stored_response_marked_as_a_replay(envoy_factory, upstream):
    envoy = envoy_factory(config(), concurrency=2, external_upstream=upstream.port)
    key = fresh_key("pay")
    conn = envoy.connect()
    first = post(conn, key)
    assert first.status == 201 and "idempotent-replayed" not in first.headers
    wait_for(lambda: post(envoy.connect(), key).status != 409, "the first request's key to complete")
    retry = post(envoy.connect(), key)
    assert retry.status == 201
    assert retry.body == first.body
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["location"] == first.headers["location"]
    assert "x-not-replayed" not in retry.headers
    assert upstream.count(key) == 1
    # Another tenant's request with the same key is its own.
    assert post(conn, key, api_key="globex").status == 201
    assert upstream.count(key) == 2
    wait_for(lambda: (counter(envoy, "idempotency_requests_total", PREFIX, "payments", "replayed") or 0) >= 1,
             "the replayed counter")


def test_the_same_key_on_another_request_gets_422(envoy_factory, upstream):
    envoy = envoy_factory(config(), concurrency=2, external_upstream=upstream.port)
    key = fresh_key("pay")
    conn = envoy.connect()
    assert post(conn, key, "/payments").status == 201
    other = post(conn, key, "/payments/refund")
    assert other.status == 422
    assert b"already used" in other.body
    assert upstream.count(key) == 1


def test_a_failed_request_frees_its_key_for_the_retry(envoy_factory, upstream):
    envoy = envoy_factory(config(), concurrency=2, external_upstream=upstream.port)
    key = fresh_key("pay")
    conn = envoy.connect()
    assert post(conn, key, answer=503).status == 503
    # The key is freed when the failed stream ends, a moment after the client saw its end.
    wait_for(lambda: post(envoy.connect(), key).status == 201, "the retry to reach the upstream")
    assert upstream.count(key) == 2


def test_a_key_is_forgotten_after_its_ttl(envoy_factory, upstream):
    envoy = envoy_factory(config(ttl="1s"), concurrency=2, external_upstream=upstream.port)
    key = fresh_key("pay")
    assert post(envoy.connect(), key).status == 201

    def reaches_the_upstream_again() -> bool:
        post(envoy.connect(), key)
        return upstream.count(key) == 2

    wait_for(reaches_the_upstream_again, "a request after the TTL to reach the upstream again", timeout=10)


def fleet_config() -> dict:
    entry = {**config()["idempotency"][0], "across": "fleet"}
    return {"key_prefix": PREFIX, "global": {"cluster": "ratelimit_service", "domain": "pay", "timeout": "1s"},
            "rules": [], "idempotency": [entry]}


def test_keys_kept_by_the_service_hold_across_two_envoys(envoy_factory, upstream, stack, tmp_path, report):
    redis = stack(Redis(tmp_path / "redis"))
    service = stack(Service(tmp_path / "service", redis.url))
    envoys = [envoy_factory(fleet_config(), concurrency=2, external_upstream=upstream.port,
                            rls_port=service.grpc_port) for _ in range(2)]
    key = fresh_key("fleet")
    results = duplicates_at_once(upstream, envoys, key, 50)
    statuses = sorted(r.status for r in results)
    report(f"idempotency across the fleet: 100 concurrent POSTs with one key, 50 on each of 2 Envoys (2 workers "
           f"each): {statuses.count(201)} x 201, {statuses.count(409)} x 409; the upstream saw {upstream.count(key)}")
    assert statuses == [201] + [409] * 99
    assert upstream.count(key) == 1
    first = next(r for r in results if r.status == 201)
    # Completed: either Envoy replays it.
    for envoy in envoys:
        wait_for(lambda: post(envoy.connect(), key).status != 409, "the key to complete at the service")
        retry = post(envoy.connect(), key)
        assert retry.status == 201 and retry.body == first.body and retry.headers["idempotent-replayed"] == "true"
    assert upstream.count(key) == 1
