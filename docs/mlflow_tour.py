"""The README's three-click path through the MLflow UI, walked by a headless browser: from the URL a
sweep prints (the experiment's runs, model-training view) to an attack's Pareto front (figure and
table) and on to the picked configuration's metrics. Each step clicks what a new user would click,
checks that the page shows what the README promises, and saves a screenshot.

    python docs/mlflow_tour.py runs/sweeps/mlflow.db --out docs/img        # the README's screenshots
    python docs/mlflow_tour.py runs/sweeps/mlflow.db --attack blended --out /tmp/tour

Needs Chromium from the system packages (Debian: ``apt-get install chromium``) and nothing else:
the browser is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``), so no
WebDriver or websocket package is involved. Exits 1, naming the step, when a click has nothing to
click or a page lacks what it should show.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VIEW = "workflowType=machine_learning"  # MLflow 3 opens its GenAI view without it


class TourError(RuntimeError):
    pass


class Browser:
    """Headless Chromium over ``--remote-debugging-pipe``: JSON messages ended by NUL, written to
    the browser's fd 3 and read from its fd 4; one page, attached with a flat session."""

    def __init__(self, width: int = 1500, height: int = 1250):
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            raise TourError("no Chromium on PATH (Debian: apt-get install chromium)")
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # the browser expects its end of the pipe as fds 3 (commands in) and 4 (replies out)
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "--no-first-run", "--user-data-dir=" + _tmpdir(), "about:blank"],
            close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # close_fds would run after preexec_fn and close fds 3 and 4 again
            preexec_fn=lambda: _as_fds_3_and_4(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise TourError("the browser closed its pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise TourError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def js(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            details = out["exceptionDetails"]
            raise TourError(f"script failed: {details.get('exception', {}).get('description') or details.get('text')}")
        return out.get("result", {}).get("value")

    def wait(self, expression: str, what: str, timeout: float = 45.0):
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            try:
                value = self.js(expression)
            except TourError as exc:  # the page is still loading (no body yet)
                value, last = None, f" ({exc})"
            if value:
                return value
            time.sleep(0.5)
        raise TourError(f"waited {timeout:g}s for {what}{last}")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path) -> None:
        time.sleep(1.0)  # let images and fonts settle after the last check
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _as_fds_3_and_4(commands_in: int, replies_out: int) -> None:
    # through high numbers first: either pipe end may itself be fd 3 or 4
    hi_in, hi_out = os.dup2(commands_in, 250), os.dup2(replies_out, 251)
    os.dup2(hi_in, 3)
    os.dup2(hi_out, 4)


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="bibau-tour-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(db: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(f"/tmp/mlflow-ui-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    proc.terminate()
    raise TourError(f"mlflow ui did not start (/tmp/mlflow-ui-{port}.log)")


def sweep_runs(db: Path, experiment: str | None) -> tuple[str, str, dict, dict]:
    """The experiment id, the newest sweep's run name, its attack runs {attack: run_id} and their picked trials
    {attack: run name}, read from the tracking store (what the click path should reach)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db.resolve()}")
    exps = [e for e in client.search_experiments() if e.name != "Default"]
    if experiment:
        exps = [e for e in exps if e.name == experiment]
    if not exps:
        raise TourError(f"no experiment {experiment!r} in {db}" if experiment else f"no sweep experiment in {db}")
    exp = exps[0]
    sweeps = client.search_runs([exp.experiment_id], "tags.role = 'sweep'", order_by=["attributes.start_time DESC"],
                                max_results=1)
    if not sweeps:
        raise TourError(f"experiment {exp.name!r} has no sweep run")
    sweep = sweeps[0]
    sweep_id = sweep.data.tags.get("sweep_id", "")
    attacks = client.search_runs([exp.experiment_id], f"tags.role = 'attack' and tags.sweep_id = '{sweep_id}'")
    picks = client.search_runs([exp.experiment_id], f"tags.role = 'trial' and tags.picked = 'true' and "
                               f"tags.sweep_id = '{sweep_id}'")
    picked = {}
    for run in picks:
        picked.setdefault(run.data.tags.get("attack", ""), run.info.run_name)
    return exp.experiment_id, sweep.info.run_name, {r.data.tags.get("attack", r.info.run_name): r.info.run_name for r in attacks}, picked


_FRONT_LINK = """(() => {{
  // the sweep's description: one list item per attack, "<label>: Pareto front · picked ..."
  const item = [...document.querySelectorAll('li')].find(li => li.textContent.trim().startsWith({label} + ':'));
  const a = item && [...item.querySelectorAll('a')].find(a => a.textContent.trim() === 'Pareto front');
  if (!a) return false;
  location.href = a.href;  // target=_blank: a new tab for a user, the same page here
  return true;
}})()"""
_SHOW_MORE = """(() => {
  const b = document.querySelector('[aria-label="Expand description"]');
  if (!b) return false; b.click(); return true;
})()"""


def attack_label(attack: str) -> str:
    from orchestrator.names import display

    return display(attack)


def follow(browser: Browser, text: str, what: str) -> None:
    """Click the link showing ``text``; a link that opens a new tab is followed in this one."""
    script = f"""(() => {{
      const a = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === {json.dumps(text)});
      if (!a) return false;
      if (a.target === '_blank') location.href = a.href; else a.click();
      return true;
    }})()"""
    if not browser.js(script):
        raise TourError(f"{what}: no link named {text!r}")


def tour(db: Path, out: Path, attack: str | None, experiment: str | None, prefix: str) -> list[str]:
    exp_id, sweep_name, attack_runs, picked = sweep_runs(db, experiment)
    if not attack_runs:
        raise TourError("the sweep has no attack runs")
    attack = attack or sorted(attack_runs)[0]
    if attack not in attack_runs:
        raise TourError(f"no attack run {attack!r}; the sweep has {', '.join(sorted(attack_runs))}")
    if attack not in picked:
        raise TourError(f"attack {attack!r} has no picked trial (tags.picked = 'true')")
    ui, base = start_ui(db)
    browser = Browser()
    steps = []
    has_link = "(() => [...document.querySelectorAll('a')].some(a => a.textContent.trim() === {text}))()"
    try:
        url = f"{base}/#/experiments/{exp_id}/runs?{VIEW}"
        browser.goto(url)
        browser.wait(has_link.format(text=json.dumps(sweep_name)), f"the sweep's run {sweep_name!r} in the runs table")
        browser.screenshot(out / f"{prefix}-1-experiment.png")
        steps.append(f"open {url} (the URL the sweep prints)")
        follow(browser, sweep_name, "click 1: the sweep's run")
        steps.append(f"click 1: the sweep's run {sweep_name!r}")
        sweep_page = browser.js("location.href")
        browser.wait(has_link.format(text=json.dumps("Pareto front")), "the sweep's description: each attack's front")
        browser.screenshot(out / f"{prefix}-2-sweep.png")

        # the picked configuration: one more click on the sweep's page
        pick = picked[attack]
        follow(browser, pick, "click 2: the picked run")
        steps.append(f"click 2: the picked run {pick!r} -> its metrics")
        browser.wait(f"document.title.includes({json.dumps(pick)}) || [...document.querySelectorAll('h1, h2, [data-testid]')]"
                     f".some(e => e.textContent.trim() === {json.dumps(pick)})", f"the page of the picked run {pick!r}")
        browser.wait("(() => { const t = document.body.innerText; return t.includes('r_asr') && t.includes('q_asr'); })()",
                     "the picked run's metrics r_asr and q_asr")
        browser.screenshot(out / f"{prefix}-4-picked-trial.png")

        # the front: the attack's link on the sweep's page, then the description's "Show more"
        browser.goto(sweep_page)
        label = attack_label(attack)
        browser.wait(has_link.format(text=json.dumps("Pareto front")), "the sweep's description again")
        if not browser.js(_FRONT_LINK.format(label=json.dumps(label))):
            raise TourError(f"click 2: no 'Pareto front' link on the line of {label!r}")
        steps.append(f"click 2: '{label}: Pareto front' on the sweep's page")
        browser.wait("(() => [...document.querySelectorAll('img')].some(i => i.src.includes('get-artifact') && i.complete "
                     "&& i.naturalWidth > 0))()", "the Pareto figure on the attack run's page")
        if browser.js(_SHOW_MORE):
            steps.append("click 3: the description's 'Show more' -> the whole figure and the front's table")
        browser.wait(has_link.format(text=json.dumps(pick)), f"the front's table with the picked run {pick!r}")
        browser.screenshot(out / f"{prefix}-3-attack-front.png")
    finally:
        browser.close()
        ui.terminate()
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db", type=Path, help="the sweep's MLflow SQLite file (runs/sweeps/mlflow.db)")
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="folder of the screenshots")
    p.add_argument("--attack", help="the attack whose front to reach (default: the first by name)")
    p.add_argument("--experiment", help="the experiment's name (default: the first that is not Default)")
    p.add_argument("--prefix", default="mlflow-tour", help="screenshot file names' prefix")
    args = p.parse_args(argv)
    if not args.db.is_file():
        print(f"error: db: {args.db} is not a file (a sweep's mlflow.db)", file=sys.stderr)
        return 2
    try:
        steps = tour(args.db, args.out, args.attack, args.experiment, args.prefix)
    except TourError as exc:
        print(f"tour failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
