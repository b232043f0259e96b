"""`make oci`'s image, the way Istio gets it: pushed to a real registry (Debian's docker-registry on a
loopback port) with skopeo, pulled back, and checked: the same manifest digest as built (the
`sha256` a WasmPlugin pins), the shape Istio's fetcher accepts, and the module's exact bytes."""

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "tools"))
import oci  # noqa: E402


@pytest.fixture
def registry(tmp_path):
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def skopeo(*args: str) -> str:
    return subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def test_the_image_round_trips_through_a_registry_with_its_digest_and_module(wasm_path, registry, tmp_path, report):
    first = oci.build(wasm_path, tmp_path / "layout", "0.1.0")
    again = oci.build(wasm_path, tmp_path / "layout-again", "0.1.0")
    assert first == again, "the same module must give the same digest"

    image = f"docker://{registry}/ratelimit-wasm:0.1.0"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:0.1.0", image)
    pushed = skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}", image).strip()
    raw = skopeo("inspect", "--tls-verify=false", "--raw", image).encode()
    assert pushed == first == "sha256:" + hashlib.sha256(raw).hexdigest()

    manifest = json.loads(raw)
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    assert manifest["annotations"] == {"module.wasm.image/variant": "compat"}

    skopeo("copy", "--src-tls-verify=false", image, f"oci:{tmp_path / 'pulled'}:0.1.0")
    layer_digest = manifest["layers"][0]["digest"].split(":", 1)[1]
    layer = (tmp_path / "pulled" / "blobs" / "sha256" / layer_digest).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        assert tar.getnames() == ["plugin.wasm"]
        pulled = tar.extractfile("plugin.wasm").read()
    assert pulled == Path(wasm_path).read_bytes()
    report(f"oci: {first} ({len(raw)} B manifest, {len(layer)} B layer) pushed to docker-registry and pulled "
           f"back with skopeo: module {len(pulled)} B identical")
