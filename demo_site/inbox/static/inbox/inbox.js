// The inbox page: one live connection (the chosen transport), the online list,
// sending, incoming messages and stored unread ones. Every text from the server
// or another user goes through textContent, never innerHTML.
import { RegistryEventStream, RegistrySocket, RequestError, State } from "../channel_registry/client.js";

const TRANSPORTS = {
  mapping: {
    open: () => new RegistrySocket("/ws/registry/"),
    hint: "WebSocket /ws/registry/: one registry row per tab, so acks count tabs. Reaches mapping and SSE tabs.",
  },
  groups: {
    open: () => new RegistrySocket("/ws/groups/"),
    hint: "WebSocket /ws/groups/: per-user groups. Reaches only tabs on groups; cannot count tabs or report presence.",
  },
  sse: {
    open: () => new RegistryEventStream("/events/"),
    hint: "Server-Sent Events /events/: registered like a socket, so it receives what mapping tabs receive. Sends with a POST.",
  },
};
const STATUS_TEXT = {
  [State.CONNECTING]: "Connecting…",
  [State.OPEN]: "Connected",
  [State.OFFLINE]: "Offline: waiting for the network",
  [State.SIGNED_OUT]: "Signed out: sign in again",
  [State.REFUSED]: "Closed: too many open tabs",
  [State.CLOSED]: "Disconnected",
};
const MAX_SHOWN = 100;

const $ = (selector) => document.querySelector(selector);
const compose = $("#compose");
const csrfToken = compose.elements.csrfmiddlewaretoken.value;
const me = Number($("#me").dataset.userId);
const names = new Map([...compose.elements.to.options].map((option) => [Number(option.value), option.textContent]));
names.set(me, $("#me").textContent);

let transport = TRANSPORTS[localStorage.getItem("transport")] ? localStorage.getItem("transport") : "mapping";
let connection = null;
let countdown = null;

function connect(name) {
  connection?.close();
  transport = name;
  localStorage.setItem("transport", name);
  $("#transport-hint").textContent = TRANSPORTS[name].hint;
  $("#presence-note").hidden = name !== "groups";
  connection = TRANSPORTS[name].open();
  connection.addEventListener("state", (event) => showState(event.detail));
  connection.addEventListener("close", ({ detail }) => { $("#status").dataset.closeReason = detail.reason; });
  connection.addEventListener("open", () => refreshPresence());
  connection.addEventListener("message", (event) => receive(event.detail.data));
  connection.addEventListener("recovered", ({ detail }) => {
    if (detail.count) showHistoryNote(`${detail.count} missed ${detail.count === 1 ? "message" : "messages"} recovered`);
  });
  connection.addEventListener("reset", ({ detail }) => {
    // Missed messages could not be replayed (history lost or too far behind): the database has them.
    showHistoryNote(`Could not replay missed messages (${detail.reason}); unread list reloaded`);
    loadUnread();
  });
  connection.connect();
}

function showHistoryNote(text) {
  $("#history-note").textContent = text;
}

function showState({ state, retryAt, code }) {
  clearInterval(countdown);
  $("#status").dataset.state = state;
  // The close that led here (4401 signed out, 4430 over a budget …): for whoever debugs a reconnect loop.
  $("#status").dataset.closeCode = code ?? "";
  $("#online").classList.toggle("stale", state !== State.OPEN); // it updates only while connected
  const text = $("#status-text");
  if (state !== State.RECONNECTING) {
    text.textContent = STATUS_TEXT[state];
    return;
  }
  const tick = () => {
    text.textContent = `Reconnecting in ${Math.max(1, Math.ceil((retryAt - Date.now()) / 1000))} s`;
  };
  tick();
  countdown = setInterval(tick, 250);
}

function receive(frame) {
  if (frame.type === "demo.presence") {
    showOnline(frame.online);
  } else if (frame.type === "direct") {
    addMessage($("#incoming"), { from: nameOf(frame.from), message: frame.message, sentAt: frame.sent_at });
  } else if (frame.type === "notification") {
    addMessage($("#incoming"), { from: "Notification", message: frame.data, sentAt: new Date().toISOString() });
  }
}

function nameOf(userId) {
  return names.get(userId) ?? `user #${userId}`;
}

function addMessage(list, { from, message, sentAt, via = transport }) {
  const item = $("#message-template").content.firstElementChild.cloneNode(true);
  item.querySelector(".from").textContent = from;
  item.querySelector(".via").textContent = via;
  const time = item.querySelector("time");
  time.dateTime = sentAt;
  time.textContent = new Date(sentAt).toLocaleTimeString();
  item.querySelector(".text").textContent = typeof message === "string" ? message : JSON.stringify(message);
  list.querySelector(".empty")?.remove();
  list.prepend(item);
  while (list.children.length > MAX_SHOWN) list.lastElementChild.remove();
}

function showEmpty(list, text) {
  const item = document.createElement("li");
  item.className = "empty";
  item.textContent = text;
  list.replaceChildren(item);
}

async function refreshPresence() {
  try {
    showOnline((await requestJSON("/presence/")).online);
  } catch {
    // The next presence event brings the list.
  }
}

function showOnline(people) {
  const list = $("#online");
  if (!people.length) {
    showEmpty(list, "Nobody on mapping or SSE");
    return;
  }
  list.replaceChildren(...people.map(({ id, username }) => {
    names.set(id, username);
    const item = document.createElement("li");
    item.textContent = id === me ? `${username} (you)` : username;
    return item;
  }));
}

/** fetch() with the CSRF token; the JSON reply, or a RequestError for an error reply. */
async function requestJSON(url, { method = "GET", body } = {}) {
  const response = await fetch(url, {
    method,
    headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken },
    body: body && JSON.stringify(body),
  });
  const type = response.headers.get("Content-Type") || "";
  const reply = type.startsWith("application/json") ? await response.json() : {};
  if (!response.ok) throw new RequestError(reply.code ?? response.status, reply.detail ?? response.statusText, reply);
  return reply;
}

function describeAck({ delivered }, recipient) {
  if (delivered === null && transport === "groups") return "Sent. The groups transport cannot count tabs.";
  if (delivered === null) return "Sent."; // ACK_DELIVERED is off: the server does not tell who is online
  if (delivered === 0) return `${recipient} is offline; the message waits in their unread list.`;
  return `Delivered to ${delivered} ${delivered === 1 ? "tab" : "tabs"}.`;
}

async function send(event) {
  event.preventDefault();
  const to = Number(compose.elements.to.value);
  const frame = { type: "direct", to, message: compose.elements.message.value };
  const ack = $("#ack");
  try {
    const reply = transport === "sse"
      ? await requestJSON("/messages/", { method: "POST", body: frame })
      : await connection.request(frame);
    ack.dataset.result = "ok";
    ack.textContent = describeAck(reply, nameOf(to));
    compose.elements.message.value = "";
  } catch (error) {
    ack.dataset.result = "error";
    const wait = error.frame?.retry_after;
    ack.textContent = `Not sent: ${error.message}` + (wait ? ` (try again in ${Math.ceil(wait)} s)` : "");
  }
}

async function loadUnread() {
  const list = $("#unread");
  try {
    const { unread } = await requestJSON("/notifications/");
    showEmpty(list, "No unread messages.");
    for (const item of [...unread].reverse()) {
      addMessage(list, { from: nameOf(item.from), message: item.message, sentAt: item.sent_at, via: "stored" });
    }
    $("#mark-read").disabled = unread.length === 0;
  } catch (error) {
    showEmpty(list, `Could not load: ${error.message}`);
  }
}

async function markAllRead() {
  try {
    await requestJSON("/notifications/read/", { method: "POST" });
    showEmpty($("#unread"), "All read.");
    $("#mark-read").disabled = true;
  } catch (error) {
    showEmpty($("#unread"), `Could not mark read: ${error.message}`);
  }
}

for (const radio of document.querySelectorAll("[name=transport]")) {
  radio.checked = radio.value === transport;
  radio.addEventListener("change", () => connect(radio.value));
}
compose.addEventListener("submit", send);
$("#load-unread").addEventListener("click", loadUnread);
$("#mark-read").addEventListener("click", markAllRead);
connect(transport);
