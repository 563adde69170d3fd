"""JupyterLab in a real headless Chromium: run 06_chat, chat through the widget, watch the memory monitor.

Installs Debian's chromium if it is missing (Playwright is pointed at /usr/bin/chromium; it never downloads a
browser), starts JupyterLab on loopback with a token on a copy of the notebooks, and cleans up every process it
started. Screenshots go to test-artifacts/.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
TOKEN = "glmkit-browser-test"


def ensure_chromium() -> None:
    if not Path(CHROMIUM).exists():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ensure_chromium()
    workdir = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "06_chat.ipynb", workdir / "06_chat.ipynb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={workdir}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/status", params={"token": TOKEN}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("JupyterLab did not start")
            time.sleep(0.3)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the server and the kernels it started
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except ProcessLookupError:  # already gone
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_chat_and_monitor_widgets_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/06_chat.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            started = "[...document.querySelectorAll('.jp-InputPrompt')].some(p => /[*0-9]/.test(p.innerText))"
            for attempt in range(2):  # once, a menu click on a freshly opened lab did not start the run: retry once
                page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
                page.click("li.lm-Menu-item[data-command='runmenu:run-all'] >> nth=0")
                try:
                    page.wait_for_function(started, timeout=60_000)
                    break
                except Exception:
                    if attempt:
                        raise
            chat_input = page.wait_for_selector(".glmkit-chat-input input", timeout=240_000)
            log = page.wait_for_selector(".glmkit-chat-log", timeout=30_000)
            page.wait_for_function("document.querySelector('.glmkit-chat-log').innerText.includes('decoder layers')",
                                   timeout=240_000)  # the scripted turns of the notebook arrived
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
            assert len(grew) >= 3 and lengths[-1] > before  # the reply streamed in, piece by piece
            page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)

            monitor = page.wait_for_selector(".glmkit-monitor", timeout=60_000)
            bars = page.query_selector_all(".glmkit-monitor .glmkit-bar")
            assert bars and all(b.is_visible() for b in bars)
            status = page.locator(".glmkit-monitor .widget-html").first
            first = status.inner_text()
            page.wait_for_function("(t) => document.querySelector('.glmkit-monitor .widget-html').innerText !== t",
                                   arg=first, timeout=30_000)  # the poll thread keeps updating the page
            assert "last update" in status.inner_text()
            monitor.screenshot(path=str(ARTIFACTS / "monitor.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)  # what the page showed
            raise
        finally:
            browser.close()
