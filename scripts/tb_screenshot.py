"""Screenshot a run's TensorBoard page as a browser shows it, with the settings docs recommend.

Starts ``tensorboard --logdir`` on a free local port, drives headless Chromium over the
DevTools protocol (``--remote-debugging-pipe``: no extra Python package), turns off
"Ignore outliers in chart scaling" (a browser-local setting) and opens the page with smoothing
0 (``#custom_scalars&_smoothingWeight=0``), waits for the charts, saves a PNG and stops both.
This is how ``docs/images/tb_custom_scalars.png`` was made:

    selftrain fit --config configs/debug.yaml --trainer.default_root_dir /tmp/tbrun
    python scripts/tb_screenshot.py /tmp/tbrun/tb docs/images/tb_custom_scalars.png

Needs a Chromium (Debian: ``apt-get install chromium-headless-shell``; ``--browser`` names
another binary).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome", "chrome")


class DevTools:
    """A Chromium started with ``--remote-debugging-pipe``: JSON messages over fds 3 and 4.

    Args:
        browser: the Chromium binary.
        width: window width in CSS pixels.
        height: window height in CSS pixels.
    """

    def __init__(self, browser: str, width: int, height: int) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # the browser reads commands on fd 3, replies on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=as_fds_3_and_4)
        os.close(to_browser)
        os.close(from_browser)
        self._next_id, self._buffer = 0, b""
        self.session: str | None = None

    def call(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        """Send one command; its result (events that arrive meanwhile are dropped).

        Args:
            method: the DevTools method (``Page.navigate``, ...).
            session: send it to the attached page rather than to the browser.
            params: the method's parameters.
        """
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"the browser exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def attach(self) -> None:
        """Attach to the browser's page; later calls go to it."""
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", session=False,
                                 targetId=page["targetId"], flatten=True)["sessionId"]

    def close(self) -> None:
        """Stop the browser."""
        self.process.kill()
        self.process.wait()
        os.close(self._write)
        os.close(self._read)


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    """Wait until ``url`` answers (TensorBoard has started)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def screenshot(logdir: Path, out: Path, browser: str, width: int, height: int,
               settle: float, fragment: str) -> None:
    """Start TensorBoard on ``logdir``, screenshot ``fragment``'s page to ``out``, stop both.

    Args:
        logdir: the ``--logdir`` (a run's ``tb/``, or a folder of runs).
        out: the PNG to write.
        browser: the Chromium binary.
        width: page width in CSS pixels.
        height: page height in CSS pixels.
        settle: seconds to wait for the charts after the page is opened.
        fragment: the URL fragment (the dashboard and its settings).
    """
    port = free_port()
    tensorboard = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
         "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    devtools = None
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base + "data/runs", 60)
        time.sleep(3)  # the first load of the event files
        devtools = DevTools(browser, width, height)
        devtools.attach()
        devtools.call("Page.enable")
        devtools.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        devtools.call("Page.navigate", url=base)
        time.sleep(2)
        # the checkbox "Ignore outliers in chart scaling" is kept in the browser's storage
        devtools.call("Runtime.evaluate",
                      expression="localStorage.setItem('_ignoreYOutliers', 'false')")
        devtools.call("Page.navigate", url="about:blank")  # so that the next load is a new page
        devtools.call("Page.navigate", url=base + "#" + fragment)
        time.sleep(settle)
        shot = devtools.call("Page.captureScreenshot", format="png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        if devtools is not None:
            devtools.close()
        tensorboard.terminate()
        tensorboard.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and take the screenshot.

    Args:
        argv: arguments; None reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path, help="the --logdir of tensorboard")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--browser", default=None, help="Chromium binary (default: found)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1300)
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds to let the charts render")
    parser.add_argument("--fragment", default="custom_scalars&_smoothingWeight=0",
                        help="URL fragment: the dashboard and its settings")
    args = parser.parse_args(argv)
    browser = args.browser or next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        parser.error(f"no Chromium found ({', '.join(BROWSERS)}); name one with --browser")
    screenshot(args.logdir, args.out, browser, args.width, args.height, args.settle,
               args.fragment)
    print(args.out)


if __name__ == "__main__":
    main()
