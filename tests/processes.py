"""Real processes for the fault tests and the load script.

* :class:`Daphne` / :class:`Uvicorn` — one ASGI server process (an
  :class:`AsgiServer`) serving ``demo_site`` with ``tests.fault_settings``;
  start, SIGTERM, SIGKILL, RSS. ``SERVERS`` maps their names to them.
* :class:`PostgresServer` — a private PostgreSQL cluster (``initdb`` in a temp
  directory, own port, run as a non-root user when we are root); stop, start.
* :func:`create_database` / :func:`drop_database` / :func:`migrate` — a
  throw-away database on any server, migrated with the demo's apps.
* :class:`Tab` — one WebSocket client (the ``websockets`` package) that keeps
  every frame it receives and the close code it got.
* HTTP helpers (:func:`http_request`, :func:`login`, :func:`logout`) over the
  standard library, and :func:`session_for` to mint a real session in-process.

Nothing here touches the shared Redis (6379) or PostgreSQL (5432) beyond
creating and dropping a database of its own on the latter.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .redis_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "tests" / "artifacts" / "faults"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
#: The shared server (never stopped here): ``PGHOST``/``PGPORT``/``PGUSER``, as in tests/settings.py.
SHARED_POSTGRES = "postgres://{user}@{host}:{port}".format(
    user=os.environ.get("PGUSER", "postgres"),
    host=os.environ.get("PGHOST", "127.0.0.1"),
    port=os.environ.get("PGPORT", "5432"),
)
HOSTNAME = socket.gethostname()

#: Every server started here and not stopped yet: killed at exit if the caller crashed.
_running: set = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.cleanup() if isinstance(server, PostgresServer) else server.kill()


# --------------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05, message: str = ""):
    """Poll ``predicate`` until it returns something truthy; that value, or ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


async def await_until(predicate, within: float, interval: float = 0.05, message: str = ""):
    """Async :func:`wait_until`; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {within} s")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_user() -> str | None:
    """The account to run a private cluster as: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither 'postgres' nor 'nobody' exists to run PostgreSQL as")


class PostgresServer:
    """A private PostgreSQL cluster on a free loopback port; a context manager.

    ``stop()`` and ``start()`` keep the data directory, so a database created
    before an outage is there after it. Trust authentication, user ``postgres``.
    """

    def __init__(self, port: int | None = None, timezone: str = "UTC", settings: dict | None = None) -> None:
        self.port = port or free_port()
        #: The server's ``timezone`` setting; initdb would take the machine's.
        self.timezone = timezone
        #: More server settings, e.g. ``{"log_statement": "all"}`` (its log is :attr:`log`).
        self.settings = settings or {}
        self.owner = _postgres_user()
        self.dir = Path(tempfile.mkdtemp(prefix="crfaults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if self.owner:
            shutil.chown(self.dir, user=self.owner)
        self._initialised = False
        _running.add(self)

    @property
    def url(self) -> str:
        """The server's URL, without a database (as ``create_database`` takes it)."""
        return f"postgres://postgres@127.0.0.1:{self.port}"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner else []
        return subprocess.run(
            [*prefix, *command], check=check, capture_output=True, text=True, cwd=self.dir, timeout=60
        )

    def start(self) -> None:
        if not self._initialised:
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")  # fmt: skip
            self._initialised = True
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            f"-c fsync=off -c full_page_writes=off -c synchronous_commit=off -c timezone={self.timezone}"
        ) + "".join(f" -c {name}='{value}'" for name, value in self.settings.items())
        result = self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                           "-o", options, "start", check=False)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"private PostgreSQL did not start: {result.stderr}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (clients disconnected, clean shutdown) or ``immediate`` (a crash)."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    @property
    def running(self) -> bool:
        return self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self._initialised:
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        _running.discard(self)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()


def _admin(server_url: str):
    import psycopg

    return psycopg.connect(f"{server_url.rstrip('/')}/postgres", autocommit=True, connect_timeout=5)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` (dropped first if it exists); its URL."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"unsafe database name {name!r}")
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url.rstrip('/')}/{name}"


def drop_database(server_url: str, name: str) -> None:
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: This process's migrated template database, on each server it made one on (dropped at exit).
TEMPLATE = f"crtemplate_{os.getpid()}"
_templated: set[str] = set()


def migrated_database(server_url: str, name: str) -> str:
    """Create database ``name`` with every migration of the demo site applied; its URL.

    The first call on a server migrates :data:`TEMPLATE` (a Django process: seconds of CPU),
    later ones copy it (``CREATE DATABASE ... TEMPLATE``: a fraction of a second).
    """
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"unsafe database name {name!r}")
    with _admin(server_url) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [TEMPLATE]).fetchone()
    # Made afresh by this process: one a killed run left under a reused pid may predate a migration.
    # Gone: a new private cluster on the port of one this process stopped.
    if server_url not in _templated or not exists:
        migrate(create_database(server_url, TEMPLATE))
        _templated.add(server_url)
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    return f"{server_url.rstrip('/')}/{name}"


@atexit.register
def _drop_templates() -> None:
    for server_url in _templated:
        with contextlib.suppress(Exception):  # a private cluster is gone already, its template with it
            drop_database(server_url, TEMPLATE)


def settings_env(database_url: str, redis_urls: Iterable[str] = ("redis://127.0.0.1:6379",), **options) -> dict:
    """The environment of a process using ``tests.fault_settings``.

    ``options`` become ``CRF_<NAME>`` variables (see tests/fault_settings.py),
    e.g. ``stale_after=2, max_connections=2, rate_limit="none"``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CRF_", "DJANGO_", "PYTEST_")) and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="tests.fault_settings",
        CRF_DATABASE_URL=database_url,
        CRF_REDIS_URLS=",".join(redis_urls),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # a hung process dumps its threads on SIGABRT (Daphne.stop)
    )
    for name, value in options.items():
        if value is not None:
            env[f"CRF_{name.upper()}"] = str(value)
    return env


def migrate(database_url: str) -> None:
    """Apply every migration of the demo site to ``database_url`` (in a subprocess)."""
    env = settings_env(database_url)
    result = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--no-input", "--verbosity", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{result.stdout}\n{result.stderr}")


# --------------------------------------------------------------------------- ASGI servers


class AsgiServer:
    """One ASGI server process serving ``demo_site.asgi:application`` (or ``application``) with
    ``tests.fault_settings``.

    Its output goes to ``tests/artifacts/faults/<name>.log``. Subclasses give the command line.
    """

    kind = "asgi"

    def __init__(self, env: dict, name: str = "daphne", port: int | None = None,
                 application: str = "demo_site.asgi:application") -> None:  # fmt: skip
        self.env = env
        self.application = application
        self.port = port or free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        """Start the process without waiting for it to serve (see :meth:`wait_ready`)."""
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        _running.add(self)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, timeout: float = 20) -> AsgiServer:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def answers(self) -> bool:
        try:
            status, _, _ = http_request(self.port, "GET", "/login/", timeout=1)
        except OSError:
            return False
        return status == 200

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def server_prefix(self) -> str:
        """The start of the registry's ``server`` column for this process's rows."""
        return f"{HOSTNAME}:{self.pid}:"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as a deploy would; waits for the exit and returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout)
        _running.discard(self)
        return status

    def kill(self) -> None:
        """SIGKILL: the process dies without running any of its code."""
        self.process.kill()
        self.process.wait(10)
        _running.discard(self)

    def rss_kb(self) -> int:
        """Resident set size from /proc/<pid>/status (VmRSS), in kB."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used (/proc/<pid>/stat)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def errors(self) -> list[str]:
        """Distinct exception lines of the log (``SomeError: message``), in order."""
        found = []
        for line in self.log_tail(1_000_000).splitlines():
            if re.match(r"^[\w.]+(Error|Exception|Exceeded|Unavailable)\b.*:", line) and line not in found:
                found.append(line)
        return found

    def stop(self, timeout: float = 15) -> bool:
        """Whatever state it is in, gone afterwards; whether SIGTERM was enough.

        A process still running ``timeout`` seconds after SIGTERM gets SIGABRT,
        so faulthandler writes every thread's stack to its log, then SIGKILL.
        """
        if not self.running:
            return True
        try:
            self.terminate(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            self.kill()
            return False


class Daphne(AsgiServer):
    """daphne, as ``make demo`` runs it."""

    kind = "daphne"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), self.application]


class Uvicorn(AsgiServer):
    """uvicorn as docs/operations.md runs it: no lifespan (Channels' ProtocolTypeRouter has no lifespan
    handler) and a bounded graceful stop. Without the bound an open event stream holds SIGTERM
    forever (and, with channels_redis's own receive on Python 3.11, a consumer that missed its
    cancellation: CPython gh-86296)."""

    kind = "uvicorn"
    graceful_timeout = 5

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(self.port),
                "--lifespan", "off", "--timeout-graceful-shutdown", str(self.graceful_timeout),
                self.application]  # fmt: skip


SERVERS: dict[str, type[AsgiServer]] = {"daphne": Daphne, "uvicorn": Uvicorn}


def start_all(*servers: AsgiServer, timeout: float = 30) -> None:
    """Start several processes in parallel: Django's import time is paid once, not per process."""
    for server in servers:
        server.spawn()
    for server in servers:
        server.wait_ready(timeout)


# --------------------------------------------------------------------------- HTTP


def http_request(
    port: int, method: str, path: str, *, cookies: dict | None = None, headers: dict | None = None,
    body: bytes | None = None, timeout: float = 5,
) -> tuple[int, http.client.HTTPMessage, bytes]:  # fmt: skip
    """One request to 127.0.0.1:``port``: (status, headers, body). Redirects are not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        if cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def response_cookies(headers: http.client.HTTPMessage) -> dict:
    cookies = {}
    for header in headers.get_all("Set-Cookie") or []:
        name, _, rest = header.partition("=")
        cookies[name.strip()] = rest.split(";", 1)[0]
    return cookies


def csrf_token(port: int) -> str:
    """A CSRF cookie from the login page."""
    status, headers, _ = http_request(port, "GET", "/login/")
    assert status == 200, status
    return response_cookies(headers)["csrftoken"]


def login(port: int, username: str, password: str) -> str:
    """Sign in through the demo's login form; the ``sessionid`` cookie."""
    token = csrf_token(port)
    body = urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token}).encode()
    status, headers, _ = http_request(
        port, "POST", "/login/", cookies={"csrftoken": token}, body=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    cookies = response_cookies(headers)
    if status != 302 or "sessionid" not in cookies:
        raise AssertionError(f"login of {username} failed with HTTP {status}")
    return cookies["sessionid"]


def logout(port: int, session_key: str) -> int:
    """POST /logout/ with the session and a CSRF token; the HTTP status."""
    token = csrf_token(port)
    status, _, _ = http_request(
        port, "POST", "/logout/", cookies={"csrftoken": token, "sessionid": session_key},
        headers={"X-CSRFToken": token, "Content-Type": "application/x-www-form-urlencoded"}, body=b"",
    )  # fmt: skip
    return status


# --------------------------------------------------------------------------- sessions (in-process Django)


def session_for(user) -> str:
    """A real database session for ``user``, as ``login()`` would leave it; its key.

    Signed with this process's ``SECRET_KEY``: daphne must run with the same
    (``settings_env`` callers pass ``secret_key=settings.SECRET_KEY``).
    """
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    session = SessionStore()
    session[SESSION_KEY] = user._meta.pk.value_to_string(user)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return session.session_key


# --------------------------------------------------------------------------- WebSocket clients


class HandshakeRefused(Exception):
    """The server answered the WebSocket handshake with an HTTP status instead of 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status


class Tab:
    """One WebSocket, as a browser tab holds it: every frame kept, the close code recorded.

    ``frames`` is the full history; :meth:`wait_for` consumes matching frames in
    order, so a test can wait for "the next direct frame" while presence frames
    and acks arrive in between.
    """

    def __init__(self, ws, label: str = "") -> None:
        self.ws = ws
        self.label = label
        self.frames: list[dict] = []
        self._pending: list[dict] = []
        self._arrived = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int, session: str | None = None, *, path: str = "/ws/registry/",
                   origin: str | None = "default", cookies: dict | None = None, headers: dict | None = None,
                   label: str = "", open_timeout: float = 10) -> Tab:  # fmt: skip
        """Open a socket; raises :class:`HandshakeRefused` when the server answers with HTTP."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        all_cookies = dict(cookies or {})
        if session is not None:
            all_cookies["sessionid"] = session
        extra = dict(headers or {})
        if all_cookies:
            extra["Cookie"] = "; ".join(f"{k}={v}" for k, v in all_cookies.items())
        if origin == "default":
            origin = f"http://127.0.0.1:{port}"
        try:
            ws = await connect(
                f"ws://127.0.0.1:{port}{path}", origin=origin, additional_headers=extra, proxy=None,
                compression=None, open_timeout=open_timeout, ping_interval=None, max_size=None, max_queue=None,
            )  # fmt: skip
        except InvalidStatus as error:
            raise HandshakeRefused(error.response.status_code) from None
        return cls(ws, label)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                frame = json.loads(message)
                self.frames.append(frame)
                self._pending.append(frame)
                self._arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            self._arrived.set()

    def frames_of(self, kind: str) -> list[dict]:
        return [frame for frame in self.frames if frame.get("type") == kind]

    async def send(self, frame) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def wait_for(self, predicate: Callable[[dict], bool], within: float = 5) -> dict:
        """The first unconsumed frame matching ``predicate`` (consumed now), waiting up to ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            for index, frame in enumerate(self._pending):
                if predicate(frame):
                    return self._pending.pop(index)
            if self.closed.is_set():
                raise ConnectionError(f"{self.label or 'socket'} closed with {self.close_code} while waiting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.label or 'socket'}: no matching frame within {within} s")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def more_than(self, seen: int, within: float) -> None:
        """Wait until the tab holds more than ``seen`` frames or is closed, at most ``within`` seconds."""
        deadline = time.monotonic() + within
        while len(self.frames) <= seen and not self.closed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def next_direct(self, within: float = 5) -> dict:
        return await self.wait_for(lambda f: f.get("type") == "direct", within)

    async def request(self, frame: dict, within: float = 10) -> dict:
        """Send a frame carrying an ``id`` and wait for the ``ack`` or ``error`` with that id."""
        await self.send(frame)
        return await self.wait_for(lambda f: f.get("type") in ("ack", "error") and f.get("id") == frame["id"], within)

    async def closed_with(self, within: float = 5) -> int | None:
        """The close code once the server closed the socket (``TimeoutError`` if it stays open)."""
        await asyncio.wait_for(self.closed.wait(), within)
        return self.close_code

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


async def close_all(tabs: Iterable[Tab]) -> None:
    await asyncio.gather(*(tab.close() for tab in tabs), return_exceptions=True)


class ClientProcess:
    """``python -m tests.<module> <args>`` in a process of its own while in the ``async with``.

    The client prints ``ready`` once it is set up, works until it is terminated, then prints
    its results as JSON on its last line: ``result``. A load generator on the same 2 CPUs as
    the server under test takes the server's CPU; ``niceness`` 19 leaves it to the server first.
    """

    def __init__(self, module: str, *args: object, niceness: int = 0) -> None:
        self.command = ["nice", "-n", str(niceness), sys.executable, "-m", f"tests.{module}", *map(str, args)]

    async def __aenter__(self):
        self.process = await asyncio.create_subprocess_exec(
            *self.command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        assert await asyncio.wait_for(self.process.stdout.readline(), 30) == b"ready\n"
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.process.terminate()
        output, _ = await asyncio.wait_for(self.process.communicate(), 30)
        self.result = json.loads(output.decode().strip().splitlines()[-1])


#: For tests that start server processes: they need the real services (``CR_TEST_STACK=real``).
real_services_only = pytest.mark.skipif(
    os.environ.get("CR_TEST_STACK", "real") != "real",
    reason="runs daphne or uvicorn on PostgreSQL and Redis (CR_TEST_STACK=real)",
)

