"""Real processes for tests, benchmarks and crash runs: a redis-server on a free loopback
port (AOF on, so it can be SIGKILLed and restarted from it), and worker subprocesses.
Like ``celery.contrib.testing``, shipped so that bench/ and tests/ share one copy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import redis

from worker.store.embedded import redis_server_binary

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """``redis-server`` on 127.0.0.1 with its data in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = True,
        port: int = 0,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.extra = tuple(extra)  # more redis-server arguments, e.g. --replicaof HOST PORT
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: S603
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not come up")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (the AOF holds what was acknowledged)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None


class SentinelCluster:
    """A primary, its replicas and three Sentinels on loopback, all real ``redis-server``
    processes (Sentinels run it with ``--sentinel``), with a short ``down-after`` so a
    killed primary is replaced within seconds (docs/design.md §8).

    Not shorter than 2 s: at 1 s, a freshly promoted primary busy serving two full
    resyncs on a loaded 2-core machine missed its PINGs for a second and was failed over
    in turn (1 crash run in 10), which is a test of flapping, not of one failover."""

    MASTER = "rf-primary"

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.directory = directory
        primary = RedisProcess(directory / "node-0")
        self.nodes = [primary] + [
            RedisProcess(
                directory / f"node-{n}", extra=("--replicaof", "127.0.0.1", str(primary.port))
            )
            for n in range(1, replicas + 1)
        ]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def url(self) -> str:
        parts = ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"{parts}/0?master_name={self.MASTER}"

    def start(self, timeout_s: float = 30.0) -> SentinelCluster:
        for node in self.nodes:
            node.start(timeout_s)
        for n, port in enumerate(self.sentinel_ports):
            self.sentinels.append(self._start_sentinel(n, port))
        deadline = time.monotonic() + timeout_s
        # ready: every replica is in sync, and every Sentinel has found every replica
        while not all(self.in_sync(node) for node in self.nodes[1:]) or not all(
            self._ask(port, "SENTINEL", "REPLICAS", self.MASTER, count=len(self.nodes) - 1)
            for port in self.sentinel_ports
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not find the primary and its replicas")
            time.sleep(0.05)
        return self

    def _start_sentinel(self, n: int, port: int) -> subprocess.Popen[bytes]:
        folder = self.directory / f"sentinel-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "sentinel.conf"  # a Sentinel rewrites its file: one each
        primary = self.nodes[0].port
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {self.MASTER} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.MASTER} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.MASTER} 1\n"
        )
        with open(folder / "sentinel.log", "wb") as log:  # the child keeps its own copy
            return subprocess.Popen(  # noqa: S603
                [redis_server_binary(), str(config), "--sentinel"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @staticmethod
    def _ask(port: int, *command: str, count: int = 0) -> bool:
        """Whether a Sentinel answers ``command`` with at least ``count`` healthy replicas
        (for SENTINEL REPLICAS), or at all."""
        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            reply = client.execute_command(*command)  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        if not count:
            return True
        healthy = [r for r in reply if "s_down" not in str(r.get("flags", ""))]
        return len(healthy) >= count

    @staticmethod
    def in_sync(node: RedisProcess) -> bool:
        """Whether ``node`` is a replica whose link to its primary is up."""
        client = redis.Redis(port=node.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            info = client.info("replication")
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the Sentinels name it now (None: no majority)."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                answer = client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER
                )
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
            if answer:
                voted = int(answer[1])
                votes[voted] = votes.get(voted, 0) + 1
        best = max(votes.items(), key=lambda item: item[1], default=None)
        return best[0] if best and best[1] * 2 > len(self.sentinel_ports) else None

    def node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def primary(self) -> RedisProcess:
        port = self.primary_port()
        if port is None:
            raise RuntimeError("the Sentinels name no primary")
        return self.node(port)

    def kill_primary(self, look: Callable[[redis.Redis], T]) -> tuple[RedisProcess, T]:
        """SIGKILL the primary, having first paused its writes and let ``look`` read it:
        what ``look`` sees is what the primary held when it died, with no write landing
        in between. Its replicas may still lack some of it: that is the fault."""
        old = self.primary()
        client = redis.Redis(port=old.port, socket_timeout=5)
        try:
            client.client_pause(60_000, all=False)  # WRITE: reads are still answered
            seen = look(client)
        finally:
            client.close()
        old.kill()
        return old, seen

    def wait_for_new_primary(self, old_port: int, timeout_s: float = 60.0) -> RedisProcess:
        """Poll until a majority of the Sentinels name a primary other than ``old_port``
        and it answers as a primary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            port = self.primary_port()
            if port is not None and port != old_port:
                client = redis.Redis(port=port, socket_timeout=1)
                try:
                    if client.info("replication").get("role") == "master":
                        return self.node(port)
                except (redis.RedisError, OSError):
                    pass
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError(f"no failover from port {old_port} within {timeout_s:g} s")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.terminate()
        for sentinel in self.sentinels:
            try:
                sentinel.wait(10)
            except subprocess.TimeoutExpired:
                sentinel.kill()
                sentinel.wait(10)
        self.sentinels = []
        for node in self.nodes:
            node.stop()


def service_env(base: Mapping[str, str] | None = None, **values: str) -> dict[str, str]:
    """The current environment without any report-forwarder setting, plus ``values``."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name.startswith("REPORT_FORWARDER_") or name in ("REDIS_URL", "CAPMONSTER_CLIENT_KEY"):
            del env[name]
    env.update(values)
    return env


class WorkerProcesses:
    """``report-forwarder worker`` subprocesses, each logging to its own file."""

    def __init__(self, env: Mapping[str, str], logs: Path, concurrency: int = 8) -> None:
        self.env = dict(env)
        self.logs = logs
        self.concurrency = concurrency
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, concurrency: int | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start one more worker; ``env`` adds to (or overrides) the shared environment."""
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"worker-{len(self.procs)}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "worker", "worker", "--concurrency",
                 str(concurrency or self.concurrency)],
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log_paths(self) -> list[Path]:
        return [self.logs / f"worker-{n}.log" for n in range(len(self.procs))]

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (warm shutdown: in-flight reports finish), SIGKILL after ``timeout_s``."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
