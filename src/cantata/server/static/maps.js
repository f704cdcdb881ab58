/* Cantata console: maps and timelines drawn as SVG. Every label is a text node
   (never markup), so data such as "<script>" shows as text. */
"use strict";
(() => {
  const NS = "http://www.w3.org/2000/svg";

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) el.setAttribute(k, String(v));
    }
    for (const kid of kids) {
      if (kid === null || kid === undefined) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  function clip(text, n) {
    text = String(text);
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  function cls(...parts) {
    return parts.filter(Boolean).map((p) => String(p).replace(/[^A-Za-z0-9_-]/g, "_")).join(" ");
  }

  function arrowDefs(svg) {
    const defs = s("defs", {});
    for (const [id, color] of [["arrow", "#8c959f"], ["arrow-comp", "#bc4c00"],
                               ["arrow-dead", "#cf222e"], ["arrow-dark", "#57606a"]]) {
      const m = s("marker", { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 9,
                              markerHeight: 9, markerUnits: "userSpaceOnUse",
                              orient: "auto-start-reverse" });
      m.append(s("path", { d: "M0,0 L10,5 L0,10 z", style: null, fill: color }));
      defs.append(m);
    }
    svg.append(defs);
  }

  const KIND_WORD = { step: "step", compensation: "compensation", sleep: "timer", wait: "wait",
                      emit: "emit", child: "child", start: "start", end: "end" };

  function nodeBox(g, x, y, w, h, node, label, kindWord) {
    const title = s("title", {}, `${node.kind}: ${node.name}` +
                    (node.status ? ` (${node.status})` : "") + (node.note ? ` [${node.note}]` : ""));
    const grp = s("g", { class: cls("node", "k-" + node.kind, node.status && "s-" + node.status),
                         "data-name": node.name, "data-kind": node.kind,
                         "data-status": node.status || "" }, title);
    const round = node.kind === "start" || node.kind === "end" ? h / 2 : 6;
    grp.append(s("rect", { x, y, width: w, height: h, rx: round, ry: round }));
    if (kindWord) {
      grp.append(s("text", { x: x + w / 2, y: y + 12, class: "kind" }, kindWord));
      grp.append(s("text", { x: x + w / 2, y: y + h / 2 + 6 }, label));
    } else {
      grp.append(s("text", { x: x + w / 2, y: y + h / 2 }, label));
    }
    g.append(grp);
  }

  function path(g, d, klass, marker, label, lx, ly) {
    g.append(s("path", { d, class: klass, "marker-end": marker ? `url(#${marker})` : null }));
    if (label) g.append(s("text", { x: lx, y: ly, class: "edge-label " + klass.replace(/\bedge\b/, "") }, label));
  }

  /* A workflow map: forward steps down the left, compensations to their right. */
  function flow(container, map) {
    const W = 230, H = 46, GAP = 30, COMP_X = 330, PAD = 20;
    const pos = {};
    const forward = map.nodes.filter((n) => n.kind !== "compensation" && n.id !== "undone");
    let y = PAD;
    for (const n of forward) { pos[n.id] = { x: PAD, y }; y += H + GAP; }
    const comps = map.nodes.filter((n) => n.kind === "compensation");
    const stepOf = {};
    for (const e of map.edges) if (e.kind === "fails") stepOf[e.target] = stepOf[e.target] || e.source;
    let cy = PAD + H + GAP;
    for (const c of comps) {
      // declared compensations sit beside the step they undo (c3 undoes n3)
      const twin = pos["n" + c.id.slice(1)];
      if (c.id.startsWith("c") && twin) { pos[c.id] = { x: COMP_X, y: twin.y }; }
      else { pos[c.id] = { x: COMP_X, y: cy }; }
      cy = pos[c.id].y + H + GAP;
    }
    const undone = map.nodes.find((n) => n.id === "undone");
    if (undone) pos.undone = { x: COMP_X, y: PAD };
    const width = (comps.length ? COMP_X + W : W) + PAD * 3;
    const height = Math.max(y, cy) + PAD;
    const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                           "aria-label": "workflow map", class: "flow-map" });
    arrowDefs(svg);
    const edges = s("g", {}), nodes = s("g", {});
    for (const e of map.edges) {
      const a = pos[e.source], b = pos[e.target];
      if (!a || !b) continue;
      const k = "edge k-" + e.kind;
      if (a.x === b.x) {
        const down = b.y > a.y;
        const y1 = down ? a.y + H : a.y, y2 = down ? b.y : b.y + H;
        path(edges, `M${a.x + W / 2},${y1} L${b.x + W / 2},${y2}`, k,
             e.kind === "undo" ? "arrow-comp" : "arrow", e.label, a.x + W / 2 + 24, (y1 + y2) / 2);
      } else {
        const x1 = a.x < b.x ? a.x + W : a.x, x2 = a.x < b.x ? b.x : b.x + W;
        const y1 = a.y + H / 2, y2 = b.y + H / 2;
        const mx = (x1 + x2) / 2;
        path(edges, `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, k,
             e.kind === "fails" || e.kind === "undo" ? "arrow-comp" : "arrow",
             e.label, x1 + 22, y1 + 14);
      }
    }
    for (const n of map.nodes) {
      const p = pos[n.id];
      if (!p) continue;
      const word = n.kind === "start" || n.kind === "end" ? null
        : (KIND_WORD[n.kind] || n.kind) + (n.status && n.status !== "not_reached" ? " · " + n.status.replace("_", " ") : "");
      const label = n.kind === "compensation" ? "↩ " + clip(n.name, 28) : clip(n.name, 30);
      nodeBox(nodes, p.x, p.y, W, H, n, label, word);
    }
    svg.append(edges, nodes);
    container.replaceChildren(svg);
    return svg;
  }

  /* The choreography: layers from left to right by longest path from the sources. */
  function graph(container, map) {
    const W = 178, H = 40, XGAP = 54, YGAP = 16, PAD = 16;
    const incoming = {}, out = {};
    for (const n of map.nodes) { incoming[n.id] = []; out[n.id] = []; }
    for (const e of map.edges) {
      if (!(e.source in out) || !(e.target in out)) continue;
      out[e.source].push(e.target); incoming[e.target].push(e.source);
    }
    const layer = {};
    const order = map.nodes.map((n) => n.id);
    // A choreography has cycles (a saga's workflow emits its start event and waits for
    // its end event, which its steps' handlers emit): the edges that close a cycle, found
    // by a depth-first walk from the sources, are left out of the layering (and drawn
    // as arcs back), so the rest is acyclic and no cycle pushes nodes far to the right.
    const back = new Set();
    const state = {};  // 1: on the walk's path, 2: done
    function walk(id) {
      state[id] = 1;
      for (const t of out[id]) {
        if (state[t] === 1) back.add(id + "\u0000" + t);
        else if (!state[t]) walk(t);
      }
      state[id] = 2;
    }
    for (const id of order) if (!incoming[id].length && !state[id]) walk(id);
    for (const id of order) if (!state[id]) walk(id);
    const forward = map.edges.filter((e) => e.source in out && e.target in out
      && !back.has(e.source + "\u0000" + e.target));
    for (const id of order) layer[id] = 0;
    for (let pass = 0; pass < order.length; pass++) {  // longest path over the acyclic rest
      let changed = false;
      for (const e of forward) {
        if (layer[e.target] < layer[e.source] + 1) { layer[e.target] = layer[e.source] + 1; changed = true; }
      }
      if (!changed) break;
    }
    const columns = [];
    for (const id of order) (columns[layer[id]] = columns[layer[id]] || []).push(id);
    for (let i = columns.length - 1; i >= 0; i--) if (!columns[i]) columns.splice(i, 1);  // (none empty)
    const pos = {};
    let height = 0;
    const top = back.size ? PAD + 48 : PAD;  // (room above the first row for the arcs back)
    columns.forEach((col, i) => {
      (col || []).forEach((id, j) => {
        pos[id] = { x: PAD + i * (W + XGAP), y: top + j * (H + YGAP) };
        height = Math.max(height, pos[id].y + H + PAD);
      });
    });
    const width = PAD * 2 + columns.length * W + Math.max(0, columns.length - 1) * XGAP;
    const svg = s("svg", { width: Math.max(width, 300), height: Math.max(height, 80),
                           role: "img", "aria-label": "choreography map", class: "event-map" });
    arrowDefs(svg);
    const edges = s("g", {}), nodes = s("g", {});
    for (const e of map.edges) {
      const a = pos[e.source], b = pos[e.target];
      if (!a || !b) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      const bend = Math.max(40, Math.abs(x2 - x1) / 2);
      const d = x2 > x1 ? `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`
        : `M${x1},${y1} C${x1 + 80},${y1 - 60} ${x2 - 80},${y2 - 60} ${x2},${y2}`;
      const marker = e.state === "dead" ? "arrow-dead" : e.state === "undeclared" ? "arrow-comp"
        : e.state === "active" ? "arrow-dark" : "arrow";
      const g = s("g", { class: "edge-g", "data-state": e.state || "" },
                  s("title", {}, `${e.state || e.kind}${e.label ? ": " + e.label : ""}`));
      g.append(s("path", { d, class: cls("edge", "e-" + (e.state || "active")),
                            "marker-end": `url(#${marker})` }));
      edges.append(g);
    }
    for (const n of map.nodes) {
      const p = pos[n.id];
      const word = n.kind === "event" ? "event" : n.kind === "workflow" ? "workflow" : "handler";
      nodeBox(nodes, p.x, p.y, W, H, n, clip(n.name, 25), word);
    }
    svg.append(edges, nodes);
    container.replaceChildren(svg);
    return svg;
  }

  /* A trace as a timeline: one row per node, a bar from start to end. */
  function timeline(container, root, onNode) {
    const rows = [];
    const stack = [[root, 0]];
    while (stack.length) {
      const [n, depth] = stack.pop();
      rows.push([n, depth]);
      for (let i = n.children.length - 1; i >= 0; i--) stack.push([n.children[i], depth + 1]);
    }
    const t = (v) => (v ? Date.parse(v) : NaN);
    let t0 = Infinity, t1 = -Infinity;
    for (const [n] of rows) {
      const a = t(n.started_at), b = t(n.ended_at);
      if (!isNaN(a)) { t0 = Math.min(t0, a); t1 = Math.max(t1, a); }
      if (!isNaN(b)) t1 = Math.max(t1, b);
    }
    const now = Date.now();
    if (!isFinite(t0)) { t0 = now; t1 = now + 1; }
    const open = rows.some(([n]) => !n.ended_at && ["running", "pending", "waiting", "compensating"].includes(n.status));
    if (open) t1 = Math.max(t1, now);
    if (t1 - t0 < 1) t1 = t0 + 1;
    const LABEL = 420, BARS = 520, ROW = 26, TOP = 26, PAD = 10;
    const width = LABEL + BARS + PAD * 2, height = TOP + rows.length * ROW + PAD;
    const x = (v) => LABEL + PAD + ((v - t0) / (t1 - t0)) * BARS;
    const svg = s("svg", { width, height, role: "img", "aria-label": "trace timeline",
                           class: "timeline" });
    const span = t1 - t0;
    for (let i = 0; i <= 4; i++) {
      const tx = LABEL + PAD + (BARS * i) / 4;
      svg.append(s("line", { x1: tx, x2: tx, y1: TOP - 6, y2: height, class: "tick" }));
      const ms = (span * i) / 4;
      svg.append(s("text", { x: tx, y: 12, class: "tick-label" },
                   ms < 1000 ? `+${Math.round(ms)} ms` : `+${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`));
    }
    rows.forEach(([n, depth], i) => {
      const y = TOP + i * ROW;
      // (a step whose branch the workflow's code cancelled while it ran: `cancelled`)
      const mark = n.cancelled ? " · branch cancelled" : "";
      const g = s("g", { class: "tl-row", "data-kind": n.kind, "data-status": n.status,
                         "data-cancelled": n.cancelled ? "true" : null },
                  s("title", {}, `${n.kind} ${n.name} — ${n.status}${mark}` +
                    (n.detail ? `\n${n.detail}` : "") + (n.error ? `\n${n.error}` : "")));
      g.append(s("rect", { x: 0, y, width, height: ROW, class: "hover" }));
      const label = `${n.kind === "handler" && n.group ? n.group + ": " : ""}${n.name}`;
      g.append(s("text", { x: PAD + depth * 16, y: y + ROW / 2 },
                 s("tspan", { class: "meta" }, n.kind + " "), clip(label, (mark ? 30 : 44) - depth * 2)));
      const a = t(n.started_at);
      if (!isNaN(a)) {
        const b = isNaN(t(n.ended_at)) ? (open ? now : a) : t(n.ended_at);
        const w = Math.max(3, x(b) - x(a));
        g.append(s("rect", { x: x(a), y: y + 6, width: w, height: ROW - 12, rx: 3,
                             class: cls("bar", "s-" + n.status, "k-" + n.kind) }));
      }
      g.append(s("text", { x: LABEL - 4, y: y + ROW / 2, class: "meta", "text-anchor": "end" },
                 n.status + (n.attempts > 1 ? ` ×${n.attempts}` : "") + mark));
      if (onNode) onNode(g, n);
      svg.append(g);
    });
    container.replaceChildren(svg);
    return svg;
  }

  window.CantataMaps = { flow, graph, timeline };
})();
