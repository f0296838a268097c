"""Notebook 02's explorer in a real JupyterLab + headless Chromium: the layer dropdown, the target-D slider (to 1 and
to Z) and every method of the toggle redraw new figures without an error (see README.md here).

Skipped, with the reason, where chromium, chromedriver, selenium or jupyterlab is missing, unless the install must
have them (SMOE_LAB_REQUIRE=browser, set by .ci/run): then it fails. Deselect with `-m "not browser"`.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared `required` helper
import required  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "explorer_screenshot.py"
SCRIPT_TIMEOUT = 600  # the script's own overall limit
TIMEOUT = SCRIPT_TIMEOUT + 90  # ours, if the script itself hangs


def _script():
    spec = importlib.util.spec_from_file_location("explorer_screenshot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only; selenium/jupyterlab are imported when used
    return mod


@pytest.mark.browser
def test_explorer_controls_redraw_in_jupyterlab(tmp_path):
    script = _script()
    missing = script.missing_requirements()
    if missing:
        required.missing("browser", "browser test needs: " + "; ".join(missing))
    out = tmp_path / "browser"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--timeout", str(SCRIPT_TIMEOUT)]
    # Own session: on a timeout the script gets SIGTERM (it then stops its server and browser), and if even that
    # hangs, the whole process group (script, JupyterLab, kernels, chromedriver, chromium) is killed.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"explorer_screenshot.py ran past {TIMEOUT} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"explorer_screenshot.py failed ({proc.returncode}):\n{log[-4000:]}"

    result = json.loads((out / "result.json").read_text())
    assert result["ok"] and result["layer_changed"]
    before, after = result["before"], result["after"]
    assert before["info"].startswith("layer 0") and after["info"].startswith("layer 1")
    assert before["selected"].startswith("MoE layer 0") and after["selected"].startswith("MoE layer 1")
    assert len(before["options"]) == 2  # the 4-block model has two MoE layers
    assert all(f"(Z={script.Z})" in o for o in before["options"])
    assert before["slider"] and "uncurl" in before["toggles"]
    assert before["drawn"] == after["drawn"] == 3
    assert all(t.startswith("Layer 0") for t in before["titles"])
    assert all(t.startswith("Layer 1") for t in after["titles"])
    from smoe_lab.reduce.methods import METHODS

    assert sorted(before["toggles"]) == sorted(METHODS)
    steps = result["steps"]
    assert [s["value"] for s in steps if s["control"] == "D"] == [1, script.Z, 3]  # both ends of the slider
    assert sorted(s["value"] for s in steps if s["control"] == "method") == sorted(METHODS)  # every method
    assert [s["control"] for s in steps].count("layout") == 1
    previous = after
    for step in steps:  # each one a redraw: three new figures, different from the last ones, no error
        st = step["state"]
        assert st["drawn"] == 3 and st["stale"] == 0 and not st["errors"], step["value"]
        assert script.ERROR_MARK not in st["info"] and st["info"].startswith("layer 1"), step["value"]
        assert [st["titles"], st["legends"]] != [previous["titles"], previous["legends"]], step["value"]
        previous = st
    mcsmoe = next(s["state"] for s in steps if s["value"] == "mcsmoe")
    assert "global budget 3 x 2 layers = 6" in mcsmoe["info"]
    for key in ("layer0", "layer1", "d1", "mcsmoe"):
        png = Path(result["screenshots"][key])
        assert png.is_file() and png.parent == out
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{png}: not a real screenshot"
