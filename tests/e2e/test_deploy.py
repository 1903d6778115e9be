"""The Kubernetes manifests in deploy/kubernetes: valid against the
Kubernetes schemas offline (kubernetes-validate, pinned, strict), and the
configuration their ConfigMap carries is one the server takes, with the
Secret's values in the environment and none of them printed back."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, binary

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def test_manifests_validate_against_the_kubernetes_schemas():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "StatefulSet"} <= kinds
    exe = Path(sys.executable).parent / "kubernetes-validate"
    r = subprocess.run([str(exe), "--strict", *map(str, MANIFESTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") >= len(kinds), r.stdout


def test_probes_are_the_servers_health_endpoints():
    [deployment] = [d for _, d in documents() if d["kind"] == "Deployment"]
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_the_configmaps_config_is_one_the_server_takes(tmp_path):
    [config] = [d for _, d in documents() if d["kind"] == "ConfigMap"]
    [secret] = [d for _, d in documents() if d["kind"] == "Secret"]
    path = tmp_path / "config.yaml"
    path.write_text(config["data"]["config.yaml"])
    env = {**os.environ, **secret["stringData"]}
    r = subprocess.run([binary(), "serve", "--config", str(path), "--print-config"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["registry"]["database_env"] == "SWITCHYARD_DATABASE_URL"
    assert printed["auth"]["inference_requires_key"] is True
    for value in secret["stringData"].values():
        assert value not in r.stdout
