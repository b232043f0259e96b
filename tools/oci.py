#!/usr/bin/env python3
"""Packs the filter module as an OCI image layout that Istio's WasmPlugin can pull.

    python3 tools/oci.py <module.wasm> <layout-dir> [tag]

The image is the "compat" shape Istio's image fetcher accepts: an OCI image manifest whose single
layer (application/vnd.oci.image.layer.v1.tar+gzip) is a tar holding `plugin.wasm`, annotated
`module.wasm.image/variant: compat`. Everything that could vary between two runs is fixed (file
metadata in the tar, the gzip header's time, JSON key order and spacing), so the same module gives
the same manifest digest: the `sha256` a WasmPlugin pins. Prints that digest.
"""

import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def layer_tar(module: bytes) -> bytes:
    info = tarfile.TarInfo("plugin.wasm")
    info.size, info.mode, info.mtime = len(module), 0o444, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(module))
    return out.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(layout: Path, data: bytes) -> dict:
    d = digest(data)
    path = layout / "blobs" / "sha256" / d.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": d, "size": len(data)}


def build(module_path: Path, layout: Path, tag: str = "latest") -> str:
    module = module_path.read_bytes()
    tar = layer_tar(module)
    layer = gzip.compress(tar, compresslevel=9, mtime=0)
    config = canonical({
        "architecture": "wasm",
        "os": "wasip1",
        "rootfs": {"type": "layers", "diff_ids": [digest(tar)]},
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, **write_blob(layout, config)},
        "layers": [{"mediaType": LAYER_TYPE, **write_blob(layout, layer)}],
        "annotations": {"module.wasm.image/variant": "compat"},
    })
    manifest_ref = write_blob(layout, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": MANIFEST_TYPE, **manifest_ref,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (layout / "index.json").write_bytes(canonical(index))
    (layout / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    return manifest_ref["digest"]


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    print(build(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
