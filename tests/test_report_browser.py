"""The Snakemake HTML report, opened in headless Chromium as a reader would open it.

`snakemake --report report.html` (Snakemake 9) writes one self-contained HTML file: a React app
whose figures are embedded as data URIs in its `results` object (a `.zip` target would give a folder
instead). A small script evaluated in the loaded page walks the app the way its buttons do
(for each result: the result shown in the main view, then its info panel) and records
whether the image decoded (natural size > 0) and what the page then shows. It talks to Chromium
over the DevTools protocol (--remote-debugging-pipe, no extra package), and takes a screenshot of
the last figure with its caption, kept with the check's JSON under `results/planted-ioi-ci/browser/`.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ioi.labels import model_label
from ioi.registry import FIGURES
from system_packages import ensure

REPO = Path(__file__).resolve().parents[1]
CI_RESULTS = REPO / "results" / "planted-ioi-ci"
ARTEFACTS = CI_RESULTS / "browser"
# reStructuredText escapes (ioi captions are plain text; the report's caption template escapes them)
RST_ESCAPES = ("\\_", "\\|", "\\*", "\\`", "\\\\")

# Run in the page once it has loaded: for each result, what the report's buttons do (the result in
# the main view, then its info panel with the caption), and what the page then shows.
CHECK_SCRIPT = r"""
(async () => {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const out = {};
  for (let i = 0; i < 100 && typeof app === "undefined"; i++) await sleep(100);
  for (const [path, result] of Object.entries(results)) {
    app.setView({content: "img", contentPath: result.data_uri, resultPath: path});
    let img;
    for (let i = 0; i < 100 && !img; i++) {
      await sleep(20);
      img = [...document.querySelectorAll("#app img")].find((x) => x.getAttribute("src") === result.data_uri);
    }
    if (img) { try { await img.decode(); } catch (err) {} }
    app.showResultInfo(path);
    for (let i = 0; i < 100 && !document.body.innerText.includes(path.split("/").pop()); i++) await sleep(20);
    await sleep(50);
    out[path] = {mime: result.mime_type, shown: !!img, width: img ? img.naturalWidth : 0,
                 height: img ? img.naturalHeight : 0, page_text: document.body.innerText};
  }
  return JSON.stringify(out);
})()
"""


class DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; messages are
    JSON terminated by NUL): enough to load a page, evaluate a script and take a screenshot."""

    def __init__(self, chromium: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def plumb():
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--allow-file-access-from-files", "--remote-debugging-pipe",
             "--window-size=1600,1100", "about:blank"],
            preexec_fn=plumb, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session = None
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], 180)
            if not ready:
                raise TimeoutError("Chromium did not answer within 180 s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def wait_for(self, event: str) -> None:
        while self._read().get("method") != event:
            pass

    def close(self) -> None:
        try:
            self.session = None
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _chromium() -> str:
    reason = ensure("chromium")
    if reason:
        pytest.skip(reason)
    return shutil.which("chromium") or "/usr/bin/chromium"


def _plain(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_report_renders_every_figure_and_caption_in_chromium(repo_workflow, tmp_path):
    chromium = _chromium()
    report = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "config/offline.yaml",
                           "config/ci.yaml", "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "</body>" in report.read_text(), "Snakemake 9 should write one self-contained HTML file"
    browser = DevTools(chromium)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=report.as_uri())
        browser.wait_for("Page.loadEventFired")
        value = browser.call("Runtime.evaluate", expression=CHECK_SCRIPT, awaitPromise=True,
                             returnByValue=True, timeout=170_000)
        assert "exceptionDetails" not in value, value.get("exceptionDetails")
        checked = json.loads(value["result"]["value"])
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
    finally:
        browser.close()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "report.png").write_bytes(base64.b64decode(shot))
    (ARTEFACTS / "report_check.json").write_text(json.dumps(
        {path: {k: v for k, v in row.items() if k != "page_text"} for path, row in checked.items()}, indent=1))

    for name, spec in FIGURES.items():
        path = f"figures/planted-ioi-ci/{name}.png"
        assert path in checked, f"{path} is not in the report"
        row = checked[path]
        assert row["mime"] == "image/png" and row["shown"], (name, row["mime"], row["shown"])
        assert row["width"] > 100 and row["height"] > 100, f"{name}: broken image ({row['width']}x{row['height']})"
        page_text = _plain(row["page_text"])
        caption_start = _plain(spec.caption)[:60]
        assert caption_start in page_text, f"{name}: caption not shown ({caption_start!r})"
        for error in ("System Message", "(ERROR/", "(WARNING/", "Unknown target name", "Inline emphasis"):
            assert error not in page_text, f"{name}: reStructuredText error in the page: {error}"
        # the caption's model line names the model as the figure titles do, never the spec or a path
        meta = json.loads((CI_RESULTS / spec.experiment / "meta.json").read_text())
        assert f"Model: {model_label(meta)}." in page_text, f"{name}: caption's model line"
        # the info panel's "Job parameters" show the caption as written, without rst escapes
        heading = row["page_text"].lower().find("job parameters")  # the heading is upper-cased by CSS
        assert heading >= 0, f"{name}: no Job parameters panel"
        params = row["page_text"][heading + len("job parameters"):]
        assert f"caption={_plain(spec.caption)}" in _plain(params), f"{name}: caption in Job parameters"
        escapes = [escape for escape in RST_ESCAPES if escape in params]
        assert not escapes, f"{name}: Job parameters show reStructuredText escapes {escapes}"
