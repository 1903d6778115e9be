"""Remote upstreams: Switchyard in front of two other Switchyard processes
over the OpenAI API; balancing over both, failover when one is killed, a
clear 503 when none is left."""
import httpx
import openai
import pytest

from conftest import MODEL, Server, metric, wait_for


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    replicas = [Server(), Server()]
    config = tmp_path_factory.mktemp("upstream") / "front.yaml"
    endpoints = ", ".join(r.url for r in replicas)
    config.write_text(
        "upstreams:\n"
        f"  - {{ name: remote, model: {MODEL}, endpoints: [{endpoints}],\n"
        "      health_interval_ms: 300, failure_threshold: 2, open_secs: 30 }\n"
    )
    front = Server(str(config))
    yield front, replicas
    front.stop()
    for r in replicas:
        if r.proc.poll() is None:
            r.stop()


def ask(front, timeout=60, **kw):
    r = httpx.post(f"{front.url}/v1/completions", timeout=timeout,
                   json={"model": "remote", "prompt": "The capital of France is", "max_tokens": 3,
                         "temperature": 0, **kw})
    return r


def test_balances_fails_over_and_says_when_nothing_is_left(nodes):
    front, (b1, b2) = nodes
    answers = [ask(front) for _ in range(8)]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    used = {r.headers["x-switchyard-upstream"] for r in answers}
    assert used == {b1.url, b2.url}, used
    assert len({r.json()["choices"][0]["text"] for r in answers}) == 1
    # Streams pass through as server-sent events.
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="remote", prompt="The capital of France is", max_tokens=3, temperature=0, stream=True))
    assert text == answers[0].json()["choices"][0]["text"]

    # One replica dies: requests that cannot reach it go to the other at once.
    b1.kill()
    after = [ask(front) for _ in range(8)]
    assert all(r.status_code == 200 for r in after), [r.text for r in after]
    assert {r.headers["x-switchyard-upstream"] for r in after} == {b2.url}
    # Once the health check has marked it down, streams avoid it too.
    wait_for("the health check to mark it down",
             lambda: metric(front, "switchyard:upstream_healthy", replica=b1.url) == 0)
    for _ in range(3):
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="remote", prompt="The capital of France is", max_tokens=3, temperature=0, stream=True))
        assert text == answers[0].json()["choices"][0]["text"]

    # None left: a 503 in OpenAI's shape, not a hang (a request that waited
    # out its 10 s limit would raise instead).
    b2.kill()
    r = ask(front, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
    assert "remote" in r.json()["error"]["message"]
