// fleet dashboard: a read-only live view of one fleet, from the broker's retained topics.
//
// Everything that arrives over MQTT (topics, payloads) is untrusted input: it is only
// ever put into the page as text (textContent, never innerHTML), parsed with JSON.parse
// into plain values, clipped in length, and kept in a Map (no object keyed by a device
// id, so no "__proto__" games). Rendering is batched: messages only mark the page dirty,
// and one render per animation frame (at most a few per second) redraws the counts and
// the first rows of the filtered, sorted table, so 10,000 devices do not stall the page.
"use strict";
(function () {
  const cfg = window.FLEET_DASHBOARD || {};
  const params = new URLSearchParams(location.search);
  const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
  const MAX_PAYLOAD = 64 * 1024; // larger messages are shown as "oversized", not parsed
  const MAX_TEXT = 500; // longest string shown from a message
  const MAX_EVENTS = 20; // recent events kept per device
  const MAX_ROWS = 200; // table rows drawn; the filter finds the others
  const MAX_DEVICES = 200000; // a flood of made-up device ids cannot exhaust the tab's memory
  const MIN_RENDER_MS = 200; // at most 5 redraws a second
  const KNOWN_STATES = ["failed", "rolled_back", "degraded", "invalid", "downloading", "applying",
    "awaiting_health", "waiting", "idle", "converged", "unknown"];
  const BAD = new Set(["failed", "rolled_back", "degraded", "invalid"]);
  const prefix = typeof cfg.topic_prefix === "string" ? cfg.topic_prefix : "fleet";
  const fleet = typeof cfg.fleet === "string" ? cfg.fleet : "";
  const base = prefix + "/" + fleet + "/devices/";
  const rolloutTopic = prefix + "/" + fleet + "/rollout"; // `fleet-bundler rollout`'s retained state
  const ROLLOUT_PHASES = ["running", "halted", "done", "aborted"];
  const MAX_WAVES = 32; // waves drawn from a rollout state
  const known = cfg.devices && typeof cfg.devices === "object" ? cfg.devices : {};
  const hasOwn = (o, k) => Object.prototype.hasOwnProperty.call(o, k);
  const $ = (id) => document.getElementById(id);

  // ---- state ---------------------------------------------------------------------------
  const devices = new Map(); // id -> record
  const stats = { messages: 0, reported: 0, firstMessageAt: null, allReportedAt: null, renders: 0,
    longestRenderMs: 0, longestTaskMs: 0, longestTaskAt: null, firstRenderAt: null, handlerMs: 0, ignored: 0, startedAt: performance.now() };
  let rollout = null; // the retained rollout state, checked field by field; null: none
  let selected = null;
  let sortKey = "state", sortDir = 1;
  let filterText = "";
  let dirty = false, lastRender = -1e9, frameQueued = false;

  function clip(s, n) {
    n = n || MAX_TEXT;
    return s.length > n ? s.slice(0, n) + "\u2026" : s;
  }
  function str(x) {
    if (typeof x === "string") return clip(x);
    if (typeof x === "number" || typeof x === "boolean") return String(x);
    return "";
  }
  function num(x) { return typeof x === "number" && isFinite(x) ? x : null; }
  function obj(x) { return x && typeof x === "object" && !Array.isArray(x) ? x : {}; }
  function short(c) { return c ? c.slice(0, 8) : ""; }

  function record(id) {
    let d = devices.get(id);
    if (d) return d;
    const k = hasOwn(known, id) ? obj(known[id]) : null;
    const labels = k ? obj(k.labels) : null;
    d = {
      id, valid: ID_RE.test(id), labels,
      labelText: labels ? Object.keys(labels).sort().map((l) => l + "=" + str(labels[l])).join(" ") : "",
      indexCommit: k ? str(k.commit) : "", indexVersion: k ? num(k.version) : null,
      status: null, raw: "", state: "unknown", online: null, applied: "", appliedVersion: null,
      desired: "", error: null, ts: null, events: [], reported: false, search: "",
    };
    refreshSearch(d);
    devices.set(id, d);
    return d;
  }
  for (const id of Object.keys(known)) record(id);

  function refreshSearch(d) {
    d.search = [d.id, d.labelText, "state:" + d.state,
      "online:" + (d.online === true ? "yes" : d.online === false ? "no" : "unknown"),
      d.applied, d.desired, d.error ? d.error.code + " " + d.error.message : ""].join(" ").toLowerCase();
  }

  // ---- messages --------------------------------------------------------------------------
  const decoder = new TextDecoder("utf-8");
  function onMessage(topic, payload) {
    const t0 = performance.now();
    handle(topic, payload);
    stats.handlerMs += performance.now() - t0;
  }

  function handle(topic, payload) {
    stats.messages++;
    if (stats.firstMessageAt === null) stats.firstMessageAt = performance.now();
    if (topic === rolloutTopic) { onRollout(payload); markDirty(); return; }
    if (typeof topic !== "string" || !topic.startsWith(base)) return;
    const rest = topic.slice(base.length);
    const slash = rest.lastIndexOf("/");
    if (slash <= 0) return;
    const id = rest.slice(0, slash), kind = rest.slice(slash + 1);
    if (kind !== "status" && kind !== "online" && kind !== "events") return;
    if (id.length > 256) return; // not a device id; do not keep it
    if (!devices.has(id) && devices.size >= MAX_DEVICES) { stats.ignored++; markDirty(); return; }
    const d = record(id);
    const text = payload.length > MAX_PAYLOAD ? null : decoder.decode(payload);
    if (kind === "status") onStatus(d, text, payload.length);
    else if (kind === "online") d.online = text === "true" ? true : text === "false" ? false : null;
    else onEvent(d, text);
    refreshSearch(d);
    if (selected === id) markDirty();
    markDirty();
  }

  function onStatus(d, text, size) {
    if (!d.reported) {
      d.reported = true;
      stats.reported++;
      if (stats.allReportedAt === null && stats.reported >= expected()) stats.allReportedAt = performance.now();
    }
    if (size === 0) { // a cleared retained status: the device left
      d.status = null; d.raw = ""; d.state = "unknown"; d.error = null; d.applied = ""; d.ts = null;
      return;
    }
    let s = null;
    if (text !== null) {
      d.raw = clip(text, 4000);
      try { s = JSON.parse(text); } catch (e) { s = null; }
    } else {
      d.raw = "(" + size + " bytes, not shown)";
    }
    if (!s || typeof s !== "object" || Array.isArray(s)) {
      d.status = null; d.state = "invalid"; d.applied = ""; d.desired = ""; d.ts = null;
      d.error = { code: text === null ? "oversized_status" : "unreadable_status",
        message: text === null ? "status message of " + size + " bytes" : "not a JSON object: " + clip(text, 160) };
      return;
    }
    d.status = s;
    d.state = str(s.state) || "unknown";
    const applied = obj(s.applied), desired = obj(s.desired);
    d.applied = str(applied.commit);
    d.appliedVersion = num(applied.version);
    d.desired = str(desired.commit);
    const e = s.last_error;
    d.error = e && typeof e === "object" ? { code: str(e.code), message: str(e.message), at: num(e.at) } : null;
    d.ts = num(s.timestamp);
  }

  function onEvent(d, text) {
    let ev = null;
    try { ev = text === null ? null : JSON.parse(text); } catch (e) { ev = null; }
    if (!ev || typeof ev !== "object" || Array.isArray(ev)) ev = { event: "unreadable", reason: clip(text || "", 160) };
    d.events.unshift(ev);
    if (d.events.length > MAX_EVENTS) d.events.length = MAX_EVENTS;
  }

  // The rollout state (bundler/src/rollout/judge.rs `RolloutState`), as untrusted as any
  // message: every field is checked, strings are clipped, only MAX_WAVES waves are kept.
  function onRollout(payload) {
    if (payload.length === 0) { rollout = null; return; } // retained state cleared
    let v = null;
    if (payload.length <= MAX_PAYLOAD) { try { v = JSON.parse(decoder.decode(payload)); } catch (e) { v = null; } }
    if (!v || typeof v !== "object" || Array.isArray(v)) {
      rollout = { phase: "invalid", commit: "", wave: null, reason: "unreadable rollout state", waves: [] };
      return;
    }
    const phase = str(v.state);
    const waves = Array.isArray(v.waves) ? v.waves.slice(0, MAX_WAVES).map((w) => {
      w = obj(w);
      return { name: str(w.name), devices: num(w.devices), succeeded: num(w.succeeded), failed: num(w.failed),
        pending: num(w.pending), announced: num(w.announced), started: num(w.started_at) !== null };
    }) : [];
    rollout = { phase: ROLLOUT_PHASES.includes(phase) ? phase : "invalid", commit: str(v.commit),
      wave: num(v.wave), reason: str(v.reason), waves, updated: num(v.updated_at) };
  }

  function renderRollout() {
    const box = $("rollout");
    if (!rollout) { box.hidden = true; return; }
    box.hidden = false;
    box.className = "panel " + rollout.phase;
    const r = rollout;
    const n = r.waves.length;
    let head = "rollout of " + (short(r.commit) || "?") + ": " + r.phase;
    if (r.wave !== null && n && r.phase === "running") head += " \u00b7 wave " + Math.min(r.wave + 1, n) + " of " + n;
    const parts = [el("h2", "", "rollout"), el("div", "head", head)];
    if (r.reason) parts.push(el("div", "why", r.reason));
    const list = el("ol");
    r.waves.forEach((w, i) => {
      const count = (x) => (x === null ? "?" : x.toLocaleString("en"));
      const li = el("li", i === r.wave && r.phase === "running" ? "current" : "",
        (w.name || "wave " + (i + 1)) + ": " + count(w.devices) + " devices, " + count(w.succeeded) + " updated, " +
        count(w.failed) + " failed, " + count(w.pending) + " pending" + (w.started ? "" : " (not started)"));
      list.append(li);
    });
    parts.push(list);
    box.replaceChildren(...parts);
  }

  function expected() {
    const n = Number(params.get("expect"));
    return n > 0 ? n : Math.max(1, Object.keys(known).length);
  }

  // ---- rendering -------------------------------------------------------------------------
  function markDirty() {
    dirty = true;
    if (!frameQueued) { frameQueued = true; requestAnimationFrame(frame); }
  }
  function frame(t) {
    frameQueued = false;
    if (!dirty) return;
    if (t - lastRender < MIN_RENDER_MS) { frameQueued = true; requestAnimationFrame(frame); return; }
    dirty = false;
    lastRender = t;
    const started = performance.now();
    render();
    const took = performance.now() - started;
    stats.renders++;
    if (stats.firstRenderAt === null) stats.firstRenderAt = started;
    if (took > stats.longestRenderMs) stats.longestRenderMs = took;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function stateClass(s) { return "s-" + (KNOWN_STATES.includes(s) ? s : "other"); }
  function nowSecs() { return Date.now() / 1000; }
  function age(ts) {
    if (ts === null) return "";
    const s = Math.max(0, Math.round(nowSecs() - ts));
    if (s < 90) return s + "s";
    if (s < 5400) return Math.round(s / 60) + "m";
    if (s < 129600) return Math.round(s / 3600) + "h";
    return Math.round(s / 86400) + "d";
  }
  function desiredOf(d) { return d.indexCommit || d.desired; }
  function errorText(d) { return d.error ? (d.error.code ? d.error.code + ": " : "") + d.error.message : ""; }

  function render() {
    const all = Array.from(devices.values());
    renderRollout();
    renderSummary(all);
    renderTable(all);
    renderDetail();
    const bad = all.reduce((n, d) => n + (BAD.has(d.state) ? 1 : 0), 0);
    document.title = (bad ? bad + " failing \u00b7 " : "") + (fleet || "fleet") + " dashboard";
  }

  function renderSummary(all) {
    let online = 0, offline = 0, bad = 0, converged = 0;
    const byState = new Map(), byCommit = new Map();
    for (const d of all) {
      byState.set(d.state, (byState.get(d.state) || 0) + 1);
      const c = d.applied ? short(d.applied) : "none";
      byCommit.set(c, (byCommit.get(c) || 0) + 1);
      if (d.online === true) online++; else if (d.online === false) offline++;
      if (BAD.has(d.state)) bad++;
      if (d.state === "converged") converged++;
    }
    const totals = $("totals");
    const items = [["devices", all.length, ""], ["reporting", stats.reported, ""], ["converged", converged, ""],
      ["failing", bad, bad ? "bad" : ""], ["online", online, ""], ["offline", offline, ""]];
    totals.replaceChildren(...items.map(([k, n, c]) => {
      const div = el("div", c);
      div.append(el("div", "n", n.toLocaleString("en")), el("div", "k", k));
      return div;
    }));
    const states = Array.from(byState.entries()).sort((a, b) => rank(a[0]) - rank(b[0]) || b[1] - a[1]);
    drawBar($("state-bar"), $("state-legend"), states, (s) => stateClass(s), (s) => "state:" + s, all.length);
    let commits = Array.from(byCommit.entries()).sort((a, b) => b[1] - a[1]);
    if (commits.length > 8) {
      const rest = commits.slice(7).reduce((n, c) => n + c[1], 0);
      commits = commits.slice(0, 7).concat([["other", rest]]);
    }
    const palette = ["#2f6fdf", "#1a9d55", "#c98a06", "#8b5cf6", "#0ea5a4", "#e05297", "#64748b", "#b6bec8"];
    drawBar($("version-bar"), $("version-legend"), commits, null, (c) => (c === "other" || c === "none" ? "" : c),
      all.length, (i, c) => (c === "none" ? "#d5dae0" : palette[i % palette.length]));
  }

  const RANK = new Map(KNOWN_STATES.map((s, i) => [s, i]));
  function rank(state) { const i = RANK.get(state); return i === undefined ? 3.5 : i; }

  function drawBar(bar, legend, entries, cls, filterFor, total, color) {
    bar.replaceChildren(...entries.map(([k, n], i) => {
      const seg = el("span", cls ? cls(k) : "");
      seg.style.flexGrow = String(n);
      if (color) seg.style.background = color(i, k);
      seg.title = k + ": " + n;
      return seg;
    }));
    legend.replaceChildren(...entries.map(([k, n], i) => {
      const li = el("li");
      const sw = el("i", cls ? cls(k) : "");
      if (color) sw.style.background = color(i, k);
      li.append(sw, el("span", "", k + " "), el("b", "", n.toLocaleString("en")),
        el("span", "muted", total ? " (" + Math.round((100 * n) / total) + "%)" : ""));
      li.addEventListener("click", () => { const f = filterFor(k); if (f !== "") setFilter(f); });
      return li;
    }));
  }

  const sorters = {
    id: (d) => d.id, labels: (d) => d.labelText, online: (d) => (d.online === true ? 0 : d.online === false ? 2 : 1),
    desired: (d) => desiredOf(d), applied: (d) => d.applied, state: (d) => rank(d.state),
    error: (d) => (d.error ? 0 : 1) + errorText(d), age: (d) => (d.ts === null ? -Infinity : -d.ts),
  };

  function renderTable(all) {
    const tokens = filterText.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = tokens.length ? all.filter((d) => tokens.every((t) => d.search.includes(t))) : all;
    const key = sorters[sortKey] || sorters.id;
    const dir = sortDir;
    // Each device's sort key is computed once per render, not once per comparison.
    const keyed = rows.map((d) => [key(d), d]);
    keyed.sort((a, b) => {
      const x = a[0], y = b[0];
      if (x < y) return -dir;
      if (x > y) return dir;
      return a[1].id < b[1].id ? -1 : a[1].id > b[1].id ? 1 : 0;
    });
    for (let i = 0; i < keyed.length; i++) rows[i] = keyed[i][1];
    const frag = document.createDocumentFragment();
    const n = Math.min(rows.length, MAX_ROWS);
    for (let i = 0; i < n; i++) frag.append(row(rows[i]));
    if (rows.length > n) {
      const tr = el("tr");
      const td = el("td", "more", "\u2026 " + (rows.length - n).toLocaleString("en") + " more: narrow the filter");
      td.colSpan = 8;
      tr.append(td);
      frag.append(tr);
    }
    $("rows").replaceChildren(frag);
    $("shown").textContent = rows.length.toLocaleString("en") + " of " + all.length.toLocaleString("en") + " devices" +
      (stats.ignored ? " (" + stats.ignored.toLocaleString("en") + " messages of further devices ignored: over " + MAX_DEVICES.toLocaleString("en") + ")" : "");
    for (const th of document.querySelectorAll("th[data-sort]")) {
      th.classList.toggle("asc", th.dataset.sort === sortKey && sortDir > 0);
      th.classList.toggle("desc", th.dataset.sort === sortKey && sortDir < 0);
    }
  }

  function row(d) {
    const tr = el("tr", (BAD.has(d.state) ? "bad" : "") + (d.online === false ? " offline" : "") + (d.id === selected ? " selected" : ""));
    tr.dataset.device = d.id;
    tr.dataset.state = d.state;
    const idCell = el("td", "c-id", d.id);
    if (!d.valid) idCell.append(el("span", "warn", " (invalid id)"));
    const desired = desiredOf(d);
    const appliedCell = el("td", "c-applied mono" + (d.applied && desired && d.applied !== desired ? " behind" : ""), short(d.applied));
    appliedCell.title = d.applied + (d.appliedVersion !== null ? " (version " + d.appliedVersion + ")" : "");
    const desiredCell = el("td", "c-desired mono", short(desired));
    desiredCell.title = desired;
    const stateCell = el("td", "c-state");
    stateCell.append(el("span", "pill " + stateClass(d.state), d.state));
    tr.append(idCell, el("td", "c-labels", d.labelText),
      el("td", "c-online", d.online === true ? "yes" : d.online === false ? "no" : "?"),
      desiredCell, appliedCell, stateCell, el("td", "c-error", errorText(d)), el("td", "c-age", age(d.ts)));
    return tr;
  }

  function renderDetail() {
    const box = $("detail");
    const d = selected === null ? null : devices.get(selected);
    if (!d) { box.hidden = true; box.replaceChildren(); return; }
    box.hidden = false;
    const close = el("button", "close", "\u00d7");
    close.title = "close";
    close.addEventListener("click", () => { selected = null; markDirty(); });
    const parts = [close, el("h3", "", d.id)];
    if (!d.valid) parts.push(el("p", "warn", "not a valid device id"));
    if (d.error) parts.push(el("div", "error", errorText(d)));
    const s = obj(d.status), applied = obj(s.applied), desired = obj(s.desired), files = obj(s.files);
    const waiting = obj(s.waiting);
    const waitText = d.state === "waiting" && str(waiting.reason)
      ? (str(waiting.reason) === "window" ? "maintenance window" : str(waiting.reason) === "lock" ? "update lock" : str(waiting.reason))
        + (num(waiting.until) !== null ? ", applies at " + when(waiting.until) : "")
        + (num(waiting.since) !== null ? " (since " + when(waiting.since) + ")" : "")
      : "";
    parts.push(dl([
      ["state", d.state], ["waiting for", waitText], ["online", d.online === true ? "yes" : d.online === false ? "no" : "unknown"],
      ["labels", d.labelText || "(not in the build)"], ["agent", str(s.agent_version)],
      ["built (index)", d.indexCommit ? short(d.indexCommit) + (d.indexVersion !== null ? "  v" + d.indexVersion : "") : ""],
      ["desired", desired.commit ? short(str(desired.commit)) + "  v" + str(desired.version) : ""],
      ["applied", applied.commit ? short(str(applied.commit)) + "  v" + str(applied.version) + (num(applied.at) !== null ? "  at " + when(applied.at) : "") : ""],
      ["files", files.managed !== undefined ? str(files.managed) + " managed, " + str(files.drift_repaired) + " drift repaired" : ""],
      ["reported", d.ts !== null ? when(d.ts) + " (" + age(d.ts) + " ago)" : ""],
    ]));
    const containers = Array.isArray(s.containers) ? s.containers.slice(0, 100) : [];
    parts.push(el("h4", "", "containers (" + containers.length + ")"));
    if (containers.length) {
      const t = el("table");
      const head = el("tr");
      for (const h of ["name", "image", "running", "health", "restarts"]) head.append(el("th", "", h));
      t.append(head);
      for (const c0 of containers) {
        const c = obj(c0);
        const tr = el("tr");
        tr.append(el("td", "", str(c.name)), el("td", "mono", clip(str(c.image), 60)),
          el("td", "", c.running === true ? "yes" : c.running === false ? "no" : ""), el("td", "", str(c.health)),
          el("td", "", str(c.restarts)));
        if (c.running === false || c.health === "unhealthy") tr.className = "bad";
        t.append(tr);
      }
      parts.push(t);
    }
    parts.push(el("h4", "", "recent events (since this page opened)"));
    if (d.events.length === 0) parts.push(el("p", "muted", "none yet"));
    for (const ev of d.events) {
      const e = obj(ev);
      const extra = Object.keys(e).filter((k) => k !== "device" && k !== "at" && k !== "event")
        .map((k) => k + "=" + (typeof e[k] === "object" ? clip(JSON.stringify(e[k]), 80) : str(e[k]))).join("  ");
      const p = el("p", /failed|rolled_back|rejected|unreadable/.test(str(e.event)) ? "warn" : "");
      p.append(el("span", "muted", (num(e.at) !== null ? when(e.at) : "") + " "), el("b", "", str(e.event)),
        el("span", "", " " + clip(extra, 300)));
      parts.push(p);
    }
    parts.push(el("h4", "", "raw status"));
    parts.push(el("pre", "", d.raw || "(none)"));
    box.replaceChildren(...parts);
  }

  function dl(pairs) {
    const list = el("dl");
    for (const [k, v] of pairs) if (v !== "") list.append(el("dt", "", k), el("dd", "", v));
    return list;
  }
  function when(ts) {
    const t = num(ts);
    if (t === null) return "";
    try { return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z"); } catch (e) { return String(t); }
  }

  // ---- interaction -------------------------------------------------------------------------
  function setFilter(text) {
    $("filter").value = text;
    filterText = text;
    markDirty();
  }
  $("filter").addEventListener("input", (e) => { filterText = e.target.value; markDirty(); });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      const k = th.dataset.sort;
      if (sortKey === k) sortDir = -sortDir; else { sortKey = k; sortDir = 1; }
      markDirty();
    });
  }
  $("rows").addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-device]");
    if (!tr) return;
    selected = tr.dataset.device === selected ? null : tr.dataset.device;
    markDirty();
  });
  if (params.get("filter")) setFilter(params.get("filter"));
  if (params.get("device")) selected = params.get("device");
  setInterval(markDirty, 1000); // ages

  // ---- connection -------------------------------------------------------------------------
  let client = null;
  function setConn(cls, text) {
    $("conn").className = "conn " + cls;
    $("conn-text").textContent = text;
  }
  function connect(url, username, password) {
    if (client) { client.end(true); client = null; }
    if (!url) { setConn("down", "no broker URL: pass ?broker=ws://host:9001 (or build with --dashboard-broker)"); return; }
    if (typeof window.mqtt === "undefined") { setConn("down", "MQTT client failed to load (vendor/mqtt.min.js)"); return; }
    const opts = { clientId: "fleet-dashboard-" + Math.random().toString(16).slice(2, 10), clean: true,
      protocolVersion: 4, reconnectPeriod: 3000, connectTimeout: 10000, keepalive: 30, resubscribe: false };
    if (username) { opts.username = username; opts.password = password || ""; }
    setConn("", "connecting to " + url);
    let c;
    try { c = window.mqtt.connect(url, opts); } catch (e) { setConn("down", "cannot connect to " + url + ": " + e.message); return; }
    client = c;
    c.on("connect", () => {
      setConn("up", "connected to " + url);
      const filters = ["status", "online", "events"].map((k) => base + "+/" + k);
      c.subscribe(filters, { qos: 0 }, (err, granted) => {
        const refused = (granted || []).filter((g) => g.qos === 128);
        if (err || refused.length) setConn("down", "subscription refused by the broker (ACL?): " + (err ? err.message : refused.map((g) => g.topic).join(", ")));
      });
      // Apart: an account that may not read the rollout state still sees the devices.
      c.subscribe(rolloutTopic, { qos: 0 }, () => {});
    });
    c.on("message", onMessage);
    c.on("reconnect", () => setConn("", "reconnecting to " + url));
    c.on("offline", () => setConn("down", "disconnected from " + url + "; retrying"));
    c.on("error", (e) => setConn("down", "broker error: " + (e && e.message ? e.message : String(e))));
  }

  const url = params.get("broker") || (typeof cfg.broker === "string" ? cfg.broker : "");
  $("fleet-name").textContent = fleet || "fleet";
  $("set-broker").value = url;
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const u = $("set-broker").value.trim();
    const q = new URLSearchParams(location.search);
    q.set("broker", u);
    history.replaceState(null, "", "?" + q.toString());
    connect(u, $("set-user").value, $("set-pass").value);
    $("settings").open = false;
  });

  // Long tasks (main-thread stalls over 50 ms), for the benchmark and the curious.
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) {
        if (e.duration > stats.longestTaskMs) { stats.longestTaskMs = e.duration; stats.longestTaskAt = e.startTime; }
      }
    }).observe({ type: "longtask", buffered: true });
  } catch (e) { /* not supported: stays 0 */ }

  // What tests and bench/dashboard.sh read.
  window.fleetDashboard = {
    stats: () => Object.assign({ devices: devices.size, expected: expected() }, stats),
    device: (id) => { const d = devices.get(id); return d ? { state: d.state, applied: d.applied, online: d.online, error: errorText(d) } : null; },
    rollout: () => (rollout ? { state: rollout.phase, text: $("rollout").textContent } : null),
    appliedCount: (commit) => { let n = 0; for (const d of devices.values()) if (d.applied === commit) n++; return n; },
    resetStalls: () => { stats.longestTaskMs = 0; stats.longestRenderMs = 0; },
  };

  markDirty();
  connect(url, params.get("username") || "", "");
})();
