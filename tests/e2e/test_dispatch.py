"""One dispatch layer for every front: an LLM reached only over KServe
(HTTP infer, generate, generate_stream, gRPC infer and streaming) gets its
canary share by sticky unit, feeds shadows and version statistics, and a
rollout policy promotes a candidate that only KServe traffic reached; shadow
sampling takes exactly the request ids that hash into its share; a route with
a prompt experiment still feeds its shadows and version statistics, and the
experiment's shadow arm is compared without ever answering a client."""
import json
import os
import subprocess
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from conftest import Server, binary, bucket, metric, wait_for
from test_registry import GOOD, KEYS, Api, serve_first_version, status, write_config

POLICY = """\
    - model: {model}
      steps: [50, 100]
      min_requests: {min_requests}
      min_step_secs: 1
      min_success_rate: 0.9
      max_p99_latency_ms: 60000
      max_shadow_divergence: 0.05
      max_shadow_kl: 0.05
"""

EXPERIMENTS = """\
experiments:
  - name: tone
    route: expo
    unit: header:x-user
    arms:
      - {name: plain, weight: 1, deployment: expo}
      - {name: brief, weight: 1, deployment: expo, prompt: {system: "Answer in one word."}}
      - name: judge
        deployment: expo@1
        prompt: {system: "You are terse."}
        shadow: {sample_percent: 100, max_in_flight: 2, timeout_ms: 60000}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dispatch")
    (tmp / "experiments.yaml").write_text(EXPERIMENTS)
    extra = (
        "  rollout_interval_ms: 300\n  rollouts:\n"
        + POLICY.format(model="kauto", min_requests=10)
        + POLICY.format(model="expo", min_requests=6)
        + "  shadows:\n    - { model: sampled, sample_percent: 25 }\n"
        # Room for every copy: sequential requests outpace the shadow.
        + "    - { model: logged, max_in_flight: 64 }\n"
        + "  request_log:\n    max_rows: 1000\n"
        + "    routes: [ { route: logged, log_sample_percent: 50 } ]\n"
        + f"experiments_file: {tmp / 'experiments.yaml'}\n"
    )
    s = Server(config := write_config(tmp, extra=extra), args=["--grpc", "127.0.0.1:0"])
    s.config = config
    port = s.wait_for_log(r"KServe gRPC on 127\.0\.0\.1:(\d+)")
    s.grpc_url = f"127.0.0.1:{port}"
    yield s
    s.stop()


def text_inputs(prompt, stream=False):
    out = []
    for name, arr, dt in [
        ("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
        ("sampling_parameters", np.array([json.dumps({"temperature": 0, "max_tokens": 2}).encode()], dtype=object), "BYTES"),
        ("stream", np.array([stream]), "BOOL"),
    ]:
        t = grpcclient.InferInput(name, [1], dt)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def infer_body(prompt):
    return {"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [prompt]},
        {"name": "sampling_parameters", "shape": [1], "datatype": "BYTES",
         "data": [json.dumps({"temperature": 0, "max_tokens": 2})]},
    ]}


def call(s, front, model, unit, prompt="The capital of France is"):
    """One request over `front`, with `unit` as the rollout unit; returns the
    version and arm the answer names."""
    h = {"x-switchyard-unit": unit}
    if front == "infer":
        r = httpx.post(f"{s.url}/v2/models/{model}/infer", json=infer_body(prompt), headers=h, timeout=120)
    elif front in ("generate", "generate_stream"):
        body = {"text_input": prompt, "parameters": {"temperature": 0, "max_tokens": 2}}
        r = httpx.post(f"{s.url}/v2/models/{model}/{front}", json=body, headers=h, timeout=120)
    if front in ("infer", "generate", "generate_stream"):
        assert r.status_code == 200, r.text
        return int(r.headers["x-switchyard-model-version"]), r.headers["x-switchyard-arm"]
    g = grpcclient.InferenceServerClient(s.grpc_url)
    if front == "grpc":
        params = g.infer(model, text_inputs(prompt), headers=h).get_response(as_json=True)["parameters"]
    else:
        got = []
        g.start_stream(callback=lambda result, error: got.append((result, error)), headers=h)
        try:
            g.async_stream_infer(model, text_inputs(prompt, stream=True))
            wait_for("the stream's first piece", lambda: got, timeout=120)
        finally:
            g.stop_stream()
        result, error = got[0]
        assert error is None, error
        params = result.get_response(as_json=True)["parameters"]
    return int(params["switchyard_model_version"]["string_param"]), params["switchyard_arm"]["string_param"]


def compared(s, route, label):
    """How many of `label`'s copies were compared with the primary on `route`."""
    shadows = httpx.get(f"{s.url}/v1/routes/{route}/shadows").json()["shadows"]
    return sum(x["compared"] for x in shadows if x["version"] == label)


FRONTS = ["infer", "generate", "generate_stream", "grpc", "grpc_stream"]


def test_kserve_traffic_alone_walks_an_llm_candidate_to_promotion(node):
    api = Api(node)
    serve_first_version(api, "kauto", tier="L1")
    # Units on either side of the 50% canary share.
    units = [f"unit-{i}" for i in range(200)]
    canary_units = [u for u in units if bucket("kauto/rollout", u) < 5000][:5]
    primary_units = [u for u in units if bucket("kauto/rollout", u) >= 5000][:5]
    seen, failures, stop = [], [], threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            front = FRONTS[i % len(FRONTS)]
            unit = (canary_units if (i // len(FRONTS)) % 2 == 0 else primary_units)[i % 5]
            try:
                seen.append((front, unit, *call(node, front, "kauto", unit)))
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(f"{front}: {e!r}")
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        assert api.post("/models/kauto/versions", json=GOOD).status_code == 201
        api.move("kauto", 2, "offline_passed")
        api.move("kauto", 2, "shadow")
        wait_for("v2 promoted by the policy on KServe traffic alone",
                 lambda: api.get("/models/kauto/versions/2").json()["state"] == "promoted", timeout=300)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert failures == [], failures[:3]
    audit = api.get("/audit", params={"model": "kauto"}).json()["entries"]
    steps = [(e["action"], e["details"]["after"]["state"], e["details"]["after"]["traffic_percent"])
             for e in audit if e["actor"] == "rollout-policy:kauto" and e["version"] == 2]
    assert steps == [("transition", "canary", 50.0), ("transition", "promoted", None)], steps
    canary = [(f, u, v) for f, u, v, arm in seen if arm == "canary"]
    assert canary, "the canary answered"
    # The canary is version 2 and only ever serves units in its share.
    assert all(v == 2 and u in canary_units for _, u, v in canary), canary
    assert {f for f, _, _ in canary} == set(FRONTS), "every front reached the canary"
    assert all(arm in ("primary", "canary") for *_, arm in seen)


def with_a_shadow(node, model):
    """Serves `model` v1 with v2 as its shadow; returns the registry client."""
    api = Api(node)
    serve_first_version(api, model)
    assert api.post(f"/models/{model}/versions", json=GOOD).status_code == 201
    api.move(model, 2, "offline_passed")
    api.move(model, 2, "shadow")
    wait_for("the shadow to load", lambda: status(api, model, 2) == "serving")
    return api


def test_shadow_sampling_takes_the_request_ids_in_its_share(node):
    api = with_a_shadow(node, "sampled")
    ids = [f"req-{i}" for i in range(24)]
    inside = [i for i in ids if bucket("sampled/shadow/2", i) < 2500]
    assert 0 < len(inside) < len(ids)
    copies = lambda: metric(node, "switchyard:shadow_requests_total", missing=0.0, route="sampled", version="2")
    for rid in ids:
        before = copies()
        body = {**infer_body("Hi"), "id": rid}
        r = httpx.post(f"{node.url}/v2/models/sampled/infer", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["id"] == rid, r.text
        # The copy is sent (and counted) before the primary answers.
        assert copies() - before == (1 if rid in inside else 0), rid
    wait_for("the sampled copies compared", lambda: compared(node, "sampled", "2") == len(inside))


def test_an_experiment_route_feeds_shadows_versions_and_its_shadow_arm(node):
    api = Api(node)
    serve_first_version(api, "expo", tier="L1")
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)
    seen, failures, stop = [], [], threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="expo", messages=[{"role": "user", "content": "Name a colour."}],
                    max_tokens=2, temperature=0, extra_headers={"x-user": f"user-{i % 30}"})
                h = raw.headers
                seen.append((h["x-switchyard-arm"], int(h["x-switchyard-model-version"]),
                             h["x-switchyard-experiment"]))
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(repr(e))
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_for("the shadow arm compared", lambda: compared(node, "expo", "tone/judge") >= 2)
        assert api.post("/models/expo/versions", json=GOOD).status_code == 201
        api.move("expo", 2, "offline_passed")
        api.move("expo", 2, "shadow")
        # The policy needs the route's shadow comparisons, then the
        # candidate's own outcomes: experiment traffic feeds both.
        wait_for("v2 promoted on experiment traffic",
                 lambda: api.get("/models/expo/versions/2").json()["state"] == "promoted", timeout=300)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert failures == [], failures[:3]
    arms = {arm for arm, _, _ in seen}
    assert arms <= {"plain", "brief"} and arms, arms  # the shadow arm never answers
    assert {exp for *_, exp in seen} == {"tone"}
    assert {v for _, v, _ in seen} == {1, 2}
    assert compared(node, "expo", "2") > 0


def test_the_request_log_holds_what_was_sampled_and_survives_a_restart(node):
    """Last in the module: it restarts the node."""
    api = with_a_shadow(node, "logged")
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)
    ids = [f"log-{i}" for i in range(16)]
    for rid in ids:
        raw = client.completions.with_raw_response.create(
            model="logged", prompt="Say hi", max_tokens=2, temperature=0,
            extra_headers={"x-request-id": rid})
        assert raw.headers["x-request-id"] == rid
    # A route that is not logged.
    serve_first_version(api, "quiet")
    client.completions.create(model="quiet", prompt="Say hi", max_tokens=1,
                              extra_headers={"x-request-id": "not-logged"})
    sampled = {rid for rid in ids if bucket("logged/log", rid) < 5000}
    assert 0 < len(sampled) < len(ids)
    viewer = httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {KEYS['viewer']}"})

    def entries(role):
        log = viewer.get("/v1/requests").json()["requests"]
        return {e["request_id"]: e for e in log if e["role"] == role}

    wait_for("the sampled requests and their shadow answers in the log",
             lambda: set(entries("primary")) == sampled and set(entries("shadow")) == sampled)
    primary = entries("primary")
    for rid, e in primary.items():
        assert (e["route"], e["version"], e["arm"], e["ok"]) == ("logged", 1, "primary", True), e
        assert e["prompt"] == "Say hi" and e["completion_tokens"] == 2 and e["response"], e
    shadow = entries("shadow")
    assert all(e["shadow"] == "2" and "similarity" in e["comparison"] for e in shadow.values())
    assert viewer.get("/v1/requests", params={"route": "quiet"}).json()["requests"] == []
    assert httpx.get(f"{node.url}/v1/requests").status_code == 401  # a key is needed
    # The CLI export, one entry per line.
    env = {**os.environ, "SWITCHYARD_URL": node.url, "SWITCHYARD_API_KEY": KEYS["viewer"]}
    out = subprocess.run([binary(), "requests", "export", "--route", "logged", "--arm", "primary"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert {json.loads(line)["request_id"] for line in out.splitlines()} == sampled
    # The log lives in the registry's database: a restarted node has it.
    before = viewer.get("/v1/requests").json()["requests"]
    node.stop()
    again = Server(node.config, port=node.port)
    try:
        after = httpx.get(f"{again.url}/v1/requests", headers={"Authorization": f"Bearer {KEYS['viewer']}"}).json()
        assert after["requests"] == before
    finally:
        again.stop()
