"""The course in a real browser: JupyterLab on 127.0.0.1, driven in headless Chromium by Playwright.

Opens the solution of notebook 00 and one learner notebook and runs all cells from the Run
menu. Then it checks that three outputs render: the tqdm progress bar as an ipywidgets widget,
a matplotlib plot as an image, and a checker's Traditional Chinese message drawn with a real
CJK font. Screenshots go to ``test-artifacts/browser/``.

Chromium comes from the system (Debian: ``apt-get install chromium chromium-driver``), not from
``playwright install``. Without it the test skips, except when the ``CI`` environment
variable is set, where a missing browser is a failure. ``COURSE_CHROMIUM`` overrides the
browser path and ``COURSE_BROWSER_LEARNER_NOTEBOOK`` the learner notebook (a path relative
to the repository, default ``notebooks/00_setup_and_data_tour.ipynb``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest

pytestmark = pytest.mark.browser

REPO_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_DIR / "test-artifacts" / "browser"
CHROMIUM_PATH = os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SOLUTION_NOTEBOOK = "solutions/00_setup_and_data_tour.ipynb"
LEARNER_NOTEBOOK = os.environ.get("COURSE_BROWSER_LEARNER_NOTEBOOK", "notebooks/00_setup_and_data_tour.ipynb")

SERVER_START_TIMEOUT_S = 120
# Notebook 00 in the ci profile should take at most 90 s on a quiet two-core machine. The rest
# is slack for a loaded machine and for rendering in the browser.
RUN_ALL_TIMEOUT_S = 900
KERNEL_READY_TIMEOUT_S = 120


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` on a learner's machine; fail in CI, where the browser test must run."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser test must run)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_settings(settings_dir: Path) -> None:
    """Render every cell into the DOM (the default windowing skips off-screen cells) and never fetch news."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    }
    for relative, content in files.items():
        path = settings_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


def api_get(base_url: str, token: str, path: str):
    request = urllib.request.Request(f"{base_url}{path}", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stop_process_tree(process: subprocess.Popen, tracked: dict[int, float]) -> None:
    """Stop the server we started, then any kernel it left behind (kernels run in their own sessions)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    leftovers = []
    for pid, created in tracked.items():
        try:
            candidate = psutil.Process(pid)
            if abs(candidate.create_time() - created) < 1e-3:
                leftovers.append(candidate)
        except psutil.Error:
            continue
    for leftover in leftovers:
        try:
            leftover.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=5)


def track_descendants(pid: int, tracked: dict[int, float]) -> None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            tracked.setdefault(child.pid, child.create_time())
    except psutil.Error:
        pass


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a temporary copy of notebooks/ and solutions/."""
    root = tmp_path_factory.mktemp("lab-root")
    ignore = shutil.ignore_patterns(".ipynb_checkpoints")
    for folder in ("solutions", "notebooks"):
        if (REPO_DIR / folder).is_dir():
            shutil.copytree(REPO_DIR / folder, root / folder, ignore=ignore)
    if not (root / SOLUTION_NOTEBOOK).exists():
        pytest.fail(f"{SOLUTION_NOTEBOOK} is missing from the repository; the browser test opens it.")
    if not (root / LEARNER_NOTEBOOK).exists():
        # notebooks/ is generated; build the learner version here when it has not been built yet.
        from course_utils.exercises import build_learner_notebook, render

        solution_path = REPO_DIR / "solutions" / Path(LEARNER_NOTEBOOK).name
        if not solution_path.exists():
            pytest.fail(f"neither {LEARNER_NOTEBOOK} nor its solution {solution_path} exists.")
        learner = build_learner_notebook(nbformat.read(solution_path, as_version=4), name=solution_path.name)
        (root / LEARNER_NOTEBOOK).parent.mkdir(parents=True, exist_ok=True)
        (root / LEARNER_NOTEBOOK).write_text(render(learner), encoding="utf-8")

    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    write_settings(jupyter_dir / "settings")
    env = dict(os.environ)
    env.update(
        COURSE_PROFILE="ci",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH", "")])),
        JUPYTERLAB_SETTINGS_DIR=str(jupyter_dir / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(jupyter_dir / "workspaces"),
        JUPYTER_RUNTIME_DIR=str(jupyter_dir / "runtime"),
        JUPYTER_CONFIG_DIR=str(jupyter_dir / "config"),
    )
    # The kernel must draw inline plots, so no MPLBACKEND=Agg here.
    env.pop("MPLBACKEND", None)

    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--ServerApp.port_retries=0",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log_path = jupyter_dir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    tracked: dict[int, float] = {}
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                api_get(base_url, token, "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"base_url": base_url, "token": token, "root": root, "process": process, "tracked": tracked, "log": log_path}
    finally:
        track_descendants(process.pid, tracked)
        stop_process_tree(process, tracked)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    require(Path(CHROMIUM_PATH).exists(), f"Chromium not found at {CHROMIUM_PATH}; install it (Debian: apt-get install chromium chromium-driver) or set COURSE_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the Python package playwright is not installed; pip install playwright")
    user_data_dir = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        # Playwright rejects --user-data-dir in args; a persistent context takes the same fresh folder.
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=CHROMIUM_PATH, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def wait_until(condition, timeout_s: float, description: str, interval_s: float = 1.0, on_timeout=None):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {description}. {detail}")
        time.sleep(interval_s)


def kernel_state(server, notebook: str) -> str | None:
    """Return the execution state of the kernel attached to ``notebook``, or None before it exists."""
    for session in api_get(server["base_url"], server["token"], "/api/sessions"):
        if session.get("path") == notebook and session.get("kernel"):
            return session["kernel"]["execution_state"]
    return None


def shut_down_kernel(server, notebook: str) -> None:
    for session in api_get(server["base_url"], server["token"], "/api/sessions"):
        if session.get("path") == notebook:
            request = urllib.request.Request(f"{server['base_url']}/api/sessions/{session['id']}", method="DELETE",
                                             headers={"Authorization": f"token {server['token']}"})
            urllib.request.urlopen(request, timeout=30).close()


def prompt_summary(panel) -> dict[str, int]:
    """Count code cells, and how many of them show a finished prompt ``[n]:`` or a running one ``[*]:``."""
    return panel.evaluate(
        """(notebook) => {
            const prompts = [...notebook.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
            return {
                cells: prompts.length,
                done: prompts.filter(p => /^\\[\\d+\\]:?$/.test(p)).length,
                running: prompts.filter(p => p.includes('*')).length,
            };
        }"""
    )


def open_and_run_all(page, server, notebook: str, screenshot_prefix: str):
    """Open ``notebook`` in JupyterLab, run all cells from the Run menu, wait until every cell finished.

    Returns the locator of the notebook's panel. Each notebook gets its own new workspace, so
    JupyterLab does not reopen the tabs of an earlier test.
    """
    workspace = f"{screenshot_prefix}-{secrets.token_hex(4)}"
    page.goto(f"{server['base_url']}/lab/workspaces/{workspace}/tree/{notebook}?token={server['token']}",
              wait_until="domcontentloaded")
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-Cell").first.wait_for(timeout=KERNEL_READY_TIMEOUT_S * 1000)
    assert panel.count() == 1, f"expected one visible notebook, found {panel.count()}"
    wait_until(lambda: kernel_state(server, notebook) == "idle", KERNEL_READY_TIMEOUT_S, f"the kernel of {notebook} to start")

    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

    def finished():
        summary = prompt_summary(panel)
        return summary["cells"] and summary["done"] == summary["cells"] and kernel_state(server, notebook) == "idle"

    def progress():
        page.screenshot(path=str(ARTIFACTS_DIR / f"{screenshot_prefix}_timeout.png"))
        return f"prompts: {prompt_summary(panel)}; kernel: {kernel_state(server, notebook)}"

    wait_until(finished, RUN_ALL_TIMEOUT_S, f"all cells of {notebook} to finish", interval_s=2.0, on_timeout=progress)
    page.screenshot(path=str(ARTIFACTS_DIR / f"{screenshot_prefix}_page.png"))
    return panel


def traceback_outputs(panel) -> list[str]:
    return panel.locator('.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]').all_inner_texts()


def check_progress_widget(panel, prefix: str) -> None:
    widgets = panel.locator(".jp-OutputArea-output .widget-hprogress")
    assert widgets.count() >= 1, "no ipywidgets progress bar rendered (is ipywidgets installed in the kernel?)"
    assert panel.get_by_text("HBox(children=").count() == 0, "a widget rendered as its text fallback HBox(children=...)"
    bar = widgets.first
    bar.scroll_into_view_if_needed()
    assert bar.is_visible()
    bar.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')][1]").screenshot(
        path=str(ARTIFACTS_DIR / f"{prefix}_progress_bar.png"))


def check_plot(panel, prefix: str) -> None:
    images = panel.locator(".jp-OutputArea-output img")
    assert images.count() >= 1, "no image output: the matplotlib plot did not render"
    widths = images.evaluate_all("imgs => imgs.map(img => img.naturalWidth)")
    assert max(widths) > 100, f"image outputs have no content (natural widths {widths})"
    first = images.first
    first.scroll_into_view_if_needed()
    first.screenshot(path=str(ARTIFACTS_DIR / f"{prefix}_plot.png"))


def check_checker_message(panel, text: str, prefix: str) -> None:
    message = panel.locator(".jp-OutputArea-output", has_text="練習「").filter(has_text=text)
    assert message.count() >= 1, f"no checker message containing {text!r} rendered"
    message.first.scroll_into_view_if_needed()
    message.first.screenshot(path=str(ARTIFACTS_DIR / f"{prefix}_checker.png"))


def check_glyphs_render(panel, text: str) -> None:
    """Fail when the browser draws ``text`` with the missing-glyph box (no CJK font installed).

    Two different characters drawn with the notebook's font must give different pixels; with
    no font for them, both come out as the same placeholder box.
    """
    distinct = panel.evaluate(
        """(notebook, text) => {
            const family = getComputedStyle(notebook.querySelector('.jp-OutputArea-output pre') || notebook).fontFamily;
            const canvas = document.createElement('canvas');
            canvas.width = 64;
            canvas.height = 64;
            const context = canvas.getContext('2d');
            const draw = (character) => {
                context.clearRect(0, 0, 64, 64);
                context.font = `48px ${family}`;
                context.fillText(character, 4, 52);
                return context.getImageData(0, 0, 64, 64).data.join(',');
            };
            const drawings = [...text].map(draw);
            return new Set(drawings).size === drawings.length;
        }""",
        text,
    )
    assert distinct, (f"the characters of {text!r} render as identical placeholder boxes: no CJK font is installed "
                      "(Debian: apt-get install fonts-noto-cjk)")


def test_solution_notebook_renders(browser_context, lab_server):
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    prefix = "solution_" + Path(SOLUTION_NOTEBOOK).stem
    page = browser_context.new_page()
    try:
        panel = open_and_run_all(page, lab_server, SOLUTION_NOTEBOOK, prefix)
        assert traceback_outputs(panel) == [], "a cell raised an exception"
        check_progress_widget(panel, prefix)
        check_plot(panel, prefix)
        check_checker_message(panel, "通過", prefix)
        check_glyphs_render(panel, "通過練習")
    finally:
        track_descendants(lab_server["process"].pid, lab_server["tracked"])
        page.close()
        shut_down_kernel(lab_server, SOLUTION_NOTEBOOK)


def test_learner_notebook_renders(browser_context, lab_server):
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    prefix = "learner_" + Path(LEARNER_NOTEBOOK).stem
    page = browser_context.new_page()
    try:
        panel = open_and_run_all(page, lab_server, LEARNER_NOTEBOOK, prefix)
        # A learner notebook runs to the end with every exercise still a stub.
        assert traceback_outputs(panel) == [], "a cell raised an exception in the learner notebook"
        check_checker_message(panel, "尚未實作", prefix)
        check_progress_widget(panel, prefix)
        check_plot(panel, prefix)
        check_glyphs_render(panel, "尚未實作")
    finally:
        track_descendants(lab_server["process"].pid, lab_server["tracked"])
        page.close()
        shut_down_kernel(lab_server, LEARNER_NOTEBOOK)
