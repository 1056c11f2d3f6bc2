/**
 * channel_registry's browser client: a WebSocket or a Server-Sent Events stream
 * that stays connected. A dependency-free ES module.
 *
 *   import { RegistrySocket } from "/static/channel_registry/client.js";
 *   const socket = new RegistrySocket("/ws/registry/");
 *   socket.addEventListener("message", (event) => show(event.detail.data));
 *   socket.addEventListener("state", (event) => render(event.detail.state));
 *   socket.connect();
 *   const ack = await socket.request({ type: "direct", to: 2, message: "hi" });
 *
 * Both classes dispatch the same events, each a CustomEvent with a `detail`:
 *   open      {}
 *   close     { code, reason }                  every time a connection ends or fails
 *   message   { data, event?, id? }             data: the parsed JSON frame
 *   state     { state, delay?, retryAt?, code? } see State
 *   recovered { count, position }               after a reconnect: the `count` events missed
 *                                                meanwhile were delivered (as messages) before it
 *   reset     { reason, position }              after a reconnect: what was missed cannot be
 *                                                replayed; reload your state from the server
 *
 * The first frame of every connection (`position`; `recovered` or `reset` after a resume)
 * announces the server's wire protocol version, "<major>.<minor>": the client keeps it as
 * `protocolVersion` and warns in the console when its major is not PROTOCOL_VERSION's.
 *
 * Recoverable frames carry their place in the user's history (`epoch`, `seq`).
 * The client keeps the newest as `position` ("<epoch>:<seq>") and sends it when
 * it reconnects (`?since=`), so the server replays what was missed, in order and
 * once. Pass `{ position }` to resume from a position the page saved earlier.
 *
 * After a close they reconnect with exponential backoff and full jitter, except
 * after 4401/4410 (state "signed-out": the session is gone), 4403/4429 (state "refused": the
 * server closed it for another reason that a retry would not change) or close(). After 4409 (the
 * user's password changed) they reconnect once after `reauthenticateDelay` ms, so the session
 * is checked again: the one that changed the password comes back. After 4420 (the page sent
 * faster than the server allows) they wait `slowDownDelay` ms plus the backoff. After 4430 (HTTP
 * 429 with Retry-After for streams: over the user's handshake or resume budget) they wait the
 * seconds the server named plus the backoff. They never hold two
 * connections at once: the old one is detached and closed before a new one opens.
 */

/** The wire protocol this client speaks, "<major>.<minor>": it understands any minor version of this major. */
export const PROTOCOL_VERSION = "1.0";

export const CLOSE_NORMAL = 1000;
/** What a browser reports for a connection that died without a close frame. */
export const CLOSE_ABNORMAL = 1006;
export const CLOSE_UNAUTHENTICATED = 4401;
export const CLOSE_FORBIDDEN = 4403;
/** Over the server's per-user connection limit; retrying would only evict another tab. */
export const CLOSE_TOO_MANY = 4429;
/** The session that opened the connection ended: logout, or the account was deactivated. */
export const CLOSE_SESSION_ENDED = 4410;
/** The user's credentials changed: reconnect so the server checks the session again. */
export const CLOSE_REAUTHENTICATE = 4409;
/** The server cannot register connections right now; retried with backoff like a network drop. */
export const CLOSE_UNAVAILABLE = 4503;
/** This connection kept sending after the server refused its frames; reconnect only after slowDownDelay. */
export const CLOSE_TOO_FAST = 4420;
/** Over the user's handshake or resume budget; the close reason is the seconds to wait. */
export const CLOSE_RETRY_LATER = 4430;
const SIGNED_OUT = new Set([CLOSE_UNAUTHENTICATED, CLOSE_SESSION_ENDED]);
/** Frames about the history itself: the client consumes them. */
const HISTORY_FRAMES = new Set(["position", "recovered", "reset"]);
const REFUSED = new Set([CLOSE_FORBIDDEN, CLOSE_TOO_MANY]);

export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  /** Waiting `delay` ms (until `retryAt`, a Date.now() value) before the next attempt. */
  RECONNECTING: "reconnecting",
  /** The browser reports no network; the next attempt starts when it comes back. */
  OFFLINE: "offline",
  /** The session is gone (4401/4410 or HTTP 401); nothing is retried. */
  SIGNED_OUT: "signed-out",
  /** The server closed this connection for a reason a retry would not change (4403, 4429, HTTP 403). */
  REFUSED: "refused",
  /** Not started yet, or stopped by close(). */
  CLOSED: "closed",
});

/** @typedef {typeof State[keyof typeof State]} StateName One of the State values. */
/**
 * @typedef {object} BackoffOptions
 * @property {number} initialDelay ceiling of the first retry's delay, ms
 * @property {number} maxDelay ceiling of any delay, ms
 * @property {number} stableAfter ms connected after which the backoff starts over
 * @property {() => number} random a uniform number in [0, 1)
 * @property {number} reauthenticateDelay ms before reconnecting after 4409 (password changed)
 * @property {number} slowDownDelay ms added to the backoff after 4420 (sent too fast)
 */
/** @typedef {{ event: string, data: string, id: string }} ServerEvent One event of a text/event-stream. */

/** @type {BackoffOptions} */
const BACKOFF = {
  /** Ceiling of the first retry's delay, in ms; it doubles with every failed attempt. */
  initialDelay: 1000,
  maxDelay: 30000,
  /** A connection open this long counts as stable: the next retry starts small again. */
  stableAfter: 10000,
  random: Math.random,
  reauthenticateDelay: 1000,
  /** After 4420 the page sent faster than the server allows: this long first, then the backoff. */
  slowDownDelay: 30000,
};

/**
 * Full jitter: a uniform delay in [0, min(maxDelay, initialDelay × 2^attempt)].
 * Spreads the reconnects of every tab after a server restart instead of
 * bringing them back in waves.
 * @param {number} attempt how many attempts failed before this one (0 for the first retry)
 * @param {Pick<BackoffOptions, "initialDelay" | "maxDelay" | "random">} [options]
 * @returns {number} ms to wait
 */
export function backoffDelay(attempt, { initialDelay, maxDelay, random } = BACKOFF) {
  return random() * Math.min(maxDelay, initialDelay * 2 ** attempt);
}

/** An error frame (or a missing answer) in reply to request(). */
export class RequestError extends Error {
  /**
   * @param {string} code the server's error code, or "not_connected", "timeout", "closed"
   * @param {string} detail
   * @param {Record<string, any> | null} [frame] the server's error frame, if there was one
   */
  constructor(code, detail, frame = null) {
    super(detail);
    this.code = code;
    this.frame = frame;
  }
}

/**
 * What both transports share: state, backoff and events. A subclass implements
 * start() (open the transport and report through opened(), received() and
 * lost()) and detach() (drop its handlers, close it, tell whether one existed).
 */
class Connection extends EventTarget {
  /**
   * @param {string} url
   * @param {Partial<BackoffOptions> & Record<string, any>} options
   */
  constructor(url, options) {
    super();
    this.url = url;
    /** @type {BackoffOptions & Record<string, any>} the backoff ones and the subclass's own */
    this.options = { ...BACKOFF, ...options };
    /** @type {string | null} "<epoch>:<seq>" of the newest recoverable frame received */
    this.position = options.position ?? null;
    /** @type {string | null} the protocol version the server announced; null until the first frame (and from servers before 0.2) */
    this.protocolVersion = null;
    /** @type {StateName} */
    this.state = State.CLOSED;
    this.attempt = 0;
    this.stopped = true;
    /** @type {any} a timer id (a number in browsers, an object in Node) */
    this.retryTimer = null;
    /** @type {any} */
    this.stableTimer = null;
    this.whenOnline = () => this.reopen();
    this.whenOffline = () => {
      if (this.state === State.OPEN || this.state === State.CONNECTING || this.state === State.RECONNECTING) {
        this.lost(CLOSE_ABNORMAL, "the browser went offline");
      }
    };
  }

  /** Start (or restart at once). Attach listeners first: events fire from here on. */
  connect() {
    this.stopped = false;
    globalThis.addEventListener?.("offline", this.whenOffline);
    this.reopen();
  }

  /** Stop for good; connect() starts again. */
  close() {
    this.stopped = true;
    globalThis.removeEventListener?.("offline", this.whenOffline);
    this.clearTimers();
    if (this.detach()) this.emit("close", { code: CLOSE_NORMAL, reason: "closed by the page" });
    this.setState(State.CLOSED);
  }

  /** Open the transport; report through opened(), received() and lost(). Subclasses implement it. */
  start() {
    throw new Error("not implemented");
  }

  /**
   * Drop the transport's handlers and close it. Subclasses implement it.
   * @returns {boolean} whether there was one
   */
  detach() {
    return false;
  }

  reopen() {
    this.clearTimers();
    this.detach();
    this.setState(State.CONNECTING);
    this.start();
  }

  opened() {
    this.setState(State.OPEN);
    this.emit("open", {});
    this.stableTimer = setTimeout(() => { this.attempt = 0; }, this.options.stableAfter);
  }

  /** @param {{ data: any, event?: string, id?: string }} detail */
  received(detail) {
    if (this.follow(detail.data)) this.emit("message", detail);
  }

  /**
   * Keep the position a frame carries; the history's own frames become events.
   * @param {Record<string, any>} frame
   * @returns {boolean} whether it is a frame for the page
   */
  follow(frame) {
    const position = typeof frame?.epoch === "string" && Number.isInteger(frame.seq) ? `${frame.epoch}:${frame.seq}` : null;
    if (position) this.position = position;
    if (typeof frame?.protocol === "string" && HISTORY_FRAMES.has(frame.type)) this.announced(frame.protocol);
    if (frame?.type === "recovered") {
      this.emit("recovered", { count: frame.count, position });
    } else if (frame?.type === "reset") {
      this.emit("reset", { reason: frame.reason, position });
    }
    return !HISTORY_FRAMES.has(frame?.type);
  }

  /**
   * Keep the protocol version a server announced; a major this client does not know is
   * warned about once, not on every reconnect.
   * @param {string} version
   */
  announced(version) {
    if (version !== this.protocolVersion && majorOf(version) !== majorOf(PROTOCOL_VERSION)) {
      console.warn(`channel_registry: the server speaks protocol ${version}, this client ${PROTOCOL_VERSION}; ` +
        "frames may not be understood: update client.js with the server's library.");
    }
    this.protocolVersion = version;
  }

  /** The transport's URL, with the position to resume from. */
  resumeURL() {
    if (!this.position) return this.url;
    return `${this.url}${this.url.includes("?") ? "&" : "?"}since=${encodeURIComponent(this.position)}`;
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  lost(code, reason) {
    this.clearTimers();
    if (this.detach()) this.emit("close", { code, reason });
    if (this.stopped) return;
    if (SIGNED_OUT.has(code)) {
      this.setState(State.SIGNED_OUT, { code });
    } else if (REFUSED.has(code)) {
      this.setState(State.REFUSED, { code });
    } else if (code === CLOSE_REAUTHENTICATE) {
      // Long enough for the page that changed the password to have its new session cookie.
      const delay = this.options.reauthenticateDelay;
      this.attempt = 0;
      this.setState(State.RECONNECTING, { delay, retryAt: Date.now() + delay, code });
      this.retryTimer = setTimeout(() => this.reopen(), delay);
    } else if (code === CLOSE_RETRY_LATER) {
      this.scheduleRetry(1000 * (Number.parseFloat(reason) || 0), code);
    } else {
      this.scheduleRetry(code === CLOSE_TOO_FAST ? this.options.slowDownDelay : 0, code);
    }
  }

  /**
   * @param {number} [minimum] ms waited before the backoff's own delay
   * @param {number} [code] the close that made it retry, reported with the state
   */
  scheduleRetry(minimum = 0, code = undefined) {
    if (globalThis.navigator?.onLine === false) {
      this.setState(State.OFFLINE, { code });
      globalThis.addEventListener("online", this.whenOnline, { once: true });
      return;
    }
    const delay = minimum + backoffDelay(this.attempt++, this.options);
    this.setState(State.RECONNECTING, { delay, retryAt: Date.now() + delay, code });
    this.retryTimer = setTimeout(() => this.reopen(), delay);
  }

  clearTimers() {
    clearTimeout(this.retryTimer);
    clearTimeout(this.stableTimer);
    globalThis.removeEventListener?.("online", this.whenOnline);
  }

  /**
   * @param {StateName} state
   * @param {Record<string, any>} [detail]
   */
  setState(state, detail = {}) {
    this.state = state;
    this.emit("state", { state, ...detail });
  }

  /**
   * @param {string} type
   * @param {Record<string, any>} detail
   */
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** The registry's WebSocket protocol: JSON frames, ping/pong, acks matched to requests. */
export class RegistrySocket extends Connection {
  /**
   * url: a ws(s):// URL or a path on this site ("/ws/registry/").
   * options: the backoff ones, plus pingInterval (25 s), pongTimeout (10 s), requestTimeout (10 s).
   * @param {string} url
   * @param {Partial<BackoffOptions> & { pingInterval?: number, pongTimeout?: number, requestTimeout?: number }} [options]
   */
  constructor(url, options = {}) {
    super(webSocketURL(url), { pingInterval: 25000, pongTimeout: 10000, requestTimeout: 10000, ...options });
    /** @type {WebSocket | null} */
    this.socket = null;
    /** @type {Map<string | number, { resolve: (frame: any) => void, reject: (error: RequestError) => void, timer: any }>} */
    this.pending = new Map();
    this.requestIds = 0;
    /** @type {any} */
    this.pingTimer = null;
    /** @type {any} */
    this.pongTimer = null;
  }

  /**
   * Send one frame; false when not connected (nothing is queued).
   * @param {Record<string, any>} frame
   * @returns {boolean}
   */
  send(frame) {
    if (this.state !== State.OPEN || !this.socket) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  /**
   * Send a frame that the server answers with `ack` (resolves) or `error` (rejects with RequestError).
   * @param {Record<string, any> & { id?: string | number }} frame
   * @returns {Promise<{ type: "ack", id: string | number, delivered: number | null }>}
   */
  request(frame) {
    const id = frame.id ?? `r${++this.requestIds}`;
    return new Promise((resolve, reject) => {
      if (!this.send({ ...frame, id })) {
        reject(new RequestError("not_connected", "not connected"));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RequestError("timeout", "no answer from the server"));
      }, this.options.requestTimeout);
      this.pending.set(id, { resolve, reject, timer });
    });
  }

  start() {
    const socket = new WebSocket(this.resumeURL());
    socket.onopen = () => {
      this.opened();
      this.pingTimer = setInterval(() => this.ping(), this.options.pingInterval);
    };
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = (event) => this.lost(event.code, event.reason);
    this.socket = socket;
  }

  ping() {
    if (this.pongTimer || !this.send({ type: "ping" })) return;
    this.pongTimer = setTimeout(
      () => this.lost(CLOSE_ABNORMAL, "no pong: the connection is dead"),
      this.options.pongTimeout,
    );
  }

  /** @param {string} text */
  receive(text) {
    const frame = JSON.parse(text);
    if (frame.type === "pong") {
      clearTimeout(this.pongTimer);
      this.pongTimer = null;
      return;
    }
    const request = (frame.type === "ack" || frame.type === "error") && this.pending.get(frame.id);
    if (!request) {
      this.received({ data: frame });
      return;
    }
    this.pending.delete(frame.id);
    clearTimeout(request.timer);
    if (frame.type === "ack") request.resolve(frame);
    else request.reject(new RequestError(frame.code, frame.detail, frame));
  }

  detach() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
    for (const { reject, timer } of this.pending.values()) {
      clearTimeout(timer);
      reject(new RequestError("closed", "the connection closed before the answer"));
    }
    this.pending.clear();
    const socket = this.socket;
    if (!socket) return false;
    this.socket = null;
    socket.onopen = socket.onmessage = socket.onclose = null;
    if (socket.readyState === WebSocket.CONNECTING || socket.readyState === WebSocket.OPEN) {
      socket.close(CLOSE_NORMAL);
    }
    return true;
  }
}

/**
 * A Server-Sent Events stream (channel_registry.views.EventStreamView), read
 * with fetch() rather than EventSource: the status of a refusal stays visible
 * (401 → "signed-out", 403 and 429 → "refused", 503 → retried), reconnects follow
 * the same backoff as sockets, a stream that has not opened within openTimeout
 * (10 s: no status, or no first byte) is abandoned and retried, and a stream
 * silent for idleTimeout (45 s: three missed 15 s heartbeats) is treated as dead. The server's `retry:` hint is for native EventSource
 * clients; this one uses its backoff. A `disconnect` event ends the stream
 * with the close code it carries.
 */
export class RegistryEventStream extends Connection {
  /**
   * @param {string} url
   * @param {Partial<BackoffOptions> & { idleTimeout?: number, openTimeout?: number }} [options]
   */
  constructor(url, options = {}) {
    super(url, { idleTimeout: 45000, openTimeout: 10000, ...options });
    /** @type {AbortController | null} */
    this.abort = null;
    /** @type {any} */
    this.idleTimer = null;
  }

  start() {
    const abort = new AbortController();
    this.abort = abort;
    // A failure of a stream that was already detached (aborted) is no news.
    this.read(abort.signal).catch((error) => {
      if (!abort.signal.aborted) this.lost(CLOSE_ABNORMAL, String(error));
    });
  }

  /** @param {AbortSignal} signal */
  async read(signal) {
    this.watch(this.options.openTimeout, "the stream did not open");
    const response = await fetch(this.resumeURL(), {
      headers: { Accept: "text/event-stream" },
      credentials: "same-origin",
      cache: "no-store",
      signal,
    });
    if (!isEventStream(response)) {
      // A budget refusal's reason is its Retry-After, as a socket's 4430 close reason is.
      this.lost(refusalCode(response), response.headers.get("Retry-After") ?? `HTTP ${response.status}`);
      return;
    }
    const body = /** @type {ReadableStream<BufferSource>} */ (response.body);
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new EventStreamParser();
    for (;;) {
      const { value, done } = await reader.read();
      if (signal.aborted) return;
      if (done) break;
      if (this.state !== State.OPEN) this.opened();
      this.watch(this.options.idleTimeout, "no heartbeat: the stream is dead");
      for (const event of parser.push(value)) this.dispatchServerEvent(event);
    }
    this.lost(CLOSE_ABNORMAL, "the server ended the stream");
  }

  /** @param {ServerEvent} serverEvent */
  dispatchServerEvent({ event, data, id }) {
    const frame = JSON.parse(data);
    if (event === "disconnect") {
      this.lost(frame.code, "disconnected by the server");
    } else {
      this.received({ data: frame, event, id });
    }
  }

  /**
   * Restart the watchdog: any bytes, heartbeat comments included, prove the stream alive.
   * @param {number} timeout ms
   * @param {string} reason
   */
  watch(timeout, reason) {
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.lost(CLOSE_ABNORMAL, reason), timeout);
  }

  detach() {
    clearTimeout(this.idleTimer);
    const abort = this.abort;
    if (!abort) return false;
    this.abort = null;
    abort.abort();
    return true;
  }
}

/**
 * @param {string} version "<major>.<minor>"
 * @returns {string}
 */
function majorOf(version) {
  return version.split(".")[0];
}

/**
 * @param {string} url
 * @returns {string}
 */
function webSocketURL(url) {
  const absolute = new URL(url, globalThis.location?.href);
  absolute.protocol = absolute.protocol.replace(/^http/, "ws");
  return absolute.href;
}

/** @param {Response} response */
function isEventStream(response) {
  return response.ok && (response.headers.get("Content-Type") || "").startsWith("text/event-stream");
}

/**
 * The close code for a response that is not an event stream.
 * @param {Response} response
 * @returns {number}
 */
function refusalCode(response) {
  if (response.status === 401 || response.redirected) return CLOSE_UNAUTHENTICATED; // redirected: a login page
  if (response.status === 403) return CLOSE_FORBIDDEN;
  if (response.status === 429 && response.headers.has("Retry-After")) return CLOSE_RETRY_LATER; // over a budget
  if (response.status === 429) return CLOSE_TOO_MANY; // over the per-user connection limit
  if (response.status === 503) return CLOSE_UNAVAILABLE;
  return CLOSE_ABNORMAL;
}

/** The text/event-stream format, fed in arbitrary chunks; yields { event, data, id } per event. */
export class EventStreamParser {
  constructor() {
    this.buffer = "";
    this.afterCR = false;
    this.id = "";
    this.event = "message";
    /** @type {string[]} */
    this.data = [];
    this.reset();
  }

  reset() {
    this.event = "message";
    this.data = [];
  }

  /**
   * @param {string} text the next chunk
   * @returns {ServerEvent[]} the events it completed
   */
  push(text) {
    // A chunk may end between the "\r" and the "\n" of one line ending.
    if (this.afterCR && text.startsWith("\n")) text = text.slice(1);
    if (text) this.afterCR = text.endsWith("\r");
    const lines = (this.buffer + text).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() ?? "";
    const events = [];
    for (const line of lines) {
      if (line === "") {
        if (this.data.length) events.push({ event: this.event, data: this.data.join("\n"), id: this.id });
        this.reset();
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      const value = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id") this.id = value;
    }
    return events;
  }
}
