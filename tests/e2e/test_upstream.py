"""Remote upstreams: Switchyard in front of two other Switchyard processes
over the OpenAI API; balancing over both, failover when one is killed, a
clear 503 when none is left; a clear error, not a hang, from a replica
that stops midway."""
import socketserver
import threading

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


class Stalling(socketserver.ThreadingTCPServer):
    """A replica that answers its health check, and every POST with
    `head`, then nothing more while the client waits."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, head: bytes):
        self.head = head
        self.released = threading.Event()
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.released.set()
        self.shutdown()
        self.server_close()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                method, length = line.split()[0], 0
                while (h := self.rfile.readline()) not in (b"\r\n", b""):
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":")[1])
                self.rfile.read(length)
                if method == b"GET":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                self.wfile.write(self.server.head)
                self.server.released.wait(30)
                return


EVENT = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n')


def test_a_replica_that_stops_midway_gets_a_clear_error_not_a_hang(tmp_path):
    streams = Stalling(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                       b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(EVENT) + EVENT + b"\r\n")
    answers = Stalling(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                       b"content-length: 100\r\n\r\n{\"id\":")
    config = tmp_path / "front.yaml"
    config.write_text(
        "upstreams:\n"
        f"  - {{ name: streams, endpoints: [{streams.url}], timeout_secs: 1, health_interval_ms: 200 }}\n"
        f"  - {{ name: answers, endpoints: [{answers.url}], timeout_secs: 1, health_interval_ms: 200 }}\n"
    )
    front = Server(str(config))
    try:
        for name in ("streams", "answers"):
            wait_for(f"{name} healthy", lambda: metric(front, "switchyard:upstream_healthy",
                                                     missing=0, upstream=name) == 1, timeout=30)
        c = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none", max_retries=0, timeout=20)
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        # A stream stopped between two events ends with an error event.
        got = []
        with pytest.raises(openai.APIError, match=r"upstream `streams`: the stream sent nothing for 1 s"):
            for chunk in c.chat.completions.create(model="streams", stream=True, **chat):
                got.append(chunk.choices[0].delta.content)
        assert got == ["Hi"]
        # A non-streamed answer stopped midway: 504, not a hang.
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="answers", **chat)
        assert e.value.status_code == 504 and e.value.body["code"] == "upstream_unavailable", e.value.body
        assert metric(front, "switchyard:upstream_errors_total", upstream="streams") == 1
        assert metric(front, "switchyard:upstream_errors_total", upstream="answers") == 1
    finally:
        front.stop()
        streams.close()
        answers.close()
