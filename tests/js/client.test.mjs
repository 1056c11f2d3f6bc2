// Unit tests of the browser client's pure parts, with Node's own test runner:
//   node --test tests/js/        (make test-js)
// Backoff, the text/event-stream parser and the connection state machine, driven through a
// fake WebSocket / fetch and mocked timers. The browser tests (tests/test_browser.py) cover the
// same client against the real server.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import {
  backoffDelay,
  CLOSE_ABNORMAL,
  CLOSE_NORMAL,
  EventStreamParser,
  PROTOCOL_VERSION,
  RegistryEventStream,
  RegistrySocket,
  RequestError,
  State,
} from "../../channel_registry/static/channel_registry/client.js";

// --------------------------------------------------------------------------- backoff

describe("backoffDelay", () => {
  const options = { initialDelay: 1000, maxDelay: 30000 };

  test("the ceiling doubles with every attempt, up to maxDelay", () => {
    const ceilings = [0, 1, 2, 3, 4, 5, 6, 20].map((n) => backoffDelay(n, { ...options, random: () => 1 }));
    assert.deepEqual(ceilings, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
  });

  test("full jitter: uniform between 0 and the ceiling", () => {
    assert.equal(backoffDelay(3, { ...options, random: () => 0 }), 0);
    assert.equal(backoffDelay(3, { ...options, random: () => 0.25 }), 2000);
  });

  test("the default options use Math.random within [0, 1 s] for the first retry", () => {
    for (let i = 0; i < 200; i++) {
      const delay = backoffDelay(0);
      assert.ok(delay >= 0 && delay <= 1000, `${delay}`);
    }
  });
});

// --------------------------------------------------------------------------- text/event-stream

describe("EventStreamParser", () => {
  test("one event per blank line, with its event name, data and id", () => {
    const parser = new EventStreamParser();
    const events = parser.push('retry: 3000\n\nid: 7\nevent: notification\ndata: {"a":1}\n\n');
    assert.deepEqual(events, [{ event: "notification", data: '{"a":1}', id: "7" }]);
  });

  test("chunks split anywhere, even inside a line or a CRLF, give the same events", () => {
    const text = 'event: direct\r\ndata: {"x":\r\ndata: 2}\r\n\r\n: heartbeat\r\n\r\ndata: "next"\r\n\r\n';
    const whole = new EventStreamParser().push(text);
    for (let size = 1; size <= 7; size++) {
      const parser = new EventStreamParser();
      const events = [];
      for (let at = 0; at < text.length; at += size) events.push(...parser.push(text.slice(at, at + size)));
      assert.deepEqual(events, whole, `chunks of ${size}`);
    }
    assert.deepEqual(whole, [
      { event: "direct", data: '{"x":\n2}', id: "" },
      { event: "message", data: '"next"', id: "" },
    ]);
  });

  test("comments and events without data dispatch nothing; the id carries over; one leading space is dropped", () => {
    const parser = new EventStreamParser();
    assert.deepEqual(parser.push(": keep-alive\n\nevent: only-a-name\n\n"), []);
    assert.deepEqual(parser.push("id: 9\ndata:  two spaces\n\ndata\n\ndata:x\n\n"), [
      { event: "message", data: " two spaces", id: "9" },
      { event: "message", data: "", id: "9" },
      { event: "message", data: "x", id: "9" },
    ]);
  });

  test("an unfinished line waits for the rest", () => {
    const parser = new EventStreamParser();
    assert.deepEqual(parser.push("data: 1"), []);
    assert.deepEqual(parser.push("2\n"), []);
    assert.deepEqual(parser.push("\n"), [{ event: "message", data: "12", id: "" }]);
  });
});

// --------------------------------------------------------------------------- the state machine

/** A WebSocket stand-in: records what the client sends; the test plays the server. */
class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  static all = [];

  constructor(url) {
    this.url = url;
    this.readyState = FakeWebSocket.CONNECTING;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.all.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code) {
    this.closedWith = code;
    this.readyState = FakeWebSocket.CLOSED;
  }

  // The server's side.
  serverOpens() {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.({});
  }

  serverSends(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  serverCloses(code, reason = "") {
    this.readyState = FakeWebSocket.CLOSED;
    this.onclose?.({ code, reason });
  }

  static get last() {
    return FakeWebSocket.all.at(-1);
  }
}

/** Every event of the given types, as [type, detail]. */
function record(target, types = ["open", "close", "state", "message"]) {
  const seen = [];
  for (const type of types) target.addEventListener(type, (event) => seen.push([type, event.detail]));
  return seen;
}

const states = (seen) => seen.filter(([type]) => type === "state").map(([, detail]) => detail.state);

describe("RegistrySocket", () => {
  let savedWebSocket;

  beforeEach(() => {
    savedWebSocket = globalThis.WebSocket;
    globalThis.WebSocket = FakeWebSocket;
    FakeWebSocket.all = [];
    mock.timers.enable({ apis: ["setTimeout", "setInterval"] });
  });

  afterEach(() => {
    mock.timers.reset();
    globalThis.WebSocket = savedWebSocket;
  });

  /** A socket with a deterministic backoff: every delay is its ceiling. */
  const socket = (options = {}) => new RegistrySocket("http://example.test/ws/registry/", { random: () => 1, ...options });

  test("an http(s) URL becomes ws(s); connect → connecting → open", () => {
    const client = socket();
    const seen = record(client);
    client.connect();
    assert.equal(FakeWebSocket.last.url, "ws://example.test/ws/registry/");
    assert.equal(client.state, State.CONNECTING);
    FakeWebSocket.last.serverOpens();
    assert.deepEqual(states(seen), [State.CONNECTING, State.OPEN]);
    assert.deepEqual(seen.find(([type]) => type === "open"), ["open", {}]);
    client.close();
  });

  test("a lost connection is retried with growing delays, one socket at a time", () => {
    const client = socket();
    const seen = record(client, ["state"]);
    client.connect();
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    assert.deepEqual(seen.at(-1)[1].state, State.RECONNECTING);
    assert.equal(seen.at(-1)[1].delay, 1000);

    mock.timers.tick(999);
    assert.equal(FakeWebSocket.all.length, 1, "no new socket before the delay");
    mock.timers.tick(1);
    assert.equal(FakeWebSocket.all.length, 2);
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    assert.equal(seen.at(-1)[1].delay, 2000);
    mock.timers.tick(2000);
    FakeWebSocket.last.serverCloses(1011);
    assert.equal(seen.at(-1)[1].delay, 4000);
    // Every earlier socket was detached: its handlers are gone.
    for (const old of FakeWebSocket.all.slice(0, -1)) assert.equal(old.onclose, null);
    client.close();
  });

  test("a connection open for stableAfter resets the backoff", () => {
    const client = socket({ stableAfter: 10000 });
    const seen = record(client, ["state"]);
    client.connect();
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    mock.timers.tick(1000);
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    assert.equal(seen.at(-1)[1].delay, 2000);
    mock.timers.tick(2000);
    FakeWebSocket.last.serverOpens();
    mock.timers.tick(10000);
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    assert.equal(seen.at(-1)[1].delay, 1000);
    client.close();
  });

  for (const [code, state] of [[4401, State.SIGNED_OUT], [4410, State.SIGNED_OUT], [4403, State.REFUSED],
                               [4429, State.REFUSED]]) {
    test(`close code ${code} ends in "${state}" and is never retried`, () => {
      const client = socket();
      const seen = record(client);
      client.connect();
      FakeWebSocket.last.serverOpens();
      FakeWebSocket.last.serverCloses(code, "bye");
      assert.equal(client.state, state);
      assert.deepEqual(seen.find(([type]) => type === "close"), ["close", { code, reason: "bye" }]);
      assert.equal(seen.at(-1)[1].code, code);
      mock.timers.tick(120000);
      assert.equal(FakeWebSocket.all.length, 1);
    });
  }

  test("4409 (password changed) reconnects once after reauthenticateDelay, whatever the backoff", () => {
    const client = socket({ reauthenticateDelay: 1000, random: () => 0.99 });
    const seen = record(client, ["state"]);
    client.connect();
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    mock.timers.tick(1000);
    FakeWebSocket.last.serverOpens();
    FakeWebSocket.last.serverCloses(4409);
    assert.deepEqual(seen.at(-1)[1].delay, 1000);
    assert.equal(seen.at(-1)[1].code, 4409);
    mock.timers.tick(999);
    assert.equal(FakeWebSocket.all.length, 2);
    mock.timers.tick(1);
    assert.equal(FakeWebSocket.all.length, 3);
    // The session was not accepted again: signed out for good.
    FakeWebSocket.last.serverCloses(4401);
    assert.equal(client.state, State.SIGNED_OUT);
    mock.timers.tick(120000);
    assert.equal(FakeWebSocket.all.length, 3);
  });

  test("4420 (sent too fast) waits slowDownDelay plus the growing backoff before each reconnect", () => {
    const client = socket({ slowDownDelay: 30000 });
    const seen = record(client, ["state"]);
    client.connect();
    FakeWebSocket.last.serverOpens();
    FakeWebSocket.last.serverCloses(4420);
    assert.equal(client.state, State.RECONNECTING);
    assert.deepEqual([seen.at(-1)[1].delay, seen.at(-1)[1].code], [31000, 4420]);
    mock.timers.tick(30999);
    assert.equal(FakeWebSocket.all.length, 1, "no reconnect before the delay");
    mock.timers.tick(1);
    assert.equal(FakeWebSocket.all.length, 2);
    FakeWebSocket.last.serverOpens();
    FakeWebSocket.last.serverCloses(4420);
    assert.equal(seen.at(-1)[1].delay, 32000);
    client.close();
  });

  test("4503 (server unavailable) is retried with backoff", () => {
    const client = socket();
    client.connect();
    FakeWebSocket.last.serverCloses(4503);
    assert.equal(client.state, State.RECONNECTING);
  });

  test("4430 (over the handshake or resume budget) waits the seconds the close reason names, then the backoff", () => {
    const client = socket();
    client.connect();
    FakeWebSocket.last.serverCloses(4430, "12");
    assert.equal(client.state, State.RECONNECTING);
    mock.timers.tick(12999); // 12 s, and the first backoff's ceiling (1 s)
    assert.equal(FakeWebSocket.all.length, 1);
    mock.timers.tick(1);
    assert.equal(FakeWebSocket.all.length, 2);
  });

  test("close() stops for good: one close event with 1000, the socket closed, no retry", () => {
    const client = socket();
    const seen = record(client, ["close"]);
    client.connect();
    const ws = FakeWebSocket.last;
    ws.serverOpens();
    client.close();
    assert.equal(client.state, State.CLOSED);
    assert.equal(ws.closedWith, CLOSE_NORMAL);
    assert.deepEqual(seen, [["close", { code: CLOSE_NORMAL, reason: "closed by the page" }]]);
    mock.timers.tick(120000);
    assert.equal(FakeWebSocket.all.length, 1);
  });

  test("a ping without a pong within pongTimeout counts as a dead connection", () => {
    const client = socket({ pingInterval: 25000, pongTimeout: 10000 });
    const seen = record(client, ["close"]);
    client.connect();
    const ws = FakeWebSocket.last;
    ws.serverOpens();
    mock.timers.tick(25000);
    assert.deepEqual(ws.sent, [{ type: "ping" }]);
    ws.serverSends({ type: "pong" });
    mock.timers.tick(25000);
    assert.equal(ws.sent.length, 2);
    mock.timers.tick(10000);
    assert.deepEqual(seen, [["close", { code: CLOSE_ABNORMAL, reason: "no pong: the connection is dead" }]]);
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(ws.closedWith, CLOSE_NORMAL);
    client.close();
  });

  test("request(): an ack resolves, an error rejects with its code, other frames are messages", async () => {
    const client = socket();
    const seen = record(client, ["message"]);
    client.connect();
    const ws = FakeWebSocket.last;
    ws.serverOpens();

    const first = client.request({ type: "direct", to: 2, message: "hi" });
    const second = client.request({ type: "direct", to: 3, message: "hi", id: "mine" });
    assert.deepEqual(ws.sent.map((frame) => frame.id), ["r1", "mine"]);
    ws.serverSends({ type: "notification", data: 1 });
    ws.serverSends({ type: "error", id: "mine", code: "forbidden", detail: "no" });
    ws.serverSends({ type: "ack", id: "r1", delivered: 2 });

    assert.deepEqual(await first, { type: "ack", id: "r1", delivered: 2 });
    await assert.rejects(second, (error) => error instanceof RequestError && error.code === "forbidden");
    assert.deepEqual(seen, [["message", { data: { type: "notification", data: 1 } }]]);
    client.close();
  });

  test("request(): not connected, no answer in time, or closed before the answer", async () => {
    const client = socket({ requestTimeout: 5000 });
    await assert.rejects(client.request({ type: "ping" }), { code: "not_connected" });
    client.connect();
    FakeWebSocket.last.serverOpens();
    const late = client.request({ type: "direct", to: 2, message: 1 });
    mock.timers.tick(5000);
    await assert.rejects(late, { code: "timeout" });
    const cut = client.request({ type: "direct", to: 2, message: 1 });
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    await assert.rejects(cut, { code: "closed" });
    client.close();
  });

  test("offline: no retry until the browser is back online", () => {
    const listeners = {};
    const saved = Object.getOwnPropertyDescriptor(globalThis, "navigator");
    Object.defineProperty(globalThis, "navigator", { value: { onLine: false }, configurable: true });
    globalThis.addEventListener = (type, listener) => { listeners[type] = listener; };
    globalThis.removeEventListener = (type) => { delete listeners[type]; };
    try {
      const client = socket();
      client.connect();
      FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
      assert.equal(client.state, State.OFFLINE);
      mock.timers.tick(120000);
      assert.equal(FakeWebSocket.all.length, 1);
      globalThis.navigator.onLine = true;
      listeners.online();
      assert.equal(client.state, State.CONNECTING);
      assert.equal(FakeWebSocket.all.length, 2);
      client.close();
    } finally {
      delete globalThis.addEventListener;
      delete globalThis.removeEventListener;
      if (saved) Object.defineProperty(globalThis, "navigator", saved);
      else delete globalThis.navigator;
    }
  });

  test("the first connection asks for nothing; a reconnect resumes from the newest position", () => {
    const client = new RegistrySocket("http://example.test/ws/registry/", { random: () => 0 });
    const seen = record(client, ["message", "recovered", "reset"]);
    client.connect();
    assert.equal(FakeWebSocket.last.url, "ws://example.test/ws/registry/");
    FakeWebSocket.last.serverOpens();
    FakeWebSocket.last.serverSends({ type: "position", epoch: "e1", seq: 4 });
    assert.equal(client.position, "e1:4");
    FakeWebSocket.last.serverSends({ type: "notification", data: "x", epoch: "e1", seq: 5 });
    FakeWebSocket.last.serverSends({ type: "pong" });
    FakeWebSocket.last.serverSends({ type: "demo.presence", online: [] }); // not recoverable: no position
    assert.equal(client.position, "e1:5");

    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    mock.timers.tick(1);
    assert.equal(FakeWebSocket.last.url, "ws://example.test/ws/registry/?since=e1%3A5");
    FakeWebSocket.last.serverOpens();
    FakeWebSocket.last.serverSends({ type: "direct", message: "missed", epoch: "e1", seq: 6 });
    FakeWebSocket.last.serverSends({ type: "recovered", count: 1, epoch: "e1", seq: 6 });
    FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
    mock.timers.tick(1);
    FakeWebSocket.last.serverOpens();
    FakeWebSocket.last.serverSends({ type: "reset", reason: "epoch", epoch: "e2", seq: 0 });
    assert.equal(client.position, "e2:0");
    assert.deepEqual(seen.map(([type]) => type), ["message", "message", "message", "recovered", "reset"]);
    assert.deepEqual(seen[3][1], { count: 1, position: "e1:6" });
    assert.deepEqual(seen[4][1], { reason: "epoch", position: "e2:0" });
    client.close();
  });

  test("the first frame's protocol version is kept; an unknown major is warned about once, not per reconnect", () => {
    const warn = mock.method(console, "warn", () => {});
    try {
      const client = socket({ random: () => 0 });
      const seen = record(client, ["message"]);
      client.connect();
      assert.equal(client.protocolVersion, null);
      FakeWebSocket.last.serverOpens();
      FakeWebSocket.last.serverSends({ type: "position", epoch: "e1", seq: 0, protocol: PROTOCOL_VERSION });
      assert.equal(client.protocolVersion, "1.0");
      FakeWebSocket.last.serverSends({ type: "reset", reason: "epoch", epoch: "e2", seq: 0 }); // mid-stream: no version
      assert.equal(client.protocolVersion, "1.0");
      FakeWebSocket.last.serverSends({ type: "notification", data: { protocol: "9.0" } }); // a page's own field
      assert.equal(client.protocolVersion, "1.0");
      assert.equal(warn.mock.callCount(), 0);

      FakeWebSocket.last.serverSends({ type: "position", epoch: "e2", seq: 0, protocol: "1.7" }); // a newer minor
      assert.equal(warn.mock.callCount(), 0);
      for (let reconnect = 0; reconnect < 2; reconnect++) {
        FakeWebSocket.last.serverCloses(CLOSE_ABNORMAL);
        mock.timers.tick(1);
        FakeWebSocket.last.serverOpens();
        FakeWebSocket.last.serverSends({ type: "recovered", count: 0, epoch: "e2", seq: 0, protocol: "2.0" });
      }
      assert.equal(client.protocolVersion, "2.0");
      assert.equal(warn.mock.callCount(), 1);
      assert.match(warn.mock.calls[0].arguments[0], /server speaks protocol 2\.0, this client 1\.0/);
      assert.deepEqual(seen.map(([, detail]) => detail.data.type), ["notification"]);
      client.close();
    } finally {
      warn.mock.restore();
    }
  });

  test("a saved position is resumed from the first connection", () => {
    const client = new RegistrySocket("http://example.test/ws/?x=1", { position: "ab:7" });
    client.connect();
    assert.equal(FakeWebSocket.last.url, "ws://example.test/ws/?x=1&since=ab%3A7");
    client.close();
  });
});

// --------------------------------------------------------------------------- the event stream

describe("RegistryEventStream", () => {
  let savedFetch;

  beforeEach(() => {
    savedFetch = globalThis.fetch;
  });

  afterEach(() => {
    globalThis.fetch = savedFetch;
  });

  const until = async (predicate) => {
    for (let i = 0; i < 200 && !predicate(); i++) await new Promise((resolve) => setImmediate(resolve));
    assert.ok(predicate(), "condition not reached");
  };

  const refusals = [
    [401, 4401, State.SIGNED_OUT], [403, 4403, State.REFUSED], [429, 4429, State.REFUSED],
    [503, 4503, State.RECONNECTING], [500, CLOSE_ABNORMAL, State.RECONNECTING],
  ];
  for (const [status, code, state] of refusals) {
    test(`HTTP ${status} ends in "${state}"`, async () => {
      globalThis.fetch = async () => new Response("no", { status, headers: { "Content-Type": "text/plain" } });
      const stream = new RegistryEventStream("http://example.test/events/", { random: () => 0.5 });
      const seen = record(stream, ["close"]);
      stream.connect();
      await until(() => stream.state === state);
      assert.deepEqual(seen, [["close", { code, reason: `HTTP ${status}` }]]);
      stream.close();
    });
  }

  test("HTTP 429 with Retry-After (over a budget) is retried after it, not refused", async () => {
    globalThis.fetch = async () =>
      new Response("{}", { status: 429, headers: { "Content-Type": "application/json", "Retry-After": "7" } });
    const stream = new RegistryEventStream("http://example.test/events/", { random: () => 0.5 });
    const seen = record(stream, ["close", "state"]);
    stream.connect();
    await until(() => stream.state === State.RECONNECTING);
    assert.deepEqual(seen.filter(([type]) => type === "close"), [["close", { code: 4430, reason: "7" }]]);
    assert.equal(seen.at(-1)[1].delay, 7500); // the server's 7 s, then half the backoff's first ceiling
    stream.close();
  });

  test("a stream that never opens is abandoned after openTimeout and retried", async () => {
    let aborted = 0;
    globalThis.fetch = (url, init) => new Promise((resolve, reject) => {
      init.signal.addEventListener("abort", () => { aborted++; reject(new Error("aborted")); });
    });
    const stream = new RegistryEventStream("http://example.test/events/", { openTimeout: 20, random: () => 0.5 });
    const seen = record(stream, ["close"]);
    stream.connect();
    await new Promise((resolve) => setTimeout(resolve, 60));
    assert.equal(stream.state, State.RECONNECTING);
    assert.deepEqual(seen, [["close", { code: CLOSE_ABNORMAL, reason: "the stream did not open" }]]);
    assert.equal(aborted, 1);
    stream.close();
  });

  test("server events become messages; a disconnect event ends it with its code", async () => {
    const body = [
      "retry: 3000\n\n",
      'id: e:0\nevent: position\ndata: {"type":"position","epoch":"e","seq":0,"protocol":"1.0"}\n\n',
      ': heartbeat\n\nid: 1\nevent: notification\ndata: {"type":"notification","data":"hi"}\n\n',
      'event: disconnect\ndata: {"code":4410}\n\n',
    ];
    globalThis.fetch = async (url, init) => {
      assert.equal(init.headers.Accept, "text/event-stream");
      const stream = new ReadableStream({
        start(controller) {
          for (const chunk of body) controller.enqueue(new TextEncoder().encode(chunk));
        },
      });
      return new Response(stream, { status: 200, headers: { "Content-Type": "text/event-stream" } });
    };
    const stream = new RegistryEventStream("http://example.test/events/");
    const seen = record(stream, ["message", "close"]);
    stream.connect();
    await until(() => stream.state === State.SIGNED_OUT);
    assert.equal(stream.protocolVersion, "1.0");
    assert.deepEqual(seen, [
      ["message", { data: { type: "notification", data: "hi" }, event: "notification", id: "1" }],
      ["close", { code: 4410, reason: "disconnected by the server" }],
    ]);
    stream.close();
  });
});
