"""Every manifest in deploy/ is valid for what applies it: Kubernetes objects against Kubernetes'
own schemas (kubernetes-validate, strict: unknown fields refused), Istio objects against the
schemas in deploy/schemas, and each WasmPlugin's pluginConfig loaded by the filter in a real Envoy,
handed over as Istio hands it (a JSON string). (deploy/monitoring holds Prometheus and Grafana files,
not API objects: test_monitoring.py checks them, and what telemetry-labels.yaml does in a proxy.)"""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO, fresh_key

DEPLOY = REPO / "deploy"
SCHEMAS = {kind: json.loads((DEPLOY / "schemas" / f"{kind.lower()}.schema.json").read_text())
           for kind in ("WasmPlugin", "ServiceEntry", "IstioOperator")}
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes that Istio 1.28-1.31 all support


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(p for d in ("istio", "kubernetes") for p in (DEPLOY / d).rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return docs


DOCS = documents()


def test_there_are_manifests_of_every_kind_shipped():
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"WasmPlugin", "ServiceEntry", "IstioOperator", "Deployment", "Service", "ConfigMap",
            "PodDisruptionBudget"} <= kinds


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_every_manifest_is_valid_for_its_api(where, doc):
    if doc["kind"] in SCHEMAS:
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_typo_in_a_wasmplugin_is_caught():
    doc = next(doc for _, doc in DOCS if doc["kind"] == "WasmPlugin")
    typo = {**doc, "spec": {**doc["spec"], "phase": "AUTHZ", "failstrategy": "FAIL_OPEN"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SCHEMAS["WasmPlugin"])


def test_a_misspelt_stats_option_is_caught():
    # Istio would ignore it, and the labels would silently stay in the metric names.
    doc = next(doc for _, doc in DOCS if doc["kind"] == "IstioOperator")
    proxy = doc["spec"]["meshConfig"]["defaultConfig"]
    for typo in ({"extraStatsTags": proxy["extraStatTags"]},
                 {"proxyStatsMatcher": {"inclusionPrefix": ["cluster.x"]}}):
        bad = {**doc, "spec": {"meshConfig": {"defaultConfig": typo}}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMAS["IstioOperator"])


def test_the_telemetry_config_names_the_global_examples_cluster():
    # The stats it includes are those of the cluster the global WasmPlugin calls.
    doc = next(doc for _, doc in DOCS if doc["kind"] == "IstioOperator")
    prefixes = doc["spec"]["meshConfig"]["defaultConfig"]["proxyStatsMatcher"]["inclusionPrefixes"]
    clusters = {d["spec"]["pluginConfig"].get("global", {}).get("cluster") for _, d in DOCS if d["kind"] == "WasmPlugin"}
    assert {p.removeprefix("cluster.") for p in prefixes} <= clusters - {None}


@pytest.mark.parametrize("where,doc", [(w, d) for w, d in DOCS if d["kind"] == "WasmPlugin"],
                         ids=[w for w, d in DOCS if d["kind"] == "WasmPlugin"])
def test_every_wasmplugin_configuration_is_accepted_by_the_filter(where, doc, envoy_factory):
    envoy = envoy_factory(json.dumps(doc["spec"]["pluginConfig"], sort_keys=True, separators=(",", ":")),
                          vm_id=None, concurrency=1)
    assert envoy.request("/", {"x-api-key": fresh_key(), "x-tenant": fresh_key()}).status == 200
    assert "invalid configuration" not in envoy.log()
