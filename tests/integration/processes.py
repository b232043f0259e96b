"""Real redis-server and ratelimit-service processes for the global tests, on free loopback ports,
always stopped at the end (and killed by the kernel should pytest die)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import REPO, _pdeathsig, _stop, free_port

SERVICE_BIN = REPO / "target" / "debug" / "ratelimit-service"


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL).stdout


class Redis:
    """One redis-server; stop() and start() again on the same port."""

    def __init__(self, workdir: Path, cluster: bool = False):
        self.workdir = workdir
        self.port = free_port()
        # A cluster node also listens on port + 10000 (the cluster bus).
        while cluster and self.port > 55000:
            self.port = free_port()
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Redis":
        args = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / "nodes.conf")]
        self.proc = subprocess.Popen(args, stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


class Service:
    """One ratelimit-service process; restart() keeps its ports."""

    def __init__(self, workdir: Path, redis_url: str, *extra: str):
        self.workdir = workdir
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.args = [str(SERVICE_BIN), "--grpc-addr", f"127.0.0.1:{self.grpc_port}",
                     "--http-addr", f"127.0.0.1:{self.http_port}", "--redis-url", redis_url, *extra]
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Service":
        self.proc = subprocess.Popen(self.args, stdout=open(self.workdir / "service.log", "ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        wait_port(self.grpc_port)
        wait_port(self.http_port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def healthz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        return (self.workdir / "service.log").read_text(errors="replace")
