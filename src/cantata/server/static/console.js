/* Cantata console: the dashboard's pages, filled from the JSON API.
   All data is written with text nodes (h() below), never as HTML. */
"use strict";
(() => {
  const body = document.body;
  const page = body.dataset.page;
  const arg = body.dataset.arg || "";
  const role = body.dataset.role || "";
  const canOperate = role === "operator" || role === "admin";
  const content = document.getElementById("content");
  const STATUSES = ["pending", "running", "compensating", "completed", "compensated", "failed", "cancelled"];
  const LIVE = new Set(["pending", "running", "compensating"]);
  const RETRYABLE = new Set(["failed", "compensated"]);

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  async function api(path, options = {}) {
    const init = { method: options.method || "GET", credentials: "same-origin",
                   headers: { Accept: "application/json", "X-Cantata-CSRF": "1" } };
    if (options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {  // no answer at all (the console stopped, the network is down): say so
      const err = new Error(`the console did not answer (${e.message}): check that ` +
        "`cantata serve` is running and reachable, then try again");
      err.status = 0;
      throw err;
    }
    if (res.status === 401) {
      location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
      const err = new Error("not logged in");
      err.status = 401;
      throw err;
    }
    const data = res.status === 204 ? null : await res.json().catch(() => null);
    if (!res.ok) {
      const err = new Error((data && data.error && data.error.message) || `HTTP ${res.status}`);
      err.status = res.status;
      err.field = (data && data.error && data.error.field) || null;  // the body field at fault
      throw err;
    }
    return data;
  }

  const badge = (status) => h("span", { class: "badge s-" + String(status || "none").replace(/[^a-z_]/g, "_") }, String(status || "—").replace(/_/g, " "));
  // Ids are shown whole: operators copy them into the CLI and into tickets.
  const runLink = (id) => h("a", { href: "/runs/" + encodeURIComponent(id), class: "mono" }, String(id));
  const traceLink = (id, text) => h("a", { href: "/trace/" + encodeURIComponent(id), class: "mono long" }, text || String(id));
  // A name or key that may be long (up to 200 characters of a workflow's name, 500 of a
  // key) wraps within its column instead of pushing the table's other columns away.
  const long = (text) => h("span", { class: "long" }, text);
  // A name or key as it is: spaces at its ends or doubled are kept (not collapsed as
  // HTML text is) and such a one is outlined, its exact text in a tooltip, so that
  // "  order 7 " is told from "order 7" (a key is exact: the one is not the other).
  function exactName(name, what) {
    const odd = /^\s|\s$|\s\s/.test(name);
    return h("span", { class: (what ? "long " : "") + (odd ? "exact spaced" : "exact"),
                       title: odd ? `Exact ${what || "name"}: ${JSON.stringify(name)}` : null }, name);
  }
  const exactKey = (key) => exactName(key, "key");
  // Every time is shown in UTC and says so (as the API and the trace's "where it
  // stands" line do); the tooltip gives it in the browser's own zone.
  const UTC_OPTS = { month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit",
                     second: "2-digit", hourCycle: "h23", timeZone: "UTC" };
  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    const opts = Object.assign({}, UTC_OPTS);
    if (d.getUTCFullYear() !== new Date().getUTCFullYear()) opts.year = "numeric";
    const local = d.toLocaleString(undefined, { year: "numeric", month: "short", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23", timeZoneName: "short" });
    return h("time", { datetime: iso, title: local }, d.toLocaleString("en-US", opts) + " UTC");
  }
  function ago(iso) { return duration((Date.now() - Date.parse(iso)) / 1000); }
  function duration(seconds) {
    const s = Math.max(0, seconds);
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.round(s / 60)} min`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }
  function took(a, b) {
    if (!a || !b) return "—";
    const ms = Date.parse(b) - Date.parse(a);
    return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
  }
  function notice(text, kind) { return h("div", { class: "notice " + (kind || ""), role: kind === "error" ? "alert" : "status" }, text); }
  function table(headers, rows, empty) {
    if (!rows.length) return h("div", { class: "table-wrap" }, h("div", { class: "empty" }, empty || "Nothing here."));
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
  }
  function json(value) { return h("pre", { class: "json mono" }, JSON.stringify(value, null, 2)); }
  function parseJson(text, what) {
    if (!text.trim()) return undefined;
    try { return JSON.parse(text); } catch (e) { throw new Error(`${what} is not valid JSON: ${e.message}`); }
  }
  function show(...nodes) { content.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined)); }
  function fail(err) { show(notice(err.message, "error")); }

  /* -- live updates ---------------------------------------------------------------- */
  const liveHandlers = [];
  function onLive(fn) { liveHandlers.push(fn); }
  // Shown above the page while its live feed is away (the store or the console is
  // down): the page is not following changes, and says why.
  const offline = h("div", { id: "offline", class: "notice warn", role: "status", hidden: true });
  content.before(offline);
  // The kinds of change each page follows (?kinds= of the stream): a page is sent only
  // what it redraws for. A busy app's steps and deliveries go to the pages that show
  // them (a run, its trace, the runs table's rows, the groups); a page not listed
  // (the audit log) gets every kind.
  const STREAM_KINDS = {
    overview: "run,dead_letter,worker",
    runs: "run,step",
    run: "run,step",
    trace: "run,step,delivery,dead_letter,group",
    "dead-letters": "dead_letter",
    stalled: "run,dead_letter,worker",
    events: "worker",
    schedules: "run,schedule,worker",
    queues: "run,worker",
    groups: "run,delivery,dead_letter,group,worker",
  };
  function connectLive() {
    if (!window.EventSource) return;
    const es = new EventSource("/api/stream" + (STREAM_KINDS[page] ? "?kinds=" + STREAM_KINDS[page] : ""));
    const mark = document.getElementById("live");
    // Connected (at first, and again after a drop): what changed before the feed
    // reached this page, since it was drawn or while the feed was away, comes with no
    // event of its own, so each page draws itself again ("open").
    es.onopen = () => {
      if (mark) mark.hidden = false;
      offline.hidden = true;
      for (const fn of liveHandlers) fn("open", {});
    };
    // The stream ends when the session's token is revoked (the server checks it every
    // few seconds) and cannot be reopened (401): ask who is logged in, and a 401 goes
    // to the login page (api() does). Otherwise the browser reconnects by itself; a
    // stream it gave up on (an answer other than 200: the store is down, the console
    // restarts) is opened again a little later, until the server answers again.
    es.onerror = () => {
      if (mark) mark.hidden = true;
      const retry = () => { if (es.readyState === EventSource.CLOSED) setTimeout(connectLive, 3000); };
      api("/api/session").then(retry, (e) => {
        if (e.status === 401) return;  // (going to the login page)
        offline.replaceChildren(h("strong", {}, "Live updates stopped"),
          `: ${e.message}. This page shows what it read last; it follows changes again once the console answers.`);
        offline.hidden = false;
        retry();
      });
    };
    for (const kind of ["run", "step", "delivery", "dead_letter", "schedule", "group", "worker"]) {
      es.addEventListener(kind, (ev) => {
        let data; try { data = JSON.parse(ev.data); } catch (e) { return; }
        for (const fn of liveHandlers) fn(kind, data);
      });
    }
  }
  // Calls within `ms` of the first one share one call of `fn`, `ms` after it. Not a
  // debounce, which waits for `ms` of quiet: on a busy app (a run changes every few
  // hundred ms) quiet never comes, and a page would never redraw from its live feed.
  function coalesce(fn, ms) {
    let t = null;
    return () => { if (t === null) t = setTimeout(() => { t = null; fn(); }, ms); };
  }
  // A page's draws can overlap (a live event's, a button's, the timer's), and an answer
  // read before a change can come back after one read after it: each draw takes a
  // ticket before it reads, and only the newest ticket's answer is drawn.
  function tickets() { let n = 0; return () => { const mine = ++n; return () => mine === n; }; }

  /* -- forms shared by pages ------------------------------------------------------- */
  function startForm(workflows) {
    const out = h("div", { id: "start-out" });
    const wf = h("select", { id: "start-workflow", name: "workflow", required: true },
      workflows.map((w) => h("option", { value: w }, w)));
    const input = h("textarea", { id: "start-input", name: "input", placeholder: '{"order_id": 42}' });
    const key = h("input", { id: "start-key", name: "idempotency_key", placeholder: "optional" });
    const form = h("form", { class: "stack", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const payload = {};
        const value = parseJson(input.value, "Input");
        if (value !== undefined) payload.input = value;
        // a key is exact (spaces at its ends are part of it): sent as typed
        if (key.value) payload.idempotency_key = key.value;
        const r = await api("/api/workflows/" + encodeURIComponent(wf.value) + "/runs", { method: "POST", body: payload });
        out.replaceChildren(h("div", { class: "notice ok", role: "status" }, "Started run ", runLink(r.run_id)));
      } catch (e) { out.replaceChildren(notice(e.message, "error")); }
    } },
      h("label", { for: "start-workflow" }, "Workflow", wf),
      h("label", { for: "start-input" }, "Input (JSON, the single argument)", input),
      h("label", { for: "start-key" }, "Idempotency key", key),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Start")),
      out);
    return h("section", { class: "panel", "data-workflows": workflows.join("\n") }, h("h2", {}, "Start a workflow"),
      workflows.length ? form : h("p", { class: "muted" }, "No workflow is declared in this app yet."));
  }

  function publishForm() {
    const out = h("div", {});
    const type = h("input", { id: "pub-type", name: "type", required: true, placeholder: "order.placed" });
    const data = h("textarea", { id: "pub-data", name: "data", placeholder: '{"order_id": 42}' });
    const corr = h("input", { id: "pub-corr", name: "correlation_id", placeholder: "optional" });
    return h("section", { class: "panel" }, h("h2", {}, "Publish an event"),
      h("form", { class: "stack", onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          const payload = { type: type.value.trim() };
          const value = parseJson(data.value, "Data");
          if (value !== undefined) payload.data = value;
          if (corr.value) payload.correlation_id = corr.value;  // (exact, as a key)
          const r = await api("/api/events", { method: "POST", body: payload });
          out.replaceChildren(h("div", { class: "notice ok", role: "status" }, "Published event ", traceLink(r.id, r.id)),
            ...(r.orphan ? [notice("Nothing in this app listens to " + payload.type + " (an orphan event): check the type.")] : []));
        } catch (e) { out.replaceChildren(notice(e.message, "error")); }
      } },
        h("label", { for: "pub-type" }, "Type", type),
        h("label", { for: "pub-data" }, "Data (JSON)", data),
        h("label", { for: "pub-corr" }, "Correlation id", corr),
        h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Publish")),
        out));
  }

  function runRow(r) {
    return h("tr", { "data-run-id": r.run_id },
      h("td", {}, runLink(r.run_id)), h("td", {}, long(r.workflow)),
      h("td", { class: "status" }, badge(r.status)),
      // the code version it is pinned to, as `cantata runs` shows it (a link: its runs)
      h("td", { class: "version" }, r.version == null ? "" : h("a", { class: "mono",
        href: "/runs?" + new URLSearchParams({ version: r.version }), title: "Runs of this version" },
        exactName(r.version, "version"))),
      h("td", { class: "mono" }, r.idempotency_key ? exactKey(r.idempotency_key) : ""),
      h("td", { class: "when" }, when(r.created_at)), h("td", { class: "when" }, when(r.updated_at)),
      h("td", { class: "err" }, r.error || ""));
  }
  const RUN_HEADERS = ["Run", "Workflow", "Status", "Version", "Key", "Created", "Updated", "Error"];

  function stallRows(stalls) {
    return stalls.map((st) => h("tr", {},
      h("td", {}, traceLink(st.correlation_id)), h("td", {}, badge(st.reason)),
      h("td", {}, st.where), h("td", {}, ago(st.since)),
      h("td", {}, stallDetail(st)), h("td", { class: "err" }, st.node.error || "")));
  }
  // Why it is stuck, as `cantata stalled` says it: the node's detail (a queue's place, a
  // step's slot, a wait's match) and the cause the store tells (a version or workflow
  // no live worker takes, a group none serves).
  function stallDetail(st) {
    return [st.node.detail, st.hint && `(${st.hint})`].filter(Boolean).join(" ");
  }
  const STALL_HEADERS = ["Transaction", "Reason", "Where", "Stuck for", "Detail", "Last error"];

  /* -- pages ------------------------------------------------------------------------- */
  const pages = {};

  // The overview is drawn once; live updates redraw its counts and lists only, never
  // the Start form (an operator may be filling it in) nor the notice under it.
  pages.overview = async () => {
    const cards = h("div", { class: "cards" });
    const attention = h("div", { class: "cards attention", role: "group", "aria-label": "Needs attention" });
    const problem = h("div", {});
    const failures = h("div", {});
    const stuck = h("div", {});
    let start = null;
    const ticket = tickets();
    async function render() {
      const current = ticket();
      const o = await api("/api/overview");
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      // What an operator looks at first, each a link to the list it counts
      const at = o.attention;
      // (a card with nothing to look at is marked so: green, not red)
      const attn = (key, cls, href, n, more, label) => h("a", { class: `card ${cls}${n ? "" : " none"}`,
        href, "data-attention": key }, h("span", { class: "n" }, `${n}${more ? "+" : ""}`), h("span", { class: "l" }, label));
      attention.replaceChildren(
        attn("stalled", "s-stalled", "/stalled?older_than=300", at.stalled, at.stalled_more,
          "Stalled (no progress for 5 min)"),
        attn("dead_letters", "s-dead", "/dead-letters", at.dead_letters, false, "Dead letters"),
        attn("failed_last_hour", "s-failed", "/runs?" + new URLSearchParams({ status: "failed", failed_since: at.failed_since }),
          at.failed_last_hour, false, "Failed in the last hour"));
      cards.replaceChildren(...STATUSES.map((st) =>
        h("a", { class: "card s-" + st, href: "/runs?status=" + st, "data-status": st },
          h("span", { class: "n" }, String(o.counts[st] || 0)),
          h("span", { class: "l" }, st[0].toUpperCase() + st.slice(1)))));
      failures.replaceChildren(table(RUN_HEADERS, o.recent_failures.map(runRow), "No failed or compensated runs."));
      // Runs count as stalled after 5 min; without a live worker (the API's `served`)
      // none of the live ones moves from the start, which the panel says at once.
      const live = [...LIVE].reduce((n, st) => n + (o.counts[st] || 0), 0);
      const idle = !o.served && live > 0 ? h("div", { class: "notice warn", role: "status", id: "no-worker" },
        h("strong", {}, "No worker is serving this app"),
        `: ${live} run${live === 1 ? " is" : "s are"} waiting or running and none progresses ` +
        "until a worker runs (cantata worker MODULE:app).") : null;
      stuck.replaceChildren(...[idle, idle && !o.stalled.length ? null
        : table(STALL_HEADERS, stallRows(o.stalled), "Nothing is stuck.")].filter(Boolean));
      if (!canOperate) return;
      if (!start) {
        start = startForm(o.workflows);
        content.append(start);
      } else if (start.dataset.workflows !== o.workflows.join("\n")) {
        // a workflow appeared or went: a new list, with what was typed and chosen kept
        const again = startForm(o.workflows);
        const was = (id) => start.querySelector("#" + id);
        const now = (id) => again.querySelector("#" + id);
        for (const id of ["start-input", "start-key"]) if (was(id) && now(id)) now(id).value = was(id).value;
        if (was("start-workflow") && now("start-workflow") && o.workflows.includes(was("start-workflow").value)) {
          now("start-workflow").value = was("start-workflow").value;
        }
        if (was("start-out") && now("start-out")) now("start-out").replaceWith(was("start-out"));
        start.replaceWith(again);
        start = again;
      }
    }
    show(attention, cards, problem, h("section", { class: "panel" }, h("h2", {}, "Recent failures"), failures),
      h("section", { class: "panel" }, h("h2", {}, "Stalled (no progress for 5 min)"), stuck));
    await render();
    const redraw = () => render().then(() => problem.replaceChildren(),
      (e) => problem.replaceChildren(notice(e.message, "error")));
    // once soon, and once more after the server's 2 s cache of the counts has expired
    onLive(coalesce(redraw, 1000));
    onLive(coalesce(redraw, 3000));
    // (a transaction becomes stalled, or moves on, with no run changing status)
    everyWhileShown(redraw, 15000);
  };

  pages.runs = async () => {
    const q = new URLSearchParams(location.search);
    const names = await api("/api/workflows");
    const field = (name, label, attrs) => h("label", {}, label,
      h("input", Object.assign({ name, value: q.get(name) || "" }, attrs || {})));
    const filters = h("form", { class: "filters", method: "get", action: "/runs" },
      h("label", {}, "Workflow", h("input", { name: "workflow", list: "workflow-names", value: q.get("workflow") || "" }),
        h("datalist", { id: "workflow-names" }, names.map((n) => h("option", { value: n })))),
      h("label", {}, "Status", h("select", { name: "status" }, h("option", { value: "" }, "any"),
        STATUSES.map((st) => h("option", { value: st, selected: q.get("status") === st }, st)))),
      field("since", "Since", { placeholder: "2026-01-31T00:00:00Z" }),
      field("until", "Until", { placeholder: "2026-02-01T00:00:00Z" }),
      // (when it failed, whenever it was created: the overview's "Failed in the last hour")
      field("failed_since", "Failed since", { placeholder: "2026-01-31T00:00:00Z" }),
      field("idempotency_key", "Idempotency key"),
      field("correlation_id", "Correlation id"),
      field("version", "Version", { placeholder: "as cantata runs shows it" }),
      // search attributes (ctx.set_attributes): one input per attr= of the address, all
      // of which a run must hold, as `cantata runs --attr`
      (q.getAll("attr").length ? q.getAll("attr") : [""]).map((v) => h("label", {}, "Attribute",
        h("input", { name: "attr", value: v, placeholder: "customer_id=42" }))),
      // (a page size asked for in the address is kept; new filters start at the first page)
      q.get("limit") ? h("input", { type: "hidden", name: "limit", value: q.get("limit") }) : null,
      h("button", { type: "submit", class: "primary" }, "Filter"),
      h("a", { href: "/runs" }, "Clear"));
    // Names and times are trimmed (a space typed around one is no part of it); keys are
    // exact, spaces at their ends included, as app.start took them; an attribute's
    // value too (its name is trimmed by the server).
    const params = new URLSearchParams();
    for (const k of ["workflow", "status", "since", "until", "failed_since"]) {
      const v = (q.get(k) || "").trim();
      if (v) params.set(k, v);
    }
    for (const k of ["idempotency_key", "correlation_id", "version"]) if (q.get(k)) params.set(k, q.get(k));
    for (const v of q.getAll("attr")) if (v.trim()) params.append("attr", v.trimStart());
    // The page's size and place are the address's (?limit=, ?cursor=): a page of a
    // list can be shared and reloaded as it is; the API refuses a limit out of range.
    params.set("limit", (q.get("limit") || "").trim() || "50");
    const start = q.get("cursor");
    const pageLink = (cursor) => {
      const at = new URLSearchParams(location.search);
      if (cursor) at.set("cursor", cursor); else at.delete("cursor");
      return "/runs?" + at.toString();
    };
    const tbody = h("tbody", {});
    const more = h("div", { class: "actions" });
    const wrap = h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, RUN_HEADERS.map((t) => h("th", { scope: "col" }, t)))), tbody));
    const status = h("div", {});
    const fresh = h("div", { class: "fresh-bar" });
    show(filters, status, fresh, wrap, more);
    // "Load more" is disabled while its page loads: pressed twice (a double click),
    // it loads the next page once, not twice over. When the page comes back between the
    // two clicks, its rows push the button down and the second click (a click event's
    // `detail` counts the clicks of one double click) lands on a new row: it opens
    // nothing, as it belongs to the double click on the button.
    let pressedAt = -Infinity;
    tbody.addEventListener("click", (ev) => {
      if (ev.detail > 1 && ev.timeStamp - pressedAt < 1000) { ev.preventDefault(); ev.stopPropagation(); }
    }, true);
    async function load(cursor, button) {
      const p = new URLSearchParams(params);
      if (cursor) p.set("cursor", cursor);
      if (button) button.disabled = true;
      try {
        const page = await api("/api/runs?" + p.toString());
        tbody.append(...page.runs.map(runRow));
        if (!tbody.children.length) status.replaceChildren(notice("No runs match these filters."));
        // "Load more" adds the next page below; "Next page" opens it on its own (an
        // address of its own, in the same newest-first order)
        more.replaceChildren(
          page.next_cursor ? h("button", { type: "button",
            onclick: (ev) => { pressedAt = ev.timeStamp; load(page.next_cursor, ev.currentTarget); } }, "Load more") : "",
          page.next_cursor ? h("a", { href: pageLink(page.next_cursor), class: "next-page" }, "Next page") : "",
          start ? h("a", { href: pageLink(null), class: "first-page" }, "First page") : "");
      } catch (e) {
        status.replaceChildren(notice(e.message, "error"));
        if (button) button.disabled = false;
      }
    }
    await load(start);
    // New runs are not slipped into the table (the operator may be reading it, and the
    // cursor of "Load more" stays the one of the last row shown): a bar above it says
    // how many runs matching the filters are newer than its first row; it shows them.
    let waiting = [];
    function showNew() {
      tbody.prepend(...waiting.map(runRow));
      waiting = [];
      fresh.replaceChildren();
      status.replaceChildren();
    }
    async function look() {
      if (start) return;  // (a later page: the runs newer than it are on the first one)
      const newest = await api("/api/runs?" + params.toString());
      const shown = new Set([...tbody.querySelectorAll("tr[data-run-id]")].map((tr) => tr.dataset.runId));
      const firstShown = newest.runs.findIndex((r) => shown.has(r.run_id));
      waiting = newest.runs.slice(0, firstShown < 0 ? newest.runs.length : firstShown);
      if (firstShown < 0 && shown.size && !newest.next_cursor) waiting = [];  // (rows gone)
      const n = waiting.length;
      const more = firstShown < 0 && newest.next_cursor ? "+" : "";
      fresh.replaceChildren(n ? h("button", { type: "button", class: "fresh", onclick: showNew },
        `${n}${more} new run${n === 1 && !more ? "" : "s"} — show`) : "");
    }
    const lookSoon = coalesce(() => look().catch((e) => status.replaceChildren(notice(e.message, "error"))), 500);
    // A run shown that changed gets its new status at once, then its row is read again
    // whole: when it was updated, and its error (gone once a retried run completes).
    const changed = new Set();
    const rowOf = (id) => tbody.querySelector(`tr[data-run-id="${CSS.escape(id)}"]`);
    const redrawRows = coalesce(() => {
      const ids = [...changed];
      changed.clear();
      for (const id of ids) {
        api("/api/runs/" + encodeURIComponent(id)).then((r) => {
          const row = rowOf(id);
          if (row) row.replaceWith(runRow(r));
        }, () => {});  // (gone, or the store is away: the row keeps what it shows)
      }
    }, 300);
    onLive((kind, d) => {
      if (kind === "open") { lookSoon(); return; }
      if (kind === "step" && rowOf(d.run_id)) { changed.add(d.run_id); redrawRows(); return; }  // (its Updated)
      if (kind !== "run") return;
      const row = rowOf(d.run_id);
      if (!row) { lookSoon(); return; }
      if (d.status) row.querySelector("td.status").replaceChildren(badge(d.status));
      changed.add(d.run_id);
      redrawRows();
    });
  };

  // A step whose branch the workflow's own code cancelled while it ran (the API's
  // `cancelled`): it ended as its status says, then the branch got the cancel.
  const BRANCH_CANCELLED = "Its branch was cancelled by the workflow's own code while it ran " +
    "(an asyncio.TaskGroup after another branch failed, a timeout around ctx.run): the step " +
    "ended as it did, then the branch got the cancel instead of its result.";
  function branchCancelled() {
    return h("span", { class: "badge s-cancelled branch-cancelled", title: BRANCH_CANCELLED }, "branch cancelled");
  }

  // The calls a run may be forked from: its steps, waits, sleeps, emits and child runs
  // (FORKABLE_KINDS in cantata/model/records.py); not compensations, nor what the run
  // records about itself (set_attributes, patch markers, set values).
  const FORKABLE = new Set(["step", "child", "wait", "sleep", "emit"]);

  // A new run reusing this one's recorded results before the chosen call; the page
  // goes to it.
  // A choreographed saga's run: its history is its start event and its wait for its
  // end; its steps are other services' handlers (shown on its trace and its map).
  function choreographed(r) {
    const keys = new Set(r.steps.map((st) => st.key));
    return keys.has(`emit:${r.workflow}.started#1`) && keys.has(`wait:${r.workflow}.finished#1`);
  }
  function forkForm(r) {
    let calls = r.steps.filter((st) => FORKABLE.has(st.kind) && !st.compensation);
    // forked from its wait, a run would reuse its start without emitting it again and
    // wait for an end that never comes: it forks from its start (its steps run again)
    if (choreographed(r)) calls = calls.filter((st) => st.key === `emit:${r.workflow}.started#1`);
    if (!calls.length) return null;
    const failed = calls.find((st) => st.status === "failed");
    const choice = (failed || calls[calls.length - 1]).key;
    const step = h("select", { id: "fork-step", name: "from_step" }, calls.map((st) =>
      h("option", { value: st.key, selected: st.key === choice }, `${st.key} (${st.status})`)));
    const out = h("div", {});
    return h("form", { class: "filters fork", onsubmit: async (ev) => {
      ev.preventDefault();
      const button = ev.target.querySelector("button");
      button.disabled = true;
      try {
        const made = await api(`/api/runs/${encodeURIComponent(r.run_id)}/fork`, { method: "POST",
          body: { from_step: step.value } });
        location.assign("/runs/" + encodeURIComponent(made.run_id));
      } catch (e) { out.replaceChildren(notice(e.message, "error")); button.disabled = false; }
    } },
      h("label", { for: "fork-step" }, "Fork from step", step),
      h("button", { type: "submit" }, "Fork"), out);
  }

  // A queued run's queue (a link to it on the queues page), its place there and the
  // queue's limits.
  function queueFacts(q) {
    const place = q.state === "waiting"
      ? [`waiting: ${ordinal(q.position)} in line`, h("span", { class: "muted" },
          ` (${q.position - 1} run${q.position === 2 ? "" : "s"} begin${q.position === 2 ? "s" : ""} before it` +
          `${q.partition !== null ? " in its partition" : ""}), since `), when(q.waiting_since)]
      : q.state === "running" ? "running (begun: it holds a place of the queue's limits)" : "ended";
    return [
      h("dt", {}, "Queue"), h("dd", { class: "queue" },
        h("a", { href: "/queues?queue=" + encodeURIComponent(q.name), title: "The queue's figures" }, exactName(q.name)),
        q.partition !== null ? [h("span", { class: "muted" }, " partition "), exactKey(q.partition)] : null,
        h("span", { class: "muted" }, ` priority ${q.priority}`)),
      h("dt", {}, "Place in queue"), h("dd", { class: "queue-place" }, place),
      h("dt", {}, "Queue limits"), h("dd", { class: "queue-limits" },
        q.limits ? queueLimits(q.limits, q.partition !== null) : "not declared by any service"),
    ];
  }
  function ordinal(n) {
    const tens = n % 100, ones = n % 10;
    const suffix = tens >= 11 && tens <= 13 ? "th" : ones === 1 ? "st" : ones === 2 ? "nd" : ones === 3 ? "rd" : "th";
    return `${n}${suffix}`;
  }

  pages.run = async () => {
    const id = arg;
    const ticket = tickets();
    let waitingInQueue = false;
    async function render() {
      const current = ticket();
      const r = await api("/api/runs/" + encodeURIComponent(id));
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      waitingInQueue = Boolean(r.queue && r.queue.state === "waiting");
      const head = h("div", { class: "headline" },
        h("span", { class: "title" }, r.workflow), badge(r.status),
        r.flagged ? h("span", { class: "badge s-failed" }, "needs an operator") : null,
        r.compensated ? h("span", { class: "badge s-compensated" }, "compensation ran") : null,
        canOperate && LIVE.has(r.status) && !r.cancel_requested
          ? h("button", { type: "button", class: "danger", onclick: async (ev) => {
              ev.target.disabled = true;
              try { await api(`/api/runs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); await render(); }
              catch (e) { head.append(notice(e.message, "error")); ev.target.disabled = false; }
            } }, "Cancel") : null,
        r.cancel_requested && LIVE.has(r.status) ? h("span", { class: "badge s-cancelled" }, "cancelling") : null,
        canOperate && RETRYABLE.has(r.status)
          ? h("button", { type: "button", class: "primary", onclick: async (ev) => {
              // a compensated run's compensations are superseded, the steps they undid
              // are not redone: the operator says so first
              const compensated = r.status === "compensated";
              if (compensated && !confirm("Retry this compensated run? Its compensations are " +
                  "set aside and it continues from its failed step; the steps they undid are not redone.")) return;
              ev.target.disabled = true;
              try {
                await api(`/api/runs/${encodeURIComponent(id)}/retry`, { method: "POST",
                  body: compensated ? { include_compensated: true } : {} });
                await render();
              } catch (e) { head.append(notice(e.message, "error")); ev.target.disabled = false; }
            } }, "Retry") : null);
      const facts = h("dl", { class: "facts" },
        h("dt", {}, "Run id"), h("dd", { class: "mono" }, r.run_id),
        h("dt", {}, "Transaction"), h("dd", {}, traceLink(r.correlation_id, exactKey(r.correlation_id))),
        h("dt", {}, "Idempotency key"), h("dd", { class: "mono key" }, r.idempotency_key ? exactKey(r.idempotency_key) : "—"),
        r.parent_run_id ? [h("dt", {}, "Parent run"), h("dd", {}, runLink(r.parent_run_id))] : null,
        h("dt", {}, "Created"), h("dd", {}, when(r.created_at)),
        h("dt", {}, "Updated"), h("dd", {}, when(r.updated_at)),
        h("dt", {}, "Arguments"), h("dd", {}, json(r.args)),
        h("dt", {}, "Attributes"), h("dd", { class: "attributes" }, Object.keys(r.attributes || {}).length
          ? Object.entries(r.attributes).map(([k, v]) => h("a", { class: "attr mono",
              href: "/runs?attr=" + encodeURIComponent(`${k}=${v}`), title: "Runs with this attribute" }, `${k}=${v}`))
          : "—"),
        r.queue ? queueFacts(r.queue) : null,
        r.error ? [h("dt", {}, "Error"), h("dd", { class: "err" }, r.error)] : null,
        r.status === "completed" ? [h("dt", {}, "Result"), h("dd", {}, json(r.result))] : null);
      const mapBox = h("div", { class: "map", id: "run-map" }, h("span", { class: "muted" }, "Drawing the map…"));
      const legend = h("div", { class: "legend" }, ["completed", "running", "waiting", "failed", "compensation", "not_reached"]
        .map((k) => h("span", { class: "l-" + k }, k === "compensation" ? "compensation ran" : k.replace("_", " "))));
      const rows = [];
      for (const st of r.steps) {
        const last = st.attempts.length ? st.attempts[st.attempts.length - 1] : null;
        rows.push(h("tr", { "data-key": st.key, class: st.compensation ? "compensation" : "" },
          h("td", {}, st.compensation ? "↩ " : "", st.name, " ", h("span", { class: "muted mono" }, st.key)),
          h("td", {}, st.compensation ? "compensation" : st.kind), h("td", { class: "status" }, badge(st.status),
            st.cancelled ? [" ", branchCancelled()] : null),
          h("td", {}, String(st.attempts.length || "")), h("td", {}, when(st.started_at)),
          h("td", {}, took(st.started_at, st.ended_at)), h("td", { class: "err" }, st.error || "")));
        for (const a of st.attempts) {
          if (!a.error || (last === a && st.error === a.error)) continue;
          rows.push(h("tr", {}, h("td", { class: "sub", colspan: 4 }, `attempt ${a.attempt} failed`),
            h("td", { class: "sub" }, when(a.started_at)), h("td", { class: "sub" }, took(a.started_at, a.ended_at)),
            h("td", { class: "err" }, a.error)));
        }
      }
      show(head, h("div", { class: "grid" },
        h("section", { class: "panel" }, h("h2", {}, "Details"), facts,
          canOperate && !LIVE.has(r.status) ? forkForm(r) : null),
        h("section", { class: "panel" }, h("h2", {}, "Map"), mapBox, legend)),
        h("h2", {}, "Steps"),
        choreographed(r) ? h("p", { class: "notice", id: "hops" }, "A choreographed saga: its steps run as " +
          "handlers of the services (the groups ", `${r.workflow}.STEP`, "), not as calls of this run; their " +
          "attempts and errors are on ", traceLink(r.correlation_id, "its trace"), ", their states on the map.") : null,
        table(["Step", "Kind", "Status", "Attempts", "Started", "Took", "Error"], rows, "No steps yet."));
      try {
        const map = await api(`/api/maps/workflows/${encodeURIComponent(r.workflow)}?run_id=${encodeURIComponent(id)}`);
        window.CantataMaps.flow(mapBox, map);
      } catch (e) { mapBox.replaceChildren(h("span", { class: "muted" }, e.message)); }
    }
    await render();
    const again = coalesce(() => render().catch(fail), 250);
    // its status changes, and steps that end while its status stays (running)
    // (and, while it waits in a queue, any run's change: runs before it begin or leave)
    onLive((kind, d) => {
      if (kind === "open" || ((kind === "run" || kind === "step") && d.run_id === id)) again();
      else if (kind === "run" && waitingInQueue) again();
    });
  };

  pages.trace = async () => {
    const ticket = tickets();
    let drawn = null;  // the answer drawn last: a live update that changed nothing redraws nothing
    async function render() {
      const current = ticket();
      const t = await api("/api/trace/" + encodeURIComponent(arg));
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      const answer = JSON.stringify(t);
      if (answer === drawn) return;
      drawn = answer;
      // A run's link that has the keyboard's focus keeps it through the redraw.
      const held = document.activeElement;
      const focused = held && held.classList && held.classList.contains("tl-link") ? held.getAttribute("href") : null;
      const box = h("div", { class: "map" });
      show(h("div", { class: "where", role: "status" }, h("strong", {}, "Where it stands: "), t.where),
        h("div", { class: "headline" }, h("span", { class: "muted" }, "Transaction "),
          h("span", { class: "mono" }, exactKey(t.correlation_id)), badge(t.status)),
        box);
      // A run's row is a link (an SVG <a>): reached with Tab, opened with Enter or a click.
      const runs = [];
      window.CantataMaps.timeline(box, t, (g, n) => { if (n.kind === "run" && n.ref) runs.push([g, n]); });
      for (const [g, n] of runs) {
        const a = document.createElementNS("http://www.w3.org/2000/svg", "a");
        a.setAttribute("href", "/runs/" + encodeURIComponent(n.ref));
        a.setAttribute("class", "tl-link");
        a.setAttribute("aria-label", `run ${n.name} ${n.ref} — ${n.status}`);
        g.replaceWith(a);
        a.append(g);
        if (a.getAttribute("href") === focused) a.focus();
      }
    }
    await render();
    onLive(coalesce(() => render().catch(fail), 400));
  };

  pages.events = async () => {
    const box = h("div", { class: "map" }, h("span", { class: "muted" }, "Reading declarations and traffic…"));
    const legend = h("div", { class: "legend" },
      h("span", { class: "e-active" }, "declared and seen"),
      h("span", { class: "e-dead" }, "dead: declared, no event reached it"),
      h("span", { class: "e-silent" }, "silent: declared, never emitted"),
      h("span", { class: "e-undeclared" }, "seen, not declared"));
    show(h("section", { class: "panel" }, h("p", { class: "muted" },
      "Event types → handlers (groups) and workflows → the events they emit."), box, legend),
      canOperate ? publishForm() : null);
    const map = await api("/api/maps/events");
    if (!map.nodes.length) box.replaceChildren(h("span", { class: "muted" }, "No handler, trigger or event is known yet."));
    else window.CantataMaps.graph(box, map);
  };

  pages["dead-letters"] = async () => {
    const q = new URLSearchParams(location.search);
    const filters = h("form", { class: "filters", method: "get", action: "/dead-letters" },
      h("label", {}, "Group", h("input", { name: "group", value: q.get("group") || "" })),
      h("label", {}, "Event type", h("input", { name: "type", value: q.get("type") || "" })),
      h("button", { type: "submit", class: "primary" }, "Filter"), h("a", { href: "/dead-letters" }, "Clear"));
    const msg = h("div", {});
    const holder = h("div", {});
    show(filters, msg, holder);
    const ticket = tickets();
    async function render() {
      const p = new URLSearchParams();
      for (const k of ["group", "type"]) if ((q.get(k) || "").trim()) p.set(k, q.get(k).trim());
      const current = ticket();
      const list = await api("/api/dead-letters" + (p.toString() ? "?" + p : ""));
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      const rows = list.map((d) => h("tr", { "data-dead-letter-id": d.id },
        h("td", {}, when(d.failed_at)), h("td", {}, d.group), h("td", {}, d.event.type),
        h("td", {}, traceLink(d.event.correlation_id || d.event.id)),
        h("td", {}, String(d.attempts)), h("td", { class: "err" }, d.error),
        h("td", { class: "buttons" }, canOperate ? h("button", { type: "button", onclick: async (ev) => {
          ev.target.disabled = true;
          try {
            await api(`/api/dead-letters/${encodeURIComponent(d.id)}/replay`, { method: "POST" });
            msg.replaceChildren(h("div", { class: "notice ok", role: "status" },
              `Replayed ${d.event.type} to ${d.group}. `,
              traceLink(d.event.correlation_id || d.event.id, "Follow it in its trace")));
            await render();
          } catch (e) { msg.replaceChildren(notice(e.message, "error")); ev.target.disabled = false; }
        } }, "Replay") : null,
        canOperate ? h("button", { type: "button", class: "danger", onclick: async (ev) => {
          if (!confirm(`Discard this ${d.event.type} for ${d.group} for good? It is not delivered again.`)) return;
          ev.target.disabled = true;
          try {
            await api(`/api/dead-letters/${encodeURIComponent(d.id)}/discard`, { method: "POST" });
            msg.replaceChildren(h("div", { class: "notice ok", role: "status" },
              `Discarded ${d.event.type} for ${d.group}.`));
            await render();
          } catch (e) { msg.replaceChildren(notice(e.message, "error")); ev.target.disabled = false; }
        } }, "Discard") : null)));
      holder.replaceChildren(table(["Failed", "Group", "Event", "Transaction", "Attempts", "Error", ""],
        rows, "No dead letters. Every delivery was handled."));
    }
    await render();
    onLive(coalesce(() => { render().catch(fail); }, 300));
  };

  pages.stalled = async () => {
    const q = new URLSearchParams(location.search);
    const older = q.get("older_than") || "300";
    const choices = [["0", "any time"], ["60", "1 minute"], ["300", "5 minutes"], ["3600", "1 hour"], ["86400", "1 day"]];
    // a link's own threshold (older_than=120) is shown as chosen, not as the first choice
    if (!choices.some(([v]) => v === older)) {
      const n = Number(older);
      choices.push([older, Number.isFinite(n) && n >= 0 ? duration(n) : older]);
    }
    const filters = h("form", { class: "filters", method: "get", action: "/stalled" },
      h("label", {}, "No progress for", h("select", { name: "older_than" },
        choices.map(([v, t]) => h("option", { value: v, selected: v === older }, t)))),
      h("button", { type: "submit", class: "primary" }, "Show"));
    const holder = h("div", {});
    show(filters, holder);
    const ticket = tickets();
    async function render() {
      const current = ticket();
      const stalls = await api("/api/stalled?older_than=" + encodeURIComponent(older));
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      holder.replaceChildren(table(STALL_HEADERS, stallRows(stalls), "Nothing is stuck."));
    }
    await render();
    onLive(coalesce(() => render().catch(fail), 1000));
    // (a transaction becomes stalled, or moves on, with no run changing status)
    everyWhileShown(() => render().catch(fail), 15000);
  };

  // Pages whose figures change with time alone (a tick passes, a waiting run ages, the
  // rate window slides: no change on the stream says so) read them again every `ms`
  // while the page is shown, besides the changes the stream brings.
  function everyWhileShown(fn, ms) { setInterval(() => { if (!document.hidden) fn(); }, ms); }
  // A table whose rows become labelled blocks at phone width (the stylesheet's
  // table.stack): each cell says which column it is, buttons included, no scrolling.
  function stacked(wrap, headers) {
    const t = wrap.querySelector("table");
    if (!t) return wrap;
    t.classList.add("stack");
    for (const tr of t.querySelectorAll("tbody tr")) {
      [...tr.children].forEach((td, i) => { if (headers[i]) td.setAttribute("data-label", headers[i]); });
    }
    return wrap;
  }

  // Nothing ticks or begins without a live worker (the API's `served`): said above the table.
  function noWorker(list, consequence) {
    if (!list.some((x) => !x.served)) return null;
    return h("div", { class: "notice warn", role: "status", id: "no-worker" },
      h("strong", {}, "No worker is serving this app"), ` (no live worker heartbeat): ${consequence} ` +
      "until a worker runs (cantata worker MODULE:app).");
  }

  // The schedules page's "New schedule" form (operators): what app.schedules.create
  // takes; the server checks it (the library's own checks) and names the field at
  // fault, which is marked here. `created(name)` redraws the list.
  function scheduleForm(workflows, created) {
    const out = h("div", { id: "sched-out" });
    const name = h("input", { id: "sched-name", name: "name", required: true, placeholder: "nightly-report" });
    const wf = h("select", { id: "sched-workflow", name: "workflow", required: true },
      workflows.map((w) => h("option", { value: w }, w)));
    const cron = h("input", { id: "sched-cron", name: "cron", placeholder: "0 3 * * *", class: "mono" });
    const every = h("input", { id: "sched-every", name: "every", inputmode: "decimal", placeholder: "or seconds, e.g. 30" });
    const zone = h("input", { id: "sched-timezone", name: "timezone", value: "UTC" });
    const choice = (id, nm, values) => h("select", { id, name: nm }, values.map((v) => h("option", { value: v }, v.replace(/_/g, " "))));
    const overlap = choice("sched-overlap", "overlap", ["skip", "buffer_one", "allow"]);
    const catchUp = choice("sched-catch-up", "catch_up", ["skip", "last", "all"]);
    const input = h("textarea", { id: "sched-input", name: "input", placeholder: '{"source": "erp"}  (optional: each run gets it after its tick)' });
    const fields = { name, workflow: wf, cron, every, timezone: zone, overlap, catch_up: catchUp, input };
    const form = h("form", { class: "stack", id: "new-schedule", onsubmit: async (ev) => {
      ev.preventDefault();
      for (const el of Object.values(fields)) el.removeAttribute("aria-invalid");
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        // the name is exact (spaces at its ends are part of it): sent as typed
        const payload = { name: name.value, workflow: wf.value, timezone: zone.value.trim() || "UTC",
                          overlap: overlap.value, catch_up: catchUp.value };
        if (cron.value.trim()) payload.cron = cron.value.trim();
        if (every.value.trim()) {
          const n = Number(every.value.trim());  // (text that is no number: the server names it)
          payload.every = Number.isFinite(n) ? n : every.value.trim();
        }
        let value;
        try { value = parseJson(input.value, "Input"); } catch (e) { e.field = "input"; throw e; }
        if (value !== undefined) payload.input = value;
        const s = await api("/api/schedules", { method: "POST", body: payload });
        out.replaceChildren(h("div", { class: "notice ok", role: "status" }, "Created ", exactName(s.name), "."));
        for (const el of [name, cron, every, input]) el.value = "";
        await created(s.name);
      } catch (e) {
        const at = e.field && fields[e.field];
        if (at) at.setAttribute("aria-invalid", "true");
        out.replaceChildren(notice(e.message, "error"));
      } finally { submit.disabled = false; }
    } },
      h("label", { for: "sched-name" }, "Name", name),
      h("label", { for: "sched-workflow" }, "Workflow", wf),
      h("label", { for: "sched-cron" }, "Cron (minute hour day month weekday)", cron),
      h("label", { for: "sched-every" }, "Every (seconds, instead of a cron)", every),
      h("label", { for: "sched-timezone" }, "Time zone of the cron", zone),
      h("label", { for: "sched-overlap" }, "Overlap (a tick while its last run is in progress)", overlap),
      h("label", { for: "sched-catch-up" }, "Catch-up (ticks missed while no worker ran)", catchUp),
      h("label", { for: "sched-input" }, "Input (JSON)", input),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create")),
      out);
    return h("section", { class: "panel", id: "new-schedule-panel" }, h("h2", {}, "New schedule"),
      workflows.length ? form : h("p", { class: "muted" }, "No workflow is declared in this app yet."));
  }

  pages.schedules = async () => {
    const banner = h("div", {});
    const msg = h("div", {});
    const holder = h("div", {});
    show(h("p", { class: "muted" }, "Each tick starts one run of the schedule's workflow. " +
      "Times are the ticks' UTC times; a cron is read in its own time zone."), banner, msg, holder);
    if (canOperate) content.append(scheduleForm(await api("/api/workflows"), () => render()));
    async function act(s, action, button) {
      if (action === "trigger" && !confirm(`Start a run of ${s.workflow} now, for schedule ${JSON.stringify(s.name)}?`)) return;
      if (action === "delete" && !confirm(`Delete schedule ${JSON.stringify(s.name)}? It starts no more runs ` +
        "(the runs it started are kept)." + (s.source === "code" ? " Declared in code: a worker whose code " +
        "still declares it records it again when it opens the app." : ""))) return;
      button.disabled = true;
      try {
        const path = `/api/schedules/${encodeURIComponent(s.name)}`;
        const r = await (action === "delete" ? api(path, { method: "DELETE" }) : api(`${path}/${action}`, { method: "POST" }));
        const done = { pause: "Paused", resume: "Resumed", delete: "Deleted" }[action];
        msg.replaceChildren(action === "trigger"
          ? h("div", { class: "notice ok", role: "status" }, "Triggered ", exactName(s.name), ": started run ", runLink(r.run_id))
          : h("div", { class: "notice ok", role: "status" }, `${done} `, exactName(s.name), "."));
        await render();
      } catch (e) { msg.replaceChildren(notice(e.message, "error")); button.disabled = false; }
    }
    // Delete is offered for a schedule made at run time, and for one whose declaration
    // left the console's code (it starts no runs; deleted, it stays gone). One still in
    // code would come back at its workers' next start: pause it instead.
    const deletable = (s) => s.source === "api" || s.in_code === false;
    function state(s) {
      if (s.paused) return badge("paused");
      if (s.in_code === false) return h("span", { class: "badge s-not_in_code",
        title: "Declared in code that no longer declares it: no worker of this code starts its runs" }, "not in code");
      if (!s.served) return [badge("active"), h("div", { class: "muted unserved" }, "no worker: not ticking")];
      return badge("active");
    }
    const ticket = tickets();
    async function render() {
      const current = ticket();
      const list = await api("/api/schedules");
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      banner.replaceChildren(noWorker(list, "no schedule ticks (the next ticks below pass without a run)") || "");
      const rows = list.map((s) => h("tr", { "data-schedule": s.name },
        h("td", { class: "name" }, h("strong", {}, exactName(s.name)),
          h("div", { class: "muted" }, s.source === "code" ? "in code" : "made at run time")),
        h("td", {}, s.workflow),
        h("td", { class: "spec" }, h("span", { class: "mono" }, s.when), s.cron ? ` (${s.timezone})` : "",
          h("div", { class: "muted policies" }, `overlap ${s.overlap} · catch-up ${s.catch_up}`,
            s.catch_up_limit ? ` (${s.catch_up_limit} at most)` : "")),
        h("td", { class: "status" }, state(s)),
        h("td", { class: "when next" }, s.next_ticks.length
          ? s.next_ticks.map((t, i) => h("div", { class: i ? "muted" : "" }, when(t))) : "—"),
        h("td", { class: "last" }, s.last_run
          ? [h("div", {}, runLink(s.last_run.run_id), " ", badge(s.last_run.status || "gone")),
             s.last_run.tick ? h("div", { class: "muted" }, "tick ", when(s.last_run.tick)) : null]
          : "—"),
        canOperate ? h("td", { class: "buttons" }, h("div", { class: "btns" },
          s.paused
            ? h("button", { type: "button", class: "primary", onclick: (ev) => act(s, "resume", ev.currentTarget) }, "Resume")
            : h("button", { type: "button", onclick: (ev) => act(s, "pause", ev.currentTarget) }, "Pause"),
          h("button", { type: "button", onclick: (ev) => act(s, "trigger", ev.currentTarget) }, "Trigger"),
          deletable(s) ? h("button", { type: "button", class: "danger", onclick: (ev) => act(s, "delete", ev.currentTarget) }, "Delete") : null)) : null));
      const headers = ["Schedule", "Workflow", "When", "State", "Next ticks", "Last run"];
      holder.replaceChildren(stacked(table(canOperate ? [...headers, ""] : headers, rows,
        "No schedules. Declare one with @app.schedule, or make one with app.schedules.create" +
        (canOperate ? " or the form below." : ".")), headers));
    }
    await render();
    const again = () => render().catch((e) => msg.replaceChildren(notice(e.message, "error")));
    const soon = coalesce(again, 300);
    const later = coalesce(again, 1000);  // a run of a tick (or any run) started or ended
    // (a worker that comes or goes starts or stops the ticks: "no worker: not ticking")
    onLive((kind) => { if (kind === "schedule" || kind === "worker" || kind === "open") soon(); else if (kind === "run") later(); });
    everyWhileShown(again, 15000);
  };

  // A queue's limits in one line: those that hold per partition say so for a
  // partitioned queue (or run).
  function queueLimits(q, partitioned) {
    const each = [];  // the limits that hold per partition
    if (q.concurrency !== null) each.push(`concurrency ${q.concurrency}`);
    if (q.rate) each.push(`rate ${q.rate.limit} per ${q.rate.per} s`);
    const parts = each.length && partitioned ? [`${each.join(" · ")} (each partition)`] : each;
    if (q.per_worker !== null) parts.push(`${q.per_worker} per worker`);
    if (q.priorities) parts.push("priorities");
    return parts.length ? parts.join(" · ") : "none";
  }

  pages.queues = async () => {
    const banner = h("div", {});
    const msg = h("div", {});
    const holder = h("div", {});
    show(h("p", { class: "muted" }, "Runs started in a queue (queue=NAME, or a workflow declared with one) " +
      "wait here until its limits let them begin. Figures are per queue, across its partitions; " +
      "the limits apply to each partition."), banner, msg, holder);
    const limits = (q) => queueLimits(q, q.partitioned);
    // A partitioned queue's sums are not read against its limits (they hold per
    // partition): the busiest partition's figure is, on a line of its own.
    function busiest(figure, limit) {
      return h("div", { class: "muted per-partition" },
        `busiest partition: ${figure}${limit === null ? "" : ` of ${limit}`}`);
    }
    function inProgress(q) {
      if (!q.per_partition_max) return String(q.in_progress);
      return [String(q.in_progress), h("span", { class: "muted" }, " in all partitions"),
              busiest(q.per_partition_max.in_progress, q.concurrency)];
    }
    function began(q) {
      const span = ` in ${duration(q.rate ? q.rate.per : q.window_seconds)}`;
      if (!q.per_partition_max) {
        return [String(q.began_recently), h("span", { class: "muted" }, q.rate ? ` of ${q.rate.limit}` : "", span)];
      }
      return [String(q.began_recently), h("span", { class: "muted" }, `${span} in all partitions`),
              busiest(q.per_partition_max.began_recently, q.rate ? q.rate.limit : null)];
    }
    const chosen = new URLSearchParams(location.search).get("queue");  // (a run's page links here)
    const ticket = tickets();
    async function render() {
      const current = ticket();
      const list = await api("/api/queues");
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      banner.replaceChildren(noWorker(list, "no queued run begins") || "");
      const rows = list.map((q) => h("tr", { "data-queue": q.name, class: q.name === chosen ? "chosen" : null },
        h("td", { class: "name" }, h("strong", {}, exactName(q.name))),
        h("td", { class: "num waiting" }, String(q.waiting)),
        h("td", { class: "num in-progress" }, inProgress(q)),
        h("td", { class: "num began" }, began(q)),
        h("td", { class: "oldest" }, q.oldest_waiting_seconds === null ? "—"
          : [duration(q.oldest_waiting_seconds), h("div", { class: "muted" }, "since ", when(q.oldest_waiting_since))]),
        h("td", { class: "limits" }, limits(q))));
      const headers = ["Queue", "Waiting", "In progress", "Begun recently", "Oldest waiting", "Limits"];
      holder.replaceChildren(stacked(table(headers, rows,
        "No queues. Declare one with app.queue(name, concurrency=..., rate=...)."), headers));
      msg.replaceChildren();
    }
    await render();
    const mark = holder.querySelector("tr.chosen");
    if (mark) mark.scrollIntoView({ block: "center" });
    const again = () => render().catch((e) => msg.replaceChildren(notice(e.message, "error")));
    onLive(coalesce(again, 500));
    everyWhileShown(again, 5000);
  };

  // Handler groups and start_on triggers (`cantata groups`): what each is declared for,
  // the deliveries waiting for it and who serves it; Retire (operators) for one no live
  // worker serves (`cantata groups retire`).
  pages.groups = async () => {
    const msg = h("div", {});
    const holder = h("div", {});
    show(h("p", { class: "muted" }, "Each event gets one delivery per handler group (and start_on " +
      "trigger, start:WORKFLOW) declared for its type. A group no code serves any more keeps " +
      "getting them until it is retired."), msg, holder);
    // The dead letters page filters by a name of these characters (the API's filter).
    const FILTERABLE = /^[A-Za-z0-9_.:-]{1,200}$/;
    // Retire is offered for a group no live worker serves (the server refuses it while
    // one does) that has something to retire: a declaration, or pending deliveries.
    const retirable = (g) => g.served === false && (g.kind !== null || g.pending > 0);
    const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
    async function retire(g, button) {
      if (!confirm(`Retire group ${JSON.stringify(g.group)}? Its declaration is removed (new events get no ` +
        `delivery for it) and its ${plural(g.pending, "pending delivery ends", "pending deliveries end")} ` +
        "unhandled; its dead letters stay.")) return;
      button.disabled = true;
      try {
        const r = await api(`/api/groups/${encodeURIComponent(g.group)}/retire`, { method: "POST" });
        const said = r.retired
          ? ["Retired ", exactName(r.group), `: ${plural(r.ended, "pending delivery", "pending deliveries")} ended unhandled.`]
          : ["Nothing to retire: ", exactName(r.group), " is not declared and has no pending delivery."];
        if (r.held) said.push(` ${plural(r.held, "delivery is", "deliveries are")} held by a live worker: left to it.`);
        if (r.dead_letters) said.push(` Its ${plural(r.dead_letters, "dead letter stays", "dead letters stay")}.`);
        msg.replaceChildren(h("div", { class: "notice ok", role: "status" }, ...said));
        await render();
      } catch (e) { msg.replaceChildren(notice(e.message, "error")); button.disabled = false; }
    }
    function servedBy(g) {
      if (g.served_by.length) return g.served_by.map((w) => h("div", { class: "mono" }, w));
      if (g.served === null) return h("span", { class: "muted", title: "A live worker does not say which groups it serves (starting, or an older release)" }, "unknown");
      return h("span", { class: g.pending ? "unserved lagging" : "unserved muted" }, "no live worker");
    }
    const ticket = tickets();
    async function render() {
      const current = ticket();
      const list = await api("/api/groups");
      if (!current()) return;  // a newer draw began meanwhile: it shows its answer
      const rows = list.map((g) => h("tr", { "data-group": g.group },
        h("td", { class: "name" }, h("strong", {}, exactName(g.group))),
        h("td", { class: "kind" }, g.kind || h("span", { class: "badge s-not_declared" }, "not declared")),
        h("td", { class: "patterns mono" }, g.patterns.length ? g.patterns.join(", ") : "—"),
        h("td", { class: "num pending" }, String(g.pending),
          g.oldest_pending_age === null ? null
            : h("div", { class: "muted oldest" }, "oldest ", duration(g.oldest_pending_age), " (", when(g.oldest_pending_at), ")")),
        h("td", { class: "num held" }, String(g.in_progress)),
        h("td", { class: "num dead" }, g.dead_letters && FILTERABLE.test(g.group)
          ? h("a", { href: "/dead-letters?group=" + encodeURIComponent(g.group) }, String(g.dead_letters))
          : String(g.dead_letters)),
        h("td", { class: "served" }, servedBy(g)),
        canOperate ? h("td", { class: "buttons" }, retirable(g)
          ? h("button", { type: "button", class: "danger", onclick: (ev) => retire(g, ev.currentTarget) }, "Retire") : null) : null));
      const headers = ["Group", "Kind", "Event types", "Pending", "Held", "Dead letters", "Served by"];
      holder.replaceChildren(stacked(table(canOperate ? [...headers, ""] : headers, rows,
        "No handler group or trigger is declared in this app."), headers));
    }
    await render();
    const again = () => render().catch((e) => msg.replaceChildren(notice(e.message, "error")));
    onLive(coalesce(again, 500));  // runs and dead letters come and go with deliveries
    everyWhileShown(again, 5000);  // ages grow and workers come and go with time alone
  };

  // The audit log (admins): newest first, older by "Load older"; a filter on the rows
  // read so far (actor, action, target); Verify checks the whole hash chain.
  pages.audit = async () => {
    if (role !== "admin") {  // (the API answers 403: no form, no Verify to press in vain)
      show(notice(`The audit log is read by admins: you are logged in as ${role}. ` +
        "An admin creates an admin token with `cantata token create --name NAME --role admin`.", "error"));
      return;
    }
    const msg = h("div", {});
    const checked = h("div", { id: "audit-verified" });
    const find = h("input", { id: "audit-find", name: "find", type: "search",
      placeholder: "token:alice, run.retried, a run id…" });
    const tbody = h("tbody", {});
    const more = h("div", { class: "actions" });
    const verify = h("button", { type: "button", onclick: async (ev) => {
      ev.currentTarget.disabled = true;
      const button = ev.currentTarget;
      try {
        const v = await api("/api/audit/verify");
        checked.replaceChildren(v.ok
          ? h("div", { class: "notice ok", role: "status" }, `The chain of ${v.records} records is intact.`)
          : notice(`The chain is broken at record #${v.first_bad_seq}: ${v.reason}. ` +
              "Run `cantata audit verify` and restore the store from a backup.", "error"));
      } catch (e) { checked.replaceChildren(notice(e.message, "error")); }
      button.disabled = false;
    } }, "Verify");
    const filters = h("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); filter(); } },
      h("label", { for: "audit-find" }, "Find in the records read", find),
      h("button", { type: "submit", class: "primary" }, "Find"), verify);
    find.addEventListener("input", () => filter());
    show(h("p", { class: "muted" }, "Every state change and operator action of this app, newest first, " +
      "with who did it (operators: token:NAME, the CLI: cli:USER@HOST, workers: worker:ID)."),
      filters, checked, msg, h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["#", "Time", "Actor", "Action", "Target", "Data"].map((t) => h("th", { scope: "col" }, t)))),
        tbody)), more);
    // A target that is a run (run.* records, `<run id>:<step key>` of a task) links to it.
    const RUN_ID = /^[0-9a-f]{32}(?=$|:)/;
    function target(r) {
      const run = (r.action.startsWith("run.") || r.action.startsWith("task.")) && RUN_ID.exec(r.target);
      return run ? [runLink(run[0]), r.target.slice(run[0].length)] : h("span", { class: "mono long" }, r.target);
    }
    function row(r) {
      return h("tr", { "data-seq": String(r.seq), class: r.past_head ? "past-head" : "" },
        h("td", { class: "num" }, String(r.seq)), h("td", { class: "when" }, when(r.time)),
        h("td", { class: "mono" }, r.actor), h("td", { class: "mono" }, r.action,
          r.past_head ? [" ", h("span", { class: "badge s-failed", title: "Added outside Cantata: " +
            "no Cantata process wrote it (Verify reports the log tampered with)" }, "past the head")] : null),
        h("td", {}, target(r)),
        h("td", {}, Object.keys(r.data || {}).length ? h("code", { class: "mono long" }, JSON.stringify(r.data)) : ""));
    }
    function filter() {
      const words = find.value.trim().toLowerCase();
      let shown = 0;
      for (const tr of tbody.children) {
        const hit = !words || tr.textContent.toLowerCase().includes(words);
        tr.hidden = !hit;
        if (hit) shown += 1;
      }
      msg.replaceChildren(words && !shown ? notice("No record read so far matches: load older ones.") : "");
    }
    async function load(cursor, button) {
      const p = new URLSearchParams({ order: "newest", limit: "100" });
      if (cursor) p.set("cursor", cursor);
      if (button) button.disabled = true;
      try {
        const got = await api("/api/audit?" + p.toString());
        tbody.append(...got.records.map(row));
        if (!tbody.children.length) msg.replaceChildren(notice("The audit log is empty."));
        more.replaceChildren(got.next_cursor ? h("button", { type: "button",
          onclick: (ev) => load(got.next_cursor, ev.currentTarget) }, "Load older") : "");
        filter();
      } catch (e) {
        msg.replaceChildren(notice(e.message, "error"));
        if (button) button.disabled = false;
      }
    }
    await load(null);
    // Records written since come on top as the stream tells of changes (the newest 100).
    async function newer() {
      const top = tbody.firstElementChild ? Number(tbody.firstElementChild.dataset.seq) : 0;
      const got = await api("/api/audit?order=newest&limit=100");
      tbody.prepend(...got.records.filter((r) => r.seq > top).map(row));
      filter();
    }
    onLive(coalesce(() => newer().catch((e) => msg.replaceChildren(notice(e.message, "error"))), 1000));
  };

  /* -- start ------------------------------------------------------------------------- */
  const logout = document.getElementById("logout");
  // Logging out ends the session on the server: when the console does not answer (or
  // refuses), the page says so and stays (the session may still be open).
  if (logout) logout.addEventListener("click", async () => {
    logout.disabled = true;
    try {
      const res = await fetch("/api/session", { method: "DELETE", credentials: "same-origin", headers: { "X-Cantata-CSRF": "1" } });
      if (!res.ok && res.status !== 401) {  // (401: no session left to end)
        const data = await res.json().catch(() => null);
        throw new Error((data && data.error && data.error.message) || `the console answered HTTP ${res.status}`);
      }
      location.assign("/login");
    } catch (e) {
      logout.disabled = false;
      const why = e instanceof TypeError ? "the console did not answer" : e.message;
      const said = h("div", { id: "logout-error", class: "notice error", role: "alert" },
        h("strong", {}, "Log out failed"), `: ${why}. You are still logged in; try again once the console answers.`);
      const was = document.getElementById("logout-error");
      if (was) was.replaceWith(said); else content.before(said);
    }
  });
  const run = pages[page];
  if (run) {
    run().then(connectLive).catch(fail);
  }
})();
