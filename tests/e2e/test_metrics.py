"""`/metrics` as Prometheus' own tooling judges it: `promtool check metrics`
on a live server before and after traffic, `promtool check rules` on the
shipped alert rules; every family with HELP text; each request counted once
in the request histograms whatever `n`, aborted ones with their outcome."""
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from conftest import ROOT, Server, Triton, metric, require_env, wait_for


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path:
        return path
    require_env("PROMTOOL", "scripts/test.sh installs Debian's prometheus package, which has promtool")
    pytest.skip("promtool is not installed")


@pytest.fixture(scope="module")
def llm():
    gguf = require_env("SWITCHYARD_MODEL_GGUF", "scripts/test.sh fetches the default model")
    s = Triton(None, gguf)
    yield s, gguf.rsplit("/", 1)[-1].removesuffix(".gguf")
    s.stop()


def lint(promtool, server) -> list[str]:
    """What promtool says of /metrics, less what vLLM's and Triton's own names
    also draw: the colon of `switchyard:` (vLLM's `vllm:`), and Triton's
    `nv_*` names kept as Triton has them."""
    text = httpx.get(f"{server.url}/metrics").text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    return [l for l in lines if not l.startswith("nv_") and not l.endswith("metric names should not contain ':'")]


def helpless(server) -> list[str]:
    text = httpx.get(f"{server.url}/metrics").text
    typed = {l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")}
    helped = {l.split()[2] for l in text.splitlines() if l.startswith("# HELP ")}
    return sorted(typed - helped)


def test_metrics_pass_promtool_and_count_each_request_once(promtool, llm):
    server, model = llm
    assert lint(promtool, server) == []
    assert helpless(server) == []
    # The engine's families are there before the first request.
    for family in ["prompt_tokens_total", "generation_tokens_total", "num_preemptions_total"]:
        assert metric(server, f"switchyard:{family}", model_name=model) == 0
    assert metric(server, "switchyard:request_success_total", model_name=model, finished_reason="length") == 0

    def count(name, **labels):
        return metric(server, name, missing=0.0, model_name=model, **labels)

    e2e, ttft = count("switchyard:e2e_request_latency_seconds_count"), count("switchyard:time_to_first_token_seconds_count")
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": model, "prompt": "Count: one, two,", "max_tokens": 4, "n": 3,
                         "ignore_eos": True, "temperature": 1.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    # One request of three samples: counted once.
    assert count("switchyard:e2e_request_latency_seconds_count") == e2e + 1
    assert count("switchyard:time_to_first_token_seconds_count") == ttft + 1
    assert count("switchyard:request_success_total", finished_reason="length") == 1

    # A stream the client leaves is recorded as aborted.
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "model": model, "prompt": "Write forever.", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}) as s:
        for i, _ in enumerate(s.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 30
    while count("switchyard:request_success_total", finished_reason="abort") < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert count("switchyard:request_success_total", finished_reason="abort") == 1
    assert count("switchyard:e2e_request_latency_seconds_count") == e2e + 2

    assert lint(promtool, server) == []
    assert helpless(server) == []


def test_alert_rules_pass_promtool(promtool):
    r = subprocess.run([promtool, "check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def families() -> dict[str, str]:
    """The families the server describes (gateway/src/telemetry.rs), by type."""
    import re
    text = (ROOT / "gateway" / "src" / "telemetry.rs").read_text()
    return {m[0]: m[1] for m in re.findall(r'\("([a-z0-9_:]+)", (Counter|Gauge|Histogram),', text)}


def series_named(expr: str, known: dict[str, str]) -> list[str]:
    """The families an expression reads, `_bucket` / `_sum` / `_count` taken
    back to their histogram; a name that is none of the server's is returned as is."""
    import re
    out = []
    for name in re.findall(r"(switchyard:[a-z0-9_]+|nv_[a-z0-9_]+)", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        out.append(base if known.get(base) == "Histogram" else name)
    return out


def test_dashboard_and_alerts_read_only_exported_families(promtool, tmp_path):
    import json
    import yaml
    known = families()
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "switchyard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    exprs_alerts = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for expr in exprs + exprs_alerts:
        for name in series_named(expr, known):
            assert name in known, f"{name} in {expr!r} is not a family the server exports"
    # Every panel's query is valid PromQL: promtool checks them as recording rules.
    recording = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"switchyard_dashboard:panel_{i}",
         "expr": e.replace("$__rate_interval", "5m").replace("$model", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(recording))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kept_alive_connections_spread_over_the_fronts(tmp_path):
    """With `balance_connections`, clients that connect in a burst and keep
    their connections are served by every HTTP front, not all by the one
    that happened to be awake."""
    config = tmp_path / "fronts.yaml"
    config.write_text("server: { limits: { http_threads: 2, balance_connections: true } }\n"
                      "upstreams: [{ name: elsewhere, endpoints: [http://127.0.0.1:9] }]\n")
    server = Server(str(config))
    try:
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(16)]
        for c in clients:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in clients:
            c.settimeout(30)
            assert c.recv(1024).startswith(b"HTTP/1.1 200")
        # Sixteen kept alive, and the scrape's own connection.
        text = httpx.get(f"{server.url}/metrics").text
        per_front = [float(l.split()[-1]) for l in text.splitlines()
                     if l.startswith("switchyard:http_connections{")]
        assert len(per_front) == 2 and sum(per_front) == 17, per_front
        assert min(per_front) >= 8, per_front
        for c in clients:
            c.close()
        wait_for("the closed connections to be counted out",
                 lambda: metric(server, "switchyard:http_connections") == 1)
    finally:
        server.stop()
