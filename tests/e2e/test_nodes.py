"""Three nodes on one PostgreSQL registry: a change made through one node is
routed by all three at once (LISTEN/NOTIFY; the poll is set to a minute, so
it cannot be what delivers it), and the rollout policy runs on exactly one
node at a time: killing the node holding the lease lets another carry the
rollout through. The audit chain verifies afterwards."""
import re
import subprocess
import threading
import time
import uuid

import httpx
import openai
import pytest

from conftest import Server, metric, require_env, wait_for
from test_registry import GOOD, KEYS, Api, model_spec, write_config

POLICY = """\
  rollout_interval_ms: 200
  rollouts:
    - model: fleet
      steps: [10, 50, 100]
      min_requests: 3
      min_step_secs: 6
      min_success_rate: 0.9
"""


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    base = require_env("SWITCHYARD_TEST_POSTGRES_URL", "scripts/test.sh starts a PostgreSQL server")
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", base, "-q", "-c", f"CREATE DATABASE {name}"], check=True)
    url = re.sub(r"/[^/]*$", f"/{name}", base)
    servers = [Server(write_config(tmp_path_factory.mktemp(f"node{i}"), url, interval=60, extra=POLICY))
               for i in range(3)]
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


def route(node, name):
    viewer = {"Authorization": f"Bearer {KEYS['viewer']}"}
    for r in httpx.get(f"{node.url}/v1/routes", headers=viewer, timeout=5).json()["routes"]:
        if r["name"] == name:
            return r
    return None


def share(node, name):
    """(candidate version, percent) as the node routes `name` now."""
    r = route(node, name)
    return r and r["candidate"] and (r["candidate"]["version"], r["candidate"]["percent"])


def serve_on_all(api, nodes, name):
    assert api.post("/models", json=model_spec(name, tier="L1")).status_code == 201
    for _ in range(2):
        assert api.post(f"/models/{name}/versions", json=GOOD).status_code == 201
    api.move(name, 1, "offline_passed")
    api.move(name, 1, "promoted")
    api.move(name, 2, "offline_passed")
    api.move(name, 2, "shadow")
    api.move(name, 2, "canary", traffic_percent=10)
    for n in nodes:
        wait_for(f"{name} v2 at 10% on {n.url}", lambda: share(n, name) == (2, 10.0), timeout=180)


def test_a_change_on_one_node_is_routed_by_all_at_once(nodes):
    api = Api(nodes[0])
    serve_on_all(api, nodes, "spread")
    seen = {}
    start = time.monotonic()
    r = api.post("/models/spread/versions/2/traffic", json={"traffic_percent": 40, "reason": "wider"})
    assert r.status_code == 200, r.text
    acked = time.monotonic()
    while len(seen) < 3 and time.monotonic() - start < 10:
        for i, n in enumerate(nodes):
            if i not in seen and share(n, "spread") == (2, 40.0):
                seen[i] = time.monotonic() - acked
        time.sleep(0.01)
    print(f"propagation after the write was acknowledged, per node (s): {seen}")
    assert len(seen) == 3, seen
    assert max(seen.values()) < 1.0, seen
    # The other nodes heard it from PostgreSQL, not from their poll.
    for n in nodes[1:]:
        assert metric(n, "switchyard:registry_notifications_total") >= 1


def holders(nodes):
    return [i for i, n in enumerate(nodes)
            if n.proc.poll() is None and metric(n, "switchyard:rollout_lease_held", missing=0.0) == 1]


def test_the_rollout_lease_moves_when_its_holder_dies(nodes):
    wait_for("one node to take the rollout lease", lambda: len(holders(nodes)) == 1)
    assert len(holders(nodes)) == 1
    api = Api(nodes[0])
    stop, failures = threading.Event(), []

    def traffic():
        i = 0
        while not stop.is_set():
            i += 1
            alive = [n for n in nodes if n.proc.poll() is None]
            n = alive[i % len(alive)]
            try:
                openai.OpenAI(base_url=f"{n.url}/v1", api_key="unused", max_retries=0).completions.create(
                    model="fleet", prompt="Hi", max_tokens=1, user=f"user-{i % 40}")
            except openai.APIConnectionError:
                pass  # the node just killed
            except Exception as e:  # noqa: BLE001 - every other failure is reported
                failures.append(repr(e))

    worker = threading.Thread(target=traffic)
    try:
        serve_on_all(api, nodes, "fleet")
        worker.start()
        [holder] = holders(nodes)
        nodes[holder].kill()
        killed_ms = time.time() * 1000
        survivors = [n for i, n in enumerate(nodes) if i != holder]
        api = Api(survivors[0])
        wait_for("another node to take the lease", lambda: len(holders(survivors)) == 1, timeout=30)
        wait_for("fleet v2 promoted by the new holder",
                 lambda: api.get("/models/fleet/versions/2").json()["state"] == "promoted", timeout=120)
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(timeout=60)
    audit = api.get("/audit", params={"model": "fleet"}).json()["entries"]
    auto = [e for e in audit if e["actor"] == "rollout-policy:fleet" and e["version"] == 2]
    assert [(e["action"], e["details"]["after"]["state"]) for e in auto] == [
        ("ramp", "canary"), ("transition", "promoted")], auto
    # Both steps came after the holder died: the new holder took them.
    assert all(e["at_ms"] > killed_ms for e in auto), (killed_ms, auto)
    assert api.get("/audit/verify").json()["ok"] is True
    # Verified at start on every node, and again by the call above.
    assert metric(survivors[0], "switchyard:registry_audit_verified") == 1
    assert metric(survivors[0], "switchyard:registry_audit_entries") == len(
        api.get("/audit", params={"limit": 10000}).json()["entries"])
    for n in survivors:
        wait_for(f"{n.url} to route fleet to v2 alone",
                 lambda: route(n, "fleet")["primary"]["version"] == 2 and route(n, "fleet")["candidate"] is None)
    assert failures == [], failures[:3]
