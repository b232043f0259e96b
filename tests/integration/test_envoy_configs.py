"""Every shipped Envoy config (envoy/*.yaml) is accepted by `envoy --mode validate`."""

import subprocess
from pathlib import Path

import pytest

from conftest import DEFAULT_WASM, ENVOY_BIN, REPO

CONFIGS = sorted((REPO / "envoy").glob("*.yaml"))
RELATIVE_WASM = str(DEFAULT_WASM.relative_to(REPO))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS), CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_validates(config: Path, wasm_path: Path, tmp_path: Path):
    text = config.read_text()
    assert RELATIVE_WASM in text, f"{config.name} should load {RELATIVE_WASM}"
    if wasm_path == DEFAULT_WASM:
        # As users run it: from the repository root, the wasm named by its relative path.
        cfg = str(config.relative_to(REPO))
    else:  # RATELIMIT_WASM override: validate a copy that loads that file instead
        copy = tmp_path / config.name
        copy.write_text(text.replace(RELATIVE_WASM, str(wasm_path)))
        cfg = str(copy)
    r = subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", cfg, "--disable-hot-restart"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, f"{config.name}: exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
