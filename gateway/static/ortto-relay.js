/*! ortto-relay.js, Ortto's ap3c via ortto-gateway (docs/shim.md) */
// What each part does and why: docs/shim.md. The gateway serves this file minified by
// gateway/shim.py (comments and spacing dropped; so no template literals here), and a test
// keeps that under 4 KB gzipped.
((w, d) => {
  if (w.__orttoRelay) return;
  // RETRIES after a network failure or a 5xx, the first after DELAY ms, doubled each time; a
  // Retry-After hint is followed up to MAX_DELAY ms. At most 100 activities (Ortto's limit) and
  // MAX_BYTES in a request: under the gateway's 64 kB body limit and under the 64 KiB that
  // keepalive fetches and beacons may have in flight. The outbox in localStorage keeps at most
  // KEEP activities and KEEP_CHARS characters; EARLY is what the loader kept.
  const RETRIES = 3,
    DELAY = 500,
    MAX_DELAY = 30000,
    MAX_BYTES = 60000,
    OUTBOX = "ortto-relay:outbox",
    EARLY = "ortto-relay:early",
    KEEP = 100,
    REPEAT = 828e5, // 23 h: within the gateway's 24 h memory of a key
    KEEP_CHARS = 200000,
    NAMES = { email: "str::email", first: "str::first", last: "str::last", ei: "str::ei" },
    con = w.console,
    loc = w.location,
    script = d.currentScript || d.querySelector('script[src*="ortto-relay"]'),
    attr = (name) => script && script.getAttribute("data-" + name),
    base = (attr("endpoint") ?? (script && script.src ? new URL(".", script.src).href : "")).replace(/\/+$/, ""),
    url = base + "/v1/activities/create",
    debug = (attr("debug") ?? "false") != "false" || /[?&]ortto_debug=1/.test(loc.search),
    ap3c = (w.ap3c = w.ap3c || {}),
    gpc = attr("gpc") != null && navigator.globalPrivacyControl === true,
    // Items {a: activity, s: its JSON, k: its key, r: its promise's resolve} in a fetch;
    // {batch, attempt, timer} waiting for a retry.
    flying = [],
    waiting = [];
  // true: send and keep; null: hold in memory until ap3c.consent; false: nothing at all.
  let consent = gpc ? false : ap3c.relayConsent ?? (attr("consent") == "required" ? null : true),
    // The person of the last ap3c.track that named someone, and the signed identity it gave.
    person = null,
    identity = "",
    // Items waiting for the end of the tick, and for consent.
    pending = [],
    held = [],
    scheduled = false,
    leaving = false,
    // The gateway failed on this page (network or 5xx): a beacon to it would be lost.
    failed = false,
    // A probe found the gateway up after a cross-origin POST failed: a CORS refusal.
    refused = false,
    restored = false;

  const say = (level, text) => debug && con[level]("ortto-relay: " + text);
  const bytes = (text) => new TextEncoder().encode(text).length;
  const drop = (list, x) => list.includes(x) && list.splice(list.indexOf(x), 1);
  const answer = (error) => ({ status: 0, accepted: false, duplicate: false, warnings: [], retryAfterSeconds: null, error, kept: false });

  // localStorage may be absent, full or forbidden: then nothing is kept.
  const load = (key) => {
    try {
      return JSON.parse(localStorage.getItem(key)) || [];
    } catch (e) {
      return [];
    }
  };
  const save = (key, list) => {
    try {
      list.length ? localStorage.setItem(key, JSON.stringify(list)) : localStorage.removeItem(key);
    } catch (e) {}
  };
  const forget = () => save(OUTBOX, save(EARLY, []) || []);
  const keep = (items) => {
    const list = load(OUTBOX).concat(items.map((it) => ({ k: it.k, a: it.a })));
    while (list.length > KEEP || JSON.stringify(list).length > KEEP_CHARS) {
      con.warn("ortto-relay: too many unsent activities: dropped the oldest, " + list.shift().a.activity_id);
    }
    save(OUTBOX, list);
  };
  const unkeep = (batch) => save(OUTBOX, load(OUTBOX).filter((e) => !batch.some((it) => it.k == e.k)));
  // Handed to the browser as the page left (a beacon, a fetch in flight): maybe delivered. Kept,
  // marked with the time; the next page sends it again within the gateway's 24 h memory of keys
  // (a repeat is answered as a duplicate, never counted twice), and drops it after that.
  const mark = (batch) => save(OUTBOX, load(OUTBOX).map((e) => (e.m || !batch.some((it) => it.k == e.k) ? e : { ...e, m: Date.now() })));

  // Ortto's track object ({"v": 0, "email", "first", "last"}, {"ei"}, or person fields by their
  // Ortto names) as person fields; null when it names nobody (a page view).
  const personOf = (t) => {
    const p = {};
    for (const k in t) {
      const name = NAMES[k] || (k.includes("::") ? k : ""),
        v = typeof t[k] == "string" ? t[k].trim() : t[k];
      if (name && v != null && v !== "") p[name] = v;
    }
    return p["str::email"] || p["str::ei"] ? p : null;
  };

  // The person goes into an activity that names nobody, or names the same email; one that names
  // someone else is left alone. Each activity gets a key: a re-send is the same activity.
  const item = (act, who, token) => {
    const a = Object.assign({}, act),
      fields = Object.assign({}, act.fields),
      attrs = act.attributes || {},
      email = fields["str::email"] || attrs["str::email"];
    if (who && (email ? String(email).trim().toLowerCase() == String(who["str::email"]).toLowerCase() : !(fields["str::ei"] || attrs["str::ei"] || act.person_id))) {
      for (const p in who) if (!(p in fields || p in attrs)) fields[p] = who[p];
      a.fields = fields;
      if (token && !a.identity) a.identity = token;
    }
    a.key = a.key || (crypto.randomUUID ? crypto.randomUUID() : Date.now() + "-" + Math.random());
    return { a, s: JSON.stringify(a), k: a.key, r: null };
  };

  const human = (s) => {
    const h = Math.floor(s / 3600),
      m = Math.floor((s % 3600) / 60);
    return h ? h + " h " + m + " min" : m ? m + " min " + (s % 60) + " s" : s + " s";
  };

  // ap3c.activity's answer, and the debug mode's explanation of it.
  const settle = (it, status, body, entry, retry, kept) => {
    entry = entry || {};
    body = body || {};
    let error = entry.error || body.error || null;
    error = (error && error.message) || error;
    const res = {
      status,
      accepted: status > 199 && status < 300 && !entry.error && !/invalid|limit/.test(entry.status),
      duplicate: entry.duplicate === true,
      warnings: entry.warnings || body.warnings || [],
      retryAfterSeconds: retry > 0 ? retry : +(/retry in (\d+) s/.exec(error) || [])[1] || null,
      error,
      kept
    };
    const id = it.a.activity_id + ": ";
    say(res.accepted ? "info" : "warn", res.accepted ? id + "accepted" + (res.duplicate ? ", a duplicate counted once" : "")
      : status == 404 ? id + "not enabled: add it to GATEWAY_ACTIVITIES"
      : status == 403 ? "this page's origin " + loc.origin + " is not allowed: add it to GATEWAY_ALLOWED_ORIGINS"
      : kept ? id + "no answer (" + (status || "network") + "), kept for the next page"
      : res.retryAfterSeconds ? id + "limit reached, try again in " + human(res.retryAfterSeconds)
      : id + status + " " + error + (/person field/.test(error) ? " (GATEWAY_PERSON_FIELDS allows it)" : ""));
    res.warnings.forEach((w) => say("warn", id + (w.message || w)));
    if (it.r) it.r(res);
  };

  const text = (batch) => '{"activities":[' + batch.map((it) => it.s).join() + "]}";

  const answered = (batch, status, data, retry) => {
    // 5xx and no answer: kept for the next page; anything else is the gateway's last word.
    const final = status > 0 && status < 500,
      list = (data && data.activities) || [];
    drop(flying, batch);
    failed = !final;
    if (final) unkeep(batch);
    batch.forEach((it, i) => settle(it, status, data, list.length == batch.length && list[i], retry, !final && !!consent));
    w.dispatchEvent(new CustomEvent("ortto-relay:response", { detail: { status, body: data, activities: batch.map((it) => it.a) } }));
  };

  // Whether the gateway serves its shim to this page (a script element sends no Origin): after a
  // cross-origin POST failed, that tells the gateway's 403 to the preflight from an outage.
  const probe = (then) => {
    const s = d.createElement("script");
    s.src = base + "/ortto-relay.js?probe=" + Date.now();
    s.onload = s.onerror = (e) => {
      s.remove();
      refused = e.type == "load";
      then();
    };
    d.head.append(s);
  };

  const post = (batch, attempt) => {
    const body = text(batch),
      again = (hint) => {
        failed = true;
        drop(flying, batch);
        const entry = { batch, attempt };
        entry.timer = setTimeout(() => {
          drop(waiting, entry);
          post(batch, attempt + 1);
        }, hint > 0 ? Math.min(hint * 1000, MAX_DELAY) : DELAY * 2 ** attempt * (0.5 + Math.random()));
        waiting.push(entry);
      };
    flying.push(batch);
    fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body, keepalive: bytes(body) <= MAX_BYTES, credentials: "omit" }).then(
      (resp) => {
        const retry = parseInt(resp.headers.get("Retry-After"));
        if (resp.status > 499 && attempt < RETRIES) return again(retry);
        return resp.json().catch(() => null).then((data) => answered(batch, resp.status, data, retry));
      },
      // A network failure, or a CORS refusal, which a page cannot tell apart without a probe.
      () => (refused || new URL(url, loc).origin == loc.origin ? (f) => f() : probe)(() =>
        refused ? answered(batch, 403, { error: "origin not allowed" }) : attempt < RETRIES ? again() : answered(batch, 0, null))
    );
  };

  const flush = () => {
    const away = leaving || d.visibilityState == "hidden";
    let batch = [],
      size = 20;
    scheduled = false;
    const go = () => {
      // A beacon (text/plain: no preflight) is fire and forget: maybe delivered (see mark).
      if (away && !failed && navigator.sendBeacon(url, text(batch))) mark(batch);
      else post(batch, 0);
      batch = [];
      size = 20;
    };
    for (const it of pending.splice(0)) {
      const n = bytes(it.s) + 1;
      if (batch.length > 99 || size + n > MAX_BYTES) go();
      batch.push(it);
      size += n;
    }
    if (batch.length) go();
  };

  const enqueue = (items) => {
    if (consent === null) return held.push(...items);
    keep(items);
    pending.push(...items);
    // A microtask still runs during pagehide: as soon as each listener returns.
    if (!scheduled && pending.length) scheduled = Promise.resolve().then(flush);
  };

  const add = (act, done) => {
    let it;
    try {
      if (!act || typeof act != "object") throw 0;
      it = item(act, person, identity);
    } catch (e) {
      con.warn("ortto-relay: not an activity:", act);
      return done && done(answer("not an activity"));
    }
    it.r = done;
    if (consent === false) return done && done(answer("no consent"));
    if (consent === null) say("info", it.a.activity_id + " waits for ap3c.consent(true)");
    enqueue([it]);
  };

  const send = (act) => new Promise((done) => add(act, done));

  // What earlier pages left, once: unanswered activities, and what the loader kept (with the
  // person of that page's ap3c.track, not of this one).
  const restore = () => {
    if (restored) return;
    restored = true;
    const fresh = [];
    const kept = load(OUTBOX).filter((e) => !(Date.now() - e.m > REPEAT));
    save(OUTBOX, kept);
    pending.push(...kept.map((e) => ({ a: e.a, s: JSON.stringify(e.a), k: e.k })));
    for (const page of load(EARLY)) {
      const who = (page.t || []).map(personOf).filter(Boolean).pop();
      for (const act of page.a || []) if (act) fresh.push(item(act, who, ""));
    }
    save(EARLY, []);
    enqueue(fresh);
  };

  // Ortto's init and track (and trackMagento, which Ortto's Magento connector calls): this
  // shim's until Ortto's own script sets its functions, then theirs, with the calls made
  // before it came replayed in order. Alone, the shim does nothing for them but say so.
  const theirs = {},
    early = [],
    define = (name, fn, set) => Object.defineProperty(ap3c, name, { configurable: true, enumerable: true, get: () => fn, set });
  for (const name of ["init", "track", "trackMagento"]) {
    const prev = ap3c[name],
      fn = function (t) {
        const p = name == "track" && personOf(t);
        if (p) {
          person = p;
          identity = t.identity || "";
        }
        say("info", "ap3c." + name + (p ? ": activities now carry " + JSON.stringify(p) : ": nothing to do for activities"));
        if (theirs[name]) return theirs[name].apply(this, arguments);
        if (early.length < 50) early.push([name, arguments]);
      };
    fn.relay = 1;
    if (prev && !prev.relay) theirs[name] = prev;
    define(name, fn, (f) => {
      if (f && !f.relay) {
        theirs[name] = f;
        Promise.resolve().then(() => {
          while (early[0] && theirs[early[0][0]]) {
            const [name, args] = early.shift();
            run(() => theirs[name].apply(ap3c, args));
          }
        });
      }
    });
  }
  define("activity", send, () => say("info", "ap3c.activity stays ours"));
  ap3c.consent = (yes) => {
    if (gpc) return say("info", "Global Privacy Control: nothing sent or kept");
    consent = !!yes;
    const now = held.splice(0);
    if (consent) {
      // The outbox first: it would otherwise hold these already.
      restore();
      enqueue(now);
    } else {
      now.forEach((it) => it.r && it.r(answer("no consent")));
      forget();
    }
    say("info", "consent " + consent);
  };

  function run(fn) {
    try {
      if (typeof fn == "function") fn.call(w);
    } catch (e) {
      con.error("ortto-relay: an ap3c.cmd function threw", e);
      const m = /ap3c\.(\w+) is not a function/.exec(e.message);
      if (m) say("info", "ap3c." + m[1] + " is Ortto's tracking code's, not the shim's");
    }
  }
  // An array whose push does at once what the queue waited for: Ortto's script, if it comes
  // later, finds it empty and replaces it.
  const drain = (list, take) => {
    const live = [];
    live.push = (...args) => (args.forEach(take), 0);
    if (Array.isArray(list)) list.forEach(take);
    return live;
  };

  if (consent) restore();
  else if (consent === false) forget();
  // Ortto's order: the commands first (init, track), then the activities queued before.
  if (!ap3c.cmd || Array.isArray(ap3c.cmd)) ap3c.cmd = drain(ap3c.cmd, run);
  ap3c.act = drain(ap3c.act, (act) => add(act));
  ap3c.relayQueue = drain(ap3c.relayQueue, (e) => add(e[0], e[1]));
  say("info", "sending to " + url + ", consent " + consent);

  // Registered now, before the page's own pagehide listeners: an activity sent from one of
  // those goes by beacon. A keepalive fetch goes on after the page: marked as a beacon is.
  w.addEventListener("pagehide", () => {
    const sent = flying.slice();
    leaving = true;
    if (pending.length) flush();
    if (!failed) sent.forEach(mark);
  });
  w.addEventListener("pageshow", () => (leaving = false));
  d.addEventListener("visibilitychange", () => d.visibilityState == "hidden" && pending.length && flush());

  w.__orttoRelay = { endpoint: url, waiting: () => waiting.length };
})(window, document);
