"""Private, throw-away ``redis-server`` processes for tests.

Each server listens on its own free loopback port, keeps nothing on disk
(``--save "" --appendonly no``) and can be stopped and started again on the
same port, so fault tests can take a shard away and bring it back. The shared
Redis on 6379 is never touched here.

    with RedisServer() as server:       # or: with running_redis() as url:
        layer = RedisChannelLayer(hosts=[server.url])
        server.stop()                   # connections now fail
        server.start()                  # same port, empty data set
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers_ping(port: int, timeout: float = 0.2) -> bool:
    """Whether a Redis server on ``port`` answers PING (raw RESP, no client)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One private ``redis-server``; a context manager that stops it on exit."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="redis-test-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._workdir.name,
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after the 5 s default
        ]  # fmt: skip

    def start(self, timeout: float = 5.0) -> None:
        """Start the server (again) on ``self.port`` and wait until it answers PING."""
        if self.running:
            return
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not answers_ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise TimeoutError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM, or SIGKILL (a crash) with ``kill=True``."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port; the data set comes back empty."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._workdir.cleanup()


class SentinelServer(RedisServer):
    """One ``redis-server --sentinel`` watching ``master_name`` at ``master_port``: quorum 2, and it
    calls the master down after ``down_after`` ms (Sentinel rewrites its config file, so it gets its own)."""

    def __init__(self, master_port: int, master_name: str = "main", down_after: int = 1000) -> None:
        super().__init__()
        self.config = f"{self._workdir.name}/sentinel.conf"
        with open(self.config, "w") as config:
            config.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self._workdir.name}\n"
                f"sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {master_name} {down_after}\n"
                f"sentinel failover-timeout {master_name} 10000\n"
            )

    def command(self) -> list[str]:
        return [REDIS_SERVER, self.config, "--sentinel"]


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """Start a private server and yield its URL, ``redis://127.0.0.1:<port>``."""
    with RedisServer() as server:
        yield server.url
