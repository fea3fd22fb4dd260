"""The ComfyUI frontend (headless Debian Chromium via Playwright) loads every workflow file of the pack."""
from __future__ import annotations

import json
import os

import pytest

from comfy_host import REPO, ComfyServer, ade_path, make_base_dir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Written under out/ (never a tracked file); copy it to docs/img/ to refresh the README's picture.
SCREENSHOT = REPO / "out" / "screenshots" / "qvd_core_workflow.png"
LOAD_WORKFLOW = """async (wf) => {
    await window.app.loadGraphData(wf);
    const registered = window.LiteGraph.registered_node_types;
    const missing = [...new Set(wf.nodes.map(n => n.type).filter(t => !registered[t]))];
    const loaded = window.app.graph._nodes.length;
    const prompt = missing.length ? null : (await window.app.graphToPrompt()).output;
    return {missing, loaded, prompt};
}"""


@pytest.fixture(scope="module")
def frontend_server(request, tmp_path_factory, sd15_checkpoint):
    """A server with AnimateDiff-Evolved when it is available (then no workflow may miss a node), else the
    shared one."""
    ade = ade_path()
    if ade is None:
        yield request.getfixturevalue("comfy_server")
        return
    server = ComfyServer(make_base_dir(tmp_path_factory.mktemp("comfy_frontend"), sd15_checkpoint, ade=ade))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_frontend_loads_every_workflow_without_missing_nodes(frontend_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed by `make host`")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} missing: `make host` installs Debian's chromium")
    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert len(workflows) == 9
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1000})
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(frontend_server.url, timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                                   "window.LiteGraph.registered_node_types['QVDCalibrate']", timeout=120_000)
            ade_missing = []
            for path in workflows:
                wf = json.loads(path.read_text())
                result = page.evaluate(LOAD_WORKFLOW, wf)
                assert result["loaded"] == len(wf["nodes"]), path.name
                if result["missing"]:
                    # Only AnimateDiff-Evolved's nodes may be absent, and only when ADE is not installed.
                    assert ade_path() is None, (path.name, result["missing"])
                    assert all(t.startswith("ADE_") for t in result["missing"]), (path.name, result["missing"])
                    ade_missing.append(path.name)
                    continue
                twin = json.loads((REPO / "workflows" / "api" / path.name).read_text())
                got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()}
                assert got == twin, f"{path.name}: the frontend's prompt differs from api/{path.name}"
                if path.name.startswith("qvd_core"):
                    for _ in range(3):  # close the first-run templates and missing-node dialogs
                        page.keyboard.press("Escape")
                    page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove())")
                    page.evaluate("() => { const ds = window.app.canvas.ds; ds.scale = 0.7; ds.offset = [40, 220];"
                                  " window.app.canvas.setDirty(true, true); }")
                    page.wait_for_timeout(1000)
                    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(SCREENSHOT))
            assert not page_errors, page_errors
        finally:
            browser.close()
    if ade_missing:
        print(f"AnimateDiff-Evolved not installed: ADE node types missing in {ade_missing} (expected)")
    assert SCREENSHOT.is_file()
