"""Starts the real `switchyard` binary on a free port for the end-to-end tests."""
import itertools
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


def binary() -> str:
    return os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "debug" / "switchyard"))


def free_port() -> int:
    """A port nobody listens on (for an address that must refuse connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_servers = itertools.count()


class Server:
    """The server on ports it binds itself (port 0 unless `port` is given),
    read back from its log; ready once `/health` answers 200."""

    def __init__(self, config: str | None = None, port: int | None = None, args: list[str] | None = None,
                 http: bool = True, client: dict | None = None):
        # http=False: the address comes from `args` (e.g. `--port`).
        # client: httpx options for the health check (a CA for TLS ports).
        cmd = [binary(), "serve"] + (["--http", f"127.0.0.1:{port or 0}"] if http else [])
        if config:
            cmd += ["--config", config]
        cmd += args or []
        name = f"e2e-server-{os.getpid()}-{next(_servers)}.log"
        self.log = open(Path(binary()).parent / name, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = int(self.wait_for_log(r"listening on https?://127\.0\.0\.1:(\d+)"))
        self.scheme = self.wait_for_log(r"listening on (https?)://")
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            self.check_running()
            try:
                if httpx.get(f"{self.url}/health", timeout=2, **(client or {})).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("switchyard did not become healthy within 180 s")

    def check_running(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"switchyard exited with {self.proc.returncode}; see {self.log.name}")

    def wait_for_log(self, pattern: str, timeout: float = 60) -> str:
        """The first group of the first log line matching `pattern`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, Path(self.log.name).read_text())
            if m:
                return m.group(1)
            self.check_running()
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"no log line matching {pattern!r} within {timeout} s; see {self.log.name}")

    def kill(self):
        """SIGKILL: no shutdown handlers, no flushing; what was acknowledged must survive."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


class Triton(Server):
    """A server of a Triton model repository over KServe HTTP and gRPC."""

    def __init__(self, repo: Path, *extra: str, config: str | None = None):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        args = ["--model-repository", str(repo)] if repo else []
        super().__init__(config=config, args=[*args, "--grpc", "127.0.0.1:0", *extra])
        self.grpc_port = int(self.wait_for_log(r"KServe gRPC on 127\.0\.0\.1:(\d+)"))
        self.http_url = f"127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if grpcclient.InferenceServerClient(self.grpc_url).is_server_live():
                    return
            except InferenceServerException:
                time.sleep(0.1)
        raise RuntimeError("gRPC did not come up")


def require_env(name: str, how: str) -> str:
    """An environment variable a test needs. Missing, the test is skipped with
    the reason shown, except in CI (`CI` set), where it fails: CI runs all."""
    value = os.environ.get(name)
    if value:
        return value
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not set ({how}); CI runs every test")
    pytest.skip(f"{name} is not set ({how})")


def bucket(seed: str, unit: str) -> int:
    """The server's sticky hash (GrowthBook's v2): the unit's bucket under
    `seed`, in 0..10,000; a share of p% holds the buckets below 100·p."""
    def fnv1a32(s: str) -> int:
        h = 0x811C9DC5
        for b in s.encode():
            h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
        return h
    return fnv1a32(str(fnv1a32(seed + unit))) % 10000


def wait_for(what, check, timeout=120):
    """Polls `check` until it returns something truthy, and returns that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def metric(server, name, missing=None, **labels) -> float:
    """Sum of a Prometheus series over the series whose labels include
    `labels`. A family with no such series is an error (a renamed metric must
    fail the test), unless the caller says what its absence means (`missing`:
    the value before the first event)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total, found = 0.0, False
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in want):
                total += float(line.split()[-1])
                found = True
    if not found:
        if missing is not None:
            return missing
        raise AssertionError(f"no series {name} with {labels} at {server.url}/metrics")
    return total


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def tmp_config(tmp_path):
    """Writes a config serving the default model with the given engine limits."""

    def write(**engine) -> str:
        lines = "".join(f"      {k}: {v}\n" for k, v in engine.items())
        default = (ROOT / "configs" / "default.yaml").read_text()
        head, _, _ = default.partition("    engine:\n")
        path = tmp_path / "config.yaml"
        path.write_text(head + "    engine:\n" + lines)
        return str(path)

    return write
