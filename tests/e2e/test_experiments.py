"""A prompt experiment from YAML end to end with the `openai` client: two arms
with their own system prompts, sticky users, per-arm metrics, feedback and
the summary; hot reload on change and on SIGHUP, a bad file kept out, and no
request dropped while the file changes."""
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from conftest import ROOT, Server, metric

# The example shipped in configs/, with short answers to keep the test quick.
EXAMPLE = (ROOT / "configs" / "experiments.yaml").read_text().replace("prompt: {", "prompt: { max_tokens: 3,")


def write_experiment(path, w1, w2):
    """Replaces the file whole (a rename), as an editor or a deploy tool does,
    so the watcher never reads it half written."""
    text = EXAMPLE.replace("weight: 50", f"weight: {w1}", 1).replace("weight: 50", f"weight: {w2}", 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def experiment_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiments")
    exp = d / "experiments.yaml"
    write_experiment(exp, 50, 50)
    config = d / "config.yaml"
    config.write_text((ROOT / "configs" / "default.yaml").read_text() + f"\nexperiments_file: {exp}\n")
    s = Server(str(config))
    s.experiments_path = exp
    yield s
    s.stop()


def ask(server, user=None, system=None):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": system}] if system else []
    raw = client.chat.completions.with_raw_response.create(
        model="support-bot",
        messages=messages + [{"role": "user", "content": "How do I reset my password?"}],
        extra_headers={"x-user-id": user} if user else None,
    )
    body = raw.parse()
    return raw.headers, body


def experiments(server):
    return httpx.get(f"{server.url}/v1/experiments").json()["experiments"]


def test_two_arms_sticky_users_metrics_and_summary(experiment_server):
    s = experiment_server
    seen, prompt_tokens, ids = {}, {}, {}
    for round_ in range(2):
        for i in range(24):
            user = f"user-{i}"
            h, body = ask(s, user)
            assert h["x-switchyard-experiment"] == "support-tone"
            arm = h["x-switchyard-arm"]
            assert seen.setdefault(user, arm) == arm, f"{user} moved arms"
            # Each arm's system prompt is in the prompt: its own token count.
            assert prompt_tokens.setdefault(arm, body.usage.prompt_tokens) == body.usage.prompt_tokens
            assert body.usage.completion_tokens <= 3  # the arm's max_tokens default
            assert body.id == h["x-request-id"]
            ids.setdefault(arm, []).append(body.id)
    per_arm = {a: sum(1 for v in seen.values() if v == a) * 2 for a in ("concise", "friendly")}
    assert per_arm["concise"] > 0 and per_arm["friendly"] > 0, per_arm
    assert prompt_tokens["concise"] != prompt_tokens["friendly"]
    # A request that brings its own system message gets the arm's instead.
    h, body = ask(s, "user-0", system="Talk like a pirate, at great length, always.")
    arm0 = h["x-switchyard-arm"]
    assert body.usage.prompt_tokens == prompt_tokens[arm0]
    per_arm[arm0] += 1
    # Requests without the unit are assigned at random and counted as such.
    for _ in range(4):
        h, _ = ask(s)
        per_arm[h["x-switchyard-arm"]] += 1
    # Feedback: thumbs up on concise, down on friendly.
    for arm, score in (("concise", 1), ("friendly", -1)):
        for rid in ids[arm][:5]:
            r = httpx.post(f"{s.url}/v1/feedback", json={"request_id": rid, "score": score})
            assert r.status_code == 200 and r.json()["arm"] == arm
    r = httpx.post(f"{s.url}/v1/feedback", json={"request_id": "chatcmpl-nope", "score": 1})
    assert r.status_code == 404 and r.json()["error"]["param"] == "request_id"

    summary = wait_for_summary(s, sum(per_arm.values()))
    arms = {a["name"]: a for a in summary["arms"]}
    for name, n in per_arm.items():
        assert arms[name]["requests"] == n, (name, arms[name])
        assert arms[name]["errors"] == 0
        assert arms[name]["latency_ms"]["p50"] > 0
        assert arms[name]["output_tokens"]["total"] > 0
        assert metric(s, "switchyard:experiment_requests_total", experiment="support-tone", arm=name) == n
    assert sum(a["random_assignments"] for a in arms.values()) == 4
    assert arms["concise"]["feedback"] == {"count": 5, "mean": 1.0, "positive_rate": 1.0}
    assert arms["friendly"]["feedback"]["positive_rate"] == 0.0
    cmp = summary["comparisons"][0]
    assert cmp["control"] == "concise" and cmp["arm"] == "friendly"
    fb = cmp["positive_feedback_rate"]
    assert fb["difference"] == -1.0 and fb["p_value"] < 0.01
    assert cmp["latency"]["test"] == "mann_whitney_u" and 0 <= cmp["latency"]["p_value"] <= 1
    assert isinstance(cmp["latency"]["enough_data"], bool)


def wait_for_summary(s, total, timeout=30):
    deadline = time.time() + timeout
    while True:
        summary = httpx.get(f"{s.url}/v1/experiments/support-tone/summary").json()
        if sum(a["requests"] for a in summary["arms"]) >= total or time.time() > deadline:
            return summary
        time.sleep(0.1)


def weights(server):
    return [a["weight"] for a in experiments(server)[0]["arms"]]


def wait_for_weights(server, want, timeout=10):
    deadline = time.time() + timeout
    while weights(server) != want:
        assert time.time() < deadline, f"weights stayed {weights(server)}, wanted {want}"
        time.sleep(0.1)


def test_hot_reload_keeps_serving_and_refuses_a_bad_file(experiment_server):
    s, path = experiment_server, experiment_server.experiments_path
    failures, answered, stop = [], [0], threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                ask(s, f"load-{i % 7}")
                answered[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # On change: every user moves to the one arm left with weight.
        write_experiment(path, 90, 10)
        wait_for_weights(s, [90.0, 10.0])
        write_experiment(path, 100, 0)
        wait_for_weights(s, [100.0, 0.0])
        for i in range(5):
            assert ask(s, f"user-{i}")[0]["x-switchyard-arm"] == "concise"
        # A bad file is refused; the table in force stays.
        rejected = metric(s, "switchyard:experiment_reloads_total", missing=0.0, outcome="rejected")
        write_experiment(path, -1, 10)
        deadline = time.time() + 10
        while metric(s, "switchyard:experiment_reloads_total", missing=0.0, outcome="rejected") == rejected:
            assert time.time() < deadline, "the bad file was not looked at"
            time.sleep(0.1)
        assert weights(s) == [100.0, 0.0]
        assert ask(s, "user-1")[0]["x-switchyard-arm"] == "concise"
        # SIGHUP: a change the watcher cannot see (same size, same mtime).
        write_experiment(path, 10, 90)
        wait_for_weights(s, [10.0, 90.0])
        stamp = path.stat()
        write_experiment(path, 90, 10)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        time.sleep(1.5)
        assert weights(s) == [10.0, 90.0]
        s.proc.send_signal(signal.SIGHUP)
        wait_for_weights(s, [90.0, 10.0])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == [], failures[:3]
    assert answered[0] > 0
    print(f"hot reload: {answered[0]} requests answered during 4 reloads, none failed")
