"""The shipped demo config (envoy/demo.yaml, what `make run` starts), run as shipped except for its
ports: a client cannot escape its per-client limit by writing its own X-Forwarded-For."""

import http.client
import subprocess
import time
import urllib.request

from conftest import DEFAULT_WASM, ENVOY_BIN, REPO, _pdeathsig, _stop, do_request, free_port


def start_demo(tmp_path, wasm_path):
    ports = {10000: free_port(), 10001: free_port(), 9901: free_port()}
    text = (REPO / "envoy" / "demo.yaml").read_text()
    for old, new in ports.items():
        text = text.replace(f"port_value: {old}", f"port_value: {new}")
    text = text.replace(str(DEFAULT_WASM.relative_to(REPO)), str(wasm_path))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(text)
    proc = subprocess.Popen([str(ENVOY_BIN), "-c", str(cfg), "--concurrency", "2", "--disable-hot-restart",
                             "-l", "warning", "--log-path", str(tmp_path / "envoy.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=_pdeathsig)
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{ports[9901]}/ready", timeout=2).status == 200:
                return proc, ports[10000]
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()[-3000:]
        time.sleep(0.1)


def test_a_client_cannot_escape_its_limit_by_writing_x_forwarded_for(wasm_path, tmp_path):
    proc, port = start_demo(tmp_path, wasm_path)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        # per-client: a burst of 10, refilled 1 per second. Spend it, then claim to be elsewhere.
        statuses = [do_request(conn, "/").status for _ in range(10)]
        spoofed = [do_request(conn, "/", {"x-forwarded-for": f"203.0.113.{i}"}).status for i in range(3)]
        assert statuses == [200] * 10
        assert spoofed == [429, 429, 429], "X-Forwarded-For chose a fresh client_address bucket"
    finally:
        _stop(proc)
