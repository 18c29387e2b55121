/*! ortto-relay.js - drop-in ap3c.activity for ortto-gateway. No dependencies.
 *
 *   <script src="/ortto/ortto-relay.js"></script>
 *   <script src="https://gw.example/ortto-relay.js" data-endpoint="https://gw.example"></script>
 *
 * The endpoint is data-endpoint + "/v1/activities/create"; without data-endpoint, the
 * directory the script was loaded from (so /ortto/ortto-relay.js posts to /ortto/...).
 * Keeps the website guide's calls working unchanged:
 *   ap3c.track({"v": 0, "email": ..., "first": ..., "last": ...})  remembers the person
 *   ap3c.track({"v": 0, "ei": ...})                                 (external id)
 *   ap3c.activity({"activity_id": ..., "attributes": {...}})        sends through the gateway
 * Activities pushed to ap3c.act before this script loaded are sent too. Calls made in the
 * same tick go in one request (fetch, keepalive); when the page is hidden or unloading they
 * go with navigator.sendBeacon (text/plain: no preflight). Network failures and 5xx are
 * retried 3 times with backoff; a 4xx is final. If Ortto's own script later sets
 * ap3c.track, it is wrapped (and still called); ap3c.activity stays this one. Each fetch
 * answer is announced as an `ortto-relay:response` event on window.
 */
(function (w, d) {
  "use strict";
  if (w.__orttoRelay) return;
  var RETRIES = 3;
  var BASE_DELAY = 500; // ms before the first retry, doubled each time, with jitter
  var MAX_DELAY = 30000; // cap on a Retry-After hint
  var MAX_BATCH = 100; // Ortto's limit of activities per request
  var MAX_BYTES = 60000; // under the gateway's 64 kB body limit and fetch keepalive's 64 KiB

  var script = d.currentScript || d.querySelector('script[src*="ortto-relay"]');
  var base = script && script.getAttribute("data-endpoint");
  if (base === null || base === undefined) {
    base = script && script.src ? script.src.replace(/[?#].*$/, "").replace(/\/[^\/]*$/, "") : "";
  }
  var url = base.replace(/\/+$/, "") + "/v1/activities/create";
  var encoder = w.TextEncoder ? new w.TextEncoder() : null;
  var has = Object.prototype.hasOwnProperty;

  var ap3c = (w.ap3c = w.ap3c || {});
  ap3c.cmd = ap3c.cmd || [];
  var person = null; // person fields from the last ap3c.track that named someone
  var identity = ""; // the signed identity token given with that ap3c.track, if any
  var pending = []; // [{a: activity, s: its JSON}] waiting for the end of the tick
  var waiting = []; // [{batch, attempt, timer}] waiting to be retried
  var scheduled = false;
  var leaving = false;

  function bytes(text) {
    return encoder ? encoder.encode(text).length : text.length * 3;
  }

  function remember(t) {
    if (!t || typeof t !== "object") return;
    var email = typeof t.email === "string" ? t.email.trim() : "";
    var ei = typeof t.ei === "string" ? t.ei.trim() : "";
    if (!email && !ei) return; // a page view without identity keeps the person
    person = {};
    identity = typeof t.identity === "string" ? t.identity : "";
    if (email) person["str::email"] = email;
    if (ei) person["str::ei"] = ei;
    if (typeof t.first === "string" && t.first) person["str::first"] = t.first;
    if (typeof t.last === "string" && t.last) person["str::last"] = t.last;
  }

  function copy(obj) {
    var out = {};
    if (obj && typeof obj === "object") for (var k in obj) if (has.call(obj, k)) out[k] = obj[k];
    return out;
  }

  // Adds the remembered person to an activity that names nobody, or names the same email;
  // an activity that names someone else is left alone.
  function withPerson(act) {
    var out = copy(act);
    if (!person) return out;
    var fields = copy(act.fields);
    var attrs = act.attributes || {};
    var email = fields["str::email"] || attrs["str::email"];
    var named = email || fields["str::ei"] || attrs["str::ei"] || act.person_id;
    var same = typeof email === "string" && person["str::email"] &&
      email.trim().toLowerCase() === person["str::email"].toLowerCase();
    if (named && !same) return out;
    for (var p in person) if (!(p in fields) && !(p in attrs)) fields[p] = person[p];
    out.fields = fields;
    // The signed identity from the site's backend (ap3c.track({..., "identity": token})).
    if (identity && !out.identity) out.identity = identity;
    return out;
  }

  function announce(detail) {
    try {
      w.dispatchEvent(new CustomEvent("ortto-relay:response", { detail: detail }));
    } catch (e) { /* no CustomEvent: nobody is listening */ }
  }

  function body(batch) {
    var parts = [];
    for (var i = 0; i < batch.length; i++) parts.push(batch[i].s);
    return '{"activities":[' + parts.join(",") + "]}";
  }

  function activities(batch) {
    var out = [];
    for (var i = 0; i < batch.length; i++) out.push(batch[i].a);
    return out;
  }

  function split(items) {
    var out = [];
    var cur = [];
    var size = 20;
    for (var i = 0; i < items.length; i++) {
      var n = bytes(items[i].s) + 1;
      if (cur.length && (cur.length >= MAX_BATCH || size + n > MAX_BYTES)) {
        out.push(cur);
        cur = [];
        size = 20;
      }
      cur.push(items[i]);
      size += n;
    }
    if (cur.length) out.push(cur);
    return out;
  }

  function post(batch, attempt) {
    var text = body(batch);
    if (!w.fetch) return beacon(batch);
    w.fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: text,
      keepalive: bytes(text) <= MAX_BYTES,
      credentials: "omit",
      mode: "cors"
    }).then(function (resp) {
      if (resp.status >= 500 && attempt < RETRIES) {
        return later(batch, attempt + 1, parseInt(resp.headers.get("Retry-After") || "", 10));
      }
      return resp.json().catch(function () { return null; }).then(function (data) {
        announce({ status: resp.status, body: data, activities: activities(batch) });
      });
    }, function () {
      // A network failure, or a CORS refusal, which a page cannot tell apart.
      if (attempt < RETRIES) return later(batch, attempt + 1, NaN);
      announce({ status: 0, body: null, activities: activities(batch) });
    });
  }

  function later(batch, attempt, hint) {
    var delay = hint > 0 ? Math.min(hint * 1000, MAX_DELAY)
      : BASE_DELAY * Math.pow(2, attempt - 1) * (0.5 + Math.random());
    var entry = { batch: batch, attempt: attempt, timer: 0 };
    entry.timer = setTimeout(function () {
      waiting.splice(waiting.indexOf(entry), 1);
      post(batch, attempt);
    }, delay);
    waiting.push(entry);
  }

  function beacon(batch) {
    try {
      // A string goes as text/plain;charset=UTF-8: a simple request, no preflight.
      return !!(w.navigator.sendBeacon && w.navigator.sendBeacon(url, body(batch)));
    } catch (e) {
      return false;
    }
  }

  function flush() {
    scheduled = false;
    var away = leaving || d.visibilityState === "hidden";
    var batches = split(pending);
    pending = [];
    for (var i = 0; i < batches.length; i++) {
      if (!(away && beacon(batches[i]))) post(batches[i], 0);
    }
  }

  function send(act) {
    if (!act || typeof act !== "object") return;
    var out = withPerson(act);
    var text;
    try {
      text = JSON.stringify(out);
    } catch (e) {
      if (w.console) w.console.warn("ortto-relay: activity is not JSON", e);
      return;
    }
    pending.push({ a: out, s: text });
    if (!scheduled) {
      scheduled = true;
      // Still runs during pagehide: microtasks run as soon as each listener returns.
      Promise.resolve().then(flush);
    }
  }

  function away() {
    if (pending.length) flush();
    var retries = waiting;
    waiting = [];
    for (var i = 0; i < retries.length; i++) {
      clearTimeout(retries[i].timer);
      if (!beacon(retries[i].batch)) post(retries[i].batch, retries[i].attempt);
    }
  }

  function wrapTrack(original) {
    var wrapped = function (t) {
      remember(t);
      if (typeof original === "function") return original.apply(this, arguments);
    };
    wrapped.__orttoRelay = true;
    return wrapped;
  }

  // Ortto's own script sets ap3c.track and ap3c.activity when it loads, before or after
  // this one: wrap whatever track it installs, and keep this activity.
  var track = wrapTrack(ap3c.track);
  try {
    Object.defineProperty(ap3c, "track", {
      configurable: true,
      enumerable: true,
      get: function () { return track; },
      set: function (fn) { track = fn && fn.__orttoRelay ? fn : wrapTrack(fn); }
    });
    Object.defineProperty(ap3c, "activity", {
      configurable: true,
      enumerable: true,
      get: function () { return send; },
      set: function () { /* the gateway's activity stays in place */ }
    });
  } catch (e) {
    ap3c.track = track;
    ap3c.activity = send;
  }

  // The guide's stub pushes to ap3c.act until a script takes over: send what it queued,
  // and keep an array there (Ortto's script may read it) whose push sends.
  var queued = ap3c.act;
  var act = [];
  act.push = function () {
    for (var i = 0; i < arguments.length; i++) send(arguments[i]);
    return 0;
  };
  ap3c.act = act;
  if (queued && queued.length) for (var i = 0; i < queued.length; i++) send(queued[i]);

  // Registered now, so before the page's own pagehide listeners: an activity sent from one
  // of those goes by beacon.
  w.addEventListener("pagehide", function () { leaving = true; away(); });
  w.addEventListener("pageshow", function () { leaving = false; });
  d.addEventListener("visibilitychange", function () {
    if (d.visibilityState === "hidden") away();
  });

  w.__orttoRelay = {
    endpoint: url,
    flush: flush,
    person: function () { return person && copy(person); },
    waiting: function () { return waiting.length; }
  };
})(window, document);
