"""Every JSON and YAML block in the READMEs is checked, so the docs cannot rot: each parses; each
filter configuration passes `envoy --mode validate` inside a bootstrap; each limits file for the
service passes `ratelimit-service --validate`."""

import json
import re
import subprocess

import pytest
import yaml

from conftest import ENVOY_BIN, REPO, free_port, render_bootstrap
from test_global import service_bin  # noqa: F401 (fixture)

READMES = [REPO / "README.md", REPO / "service" / "README.md"]
FENCE = re.compile(r"^[ \t]*```(json|yaml|yml)\n(.*?)\n[ \t]*```", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    found = []
    for readme in READMES:
        text = readme.read_text()
        for m in FENCE.finditer(text):
            indent = len(m.group(0)) - len(m.group(0).lstrip(" \t"))
            body = "\n".join(line[indent:] if line[:indent].isspace() else line for line in m.group(2).splitlines())
            line = text[:m.start()].count("\n") + 1
            found.append((f"{readme.relative_to(REPO)}:{line}", m.group(1), body))
    return found


BLOCKS = blocks()


def parsed(lang: str, body: str) -> list:
    return [json.loads(body)] if lang == "json" else [d for d in yaml.safe_load_all(body) if d is not None]


def test_the_readmes_have_blocks_of_every_kind():
    kinds = {lang for _, lang, _ in BLOCKS}
    assert {"json", "yaml"} <= kinds and len(BLOCKS) >= 10, BLOCKS


@pytest.mark.parametrize("where,lang,body", BLOCKS, ids=[w for w, _, _ in BLOCKS])
def test_every_block_parses_and_every_configuration_in_it_is_accepted(where, lang, body, wasm_path, tmp_path,
                                                                       service_bin):
    for doc in parsed(lang, body):
        if isinstance(doc, dict) and "rules" in doc:
            bootstrap = render_bootstrap(doc, wasm_path, free_port())
            cfg = tmp_path / "envoy.json"
            cfg.write_text(json.dumps(bootstrap))
            r = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart"],
                               capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, f"{where}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        elif isinstance(doc, dict) and "domain" in doc and "descriptors" in doc:
            limits = tmp_path / "limits.yaml"
            limits.write_text(yaml.safe_dump(doc))
            r = subprocess.run([str(service_bin), "--validate", "--config", str(limits)],
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, f"{where}: {r.stdout}{r.stderr}"
