#!/usr/bin/env python
"""Open notebook 02's ipywidgets explorer in a real JupyterLab with headless Chromium, drive every control (layer,
target D to 1 and to Z, every method, the t-SNE layout) and check that each change draws new figures without error.

    .venv/bin/python tests/browser/explorer_screenshot.py --out runs/browser

What it does (see tests/browser/README.md):

1. `smoe-lab data prepare` (seconds when already done) and notebook 01 with the CI parameters but a 4-block model
   (2 MoE layers) and only the 8-expert variant, into a temporary run folder;
2. a copy of notebooks/02_clusters.ipynb parameterised by papermill without executing it (out_dir = that run,
   interactive = True, variant = "8e");
3. JupyterLab on a free 127.0.0.1 port with a random token, isolated settings (no news/update check, no
   notebook windowing) and the user's own Jupyter config left alone;
4. headless Chromium through Selenium and /usr/bin/chromedriver: Run > Run All Cells, wait for the explorer
   (layer dropdown, target-D slider, method toggle, info line, three plotly figures), screenshot, choose
   "MoE layer 1" in the dropdown, wait until the kernel has redrawn (info line "layer 1 ...", new figures titled
   "Layer 1: ..."), screenshot; then D = 1, D = Z, D = 3 through the slider's readout, a click on every method and
   on the other t-SNE layout, each followed by the same wait and a check that the figures changed and the info line
   shows no error;
5. writes <out>/result.json, shuts the server down (its kernels with it) and exits non-zero on any failure
   (with <out>/failure.png and <out>/jupyterlab.log to look at).

Needs: chromium + chromedriver (Debian: `apt-get install chromium chromium-driver`), and in the venv
`jupyterlab` (the `lab` extra) and `selenium`. Nothing is fetched from the network: plotly figures render through
the jupyterlab-plotly labextension that ships with plotly, and Selenium is given the driver and browser paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "02_clusters.ipynb"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)

# Notebook 01 with the CI parameters, but 4 blocks (MoE in blocks 0 and 2 -> 2 MoE layers), 8 experts, no dense.
Z = 8
VARIANT = f"{Z}e"
PIPELINE_YAML = f"""\
name: browser
base: ci
notebooks:
  01_pretrain:
    model_overrides: {{n_layer: 4, d_model: 64, n_head: 2, d_ff: 128}}
    variants: [{Z}]
"""
ERROR_MARK = "redraw failed"  # smoe_lab.widgets.ERROR_MARK: the info line after a redraw that raised

# JupyterLab user settings for the test server: no news / update pop-ups, every cell in the DOM (no windowing).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"checkForUpdates": False, "fetchNews": "false"},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# One DOM probe, evaluated in the page: the state of the explorer in the notebook's output area.
PROBE_JS = """
const txt = e => e.textContent.replace(/\\u00a0/g, ' ').trim();  // ipywidgets pads labels with no-break spaces
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) return {panel: false};
const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
const kname = panel.querySelector('.jp-Toolbar-kernelName');
const errors = [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .map(txt).filter(t => /Traceback|Error/.test(t));
const box = panel.querySelector('.smoe-explorer');
const sel = box ? box.querySelector('.widget-dropdown select') : null;
const info = box ? [...box.querySelectorAll('.widget-html-content')].map(txt)
  .find(t => t.startsWith('layer ')) : null;
const plots = box ? [...box.querySelectorAll('.widget-output .js-plotly-plot')] : [];
const toggles = box ? [...box.querySelectorAll('.smoe-method .widget-toggle-button')] : [];
const layouts = box ? [...box.querySelectorAll('.smoe-layout .widget-toggle-button')] : [];
const readout = box ? box.querySelector('.widget-slider .widget-readout, .widget-hslider .widget-readout') : null;
return {
  panel: true,
  kernel: ind ? ind.getAttribute('data-status') : null,
  kernel_name: kname ? txt(kname) : null,
  errors: errors,
  options: sel ? [...sel.options].map(txt) : [],
  selected: sel ? txt(sel.options[sel.selectedIndex]) : null,
  slider: box ? !!box.querySelector('.widget-slider, .widget-hslider') : false,
  slider_value: readout ? txt(readout) : null,
  toggles: toggles.map(txt),
  active: toggles.filter(b => b.classList.contains('mod-active')).map(txt),
  layouts: layouts.map(txt),
  layout: layouts.filter(b => b.classList.contains('mod-active')).map(txt),
  info: info || null,
  plots: plots.length,
  drawn: plots.filter(p => p.querySelector('.main-svg')).length,
  titles: plots.map(p => { const t = p.querySelector('.gtitle'); return t ? txt(t) : ''; }),
  legends: plots.map(p => [...p.querySelectorAll('.legendtext')].map(txt).join('|')),
  stale: (window.__oldPlots || []).filter(p => document.body.contains(p)).length,
};
"""

# Bring the explorer (controls + figures) to the top of the notebook's viewport, with a little room above it.
SCROLL_JS = """
const box = arguments[0].closest('.smoe-explorer');
box.scrollIntoView({block: 'start'});
const scroller = box.closest('.jp-WindowedPanel-outer');
if (scroller) scroller.scrollTop = Math.max(0, scroller.scrollTop - 48);
"""


def log(msg: str) -> None:
    print(f"[browser {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _which(names: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if os.access(os.environ[env], os.X_OK) else None
    return next((p for p in map(shutil.which, names) if p), None)


def find_chromium() -> str | None:
    return _which(BROWSERS, "CHROMIUM")


def find_chromedriver() -> str | None:
    return _which(DRIVERS, "CHROMEDRIVER")


def missing_requirements() -> list[str]:
    """What this script needs and cannot find, as readable reasons (empty: it can run)."""
    import importlib.util

    missing = []
    if not find_chromium():
        missing.append("no chromium binary (apt-get install chromium, or set $CHROMIUM)")
    if not find_chromedriver():
        missing.append("no chromedriver (apt-get install chromium-driver, or set $CHROMEDRIVER)")
    for mod, pkg in (("selenium", "selenium"), ("jupyterlab", "jupyterlab (the lab extra)")):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"python package {pkg} is not installed in {sys.executable}")
    return missing


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _child_env() -> dict[str, str]:
    # The notebooks' models are tiny: one thread each keeps a shared machine responsive.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run(cmd: list[str], deadline: Deadline, **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=deadline.left(), env=_child_env(), **kw)


def prepare_notebook(work: Path, deadline: Deadline) -> Path:
    """Train the 2-MoE-layer checkpoint with notebook 01 and write a parameterised, unexecuted copy of 02."""
    run_dir = work / "ci"
    pipeline = work / "browser_pipeline.yaml"
    pipeline.write_text(PIPELINE_YAML)
    smoe = [sys.executable, "-m", "smoe_lab"]
    _run([*smoe, "data", "prepare", "--recipe", "tiny"], deadline)
    _run([*smoe, "run", "--params", str(pipeline), "--out-dir", str(run_dir), "--only", "01_pretrain"], deadline)
    if not (run_dir / "pretrain" / f"{VARIANT}-s0").is_dir():
        raise RuntimeError(f"notebook 01 did not write {run_dir / 'pretrain' / f'{VARIANT}-s0'}")

    import papermill as pm

    lab_root = work / "lab"
    lab_root.mkdir()
    nb = lab_root / "02_clusters_browser.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK),
        str(nb),
        parameters={"out_dir": str(run_dir), "interactive": True, "variant": VARIANT},
        prepare_only=True,
        kernel_name="python3",
        progress_bar=False,
    )
    log(f"parameterised copy of 02: {nb}")
    return nb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """`jupyter lab` on 127.0.0.1:<free port> with a token; settings, workspaces and runtime files in `work`."""

    def __init__(self, root: Path, work: Path, log_path: Path):
        self.port = _free_port()
        self.token = os.urandom(16).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        self._auth = {"Authorization": f"token {self.token}"}
        settings = work / "lab-settings"
        for rel, value in LAB_SETTINGS.items():
            (settings / rel).parent.mkdir(parents=True, exist_ok=True)
            (settings / rel).write_text(json.dumps(value))
        env = _child_env()
        env.update(
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(work / "lab-workspaces"),
            JUPYTER_CONFIG_DIR=str(work / "jupyter-config"),
            JUPYTER_RUNTIME_DIR=str(work / "jupyter-runtime"),
        )
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={self.token}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log_file = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        log(f"starting JupyterLab on {self.url} (log: {log_path})")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=root)

    def api(self, path: str, method: str = "GET", timeout: float = 5) -> bytes:
        data = b"" if method == "POST" else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._auth)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def wait_ready(self, deadline: Deadline, limit: float = 120) -> None:
        end = time.monotonic() + min(limit, deadline.left())
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}; see {self.log_file.name}")
            try:
                self.api("/api/status", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("JupyterLab did not answer /api/status in time")

    def stop(self) -> None:
        """Shut down kernels and server through the API; SIGTERM, then SIGKILL, if it does not exit in time."""
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", method="POST", timeout=5)
            except OSError:
                pass
            for sig, wait in ((None, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log_file.close()
        log(f"JupyterLab stopped (exit {self.proc.returncode})")


def start_browser(chromium: str, chromedriver: str, profile: Path, size: tuple[int, int]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={size[0]},{size[1]}",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    # Both paths are given, so Selenium Manager (which would download drivers) is never consulted.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    # --window-size includes the (invisible) browser frame; pin the page's viewport itself.
    metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


def _wait(driver, what: str, cond, deadline: Deadline, limit: float, every: float = 0.5) -> dict:
    """Probe the page until cond(state) holds; fail early on a traceback in the notebook."""
    end = time.monotonic() + min(limit, deadline.left())
    state: dict = {}
    while time.monotonic() < end:
        state = driver.execute_script(PROBE_JS) or {}
        if state.get("errors"):
            raise RuntimeError("the notebook raised:\n" + "\n".join(state["errors"])[-3000:])
        if cond(state):
            return state
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}; last page state: {json.dumps(state)}")


def _click_menu(driver, menu: str, item: str) -> None:
    """Open a main-menu entry (e.g. Run) and click one of its items by its label (e.g. Run All Cells)."""
    from selenium.webdriver.common.by import By

    def by_label(kind: str, label: str) -> str:
        return f"//li[contains(@class,'lm-{kind}-item')][.//div[contains(@class,'lm-{kind}-itemLabel')][normalize-space()='{label}']]"  # noqa: E501

    driver.find_element(By.XPATH, by_label("MenuBar", menu)).click()
    driver.find_element(By.XPATH, "//ul[contains(@class,'lm-Menu-content')]" + by_label("Menu", item)).click()


def _remember_plots(driver, sel) -> None:
    """Mark the figures now on the page: a redraw is complete once none of them is left (`stale` == 0)."""
    driver.execute_script(
        "window.__oldPlots = [...arguments[0].closest('.smoe-explorer').querySelectorAll('.js-plotly-plot')];", sel
    )


def _signature(state: dict) -> list:
    return [state.get("titles"), state.get("legends")]


def _wait_redraw(driver, what: str, previous: dict, deadline: Deadline, cond, limit: float = 120) -> dict:
    """Wait until the explorer has redrawn: cond holds, every old figure is gone, three new ones are drawn, the
    kernel is idle; then require the figures to differ from `previous` and no error in the info line."""

    def done(s: dict) -> bool:
        if ERROR_MARK in (s.get("info") or ""):
            raise RuntimeError(f"{what}: the explorer reported an error: {s['info']}")
        return cond(s) and s.get("stale") == 0 and s.get("drawn") == 3 and s.get("kernel") == "idle"

    state = _wait(driver, what, done, deadline, limit)
    if _signature(state) == _signature(previous):
        raise RuntimeError(f"{what}: the figures did not change: {json.dumps(_signature(state))}")
    return state


def _set_slider(driver, value: int) -> None:
    """Type a value into the target-D slider's readout and press Enter (what a user can do; continuous_update is
    off, so this is one change)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    readout = driver.find_element(
        By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .smoe-explorer .widget-readout"
    )
    readout.click()
    readout.send_keys(Keys.CONTROL, "a")
    readout.send_keys(str(value), Keys.ENTER)


def _click_toggle(driver, label: str, group: str = "smoe-method") -> None:
    from selenium.webdriver.common.by import By

    buttons = driver.find_elements(
        By.CSS_SELECTOR, f".jp-NotebookPanel:not(.lm-mod-hidden) .smoe-explorer .{group} .widget-toggle-button"
    )
    match = [b for b in buttons if b.text.replace("\u00a0", " ").strip() == label]
    if not match:
        raise RuntimeError(f"no toggle button {label!r} among {[b.text for b in buttons]}")
    match[0].click()


def _screenshot(driver, sel, path: Path, result: dict, key: str) -> None:
    driver.execute_script(SCROLL_JS, sel)
    time.sleep(1.0)  # let plotly finish its resize after the scroll
    driver.save_screenshot(str(path))
    result["screenshots"][key] = str(path)
    log(f"screenshot {path}")


def drive(lab: LabServer, nb: Path, out: Path, args, deadline: Deadline) -> dict:
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    result: dict = {"screenshots": {}}
    driver = start_browser(args.chromium, args.chromedriver, nb.parent.parent / "chrome-profile", args.window)
    try:
        driver.set_page_load_timeout(120)
        t0 = time.monotonic()
        driver.get(f"{lab.url}/lab/tree/{nb.name}?reset&token={lab.token}")
        opened = _wait(
            driver,
            "the notebook to open with an idle Python kernel",
            lambda s: "Python" in (s.get("kernel_name") or "") and s.get("kernel") == "idle",
            deadline,
            180,
        )
        result["t_open_s"] = round(time.monotonic() - t0, 1)
        log(f"notebook open, kernel {opened['kernel_name']!r} idle ({result['t_open_s']} s); Run > Run All Cells")
        for attempt in range(5):  # the notebook may still re-render right after opening
            try:
                driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").click()
                _click_menu(driver, "Run", "Run All Cells")
                break
            except (StaleElementReferenceException, ElementClickInterceptedException, NoSuchElementException):
                if attempt == 4:
                    raise
                driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close a half-open menu
                time.sleep(1.0)

        t0 = time.monotonic()
        before = _wait(
            driver,
            "the explorer (layer 0, three drawn figures, kernel idle)",
            lambda s: (s.get("info") or "").startswith("layer 0") and s.get("drawn") == 3 and s.get("kernel") == "idle",
            deadline,
            args.run_timeout,
        )
        result["t_run_all_s"] = round(time.monotonic() - t0, 1)
        log(f"explorer drawn ({result['t_run_all_s']} s): {before['info']}")
        if len(before["options"]) < 2:
            raise RuntimeError(f"expected >= 2 MoE layers in the dropdown, got {before['options']}")
        sel = driver.find_element(
            By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .smoe-explorer .widget-dropdown select"
        )
        _screenshot(driver, sel, out / "explorer_layer0.png", result, "layer0")

        # Change the dropdown like a user would; remember the figures on the page to see them replaced.
        t0 = time.monotonic()
        _remember_plots(driver, sel)
        Select(sel).select_by_index(1)
        after = _wait_redraw(
            driver, "the redraw for layer 1", before, deadline,
            lambda s: (s.get("info") or "").startswith("layer 1")
            and all(t.startswith("Layer 1") for t in s.get("titles", [])),
        )  # fmt: skip
        result["t_redraw_s"] = round(time.monotonic() - t0, 1)
        log(f"redrawn ({result['t_redraw_s']} s): {after['info']}")
        _screenshot(driver, sel, out / "explorer_layer1.png", result, "layer1")

        # The target-D slider to its ends (1 and Z) and back, then every method, each a redraw of new figures.
        steps, state = [], after
        for d in (1, Z, 3):
            t0 = time.monotonic()
            _remember_plots(driver, sel)
            _set_slider(driver, d)
            state = _wait_redraw(
                driver, f"the redraw for D={d}", state, deadline,
                lambda s, d=d: f"-> D={d} with" in (s.get("info") or "") and s.get("slider_value") == str(d),
            )  # fmt: skip
            steps.append({"control": "D", "value": d, "t_s": round(time.monotonic() - t0, 1), "state": state})
            log(f"D={d} redrawn ({steps[-1]['t_s']} s): {state['info'][:120]}")
            if d == 1:
                _screenshot(driver, sel, out / "explorer_d1.png", result, "d1")
        for method in [m for m in state["toggles"] if m not in state["active"]] + state["active"]:
            t0 = time.monotonic()
            _remember_plots(driver, sel)
            _click_toggle(driver, method)
            state = _wait_redraw(
                driver, f"the redraw for method {method}", state, deadline,
                lambda s, m=method: f"with {m}" in (s.get("info") or "") and s.get("active", [None])[0] == m,
            )  # fmt: skip
            steps.append({"control": "method", "value": method, "t_s": round(time.monotonic() - t0, 1), "state": state})
            log(f"method {method} redrawn ({steps[-1]['t_s']} s): {state['info'][:120]}")
            if method == "mcsmoe":
                _screenshot(driver, sel, out / "explorer_mcsmoe.png", result, "mcsmoe")
        # The other t-SNE layout (re-embedded per D instead of fixed per layer).
        other = [x for x in state["layouts"] if x not in state["layout"]]
        if other:
            t0 = time.monotonic()
            _remember_plots(driver, sel)
            _click_toggle(driver, other[0], "smoe-layout")
            state = _wait_redraw(
                driver, f"the redraw for t-SNE layout {other[0]}", state, deadline,
                lambda s, x=other[0]: s.get("layout", [None])[0] == x,
            )  # fmt: skip
            steps.append(
                {"control": "layout", "value": other[0], "t_s": round(time.monotonic() - t0, 1), "state": state}
            )
            log(f"layout {other[0]} redrawn ({steps[-1]['t_s']} s)")
        result["steps"] = steps
        result.update(before=before, after=after)
        return result
    except BaseException:
        try:
            driver.save_screenshot(str(out / "failure.png"))
            log(f"failure screenshot: {out / 'failure.png'}")
        except Exception:  # noqa: BLE001 (best effort while failing)
            pass
        raise
    finally:
        driver.quit()


def _versions(chromium: str, chromedriver: str) -> dict[str, str]:
    from importlib.metadata import version

    def first_line(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    return {
        "chromium": first_line([chromium, "--version"]),
        "chromedriver": first_line([chromedriver, "--version"]),
        **{p: version(p) for p in ("jupyterlab", "selenium", "ipywidgets", "plotly")},
    }


def _on_sigterm(signum, frame):  # a timeout in the caller: unwind so that the server and browser are stopped
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "browser"), help="folder for the PNGs and result.json")
    p.add_argument("--work-dir", help="folder for the run, notebook copy and server state (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    p.add_argument("--timeout", type=float, default=600, help="overall limit in seconds")
    p.add_argument("--run-timeout", type=float, default=420, help="limit for Run All Cells until the explorer shows")
    p.add_argument("--window", default="1440x1000", help="browser window WIDTHxHEIGHT")
    p.add_argument("--chromium", default=None, help="browser binary (default: $CHROMIUM or chromium on PATH)")
    p.add_argument("--chromedriver", default=None, help="driver binary (default: $CHROMEDRIVER or on PATH)")
    args = p.parse_args(argv)
    args.window = tuple(int(x) for x in args.window.lower().split("x"))
    args.chromium = args.chromium or find_chromium()
    args.chromedriver = args.chromedriver or find_chromedriver()
    missing = [m for m in missing_requirements() if m.startswith("python package")]
    missing += [] if args.chromium else ["no chromium binary (apt-get install chromium, or --chromium PATH)"]
    missing += [] if args.chromedriver else ["no chromedriver (apt-get install chromium-driver, or --chromedriver)"]
    if missing:
        print("explorer_screenshot: cannot run:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)

    deadline = Deadline(args.timeout)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("explorer_layer0.png", "explorer_layer1.png", "explorer_d1.png", "explorer_mcsmoe.png", "failure.png",
                  "result.json"):  # fmt: skip
        (out / stale).unlink(missing_ok=True)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="smoe-browser-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    lab = None
    status = 1
    try:
        t0 = time.monotonic()
        nb = prepare_notebook(work, deadline)
        t_prepare = round(time.monotonic() - t0, 1)
        lab = LabServer(nb.parent, work, out / "jupyterlab.log")
        lab.wait_ready(deadline)
        result = drive(lab, nb, out, args, deadline)
        result.update(
            ok=True,
            layer_changed=result["before"]["info"].startswith("layer 0")
            and result["after"]["info"].startswith("layer 1"),
            t_prepare_s=t_prepare,
            t_total_s=round(time.monotonic() - t_all, 1),
            versions=_versions(args.chromium, args.chromedriver),
        )
        (out / "result.json").write_text(json.dumps(result, indent=2))
        log(f"ok in {result['t_total_s']} s: {out / 'result.json'}")
        status = 0 if result["layer_changed"] else 1
    except (Exception, KeyboardInterrupt) as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        (out / "result.json").write_text(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}, indent=2))
    finally:
        if lab is not None:
            lab.stop()
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
