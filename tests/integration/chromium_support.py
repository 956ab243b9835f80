"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
commands as NUL-terminated JSON on fd 3, answers and events on fd 4), so a test can set the
viewport, wait for the page, run a script in it and take a screenshot, with no client library."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


_TRAMPOLINE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevToolsError(RuntimeError):
    """Chromium answered a command with an error, or did not answer in time."""


class Browser:
    """One headless Chromium with one page (a tab), for one test; a context manager."""

    def __init__(self, user_data_dir: Path, timeout: float = 30.0) -> None:
        assert CHROMIUM is not None
        self.timeout = timeout
        to_chromium, self._write = os.pipe()
        self._read, from_chromium = os.pipe()
        # Chromium's ends become its fd 3 and 4, set by a trampoline (Popen maps no fds);
        # numbered from 10 first, so that setting one never overwrites the other
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chromium, from_chromium)]
        os.close(to_chromium)
        os.close(from_chromium)
        argv = [CHROMIUM, *CHROMIUM_FLAGS, "--remote-debugging-pipe"]
        argv += [f"--user-data-dir={user_data_dir}", "about:blank"]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, *map(str, ends), *argv],
            pass_fds=ends,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session = ""

    def __enter__(self) -> Browser:
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
            self.session = attached["sessionId"]
            self.call("Page.enable")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close", session="")
            self.process.wait(10)
        except (DevToolsError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(10)
        finally:
            os.close(self._write)
            os.close(self._read)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command (to the page's session unless ``session`` is given) and return
        its result; events that arrive meanwhile are kept for :meth:`open`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is None:
            session = self.session
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        answer = self._receive(lambda m: m.get("id") == self._next_id)
        if "error" in answer:
            raise DevToolsError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    def _receive(self, wanted: Any) -> dict[str, Any]:
        for message in self._events:
            if wanted(message):
                self._events.remove(message)
                return message
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                if "method" in message:
                    self._events.append(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise DevToolsError(f"no answer from Chromium in {self.timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise DevToolsError("Chromium closed the protocol pipe")
            self._buffer += chunk

    def open(self, url: str, width: int, height: int) -> None:
        """Load ``url`` in a ``width`` x ``height`` viewport (a phone's below 600 px wide)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        self._events.clear()
        frame = self.call("Page.navigate", url=url)
        if "errorText" in frame:
            raise DevToolsError(f"{url}: {frame['errorText']}")
        self._receive(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited if it is a promise)."""
        answer = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in answer:
            raise DevToolsError(f"{expression[:60]!r}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page (not only the viewport) as a PNG at ``path``."""
        width, height = self.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        shot = self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.write_bytes(base64.b64decode(shot["data"]))


# Every element and every run of text in a card ("main > section") must lie within the
# card's content box (its padding is the card's margin), and no card may stick out of the
# viewport: one line per offender (the outermost), naming the card, the element and the
# overshoot in px.
OUTSIDE_THEIR_CARDS = r"""
(() => {
  const found = [];
  const width = document.documentElement.clientWidth;
  const page = document.documentElement.scrollWidth;
  if (page > width) found.push(`the page is ${page} px wide in a ${width} px viewport`);
  const describe = (node) => {
    const element = node.nodeType === Node.TEXT_NODE ? node.parentElement : node;
    const text = node.textContent.replace(/\s+/g, " ").trim().slice(0, 60);
    return `${node.nodeType === Node.TEXT_NODE ? "text in " : ""}<${element.localName}> "${text}"`;
  };
  for (const card of document.querySelectorAll("main > section")) {
    const name = card.querySelector("h2").textContent;
    const box = card.getBoundingClientRect();
    const style = getComputedStyle(card);
    const left = box.left + parseFloat(style.paddingLeft);
    const right = box.right - parseFloat(style.paddingRight);
    if (box.left < -0.5 || box.right > width + 0.5) {
      found.push(`card "${name}" spans ${box.left.toFixed(0)}..${box.right.toFixed(0)} px`);
    }
    const outside = [];
    const walk = document.createTreeWalker(card, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT);
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
      let rect = null;
      if (node.nodeType === Node.TEXT_NODE) {
        if (!node.data.trim()) continue;
        const range = document.createRange();
        range.selectNodeContents(node);
        rect = range.getBoundingClientRect();
      } else {
        rect = node.getBoundingClientRect();
      }
      if (rect.width === 0 && rect.height === 0) continue;
      const over = Math.max(left - rect.left, rect.right - right);
      if (over <= 0.5 || outside.some((o) => o.contains(node))) continue;
      outside.push(node);  // its descendants overshoot with it: name the outermost only
      found.push(`card "${name}": ${describe(node)} overshoots by ${over.toFixed(0)} px`);
    }
  }
  return found;
})()
"""

# Resolves once the page has rendered the stats at least once (it sets body[data-loaded]).
RENDERED = """
new Promise((done) => {
  const check = () => (document.body.dataset.loaded ? done(true) : setTimeout(check, 25));
  check();
})
"""
