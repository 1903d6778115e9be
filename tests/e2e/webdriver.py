"""A small W3C WebDriver client over httpx, driving Debian's chromium
through its chromedriver (both from `apt-get install chromium
chromium-driver`): enough to open pages, read and click elements, run a
script in the page and take screenshots."""
import base64
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from conftest import free_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriverError(RuntimeError):
    pass


class Browser:
    def __init__(self):
        driver = shutil.which("chromedriver")
        browser = shutil.which("chromium")
        if not (driver and browser):
            raise WebDriverError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
        self.port = free_port()
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.time() + 30
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise WebDriverError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        r = self.http.request(method, path, json=body)
        value = r.json().get("value")
        if r.status_code >= 400:
            raise WebDriverError(f"{method} {path}: {value}")
        return value

    def _s(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self._s("POST", "/url", {"url": url})

    def find_all(self, css, within=None):
        base = f"/element/{within}" if within else ""
        found = self._s("POST", f"{base}/elements", {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def find(self, css, timeout=10):
        """The first element matching `css`, waiting for it to appear."""
        deadline = time.time() + timeout
        while True:
            found = self.find_all(css)
            if found:
                return found[0]
            if time.time() > deadline:
                raise WebDriverError(f"no element matches {css!r}")
            time.sleep(0.1)

    def text(self, element):
        return self._s("GET", f"/element/{element}/text")

    def texts(self, css):
        """The text of every element matching `css` now; a page that
        re-renders meanwhile is read again."""
        for _ in range(20):
            try:
                return [self.text(e) for e in self.find_all(css)]
            except WebDriverError as e:
                if "stale element" not in str(e):
                    raise
                time.sleep(0.05)
        raise WebDriverError(f"{css!r} kept changing while read")

    def click(self, element):
        self._s("POST", f"/element/{element}/click", {})

    def type(self, element, text):
        self._s("POST", f"/element/{element}/value", {"text": text})

    def select(self, css, value):
        self.script(f"const s = document.querySelector({css!r}); s.value = {value!r};")

    def script(self, source, *args):
        return self._s("POST", "/execute/sync", {"script": source, "args": list(args)})

    def async_script(self, source, *args):
        return self._s("POST", "/execute/async", {"script": source, "args": list(args)})

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._s("GET", "/screenshot")))

    def quit(self):
        try:
            self._s("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)
