/*! ortto-relay.js - drop-in ap3c.activity for ortto-gateway. No dependencies.
 *
 * <script src="/ortto/ortto-relay.js" data-endpoint="/ortto"></script>
 *
 * Keeps the website guide's calls working unchanged:
 *   ap3c.track({"v": 0, "email": ..., "first": ..., "last": ...})  remembers the person
 *   ap3c.track({"v": 0, "ei": ...})                                 (external id)
 *   ap3c.activity({"activity_id": ..., "attributes": {...}})        sends through the gateway
 * Calls queued in ap3c.act before this script loaded are sent too. Calls made in
 * the same tick go in one request (fetch keepalive); when the page is hidden or
 * unloading, what is pending goes with navigator.sendBeacon (text/plain, no
 * preflight). Network failures and 5xx are retried a few times with backoff; a 4xx
 * is final. Each answer is announced as a `ortto-relay:response` event on window.
 */
(function (w, d) {
  "use strict";
  if (w.__orttoRelay) return;
  var script = d.currentScript;
  var base = (script && script.getAttribute("data-endpoint")) || "";
  var url = base.replace(/\/+$/, "") + "/v1/activities/create";
  var RETRIES = 3;
  var BASE_DELAY = 500;
  var MAX_BATCH = 100;

  var ap3c = (w.ap3c = w.ap3c || {});
  ap3c.cmd = ap3c.cmd || [];
  var person = {};
  var pending = [];
  var scheduled = false;

  function remember(t) {
    if (!t || typeof t !== "object") return;
    if (typeof t.email === "string" && t.email) person["str::email"] = t.email;
    if (typeof t.ei === "string" && t.ei) person["str::ei"] = t.ei;
    if (typeof t.first === "string") person["str::first"] = t.first;
    if (typeof t.last === "string") person["str::last"] = t.last;
  }

  function withPerson(act) {
    var out = {};
    for (var k in act) if (Object.prototype.hasOwnProperty.call(act, k)) out[k] = act[k];
    var attrs = act.attributes || {};
    var fields = {};
    var given = act.fields || {};
    for (var f in given) if (Object.prototype.hasOwnProperty.call(given, f)) fields[f] = given[f];
    var hasId = fields["str::email"] || fields["str::ei"] || attrs["str::email"] ||
      attrs["str::ei"] || act.person_id;
    for (var p in person) {
      if (!Object.prototype.hasOwnProperty.call(person, p)) continue;
      var isId = p === "str::email" || p === "str::ei";
      if (isId && hasId) continue;
      if (!(p in fields) && !(p in attrs)) fields[p] = person[p];
    }
    out.fields = fields;
    return out;
  }

  function announce(detail) {
    try {
      w.dispatchEvent(new CustomEvent("ortto-relay:response", { detail: detail }));
    } catch (e) { /* old browsers */ }
  }

  function post(batch, attempt) {
    var body = JSON.stringify({ activities: batch });
    var opts = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: body,
      keepalive: body.length < 60000,
      credentials: "omit",
      mode: "cors"
    };
    return fetch(url, opts).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = JSON.parse(text); } catch (e) { data = null; }
        if (resp.status >= 500 && attempt < RETRIES) return retry(batch, attempt, resp);
        announce({ status: resp.status, body: data, activities: batch });
        return resp.status;
      });
    }, function () {
      if (attempt < RETRIES) return retry(batch, attempt, null);
      announce({ status: 0, body: null, activities: batch });
      return 0;
    });
  }

  function retry(batch, attempt, resp) {
    var hint = resp && parseInt(resp.headers.get("Retry-After") || "", 10);
    var delay = hint > 0 ? hint * 1000 : BASE_DELAY * Math.pow(2, attempt) * (0.5 + Math.random());
    return new Promise(function (resolve) {
      setTimeout(function () { resolve(post(batch, attempt + 1)); }, delay);
    });
  }

  function beacon(batch) {
    if (!navigator.sendBeacon) return false;
    var blob = new Blob([JSON.stringify({ activities: batch })], { type: "text/plain" });
    return navigator.sendBeacon(url, blob);
  }

  function flush(useBeacon) {
    scheduled = false;
    while (pending.length) {
      var batch = pending.splice(0, MAX_BATCH);
      if (useBeacon && beacon(batch)) continue;
      post(batch, 0);
    }
  }

  function send(act) {
    if (!act || typeof act !== "object") return;
    pending.push(withPerson(act));
    if (d.visibilityState === "hidden") return flush(true);
    if (!scheduled) {
      scheduled = true;
      Promise.resolve().then(function () { flush(false); });
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

  // Ortto's own script may set ap3c.track and ap3c.activity after this one loads:
  // keep our activity, and wrap whatever track it installs.
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

  var queued = ap3c.act;
  ap3c.act = { push: function (act) { send(act); } };
  if (queued && queued.length) for (var i = 0; i < queued.length; i++) send(queued[i]);

  function leaving() { if (pending.length) flush(true); }
  w.addEventListener("pagehide", leaving);
  d.addEventListener("visibilitychange", function () {
    if (d.visibilityState === "hidden") leaving();
  });

  w.__orttoRelay = { endpoint: url, person: person, flush: flush };
})(window, document);
