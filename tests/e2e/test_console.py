"""The web console in headless Chromium: after a CLI walk of a version to a
canary, the routes page shows both versions with the share and the canary's
requests appear within seconds; an approval and a rollback made from the
models page change the registry (checked with the CLI), the rollback's plan
shown before it is confirmed; a viewer key sees no action, and an action
forged from the page with it is refused by the API. Each page is written to
`target/<profile>/console-screenshots/`."""
import functools
import json
import os
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Server, binary, wait_for
from test_plane import cli
from test_registry import GOOD, KEYS, model_spec, write_config
from webdriver import Browser, WebDriverError

SHOTS = Path(binary()).parent / "console-screenshots"
EXPERIMENTS = """\
experiments:
  - name: support-tone
    route: support-bot
    unit: header:x-user-id
    arms:
      - { name: concise, weight: 50, deployment: chat@1, prompt: { system: "Answer in one sentence." } }
      - { name: friendly, weight: 50, deployment: chat@1, prompt: { system: "You are warm and friendly." } }
    metrics: [latency, output_tokens]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    (tmp / "experiments.yaml").write_text(EXPERIMENTS)
    extra = (f"experiments_file: {tmp / 'experiments.yaml'}\n"
             f"model_repository:\n  path: {ROOT / 'configs' / 'model_repository'}\n")
    s = Server(write_config(tmp, extra=extra))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        b = Browser()
    except WebDriverError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    yield b
    b.quit()


def version(node, model, number):
    return json.loads(cli(node, "versions", "show", model, str(number), role="viewer"))


# The page's own waits are short: it refreshes every two seconds.
wait = functools.partial(wait_for, timeout=20)


def sign_in(b, node, role, page):
    b.get(f"{node.url}/ui/{page}")
    b.script("sessionStorage.clear()")
    b.get(f"{node.url}/ui/{page}")
    b.type(b.find("#key"), KEYS[role])
    b.click(b.find("#login button[type=submit]"))
    wait(f"{role} to be signed in", lambda: f"({role})" in "".join(b.texts("#who")))


@pytest.fixture(scope="module")
def walked(node, tmp_path_factory):
    """`chat` v1 promoted and v2 a 30% canary, walked with the CLI."""
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "model.json").write_text(json.dumps(model_spec("chat", tier="L1")))
    (tmp / "version.json").write_text(json.dumps(GOOD))
    cli(node, "models", "create", str(tmp / "model.json"))
    for _ in range(2):
        cli(node, "versions", "register", "chat", str(tmp / "version.json"))
    cli(node, "transition", "chat", "1", "offline_passed")
    cli(node, "transition", "chat", "1", "promoted")
    cli(node, "transition", "chat", "2", "offline_passed")
    cli(node, "transition", "chat", "2", "shadow")
    cli(node, "transition", "chat", "2", "canary", "--percent", "30")
    wait("v2 to serve as the canary", lambda: (version(node, "chat", 2).get("status") or {}).get("phase") == "serving",
         timeout=120)
    return node


def route_row(b, arm):
    rows = b.texts(f"[data-route=chat] tr[data-arm={arm}]")
    return rows[0] if rows else ""


def test_the_routes_page_shows_the_canary_and_its_requests_live(walked, browser):
    b, node = browser, walked
    sign_in(b, node, "deployer", "routes")
    wait("the route with both versions", lambda: "30%" in route_row(b, "canary") and "70%" in route_row(b, "primary"))
    assert route_row(b, "canary").split()[:3] == ["canary", "2", "30%"]
    assert route_row(b, "primary").split()[:3] == ["primary", "1", "70%"]
    before = route_row(b, "canary").split()[3]
    assert before in ("0", "—")
    for i in range(40):
        r = httpx.post(f"{node.url}/v1/completions", timeout=60,
                       json={"model": "chat", "prompt": "Hi", "max_tokens": 1, "user": f"user-{i}"})
        assert r.status_code == 200, r.text
    # The page refreshes on its own: the canary's requests show within seconds.
    wait("the canary's requests on the page", lambda: int(route_row(b, "canary").split()[3]) > 0, timeout=8)
    assert b.find_all("[data-route=chat] svg.chart")
    b.screenshot(SHOTS / "routes.png")


def test_approve_and_roll_back_from_the_models_page(walked, browser):
    b, node = browser, walked
    sign_in(b, node, "approver", "models")
    v2 = b.find("[data-model=chat] tr[data-version='2']")
    # An approver may approve, and is offered nothing else.
    assert not b.find_all("[data-model=chat] [data-action=rollback]")
    assert not b.find_all("[data-model=chat] tr[data-version='2'] [data-action=transition]")
    b.select("[data-model=chat] tr[data-version='2'] [data-action=approve-target]", "promoted")
    b.click(b.find_all("[data-action=approve]", within=v2)[0])
    wait("the approval in the registry",
         lambda: any(a["target"] == "promoted" and a["by"] == "approver-user"
                     for a in version(node, "chat", 2)["approvals"]))
    b.screenshot(SHOTS / "models-approver.png")

    sign_in(b, node, "deployer", "models")
    b.click(b.find("[data-model=chat] [data-action=rollback]"))
    # The plan is shown before anything happens.
    dialog = b.find("#confirm[open]")
    plan = b.text(b.find("#confirm-body"))
    assert "roll back version(s) 2" in plan and "serving afterwards: 1" in plan, plan
    assert version(node, "chat", 2)["state"] == "canary"
    b.screenshot(SHOTS / "rollback-plan.png")
    b.click(b.find("#confirm-ok"))
    wait("v2 rolled back", lambda: version(node, "chat", 2)["state"] == "rolled_back")
    assert dialog
    wait("the page to show it", lambda: "rolled_back" in "".join(b.texts("[data-model=chat] tr[data-version='2']")))
    b.screenshot(SHOTS / "models.png")


def test_a_viewer_sees_no_action_and_a_forged_one_is_refused(walked, browser):
    b, node = browser, walked
    sign_in(b, node, "viewer", "models")
    b.find("[data-model=chat] tr[data-version='1']")
    assert b.find_all(".action") == []
    status = b.async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/v1/registry/models/chat/versions/1/transitions', {method: 'POST',
              headers: {'content-type': 'application/json',
                        Authorization: 'Bearer ' + sessionStorage.getItem('switchyard-key')},
              body: JSON.stringify({to: 'deprecated'})}).then(r => done(r.status));""")
    assert status == 403
    assert version(node, "chat", 1)["state"] == "promoted"
    b.screenshot(SHOTS / "models-viewer.png")


def test_audit_experiments_and_triton_pages(walked, browser):
    b, node = browser, walked
    sign_in(b, node, "viewer", "audit")
    verify = wait("the verification", lambda: b.texts("[data-field=verify]"))
    assert "verifies" in verify[0]
    b.type(b.find("#audit-model"), "chat")
    b.type(b.find("#audit-action"), "rollback")
    b.click(b.find("#audit-filter button"))
    wait("the rollback entry alone", lambda: (rows := b.texts("#audit tbody tr"))
         and all("rollback" in r for r in rows))
    b.screenshot(SHOTS / "audit.png")

    for i in range(6):
        r = httpx.post(f"{node.url}/v1/chat/completions", headers={"x-user-id": f"user-{i}"}, timeout=60,
                       json={"model": "support-bot", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
    b.get(f"{node.url}/ui/experiments")
    wait("both arms with their samples", lambda: sum(
        int(t) for t in b.texts("[data-experiment=support-tone] [data-field=requests]")) == 6)
    assert b.find_all("[data-experiment=support-tone] [data-field=enough_data]")
    b.screenshot(SHOTS / "experiments.png")

    for _ in range(3):
        r = httpx.post(f"{node.url}/v2/models/iris_xgb/infer", json={"inputs": [
            {"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})
        assert r.status_code == 200, r.text
    b.get(f"{node.url}/ui/triton")
    b.find("#triton tr[data-model=iris_xgb]")
    assert "READY" in b.texts("#triton tr[data-model=iris_xgb]")[0]
    wait("the batch-size histogram", lambda: b.find_all("#triton svg.chart"))
    b.screenshot(SHOTS / "triton.png")
    assert all((SHOTS / f).stat().st_size > 10_000 for f in ["routes.png", "models.png", "audit.png",
                                                             "experiments.png", "triton.png"])
