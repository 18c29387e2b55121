// The operator console: a live stream of requests, what was forwarded, delivery, dead
// letters, settings and activities. Plain JS, no build step, no external resources.
"use strict";

const TOKEN = document.querySelector('meta[name="console-token"]').content;
const MAX_EVENTS = 2000;
const STATE_EVERY_MS = 2000;

const events = []; // every event received, oldest first (bounded)
const held = []; // events received while paused
let paused = false;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function clock(t) {
  return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 23) : "";
}

async function post(url, body) {
  const resp = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Console-Token": TOKEN },
    body: JSON.stringify(body),
  });
  let answer;
  try { answer = await resp.json(); } catch (e) { answer = null; }
  return { status: resp.status, answer };
}

async function getJSON(url) {
  const resp = await fetch(url, { credentials: "same-origin" });
  return { status: resp.status, answer: await resp.json() };
}

// -- the stream

const FILTERS = {
  activity: (ev, v) => (ev.activity_id || "").toLowerCase().includes(v),
  outcome: (ev, v) => (ev.outcome || "") === v,
  reason: (ev, v) => (ev.reason || "").toLowerCase().includes(v) ||
    (ev.warnings || []).some((w) => w.toLowerCase().includes(v)),
  person: (ev, v) => (ev.person || "").toLowerCase().includes(v),
  request: (ev, v) => (ev.request_id || "").toLowerCase().includes(v),
};

function filterValues() {
  return {
    activity: $("f-activity").value.trim().toLowerCase(),
    outcome: $("f-outcome").value,
    reason: $("f-reason").value.trim().toLowerCase(),
    person: $("f-person").value.trim().toLowerCase(),
    request: $("f-request").value.trim().toLowerCase(),
  };
}

function shown(ev, values) {
  return Object.entries(values).every(([name, v]) => !v || FILTERS[name](ev, v));
}

function row(ev) {
  const tr = el("tr", undefined, "event outcome-" + (ev.outcome || ""));
  tr.dataset.outcome = ev.outcome || "";
  tr.dataset.reason = ev.reason || "";
  tr.dataset.activity = ev.activity_id || "";
  tr.append(el("td", clock(ev.time)));
  const kind = el("td", ev.kind);
  if (ev.test) kind.append(" ", el("span", "test", "badge test"));
  tr.append(kind);
  tr.append(el("td", ev.kind === "delivery" ? (ev.count || 0) + " activities" : ev.activity_id));
  tr.append(el("td", ev.outcome, "outcome"));
  const why = ev.reason || (ev.kind === "delivery" && ev.status !== undefined ? "HTTP " + ev.status : "");
  const reason = el("td", why, "reason");
  if (ev.field) reason.append(" ", el("small", ev.field));
  if (ev.warnings && ev.warnings.length) reason.append(" ", el("small", "warn: " + ev.warnings.join(", ")));
  tr.append(reason);
  tr.append(el("td", ev.person, "mono"));
  tr.append(el("td", ev.client, "mono"));
  tr.append(el("td", ev.request_id, "mono"));
  tr.append(el("td", ev.worker));
  tr.addEventListener("click", () => showDetail(ev, tr));
  return tr;
}

function render() {
  const body = $("events").querySelector("tbody");
  const values = filterValues();
  const rows = [];
  for (let i = events.length - 1; i >= 0; i--) {
    if (shown(events[i], values)) rows.push(row(events[i]));
  }
  body.replaceChildren(...rows);
  $("shown-count").textContent = rows.length + " of " + events.length;
}

function add(ev) {
  events.push(ev);
  if (events.length > MAX_EVENTS) events.shift();
  if (events.length > MAX_EVENTS) return render();
  const values = filterValues();
  if (shown(ev, values)) {
    const body = $("events").querySelector("tbody");
    body.prepend(row(ev));
    while (body.children.length > MAX_EVENTS) body.lastChild.remove();
  }
  $("shown-count").textContent = $("events").querySelector("tbody").children.length + " of " + events.length;
  if (ev.kind === "delivery") addAnswer(ev);
}

function connect() {
  const source = new EventSource("/console/events");
  source.onopen = () => { setStatus("live", "ok"); };
  source.onerror = () => { setStatus("reconnecting…", "warn"); };
  source.onmessage = (message) => {
    const ev = JSON.parse(message.data);
    if (paused) {
      held.push(ev);
      if (held.length > MAX_EVENTS) held.shift(); // bounded: only the newest are kept
      $("paused-note").textContent = held.length + " new while paused";
    } else {
      add(ev);
    }
  };
}

function setStatus(text, cls) {
  const badge = $("stream-status");
  badge.textContent = text;
  badge.className = "badge " + cls;
}

function togglePause() {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("paused-note").hidden = !paused;
  $("paused-note").textContent = "paused";
  if (!paused) {
    held.splice(0).forEach(add);
  }
}

// -- detail: the event, what was forwarded, the deliveries that name it

async function showDetail(ev, tr) {
  document.querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
  tr.classList.add("selected");
  $("detail-empty").hidden = true;
  $("detail").hidden = false;
  $("detail-event").textContent = JSON.stringify(ev, null, 2);
  const forwarded = $("forwarded");
  const related = $("related");
  forwarded.replaceChildren();
  related.replaceChildren();
  if (!ev.key) {
    forwarded.append(el("p", ev.outcome === "refused"
      ? "Refused by the gateway: nothing was sent to Ortto."
      : "No activity key on this event.", "muted"));
    return;
  }
  const deliveries = events.filter((e) => e.kind === "delivery" && (e.keys || []).includes(ev.key));
  if (deliveries.length) {
    deliveries.forEach((d) => related.append(el("p",
      clock(d.time) + "  " + d.outcome + "  HTTP " + d.status + (d.error ? "  " + d.error : ""))));
  } else {
    related.append(el("p", "None seen yet (still queued, or before this page opened).", "muted"));
  }
  const { status, answer } = await getJSON("/console/api/forwarded/" + encodeURIComponent(ev.key));
  if (status !== 200) {
    forwarded.append(el("p", ev.outcome === "accepted"
      ? "Not forwarded yet, or no longer remembered (the console keeps the most recent)."
      : (answer && answer.error) || "Nothing forwarded.", "muted"));
    return;
  }
  forwarded.append(el("p", "POST " + answer.endpoint, "mono"));
  forwarded.append(el("pre", Object.entries(answer.headers).map(([k, v]) => k + ": " + v).join("\n"), "headers"));
  forwarded.append(el("pre", JSON.stringify(answer.body, null, 2), "forwarded-body"));
  forwarded.append(el("p", "Ortto answered HTTP " + answer.status + ":"));
  forwarded.append(el("pre", JSON.stringify(answer.answer, null, 2), "forwarded-answer"));
}

// -- delivery

let lastRequests = null;

function addAnswer(ev) {
  const body = $("answers").querySelector("tbody");
  const tr = el("tr", undefined, "outcome-" + ev.outcome);
  [clock(ev.time), ev.outcome, ev.status, ev.count, ev.ms !== undefined ? Math.round(ev.ms) : "", ev.error || ""]
    .forEach((v) => tr.append(el("td", v)));
  body.prepend(tr);
  while (body.children.length > 20) body.lastChild.remove();
}

function sum(values) {
  return Object.values(values || {}).reduce((a, b) => a + b, 0);
}

function fact(list, name, value, cls) {
  list.append(el("dt", name));
  list.append(el("dd", value, cls));
}

function showDelivery(state) {
  const d = state.delivery;
  const list = $("delivery");
  list.replaceChildren();
  const paused = Object.entries(d.delivery_paused || {}).filter(([, v]) => v > 0).map(([k]) => k);
  fact(list, "Sending", paused.length ? "PAUSED: " + paused.join(", ") : "running", paused.length ? "bad" : "ok");
  fact(list, "Spool depth", d.spool_depth ?? "n/a");
  fact(list, "Batches in flight", d.delivery_batches_in_flight ?? "n/a");
  const age = d.spool_oldest_age_seconds;
  fact(list, "Oldest waiting", age === undefined ? "n/a" : age.toFixed(1) + " s");
  fact(list, "Spool writable", d.spool_writable === 0 ? "NO" : "yes", d.spool_writable === 0 ? "bad" : "");
  fact(list, "Dead letters", d.dead_letters ?? "n/a", d.dead_letters > 0 ? "warn" : "");
  const total = sum(d.upstream_requests_total);
  const now = Date.now() / 1000;
  let rate = "";
  if (lastRequests) rate = ((total - lastRequests.total) / (now - lastRequests.at)).toFixed(2) + " req/s now, ";
  lastRequests = { total, at: now };
  fact(list, "Upstream rate", rate + "limit " + state.upstream_rate + " req/s");
  const statuses = Object.entries(d.upstream_requests_total || {}).filter(([, v]) => v > 0).map(([k, v]) => k + ": " + v).join(", ");
  fact(list, "Ortto answers (total)", statuses || "none yet");
  const retries = Object.entries(d.upstream_retries_total || {}).filter(([, v]) => v > 0)
    .map(([k, v]) => k + ": " + v).join(", ");
  fact(list, "Retries", retries || "none");
  const pauses = Object.entries(d.delivery_pauses_total || {}).filter(([, v]) => v > 0)
    .map(([k, v]) => k + ": " + v).join(", ");
  fact(list, "Pauses (backoff, …)", pauses || "none");
  fact(list, "Delivery mode", state.delivery_mode);
  const body = $("answers").querySelector("tbody");
  if (!body.children.length) state.deliveries.slice().reverse().forEach(addAnswer);
}

async function refreshState() {
  try {
    const { status, answer } = await getJSON("/console/api/state");
    if (status === 200) {
      showDelivery(answer);
      if (!$("settings").textContent) showSettings(answer);
    }
  } catch (e) {
    // the next poll tries again
  }
}

// -- dead letters

async function loadDeadLetters() {
  const error = $("dl-error").value.trim();
  const { status, answer } = await getJSON("/console/api/dead-letters" + (error ? "?error=" + encodeURIComponent(error) : ""));
  const body = $("dead-letters").querySelector("tbody");
  if (status !== 200) {
    $("dl-note").textContent = (answer && answer.error) || "cannot list dead letters";
    return;
  }
  const rows = answer.dead_letters.map((letter) => {
    const tr = el("tr", undefined, "dead-letter");
    tr.dataset.id = letter.id;
    [letter.id, letter.failed_at, letter.activity_id, letter.person, letter.error, letter.spool.split("/").pop()]
      .forEach((v) => tr.append(el("td", v)));
    const actions = el("td");
    const inspect = el("button", "Inspect");
    inspect.type = "button";
    inspect.addEventListener("click", () => {
      $("dl-payload").hidden = false;
      $("dl-payload").textContent = JSON.stringify(letter.payload, null, 2);
    });
    const replay = el("button", "Replay", "replay");
    replay.type = "button";
    replay.addEventListener("click", () => act("replay", { spool: letter.spool, ids: [letter.id] }));
    const purge = el("button", "Purge", "danger");
    purge.type = "button";
    purge.addEventListener("click", () => {
      if (confirm("Delete dead letter " + letter.id + "?")) act("purge", { spool: letter.spool, ids: [letter.id] });
    });
    actions.append(inspect, " ", replay, " ", purge);
    tr.append(actions);
    return tr;
  });
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr")).append(el("td", "No dead letters.", "muted"));
}

async function act(action, choice) {
  const { status, answer } = await post("/console/api/dead-letters/" + action, choice);
  $("dl-note").textContent = status === 200
    ? (action === "replay" ? "re-queued " : "deleted ") + answer.count
    : (answer && answer.error) || "HTTP " + status;
  await loadDeadLetters();
}

// -- settings and activities

function showSettings(state) {
  $("settings").textContent = JSON.stringify(state.settings, null, 2);
  const body = $("activities").querySelector("tbody");
  const rows = Object.entries(state.activities).map(([id, spec]) => {
    const tr = el("tr", undefined, "activity");
    tr.dataset.activity = id;
    [id, spec.person_limit, spec.ip_limit, spec.signed_identity ? "required" : "no"]
      .forEach((v) => tr.append(el("td", v)));
    const cell = el("td");
    const form = el("form", undefined, "test-form");
    const email = el("input");
    email.type = "email";
    email.required = true;
    email.placeholder = "test@example.com";
    email.name = "email";
    const send = el("button", "Send");
    send.type = "submit";
    const out = el("output", "", "test-answer");
    form.append(email, " ", send, " ", out);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      out.textContent = "sending…";
      const { status, answer } = await post("/console/api/test-activity", { activity_id: id, email: email.value });
      out.textContent = status === 200
        ? "HTTP " + answer.status + " " + JSON.stringify(answer.answer)
        : (answer && answer.error) || "HTTP " + status;
    });
    cell.append(form);
    tr.append(cell);
    return tr;
  });
  body.replaceChildren(...rows);
}

// -- start

document.addEventListener("DOMContentLoaded", () => {
  $("filters").addEventListener("input", render);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("pause").addEventListener("click", togglePause);
  $("clear").addEventListener("click", () => { events.length = 0; held.length = 0; render(); });
  $("dl-refresh").addEventListener("click", loadDeadLetters);
  $("dl-replay-all").addEventListener("click", () => act("replay", { all: true }));
  $("dl-purge-all").addEventListener("click", () => {
    if (confirm("Delete ALL dead letters?")) act("purge", { all: true });
  });
  connect();
  refreshState();
  loadDeadLetters();
  setInterval(refreshState, STATE_EVERY_MS);
});
