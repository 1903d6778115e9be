"""Starts the real `switchyard` binary on a free port for the end-to-end tests."""
import os
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: str | None = None, port: int | None = None, args: list[str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [binary(), "serve", "--http", f"127.0.0.1:{self.port}"]
        if config:
            cmd += ["--config", config]
        cmd += args or []
        self.log = open(Path(binary()).parent / f"e2e-server-{self.port}.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"switchyard exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("switchyard did not become healthy within 180 s")

    def kill(self):
        """SIGKILL: no shutdown handlers, no flushing; what was acknowledged must survive."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Triton(Server):
    """A server of a Triton model repository over KServe HTTP and gRPC."""

    def __init__(self, repo: Path, *extra: str, config: str | None = None, grpc_port: int | None = None):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.grpc_port = grpc_port or free_port()
        args = ["--model-repository", str(repo)] if repo else []
        super().__init__(config=config, args=[*args, "--grpc", f"127.0.0.1:{self.grpc_port}", *extra])
        self.http_url = f"127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if grpcclient.InferenceServerClient(self.grpc_url).is_server_live():
                    return
            except InferenceServerException:
                time.sleep(0.2)
        raise RuntimeError("gRPC did not come up")


def wait_for(what, check, timeout=120):
    """Polls `check` until it returns something truthy, and returns that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def metric(server, name, **labels) -> float:
    """Sum of a Prometheus series over the series whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in want):
                total += float(line.split()[-1])
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
