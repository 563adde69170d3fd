"""JupyterLab in a real headless Chromium: run 06_chat, chat through the widget, watch the memory monitor.

Needs Debian's chromium at /usr/bin/chromium (``make test`` installs it, or says the one command to run; Playwright
is pointed at it and never downloads a browser). JupyterLab runs on loopback with a token on a copy of the notebook
whose outputs and execution counts are cleared, so "Run All started" is seen from prompts that change, never from
committed ones, and which is signed (trusted). The kernel is started through the REST API; the page must show it
connected and idle, and the notebook trusted, before anything runs. A "Select Kernel" dialog, should one appear, is
answered with the notebook's own kernel. Every wait names what it waited for; a failure saves
test-artifacts/failure.png and says why. Every process started here is ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest
from nbformat.sign import NotebookNotary

from glmkit.parallel import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
INSTALL = "sudo apt-get install --no-install-recommends chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
TOKEN = "glmkit-browser-test"
NOTEBOOK = "06_chat.ipynb"
SLOW = 300  # seconds: a cold kernel importing torch + transformers on 2 busy cores takes a while

# JavaScript read through window.jupyterapp (JupyterLab started with expose_app_in_browser)
NOTEBOOK_STATE = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    if (!w || !w.sessionContext || !w.content) return 'the notebook is not open yet';
    if (!w.context.isReady) return 'the notebook file is still loading';
    const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
    if (!kernel) return 'the notebook has no kernel yet';
    if (kernel.connectionStatus !== 'connected') return 'kernel connection: ' + kernel.connectionStatus;
    if ([...w.content.model.cells].some(c => c.type === 'code' && !c.trusted)) return 'the notebook is not trusted';
    return 'kernel ' + kernel.status;
}"""
CELL_ERRORS = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const errors = [];
    if (!w || !w.content || !w.content.model) return errors;
    for (const cell of w.content.model.cells) {
        if (cell.type !== 'code') continue;
        for (const out of cell.outputs.toJSON())
            if (out.output_type === 'error') errors.push(out.ename + ': ' + out.evalue);
    }
    return errors;
}"""
RUN_STARTED = "() => [...document.querySelectorAll('.jp-InputPrompt')].some(p => /[*0-9]/.test(p.innerText))"
DIALOG = "() => { const d = document.querySelector('.jp-Dialog'); return d ? d.innerText : ''; }"


def require_chromium() -> None:
    """Fail (never skip) with the one command that installs the browser."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Debian's chromium at {CHROMIUM}; install it with:\n    {INSTALL}\n"
                    "(make test does this itself when run as root)", pytrace=False)


def fresh_copy(source: Path, dest: Path) -> None:
    """The notebook without outputs or execution counts, with its kernel named (no kernel to pick), signed."""
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookNotary().sign(nb)  # trusted, as `jupyter trust` does (the test's own JUPYTER_DATA_DIR)
    nbformat.write(nb, dest)


def wait_until(check, what: str, timeout: float, interval: float = 0.5):
    """Poll ``check()`` until it returns something truthy; raise naming ``what`` and the last state otherwise."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def start_kernel(url: str) -> str:
    """A session for the notebook with the python3 kernel, before the page opens (so no kernel is asked for)."""
    api = httpx.Client(base_url=url, params={"token": TOKEN}, timeout=60)
    body = {"path": NOTEBOOK, "name": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}}
    kernel_id = api.post("/api/sessions", json=body).raise_for_status().json()["kernel"]["id"]
    state = api.get(f"/api/kernels/{kernel_id}").raise_for_status().json().get("execution_state")
    assert state != "dead", "the python3 kernel died as it started; see jupyterlab.log"
    return kernel_id


def stop(proc: subprocess.Popen) -> None:
    """End the server and the kernels it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:  # already gone
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[str]:
    require_chromium()
    workdir = tmp_path_factory.mktemp("lab")
    (workdir / "root").mkdir()  # what the lab shows; its settings and log stay beside it
    fresh_copy(ROOT / "notebooks" / NOTEBOOK, workdir / "root" / NOTEBOOK)
    settings = workdir / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get notified about Jupyter news?" toast over the page
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = open(workdir / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={workdir / 'root'}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={workdir / 'user-settings'}", f"--LabApp.workspaces_dir={workdir / 'workspaces'}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with code {proc.returncode}; see {workdir / 'jupyterlab.log'}")
        try:
            return httpx.get(f"{url}/api/status", params={"token": TOKEN}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, "JupyterLab did not answer /api/status", 120, 0.3)
        start_kernel(url)
        yield url
    finally:
        stop(proc)
        log.close()


def open_ready_notebook(page, url: str) -> None:
    """Open the notebook and wait until its kernel is connected and idle, answering a kernel dialog if one shows."""
    page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={TOKEN}")
    page.wait_for_selector(".jp-Notebook", timeout=SLOW * 1000)
    state = {"last": ""}

    def ready() -> bool:
        dialog = page.evaluate(DIALOG)
        if dialog:  # e.g. "Select Kernel" on a cold start: keep the preselected (the notebook's) kernel
            state["last"] = f"a dialog is open: {dialog[:200]!r}"
            page.click(".jp-Dialog .jp-mod-accept")
            return False
        state["last"] = page.evaluate(NOTEBOOK_STATE)
        return state["last"] == "kernel idle"

    try:
        wait_until(ready, "the notebook's kernel did not become connected and idle", SLOW)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (last seen: {state['last']})") from None


def run_all(page) -> None:
    """Run All, and see it start: a cleared prompt turns into [*] or [1]. Asked again once if it did not."""
    for attempt in range(2):
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        try:
            wait_until(lambda: page.evaluate(RUN_STARTED), "Run All did not start", 60)
            return
        except AssertionError:
            if attempt:
                raise AssertionError("Run All did not start: no input prompt changed from [ ] within 60 s, twice "
                                     f"(kernel state: {page.evaluate(NOTEBOOK_STATE)})") from None


def wait_for_widget(page, selector: str, timeout: float) -> None:
    """Wait for ``selector`` while the notebook runs; stop at once when a cell raised."""

    def found() -> bool:
        errors = page.evaluate(CELL_ERRORS)
        if errors:
            raise AssertionError(f"a notebook cell failed before {selector} appeared: {errors}")
        return page.query_selector(selector) is not None

    wait_until(found, f"{selector} did not appear (kernel: {page.evaluate(NOTEBOOK_STATE)})", timeout)


def test_chat_and_monitor_widgets_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            open_ready_notebook(page, lab)
            run_all(page)
            wait_for_widget(page, ".glmkit-chat-input input", SLOW)
            chat_input = page.query_selector(".glmkit-chat-input input")
            log = page.wait_for_selector(".glmkit-chat-log", timeout=30_000)
            page.wait_for_function("document.querySelector('.glmkit-chat-log').innerText.includes('decoder layers')",
                                   timeout=SLOW * 1000)  # the scripted turns of the notebook arrived
            page.evaluate("""() => {
                window.__lens = [];
                const log = document.querySelector('.glmkit-chat-log');
                new MutationObserver(() => window.__lens.push(log.innerText.length))
                    .observe(log, {childList: true, subtree: true, characterData: true});
            }""")
            before = len(log.inner_text())
            chat_input.fill("What does 4-bit quantization save?")
            chat_input.press("Enter")
            page.wait_for_function("document.querySelector('.glmkit-chat-log').innerText.includes('NF4 stores')",
                                   timeout=120_000)
            page.wait_for_function("document.querySelector('.glmkit-chat-status').innerText.includes('tok/s')")
            lengths = page.evaluate("window.__lens")
            grew = [b for a, b in zip(lengths, lengths[1:]) if b > a]
            assert len(grew) >= 3 and lengths[-1] > before, f"the reply did not stream in pieces: {lengths}"
            page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)

            wait_for_widget(page, ".glmkit-monitor", 120)
            monitor = page.query_selector(".glmkit-monitor")
            bars = page.query_selector_all(".glmkit-monitor .glmkit-bar")
            assert bars and all(b.is_visible() for b in bars), "the memory monitor shows no bars"
            status = page.locator(".glmkit-monitor .widget-html").first
            first = status.inner_text()
            page.wait_for_function("(t) => document.querySelector('.glmkit-monitor .widget-html').innerText !== t",
                                   arg=first, timeout=30_000)  # the poll thread keeps updating the page
            assert "last update" in status.inner_text()
            monitor.screenshot(path=str(ARTIFACTS / "monitor.png"))
        except Exception as exc:
            shot = ARTIFACTS / "failure.png"
            page.screenshot(path=str(shot), full_page=True)  # what the page showed
            raise AssertionError(f"{exc}\n(screenshot of the page: {shot})") from exc
        finally:
            browser.close()
