"""The demo site in a real browser: daphne subprocesses, Debian's chromium, people talking.

On the real stack the demo runs as two daphne processes on PostgreSQL and Redis
(alice on one, bob on the other, so every message crosses processes); on the
memory stack as one process on SQLite and the in-memory layer. Either way it
gets a database of its own, created for this run and dropped after it.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from demo_site.inbox.management.commands.demo_users import PASSWORD

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REAL_STACK = os.environ.get("CR_TEST_STACK", "real") == "real"
RUN_ID = os.getpid()
#: Longest wait for anything live (a message, a presence change) to show.
LIVE = 2000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Daphne:
    """One daphne process serving demo_site; its output goes to tests/artifacts/."""

    def __init__(self, env: dict, name: str) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTIFACTS / f"daphne-{name}.log"
        self.log_path.write_text("")
        self.process = None

    def start(self) -> None:
        command = [sys.executable, "-m", "daphne", "--bind", "127.0.0.1", "--port", str(self.port),
                   "demo_site.asgi:application"]
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"daphne did not start; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/login/", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM, like a deploy: daphne cancels its consumers and exits, promptly."""
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"daphne hung on SIGTERM; see {self.log_path}")


def manage(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "demo_site/manage.py", *args], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    """The environment of the demo's processes, with a database made for this run."""
    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "demo_site.settings", "PYTHONPATH": str(ROOT)}
    if not REAL_STACK:
        env.pop("REDIS_URL", None)
        env["DATABASE_URL"] = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.sqlite3'}"
        manage(env, "migrate", "--no-input")
        manage(env, "demo_users")
        yield env
        return
    import psycopg

    name = f"demo_browser_{RUN_ID}"
    server = {"host": os.environ.get("PGHOST", "127.0.0.1"), "port": os.environ.get("PGPORT", "5432"),
              "user": os.environ.get("PGUSER", "postgres")}
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env["DATABASE_URL"] = f"postgres://{server['user']}@{server['host']}:{server['port']}/{name}"
    env["REDIS_URL"] = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    env["REDIS_PREFIX"] = f"demobrowser{RUN_ID}"
    manage(env, "migrate", "--no-input")
    manage(env, "demo_users")
    yield env
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def servers(demo_env):
    """(alice's server, bob's server): two processes on the real stack, one on the memory stack."""
    started = [Daphne(demo_env, name) for name in (("a", "b") if REAL_STACK else ("a",))]
    for server in started:
        server.start()
    yield started[0], started[-1]
    for server in started:
        if server.process.poll() is None:
            server.stop()


@pytest.fixture(autouse=True)
def server_logs(servers):
    """What the servers logged during the test, printed after it: pytest shows it when the test failed."""
    starts = {server.log_path: server.log_path.stat().st_size for server in servers}
    yield
    for path, start in starts.items():
        with path.open() as log:
            log.seek(start)
            print(f"--- {path.name} during the test (last 6,000 characters) ---\n{log.read()[-6000:]}")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Person:
    """One browser profile (context) signed in as ``username``, with its tabs."""

    def __init__(self, browser, server: Daphne, username: str) -> None:
        self.server = server
        self.context = browser.new_context()
        self.dialogs = []
        self.context.on("page", lambda page: page.on("dialog", self.record_dialog))
        self.page = self.context.new_page()
        self.page.goto(f"{server.url}/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        wait_connected(self.page)

    def record_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def new_tab(self):
        page = self.context.new_page()
        page.goto(f"{self.server.url}/")
        wait_connected(page)
        return page

    def send(self, to: str, message: str) -> None:
        self.page.select_option("#compose select[name=to]", label=to)
        self.page.fill("#compose input[name=message]", message)
        self.page.click("#compose button[type=submit]")

    def switch_transport(self, label: str) -> None:
        self.page.click(f".segmented label:has-text('{label}')")
        wait_connected(self.page)

    def log_out(self) -> None:
        self.page.click("text=Log out")
        expect(self.page).to_have_url(re.compile(r"/login/"))


def wait_connected(page, timeout: float = 5000) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=timeout)


def newest_message(page):
    return page.locator("#incoming .message .text").first


def screenshot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def sign_in(browser, servers):
    """``sign_in("alice")``: a new profile on that person's server; closed after the test."""
    people = []

    def open_profile(username: str, server: Daphne | None = None) -> Person:
        person = Person(browser, server or (servers[1] if username == "bob" else servers[0]), username)
        people.append(person)
        return person

    yield open_profile
    for person in people:
        person.context.close()


def test_message_reaches_both_of_bobs_tabs_within_2_seconds(sign_in):
    alice = sign_in("alice")
    # Tabs of earlier tests have gone: bob starts with none.
    expect(alice.page.locator("#online")).not_to_contain_text("bob", timeout=LIVE)
    bob = sign_in("bob")
    bob_second_tab = bob.new_tab()
    errors = []
    for page in (alice.page, bob.page, bob_second_tab):
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))

    alice.send("bob", "Lunch at noon?")

    for page in (bob.page, bob_second_tab):
        expect(newest_message(page)).to_have_text("Lunch at noon?", timeout=LIVE)
        expect(page.locator("#incoming .message .from").first).to_have_text("alice")
    expect(alice.page.locator("#ack")).to_have_text(re.compile("delivered to 2 tabs", re.I))
    expect(alice.page.locator("#online")).to_contain_text("bob")
    assert errors == []  # the Content-Security-Policy blocked nothing of the page's own
    screenshot(bob.page, "inbox-bob")
    screenshot(alice.page, "inbox-alice")


def test_markup_in_a_message_is_shown_as_text(sign_in):
    alice, bob = sign_in("alice"), sign_in("bob")
    markup = "<img src=x onerror=alert(1)>"

    alice.send("bob", markup)

    expect(newest_message(bob.page)).to_have_text(markup, timeout=LIVE)
    assert bob.page.locator("#incoming img").count() == 0
    bob.page.wait_for_timeout(300)  # an onerror handler would have run by now
    assert bob.dialogs == []


def test_online_list_and_unread_messages_follow_carol(sign_in):
    alice = sign_in("alice")
    online = alice.page.locator("#online")
    expect(online).not_to_contain_text("carol")

    alice.send("carol", "Welcome back")
    expect(alice.page.locator("#ack")).to_have_text(re.compile("carol is offline"))

    carol = sign_in("carol")
    expect(online).to_contain_text("carol", timeout=LIVE)

    carol.page.click("#load-unread")
    expect(carol.page.locator("#unread .message .text").first).to_have_text("Welcome back")
    carol.page.click("#mark-read")
    expect(carol.page.locator("#unread")).to_have_text("All read.")
    carol.page.click("#load-unread")
    expect(carol.page.locator("#unread")).to_have_text("No unread messages.")

    carol.log_out()
    expect(online).not_to_contain_text("carol", timeout=LIVE)


def test_event_stream_transport_receives_the_same_message_and_sends_with_a_post(sign_in):
    alice, bob = sign_in("alice"), sign_in("bob")
    bob.switch_transport("SSE")

    alice.send("bob", "Over Server-Sent Events")

    expect(newest_message(bob.page)).to_have_text("Over Server-Sent Events", timeout=LIVE)
    expect(bob.page.locator("#incoming .message .via").first).to_have_text("sse")
    expect(alice.page.locator("#ack")).to_have_text(re.compile("delivered to 1 tab", re.I))
    screenshot(bob.page, "inbox-bob-sse")

    bob.send("alice", "Replying by POST")

    expect(newest_message(alice.page)).to_have_text("Replying by POST", timeout=LIVE)
    expect(bob.page.locator("#ack")).to_have_text(re.compile("delivered to 1 tab", re.I))


def test_groups_transport_delivers_without_counting_tabs(sign_in):
    alice, bob = sign_in("alice"), sign_in("bob")
    for person in (alice, bob):
        person.switch_transport("Groups")

    alice.send("bob", "Through a group")

    expect(newest_message(bob.page)).to_have_text("Through a group", timeout=LIVE)
    expect(alice.page.locator("#ack")).to_have_text(re.compile("cannot count tabs"))
    expect(bob.page.locator("#presence-note")).to_be_visible()


def test_logout_in_one_browser_leaves_the_other_connected(sign_in):
    """Two browsers of one user are two sessions: logging out of one closes only its connection."""
    laptop, phone = sign_in("carol"), sign_in("carol")
    alice = sign_in("alice")
    phone_state = phone.page.evaluate("() => document.querySelector('#status').dataset.state")
    assert phone_state == "open"
    laptop.log_out()
    phone.page.wait_for_timeout(1000)
    wait_connected(phone.page, timeout=100)
    alice.send("carol", "Still here on the phone")
    expect(newest_message(phone.page)).to_have_text("Still here on the phone", timeout=LIVE)


def state_of(page):
    return page.locator("#status")


def states_until(page, final: str, timeout: float) -> list[tuple[str, str, str]]:
    """The (state, close code, close reason) the page showed, in order, until ``final`` or ``timeout`` ms.

    Polled every 20 ms rather than awaited with ``expect``: a failure then says which
    closes the page went through, not only where it ended.
    """
    seen: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        shown = page.evaluate("() => { const d = document.querySelector('#status').dataset; "
                              "return [d.state, d.closeCode || '', d.closeReason || '']; }")  # fmt: skip
        if not seen or seen[-1] != tuple(shown):
            seen.append(tuple(shown))
        if shown[0] == final:
            break
        page.wait_for_timeout(20)
    return seen


def test_password_change_signs_other_browsers_out_and_keeps_its_own(sign_in, demo_env):
    """The browser that changed the password stays connected; the other one's socket and stream end."""
    laptop, phone = sign_in("carol"), sign_in("carol")
    phone_stream = phone.new_tab()
    phone_stream.click(".segmented label:has-text('SSE')")
    wait_connected(phone_stream)
    form = laptop.context.new_page()
    form.goto(f"{laptop.server.url}/password/")
    form.fill("input[name=old_password]", PASSWORD)
    for field in ("new_password1", "new_password2"):
        form.fill(f"input[name={field}]", "a-new-pass-456")
    try:
        form.click("button[type=submit]")
        for page in (phone.page, phone_stream):
            expect(state_of(page)).not_to_have_attribute("data-state", "open", timeout=1000)
        for page in (phone.page, phone_stream):
            # 4409 first (reconnect once: the handshake decides), then 4401 (HTTP 401 for the stream).
            # A refused socket is accepted, then closed (a close before accept reaches the browser as
            # 1006), so a loaded machine may show it "open" for a moment in between.
            seen = states_until(page, "signed-out", timeout=3 * LIVE)
            print(f"{page.url}: {seen}")
            assert seen[-1][:2] == ("signed-out", "4401"), seen
        expect(form).to_have_url(f"{laptop.server.url}/")
        wait_connected(form, timeout=LIVE)
        wait_connected(laptop.page, timeout=LIVE)  # closed with 4409, came back with the same session
    finally:
        manage(demo_env, "demo_users")  # the password of the other tests


def test_deactivation_closes_every_browser_of_the_user(sign_in, demo_env):
    laptop, phone = sign_in("carol"), sign_in("carol")
    set_active = "from django.contrib.auth.models import User; u = User.objects.get(username='carol'); "
    try:
        manage(demo_env, "shell", "-c", set_active + "u.is_active = False; u.save()")
        for page in (laptop.page, phone.page):
            expect(state_of(page)).to_have_attribute("data-state", "signed-out", timeout=1000)
    finally:
        manage(demo_env, "shell", "-c", set_active + "u.is_active = True; u.save()")


def test_client_stays_signed_out_after_4401(browser, servers):
    page = browser.new_page()
    page.goto(f"{servers[0].url}/login/")
    states = page.evaluate("""async () => {
        const { RegistrySocket } = await import("/static/channel_registry/client.js");
        const socket = new RegistrySocket("/ws/registry/", { initialDelay: 50 });
        const states = [];
        socket.addEventListener("state", (event) => states.push(event.detail.state));
        socket.connect();
        await new Promise((resolve) => setTimeout(resolve, 1500));
        return states;
    }""")
    page.close()
    assert states == ["connecting", "open", "signed-out"]


# What the client does after the server closes with each documented code (test_faults.py shows a
# real daphne sends each of them): the browser's own WebSocket events, a server that closes at once.
CLOSE_REACTIONS = {
    4401: ["connecting", "open", "signed-out"],
    4410: ["connecting", "open", "signed-out"],
    4403: ["connecting", "open", "refused"],
    4429: ["connecting", "open", "refused"],
    4409: ["connecting", "open", "reconnecting", "connecting", "open"],
    4503: ["connecting", "open", "reconnecting", "connecting", "open"],
    1006: ["connecting", "open", "reconnecting", "connecting", "open"],
}


def test_client_reacts_to_each_close_code_as_documented(browser, servers):
    page = browser.new_page()
    page.goto(f"{servers[0].url}/login/")
    reactions = page.evaluate("""async (codes) => {
        const { RegistrySocket } = await import("/static/channel_registry/client.js");
        const reactions = {};
        for (const code of codes) {
            let opened = 0;
            window.WebSocket = class {
                constructor() {
                    const first = opened++ === 0;
                    setTimeout(() => this.onopen?.(), 10);
                    if (first) setTimeout(() => this.onclose?.({ code, reason: "" }), 30);
                }
                send() {}
                close() {}
            };
            const socket = new RegistrySocket("/ws/registry/", { initialDelay: 50, reauthenticateDelay: 50 });
            const states = [];
            socket.addEventListener("state", (event) => states.push(event.detail.state));
            socket.connect();
            await new Promise((resolve) => setTimeout(resolve, 300));
            socket.close();
            reactions[code] = states.slice(0, -1);  // without close()'s own "closed"
        }
        return reactions;
    }""", list(CLOSE_REACTIONS))
    page.close()
    assert {int(code): states for code, states in reactions.items()} == CLOSE_REACTIONS


def test_client_treats_a_missing_pong_as_dead_and_never_holds_two_sockets(sign_in):
    alice = sign_in("alice")
    page = alice.context.new_page()
    page.goto(f"{alice.server.url}/login/")  # a page with no connection of its own
    result = page.evaluate("""async () => {
        const { RegistrySocket } = await import("/static/channel_registry/client.js");
        const open = new Set();
        let most = 0;
        window.WebSocket = class extends WebSocket {
            constructor(url) {
                super(url);
                open.add(this);
                most = Math.max(most, open.size);
                this.addEventListener("close", () => open.delete(this));
            }
            close(code) { open.delete(this); super.close(code); }
        };
        const socket = new RegistrySocket("/ws/registry/", { pingInterval: 200, pongTimeout: 300, initialDelay: 50 });
        const states = [], closes = [];
        socket.addEventListener("state", (event) => states.push(event.detail.state));
        socket.addEventListener("close", (event) => closes.push(event.detail.reason));
        socket.connect();
        await new Promise((resolve) => setTimeout(resolve, 700));  // pings answered: stays open
        socket.socket.send = () => {};  // this socket's pings now go nowhere
        await new Promise((resolve) => setTimeout(resolve, 1200));
        socket.close();
        return { states, closes, most };
    }""")
    assert result["states"][:2] == ["connecting", "open"]
    assert result["closes"][0].startswith("no pong")
    assert result["states"][2:6] == ["reconnecting", "connecting", "open", "closed"]
    assert result["most"] == 1


NATIVE_EVENT_SOURCE = """() => {
    window.got = [];
    window.recovered = [];
    const source = new EventSource("/events/");
    for (const name of ["direct", "notification"]) {
        source.addEventListener(name, (event) => {
            window.got.push({ ...JSON.parse(event.data), lastEventId: event.lastEventId });
        });
    }
    source.addEventListener("position", (event) => { window.position = event.lastEventId; });
    source.addEventListener("recovered", (event) => window.recovered.push(JSON.parse(event.data)));
}"""


def test_native_event_source_gets_what_it_missed_while_the_server_restarted(sign_in, servers):
    """The browser's own EventSource reconnects with Last-Event-ID; the server replays the gap once."""
    alice, bob = sign_in("alice"), sign_in("bob")
    page = bob.context.new_page()
    page.goto(f"{bob.server.url}/login/")  # a page of the site with no connection of its own
    page.evaluate(NATIVE_EVENT_SOURCE)
    page.wait_for_function("() => window.position !== undefined", timeout=LIVE)
    alice.send("bob", "before")
    page.wait_for_function("() => window.got.length === 1", timeout=LIVE)

    servers[1].stop()
    for n in range(3):
        alice.send("bob", f"missed {n}")
        expect(alice.page.locator("#ack")).to_have_text(re.compile("bob is offline"), timeout=LIVE)
        alice.page.locator("#ack").evaluate("(ack) => { ack.textContent = ''; }")
    servers[1].start()

    page.wait_for_function("() => window.recovered.length === 1", timeout=20000)
    alice.send("bob", "live")
    page.wait_for_function("() => window.got.some((frame) => frame.message === 'live')", timeout=LIVE)
    page.wait_for_timeout(300)  # a duplicate would have come by now
    got = page.evaluate("window.got")
    assert [frame["message"] for frame in got] == ["before", "missed 0", "missed 1", "missed 2", "live"]
    assert [frame["lastEventId"] for frame in got] == [f"{frame['epoch']}:{frame['seq']}" for frame in got]
    assert [frame["seq"] for frame in got] == list(range(got[0]["seq"], got[0]["seq"] + 5))
    assert page.evaluate("window.recovered")[0]["count"] == 3
    # Bob's inbox (its own client, with its own backoff) may come back before or after "live".
    note = bob.page.locator("#history-note")
    expect(note).to_have_text(re.compile(r"^[34] missed messages recovered$"), timeout=20000)
    page.close()


class AnotherApplication:
    """A page served on another port of the same host: browsers send it the site's cookies."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<!doctype html><title>another application</title>")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def registry_rows(env: dict, username: str) -> int:
    code = ("from channel_registry.models import UserChannel; "
            f"print(UserChannel.objects.filter(user__username={username!r}).count())")
    result = subprocess.run([sys.executable, "demo_site/manage.py", "shell", "-c", code], cwd=ROOT, env=env,
                            check=True, capture_output=True, text=True, timeout=60)
    return int(result.stdout.strip().splitlines()[-1])


def access_log(server: Daphne, since: int) -> list[str]:
    """daphne's access log lines for ``/events/`` written after offset ``since`` of its log."""
    with server.log_path.open() as log:
        log.seek(since)
        return re.findall(r'"GET (/events/\S*)" (\d+)', log.read())


def test_a_page_on_another_port_cannot_open_the_users_event_stream(sign_in, demo_env):
    """Chromium sends the site's own EventSource no Origin and ``Sec-Fetch-Site: same-origin``: it
    streams. A page on another port of the same host gets the user's cookies sent along with its
    EventSource (``Origin`` and ``same-site``) and its ``<img>`` (no Origin, ``same-site``): both are
    refused with 403 and hold none of the user's connections. (Chromium reports neither refusal to
    the page's script, a CORS and an ORB failure: daphne's access log shows the answers.)"""
    carol = sign_in("carol")  # her inbox: one connection
    since = carol.server.log_path.stat().st_size
    own = carol.context.new_page()
    own.goto(f"{carol.server.url}/login/")
    own.evaluate(NATIVE_EVENT_SOURCE)
    own.wait_for_function("() => window.position !== undefined", timeout=LIVE)
    other = AnotherApplication()
    try:
        page = carol.context.new_page()
        page.goto(other.url)
        page.evaluate("""(url) => {
            new EventSource(url, { withCredentials: true });
            new Image().src = url + "?img";
        }""", f"{carol.server.url}/events/")
        deadline = time.monotonic() + 5
        while len(access_log(carol.server, since)) < 2 and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        # daphne logs a response once it ended: her own stream, still open, is not there yet.
        assert sorted(set(access_log(carol.server, since))) == [("/events/", "403"), ("/events/?img", "403")]
        assert registry_rows(demo_env, "carol") == 2  # the inbox and her own stream
    finally:
        other.close()
        own.close()


ONLINE_NOW = "/admin/channel_registry/userchannel/online/"
OPERATOR = "\n".join([
    "from django.contrib.auth.models import Permission, User",
    "operator, _ = User.objects.get_or_create(username='operator', defaults={'is_staff': True})",
    f"operator.set_password({PASSWORD!r})",
    "operator.save()",
    "operator.user_permissions.set(Permission.objects.filter(codename__in=['view_userchannel', 'change_userchannel']))",
])


def test_staff_disconnects_both_of_bobs_tabs_from_the_admin_and_carol_gets_nothing(sign_in, demo_env):
    manage(demo_env, "shell", "-c", OPERATOR)  # staff with the model's view and change permissions only
    bob = sign_in("bob")
    stream_tab = bob.new_tab()
    stream_tab.click(".segmented label:has-text('SSE')")
    wait_connected(stream_tab)
    operator = sign_in("operator")

    operator.page.goto(f"{operator.server.url}{ONLINE_NOW}")
    cells = operator.page.locator("#online-users tbody tr", has_text="bob").locator("td")
    # user, connections, processes, WebSocket, event streams
    for column, text in enumerate(["bob", "2", "1", "1", "1"], start=1):
        expect(cells.nth(column)).to_have_text(text)
    expect(operator.page.locator("#processes")).to_contain_text("beating")
    screenshot(operator.page, "admin-online-now")
    cells.nth(0).locator("input[name=users]").check()
    operator.page.click("input[name=disconnect]")

    expect(operator.page.locator(".messagelist")).to_contain_text("Sent 4403 to 2 connection(s) of 1 user(s).")
    for page in (bob.page, stream_tab):
        expect(state_of(page)).to_have_attribute("data-state", "refused", timeout=LIVE)

    carol = sign_in("carol")
    carol.page.goto(f"{carol.server.url}{ONLINE_NOW}")
    expect(carol.page).to_have_url(re.compile(r"/admin/login/"))
    expect(carol.page.locator("body")).to_contain_text("not authorized")
    expect(carol.page.locator("body")).not_to_contain_text("operator")


def test_page_reconnects_by_itself_after_daphne_restarts(sign_in, servers):
    alice, bob = sign_in("alice"), sign_in("bob")
    status = bob.page.locator("#status")

    servers[1].stop()
    expect(status).to_have_attribute("data-state", "reconnecting", timeout=LIVE)
    expect(status).to_contain_text(re.compile(r"Reconnecting in \d+ s"))
    screenshot(bob.page, "inbox-bob-reconnecting")
    servers[1].start()
    wait_connected(bob.page, timeout=20000)
    wait_connected(alice.page, timeout=20000)

    alice.send("bob", "Still there?")

    expect(newest_message(bob.page)).to_have_text("Still there?", timeout=LIVE)
    # One socket per tab after the reconnects: never a leftover second one.
    expect(alice.page.locator("#ack")).to_have_text(re.compile("delivered to 1 tab", re.I))

