"""SIGTERM, as Kubernetes stops a pod: the server stops accepting, lets the
requests in flight finish within `server.shutdown_grace_secs`, ends the
streams still running after it with an error event (not a cut connection),
and exits 0."""
import json
import signal
import socket
import threading
import time

import httpx

from conftest import MODEL, ROOT, Server


def test_sigterm_drains_then_ends_streams_with_an_error(tmp_path):
    models = (ROOT / "configs" / "default.yaml").read_text().split("models:\n", 1)[1]
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  shutdown_grace_secs: 3\nmodels:\n" + models)
    s = Server(str(config))
    events, short = [], {}

    def long_stream():
        body = {"model": MODEL, "stream": True, "max_tokens": 4000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Count to ten thousand."}]}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])

    def short_request():
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        short["response"] = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    deadline = time.time() + 60
    while len(events) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert len(events) >= 3, "the stream started"
    asker = threading.Thread(target=short_request)
    asker.start()
    time.sleep(0.2)
    s.proc.send_signal(signal.SIGTERM)
    asker.join(60)
    assert short["response"].status_code == 200, short["response"].text
    # No new connection is accepted while draining.
    time.sleep(0.5)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=2) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(1024) == b"", "a new connection was served while draining"
    except (ConnectionRefusedError, ConnectionResetError):
        pass
    streamer.join(60)
    assert not streamer.is_alive()
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down", error
    assert s.proc.wait(timeout=30) == 0
    s.log.close()
