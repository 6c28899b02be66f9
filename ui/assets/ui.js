// The page of `submit ui` (ui/doc.go). The server pushes the whole state
// over server-sent events, at most 4 times a second; each push re-renders
// the sections, which is cheap enough for hundreds of workers, and keeps
// no state here but the event filters.
"use strict";
let S = null;
window.pyfleetStats = {pushes: 0, bytes: 0, renderMsMax: 0, renderMsTotal: 0};
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const dur = (s) => s < 60 ? Math.round(s) + "s" : s < 3600 ? Math.round(s / 60) + "m" : (s / 3600).toFixed(1) + "h";
const mb = (b) => b ? (b / 1048576).toFixed(1) + " MB" : "–";
const hhmmss = (t) => new Date(t).toLocaleTimeString([], {hour12: false});

function connect() {
  const es = new EventSource("api/stream");
  es.onopen = () => { $("conn").textContent = "live"; $("conn").className = "ok"; };
  es.onerror = () => { $("conn").textContent = "reconnecting…"; $("conn").className = "bad"; };
  es.onmessage = (m) => {
    const t0 = performance.now();
    S = JSON.parse(m.data); render();
    // Read by the browser test (test/ui_test.go) to show the page keeps up.
    const st = window.pyfleetStats, ms = performance.now() - t0;
    st.pushes++; st.bytes += m.data.length; st.renderMsMax = Math.max(st.renderMsMax, ms); st.renderMsTotal += ms;
  };
}

function render() {
  document.body.classList.toggle("actions", !!S.actions);
  $("actions-mode").textContent = S.actions ? "actions on" : "read-only";
  const live = S.nodes.filter((n) => !n.gone);
  const workers = live.reduce((a, n) => a + n.status.workers.length, 0);
  $("summary").textContent = `${live.length} node(s), ${workers} worker(s)`;
  renderNodes(); renderWorkers(); renderFunctions(); renderJobs(); renderEvents(); renderLog();
  document.body.dataset.version = S.version;
}

function renderNodes() {
  const now = new Date(S.now);
  $("nodes").tBodies[0].innerHTML = S.nodes.map((n) => {
    const s = n.status, l = s.load, key = s.pool + "/" + s.node;
    const state = n.gone ? "gone" : s.draining ? "draining" : "up";
    return `<tr data-node="${esc(key)}" data-state="${state}" class="${n.gone ? "gone" : ""}">
      <td>${esc(s.node)}</td><td>${esc(s.pool)}</td><td>${esc(s.version)}</td><td>${esc(s.containment)}</td>
      <td>${dur((now - new Date(s.started)) / 1000)}</td><td class="num">${l.workers}</td><td class="num">${l.busy}</td>
      <td class="num">${l.queued}</td><td class="num">${l.handled}</td><td class="num">${l.errors}</td>
      <td class="state ${state === "up" ? "ok" : "bad"}">${state}</td>
      <td class="act">${n.gone ? "" : `<button data-act="drain" data-pool="${esc(s.pool)}" data-node="${esc(s.node)}">drain</button>`}</td></tr>`;
  }).join("");
}

function renderWorkers() {
  $("workers").innerHTML = S.nodes.filter((n) => !n.gone).map((n) => {
    const s = n.status;
    const rows = s.workers.map((w) => {
      const ev = w.last_event || {};
      return `<tr data-worker="${esc(s.pool + "/" + s.node + "/" + w.name)}" data-pid="${w.pid}" data-last="${esc(ev.kind)}" class="w${esc(ev.kind)}">
        <td>${esc(w.name)}</td><td class="num">${w.pid}</td><td>${esc(w.state)}</td><td class="num">${dur(w.age_s)}</td>
        <td class="num">${w.handled}</td><td class="num">${mb(w.rss_bytes)}</td>
        <td>${esc(ev.kind || "")}${ev.reason ? " (" + esc(ev.reason) + ")" : ""} ${ev.ts ? hhmmss(ev.ts) : ""}</td>
        <td class="act"><button data-act="recycle" data-pool="${esc(s.pool)}" data-node="${esc(s.node)}" data-worker="${esc(w.name)}">recycle</button></td></tr>`;
    }).join("");
    return `<div class="node-workers"><h3>${esc(s.node)} <span>${esc(s.pool)}</span></h3>
      <table><thead><tr><th>worker</th><th class="num">pid</th><th>state</th><th class="num">age</th><th class="num">calls</th>
      <th class="num">tree RSS</th><th>last event</th><th class="act"></th></tr></thead><tbody>${rows}</tbody></table></div>`;
  }).join("");
}

// spark draws one series as an inline SVG polyline.
function spark(pts, key, color, w = 240, h = 36) {
  if (pts.length < 2) return `<svg width="${w}" height="${h}"></svg>`;
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t || t0 + 1;
  const top = Math.max(...pts.map((p) => p[key]), 1e-9);
  const xy = pts.map((p) => `${((p.t - t0) / (t1 - t0 || 1) * (w - 2) + 1).toFixed(1)},${(h - 2 - p[key] / top * (h - 4)).toFixed(1)}`).join(" ");
  return `<svg width="${w}" height="${h}" data-series="${key}"><polyline fill="none" stroke="${color}" stroke-width="1.5" points="${xy}"/></svg>`;
}

function renderFunctions() {
  const errs = {};
  for (const n of S.nodes) if (!n.gone) for (const [f, fig] of Object.entries(n.status.functions || {}))
    for (const [code, v] of Object.entries(fig.errors || {})) (errs[f] ??= {})[code] = ((errs[f] ?? {})[code] || 0) + v;
  $("functions").innerHTML = Object.keys(S.series).sort().map((f) => {
    const pts = S.series[f], last = pts[pts.length - 1];
    const e = Object.entries(errs[f] || {}).map(([c, v]) => `${c}: ${v}`).join(", ");
    return `<div class="fn" data-function="${esc(f)}"><b>${esc(f)}</b>
      <div>calls <span data-calls="${esc(f)}">${last.calls}</span> · ${last.rate.toFixed(2)}/s · p50 ${last.p50.toFixed(1)} ms · p99 ${last.p99.toFixed(1)} ms</div>
      <div class="muted">calls/s</div>${spark(pts, "rate", "#2a6")}
      <div class="muted">p99 ms</div>${spark(pts, "p99", "#c62")}
      <div class="${e ? "bad" : "muted"}">errors by code: ${esc(e || "none")}</div></div>`;
  }).join("") || `<span class="muted">no calls yet</span>`;
}

function renderJobs() {
  const j = S.jobs;
  $("jobs-off").textContent = j.available ? "" : "no jobs stream (no JetStream, or no node has created it yet)";
  $("jobcounts").tBodies[0].innerHTML = Object.entries(j.counts || {}).sort().map(([k, c]) => {
    const [pool, fn] = k.split("/");
    return `<tr data-jobs="${esc(k)}"><td>${esc(pool)}</td><td>${esc(fn)}</td><td class="num">${c.pending}</td><td class="num">${c.running}</td><td class="num">${c.dead}</td></tr>`;
  }).join("");
  $("dead").tBodies[0].innerHTML = (j.dead || []).map((d) => {
    const l = d.letter || {}, job = l.job || {}, err = l.error || {};
    const payload = job.payload !== undefined ? JSON.stringify(job.payload) : job.payload_bytes ? "(bytes, base64) " + job.payload_bytes : "";
    return `<tr data-dead="${d.seq}"><td>${d.seq}</td><td>${hhmmss(d.time)}</td><td>${esc(d.pool)}</td><td>${esc(d.function)}</td>
      <td>${esc(job.id)}</td><td class="bad">${esc(err.code)} ${esc(err.type)}: ${esc(err.message)}</td><td><pre>${esc(payload)}</pre></td>
      <td class="act"><button data-act="requeue" data-seq="${d.seq}">requeue</button> <button data-act="discard" data-seq="${d.seq}">discard</button></td></tr>`;
  }).join("");
}

function renderEvents() {
  const nodes = [...new Set(S.events.map((e) => e.node).filter(Boolean))].sort();
  const kinds = [...new Set(S.events.map((e) => e.kind))].sort();
  fillSelect($("f-node"), nodes); fillSelect($("f-kind"), kinds);
  const fn = $("f-node").value, fk = $("f-kind").value;
  $("events").innerHTML = S.events.filter((e) => (!fn || e.node === fn) && (!fk || e.kind === fk)).slice(-200).reverse().map((e) =>
    `<li class="${esc(e.kind)}" data-kind="${esc(e.kind)}" data-node="${esc(e.node)}" data-worker="${esc(e.worker)}">${hhmmss(e.ts)} ${esc(e.node)} ${esc(e.kind)} ${esc(e.worker || "")}${e.pid ? " pid " + e.pid : ""}${e.reason ? " reason " + esc(e.reason) : ""}${e.signal ? " " + esc(e.signal) : ""}${e.detail ? " — " + esc(e.detail) : ""}</li>`).join("");
}

function fillSelect(sel, values) {
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (have.join("\n") === values.join("\n")) return;
  const cur = sel.value;
  sel.innerHTML = `<option value="">all</option>` + values.map((v) => `<option>${esc(v)}</option>`).join("");
  sel.value = cur;
}

function renderLog() {
  $("log").innerHTML = (S.log || []).slice().reverse().map((a) =>
    `<li class="${a.error ? "bad" : ""}">${hhmmss(a.ts)} ${esc(a.action)} ${esc(a.target)} by ${esc(a.by)}${a.error ? ": " + esc(a.error) : ""}</li>`).join("");
}

async function act(body) {
  const r = await fetch("api/action", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const j = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) alert(j.error || r.statusText);
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-act]");
  if (!b) return;
  const d = b.dataset;
  if (d.act === "drain" && !confirm(`Drain node ${d.node}? It stops once its work is done.`)) return;
  act({action: d.act, seq: d.seq ? Number(d.seq) : undefined, pool: d.pool, node: d.node, worker: d.worker});
});
$("cancel-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  act({action: "cancel", pool: $("cancel-pool").value, job: $("cancel-id").value});
});
for (const id of ["f-node", "f-kind"]) $(id).addEventListener("change", () => S && renderEvents());
connect();
