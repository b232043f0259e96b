"""The shipped demo config (envoy/demo.yaml, what `make run` starts), run as shipped except for its
ports: a client cannot escape its per-client limit by writing its own X-Forwarded-For."""

import http.client
import re
import subprocess
import time
import urllib.request

from conftest import DEFAULT_WASM, ENVOY_BIN, REPO, _pdeathsig, _stop, do_request, free_port


def start_demo(tmp_path, wasm_path, with_admin: bool = False):
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
                return (proc, ports[10000], ports[9901]) if with_admin else (proc, ports[10000])
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


def quick_start_commands() -> list[str]:
    """The README's Quick start commands, in order, as a reader types them."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quick start"):readme.index("## Configuration")]
    block = section.split("In another terminal:\n\n```sh\n", 1)[1].split("\n```", 1)[0]
    return [line.split("   #", 1)[0].rstrip() for line in block.splitlines() if line.strip()]


def test_the_quick_start_commands_show_what_the_readme_says(wasm_path, tmp_path):
    proc, port, admin = start_demo(tmp_path, wasm_path, with_admin=True)
    try:
        out = []
        commands = [c.replace("localhost:10000", f"127.0.0.1:{port}").replace("localhost:9901", f"127.0.0.1:{admin}")
                    for c in quick_start_commands()]
        for command in commands:
            r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
            out.append(r.stdout)
        loop, denied, api, bob, counters = out
        assert loop.split() == ["200"] * 10 + ["429"] * 2, loop
        assert denied.splitlines()[0].startswith("HTTP/1.1 429") and "retry-after" in denied.lower(), denied
        assert api.split() == ["200"] * 5 + ["429"], api
        assert bob.lower().startswith('ratelimit: "per-api-key";r=4;'), bob
        # The demo's stats_tags make the labels the filter writes into its counter names Prometheus
        # labels (README, Metrics). Workers add their counts every 100 ms, so the command is run
        # again until the last requests show (a reader types slower than that).
        expected = {("per-client", "allowed"): 10, ("per-client", "denied"): 3, ("per-client", "shadow_denied"): 0,
                    ("per-api-key", "allowed"): 6, ("per-api-key", "denied"): 1, ("per-api-key", "shadow_denied"): 0}
        deadline = time.monotonic() + 10
        while demo_counters(counters) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            counters = subprocess.run(["bash", "-c", commands[-1]], capture_output=True, text=True, timeout=60).stdout
        assert demo_counters(counters) == expected, counters
    finally:
        _stop(proc)


def demo_counters(output: str) -> dict:
    """{(rule, decision): value} of the demo's ratelimit_wasm_requests_total samples in `output`,
    whatever order Envoy prints the labels in."""
    counted = {}
    for line in output.splitlines():
        if line.startswith("ratelimit_wasm_requests_total{"):
            sample, _, value = line.rpartition(" ")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', sample))
            if labels.get("key_prefix") == "demo":
                counted[(labels["rule"], labels["decision"])] = float(value)
    return counted
