// actdiag's TensorBoard dashboard. TensorBoard loads this ES module into an iframe whose <base> is this plugin's
// route prefix, and calls render(). Hand-written, no build step, no dependency: the page asks only its own routes.
//
// Every name and message shown comes from the user's code (module names, finding messages, fix snippets), so text
// goes into the DOM through textContent and SVG <text>/<title> nodes, never through innerHTML.

const SVG_NS = "http://www.w3.org/2000/svg";
const SEVERITY_COLOR = { error: "#c62828", warning: "#e65100", info: "#1565c0" };
const SERIES = [
  { key: "act_std", label: "activation std", color: "#1565c0", shape: "circle" },
  { key: "act_abs_max", label: "activation |max|", color: "#ef6c00", shape: "square" },
  { key: "grad_rms", label: "gradient RMS", color: "#c62828", shape: "diamond" },
];
const SHARES = [
  { key: "dead_fraction", label: "dead units", color: "#6d4c41" },
  { key: "saturation", label: "saturated", color: "#7b1fa2" },
];
const ROW = 18;
const LABEL_W = 220;

const CSS = `
  body { font: 13px/1.45 Roboto, "Helvetica Neue", Arial, sans-serif; color: #212121; margin: 0; background: #fff; }
  main { padding: 12px 20px 40px; max-width: 1400px; }
  h1 { font-size: 18px; margin: 4px 0 2px; }
  h2 { font-size: 15px; margin: 22px 0 6px; border-bottom: 1px solid #e0e0e0; padding-bottom: 3px; }
  .meta, .note { color: #616161; }
  .error-box { color: #b71c1c; background: #ffebee; padding: 8px 10px; border-radius: 4px; }
  select, button, input { font: inherit; }
  .finding { border: 1px solid #e0e0e0; border-left: 4px solid #9e9e9e; border-radius: 4px; padding: 8px 12px;
             margin: 8px 0; }
  .finding .head { display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; }
  .sev { color: #fff; border-radius: 3px; padding: 0 6px; font-size: 11px; text-transform: uppercase; }
  .code { font-family: "Roboto Mono", Menlo, monospace; font-weight: 600; }
  .layer { font-family: "Roboto Mono", Menlo, monospace; color: #424242; }
  .message { margin: 4px 0; }
  table.evidence { border-collapse: collapse; margin: 4px 0; }
  table.evidence td { padding: 1px 12px 1px 0; font-family: "Roboto Mono", Menlo, monospace; font-size: 12px; }
  .fix { background: #fafafa; border-radius: 4px; padding: 6px 10px; margin: 6px 0; }
  .verified-yes { color: #2e7d32; } .verified-no { color: #c62828; } .verified-none { color: #757575; }
  .snippet { display: flex; gap: 8px; align-items: flex-start; }
  pre { background: #263238; color: #eceff1; padding: 6px 10px; border-radius: 4px; margin: 4px 0;
        overflow-x: auto; flex: 1; font-size: 12px; }
  summary { cursor: pointer; color: #424242; margin: 4px 0; }
  button.copy { margin-top: 4px; cursor: pointer; }
  .controls { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; margin: 4px 0 8px; }
  .controls input[type=range] { width: 320px; }
  .legend { display: flex; gap: 14px; flex-wrap: wrap; font-size: 12px; }
  .swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
  svg text { font: 11px Roboto, Arial, sans-serif; fill: #424242; }
  svg text.mono { font-family: "Roboto Mono", Menlo, monospace; }
`;

// ---------------------------------------------------------------------------------------------------- DOM helpers
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "style") Object.assign(node.style, v);
    else if (k === "text") node.textContent = v;
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c); // strings become text nodes
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text != null) node.textContent = text;
  return node;
}

function titled(node, text) {
  node.append(svg("title", {}, text));
  return node;
}

function fmt(v) {
  if (v == null) return "–";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(3)));
}

function pct(v) {
  return v == null ? "–" : `${(100 * v).toFixed(1)}%`;
}

function shorten(name, max = 34) {
  return name.length <= max ? name : `…${name.slice(name.length - max + 1)}`;
}

async function getJSON(path) {
  const resp = await fetch(path, { credentials: "same-origin" });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status} ${(await resp.text()).slice(0, 200)}`);
  return resp.json();
}

// ---------------------------------------------------------------------------------------------------- findings
async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (_) {
    // The iframe may not be allowed the async clipboard: copy from a selection instead.
    const area = el("textarea", { value: text, style: { position: "fixed", opacity: "0" } });
    document.body.append(area);
    area.select();
    try {
      ok = document.execCommand("copy");
    } catch (_e) {
      ok = false;
    }
    area.remove();
  }
  button.textContent = ok ? "Copied" : "Select and press Ctrl+C";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function evidenceTable(evidence) {
  const rows = Object.entries(evidence || {});
  if (!rows.length) return null;
  return el("table", { className: "evidence" }, ...rows.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: fmt(v) }))));
}

function fixView(fix) {
  const verdict =
    fix.verified === true
      ? el("span", { className: "verified-yes", text: "verified: the finding went away on a copy of the model" })
      : fix.verified === false
        ? el("span", { className: "verified-no", text: "tried: the finding stayed" })
        : el("span", { className: "verified-none", text: "not tried" });
  const parts = [el("div", {}, el("span", { className: "code", text: fix.code }), " · ", verdict), el("div", { text: fix.text })];
  const keys = Object.keys(fix.before || {});
  if (keys.length) {
    parts.push(
      el("div", { className: "meta", text: keys.map((k) => `${k}: ${fmt(fix.before[k])} → ${fmt((fix.after || {})[k])}`).join(", ") }),
    );
  }
  if (fix.snippet) {
    const button = el("button", { className: "copy", type: "button", text: "Copy" });
    button.addEventListener("click", () => copyText(fix.snippet, button));
    parts.push(el("div", { className: "snippet" }, el("pre", {}, el("code", { text: fix.snippet })), button));
  }
  return el("div", { className: "fix" }, ...parts);
}

function findingsView(report) {
  const box = el("section", { id: "findings" }, el("h2", { text: "Findings" }));
  if (report == null) {
    box.append(el("p", { className: "note", text: "No findings yet: they are written when the watch closes (or by actdiag inspect --logdir)." }));
    return box;
  }
  if (!report.findings.length) {
    box.append(el("p", { className: "note", text: "No findings: no rule fired on the recorded steps." }));
    return box;
  }
  box.append(el("p", { className: "meta", text: `${report.findings.length} finding${report.findings.length === 1 ? "" : "s"}, most severe first.` }));
  report.findings.forEach((f, i) => {
    const color = SEVERITY_COLOR[f.severity] || "#616161";
    const head = el(
      "div",
      { className: "head" },
      el("span", { className: "rank", text: `${i + 1}.` }),
      el("span", { className: "sev", text: f.severity, style: { background: color } }),
      el("span", { className: "code", text: f.code }),
      el("span", { className: "layer", text: f.layer == null ? "(whole model)" : f.layer }),
    );
    const card = el("article", { className: "finding", style: { borderLeftColor: color } }, head, el("p", { className: "message", text: f.message }));
    const ev = evidenceTable(f.evidence);
    if (ev) card.append(ev);
    if (f.related && f.related.length) card.append(el("div", { className: "meta", text: `related: ${f.related.join(", ")}` }));
    const fixes = f.fixes || [];
    if (fixes.length) {
      // The most severe finding shows its fixes; the others keep them folded so the charts stay in view.
      const summary = el("summary", { text: `${fixes.length} fix${fixes.length === 1 ? "" : "es"}: ${fixes.map((x) => x.code).join(", ")}` });
      card.append(el("details", { open: i === 0 }, summary, ...fixes.map(fixView)));
    }
    box.append(card);
  });
  return box;
}

// ---------------------------------------------------------------------------------------------------- scales
function logRange(profiles) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const p of profiles)
    for (const row of p.layers)
      for (const s of SERIES) {
        const v = row[s.key];
        if (v != null && v > 0) {
          lo = Math.min(lo, v);
          hi = Math.max(hi, v);
        }
      }
  if (!Number.isFinite(lo)) return [-3, 1];
  return [Math.floor(Math.log10(lo)), Math.max(Math.ceil(Math.log10(hi)), Math.floor(Math.log10(lo)) + 1)];
}

function marker(shape, x, y, color, hollow) {
  const fill = hollow ? "#fff" : color;
  const common = { fill, stroke: color, "stroke-width": 1.5 };
  if (shape === "circle") return svg("circle", { cx: x, cy: y, r: 4, ...common });
  if (shape === "square") return svg("rect", { x: x - 3.5, y: y - 3.5, width: 7, height: 7, ...common });
  return svg("path", { d: `M${x} ${y - 5}L${x + 5} ${y}L${x} ${y + 5}L${x - 5} ${y}Z`, ...common });
}

function layerLabels(g, rows, top) {
  rows.forEach((row, i) => {
    const y = top + i * ROW + ROW / 2 + 4;
    g.append(titled(svg("text", { x: LABEL_W - 8, y, "text-anchor": "end", class: "mono" }, shorten(row.layer)), `${row.layer} (${row.type || "?"})`));
  });
}

// ---------------------------------------------------------------------------------------------------- depth profile
function profileChart(profile, decades, width) {
  const rows = profile.layers;
  const top = 26;
  const logW = Math.max(260, Math.round((width - LABEL_W) * 0.62));
  const shareX = LABEL_W + logW + 40;
  const shareW = Math.max(160, width - shareX - 10);
  const zeroX = LABEL_W + 14; // zeros have their own column left of the log axis
  const x0 = LABEL_W + 34;
  const x1 = LABEL_W + logW;
  const [d0, d1] = decades;
  const xOf = (v) => x0 + ((Math.log10(v) - d0) / (d1 - d0)) * (x1 - x0);
  const height = top + rows.length * ROW + 30;
  const root = svg("svg", { width, height, class: "profile", role: "img" });
  root.append(titled(svg("rect", { x: 0, y: 0, width, height, fill: "#fff" }), "depth profile"));
  // Axes and grid: one vertical line per decade.
  for (let d = d0; d <= d1; d++) {
    const x = xOf(10 ** d);
    root.append(svg("line", { x1: x, x2: x, y1: top - 4, y2: height - 26, stroke: "#e0e0e0" }));
    root.append(svg("text", { x, y: height - 12, "text-anchor": "middle" }, `1e${d}`));
  }
  root.append(svg("text", { x: zeroX, y: height - 12, "text-anchor": "middle" }, "0"));
  root.append(svg("line", { x1: zeroX, x2: zeroX, y1: top - 4, y2: height - 26, stroke: "#bdbdbd", "stroke-dasharray": "2 3" }));
  root.append(svg("text", { x: (x0 + x1) / 2, y: 12, "text-anchor": "middle" }, "magnitude (log scale)"));
  root.append(svg("text", { x: shareX + shareW / 2, y: 12, "text-anchor": "middle" }, "share of units (0–100%)"));
  for (const p of [0, 0.5, 1]) {
    const x = shareX + p * shareW;
    root.append(svg("line", { x1: x, x2: x, y1: top - 4, y2: height - 26, stroke: "#e0e0e0" }));
    root.append(svg("text", { x, y: height - 12, "text-anchor": "middle" }, `${p * 100}%`));
  }
  layerLabels(root, rows, top);
  rows.forEach((row, i) => {
    const yMid = top + i * ROW + ROW / 2;
    if (i % 2 === 0) root.append(svg("rect", { x: LABEL_W - 4, y: yMid - ROW / 2, width: width - LABEL_W, height: ROW, fill: "#f7f7f7" }));
  });
  rows.forEach((row, i) => {
    const yMid = top + i * ROW + ROW / 2;
    for (const s of SERIES) {
      const v = row[s.key];
      if (v == null) continue;
      const x = v > 0 ? xOf(v) : zeroX;
      root.append(titled(marker(s.shape, x, yMid, s.color, v === 0), `${row.layer}: ${s.label} = ${fmt(v)}`));
    }
    SHARES.forEach((s, k) => {
      const v = row[s.key];
      if (v == null) return;
      const h = (ROW - 6) / 2;
      const y = yMid - h - 0.5 + k * (h + 1);
      root.append(titled(svg("rect", { x: shareX, y, width: Math.max(v * shareW, v > 0 ? 1 : 0), height: h, fill: s.color }), `${row.layer}: ${s.label} ${pct(v)}`));
    });
  });
  return root;
}

function legend(items, hollowNote) {
  const out = el("div", { className: "legend" });
  for (const s of items) out.append(el("span", {}, el("span", { className: "swatch", style: { background: s.color } }), s.label));
  if (hollowNote) out.append(el("span", { className: "meta", text: "hollow mark in the 0 column: exactly zero" }));
  return out;
}

// ---------------------------------------------------------------------------------------------------- heatmaps
function heatmap(profiles, key, label, absent, color, width) {
  const layerNames = [];
  const types = {};
  for (const p of profiles)
    for (const row of p.layers)
      if (row[key] != null && !(row.layer in types)) {
        types[row.layer] = row.type;
        layerNames.push(row.layer);
      }
  const box = el("div", {}, el("h3", { text: label, style: { fontSize: "13px", margin: "10px 0 2px" } }));
  box.select = () => {};
  if (!layerNames.length) {
    box.append(el("p", { className: "note", text: absent }));
    return box;
  }
  const top = 4;
  const n = profiles.length;
  const plotW = width - LABEL_W - 60;
  const cw = plotW / n;
  const height = top + layerNames.length * ROW + 34;
  const root = svg("svg", { width, height, class: "heatmap" });
  layerLabels(root, layerNames.map((l) => ({ layer: l, type: types[l] })), top);
  const index = Object.fromEntries(layerNames.map((l, i) => [l, i]));
  profiles.forEach((p, j) => {
    for (const row of p.layers) {
      const v = row[key];
      if (v == null || !(row.layer in index)) continue;
      const cell = svg("rect", { x: LABEL_W + j * cw, y: top + index[row.layer] * ROW, width: Math.max(cw - 0.5, 0.8), height: ROW - 1, fill: color, "fill-opacity": 0.06 + 0.94 * v });
      root.append(titled(cell, `${row.layer} at step ${p.step}: ${pct(v)}`));
    }
  });
  // Built once per run; moving the step slider only moves this frame.
  const frame = svg("rect", { x: LABEL_W, y: top - 2, width: Math.max(cw, 2), height: layerNames.length * ROW + 3, fill: "none", stroke: "#212121", "stroke-width": 1.2 });
  root.append(frame);
  box.select = (i) => frame.setAttribute("x", String(LABEL_W + i * cw));
  const ticks = Math.min(n, 6);
  for (let t = 0; t < ticks; t++) {
    const j = ticks === 1 ? 0 : Math.round((t * (n - 1)) / (ticks - 1));
    root.append(svg("text", { x: LABEL_W + (j + 0.5) * cw, y: height - 16, "text-anchor": "middle" }, String(profiles[j].step)));
  }
  root.append(svg("text", { x: LABEL_W + plotW / 2, y: height - 2, "text-anchor": "middle" }, "recorded step (darker: larger share)"));
  box.append(root);
  return box;
}

// ---------------------------------------------------------------------------------------------------- histograms
function histogramChart(data, width) {
  const layers = data.layers.filter((l) => l.buckets.length);
  if (!layers.length) return el("p", { className: "note", text: "No histogram of this kind was recorded for this run." });
  let lo = Infinity;
  let hi = -Infinity;
  for (const l of layers) {
    lo = Math.min(lo, l.buckets[0][0]);
    hi = Math.max(hi, l.buckets[l.buckets.length - 1][1]);
  }
  if (!(hi > lo)) {
    lo -= 1;
    hi += 1;
  }
  const rowH = 34;
  const top = 6;
  const x0 = LABEL_W;
  const x1 = width - 20;
  const xOf = (v) => x0 + ((v - lo) / (hi - lo)) * (x1 - x0);
  const height = top + layers.length * rowH + 34;
  const root = svg("svg", { width, height, class: "histograms" });
  if (lo < 0 && hi > 0) root.append(svg("line", { x1: xOf(0), x2: xOf(0), y1: top, y2: height - 28, stroke: "#9e9e9e", "stroke-dasharray": "3 3" }));
  layers.forEach((l, i) => {
    const base = top + (i + 1) * rowH - 3;
    // Density (count per unit width), scaled to each layer's own peak: the shape is compared, on one x-axis.
    const dens = l.buckets.map(([a, b, c]) => (b > a ? c / (b - a) : c));
    const peak = Math.max(...dens) || 1;
    let d = `M${xOf(l.buckets[0][0])} ${base}`;
    l.buckets.forEach(([a, b], k) => {
      const y = base - (dens[k] / peak) * (rowH - 6);
      d += `L${xOf(a)} ${y}L${xOf(b)} ${y}`;
    });
    d += `L${xOf(l.buckets[l.buckets.length - 1][1])} ${base}Z`;
    root.append(svg("line", { x1: x0, x2: x1, y1: base, y2: base, stroke: "#e0e0e0" }));
    root.append(titled(svg("path", { d, fill: "#1565c0", "fill-opacity": 0.35, stroke: "#1565c0", "stroke-width": 1 }), `${l.layer} at step ${l.step}: ${fmt(l.buckets[0][0])} … ${fmt(l.buckets[l.buckets.length - 1][1])}`));
    root.append(titled(svg("text", { x: LABEL_W - 8, y: base - 4, "text-anchor": "end", class: "mono" }, shorten(l.layer)), l.layer));
  });
  for (let t = 0; t <= 4; t++) {
    const v = lo + ((hi - lo) * t) / 4;
    root.append(svg("text", { x: xOf(v), y: height - 14, "text-anchor": "middle" }, fmt(v)));
  }
  root.append(svg("text", { x: (x0 + x1) / 2, y: height - 1, "text-anchor": "middle" }, "value (one axis for every layer)"));
  return root;
}

// ---------------------------------------------------------------------------------------------------- page
export async function render() {
  document.head.append(el("style", { text: CSS }));
  const main = el("main", {}, el("h1", { text: "actdiag" }));
  document.body.append(main);
  document.body.dataset.state = "loading";
  try {
    const runs = await getJSON("runs");
    if (!runs.length) {
      main.append(el("p", { className: "note", text: "No actdiag data in this logdir: run actdiag.watch(model, logdir=...) or actdiag inspect --logdir." }));
      document.body.dataset.state = "empty";
      return;
    }
    const picker = el("select", { id: "run" }, ...runs.map((r) => el("option", { value: r.run, text: r.run === "." ? ". (the logdir itself)" : r.run })));
    main.append(el("div", { className: "controls" }, el("label", { text: "Run " }, picker)));
    const body = el("div");
    main.append(body);
    const fail = (err) => {
      body.replaceChildren(el("p", { className: "error-box", text: `actdiag could not load run ${picker.value}: ${err.message}` }));
      document.body.dataset.state = "error";
    };
    picker.addEventListener("change", () => showRun(body, picker.value).catch(fail));
    await showRun(body, runs[0].run).catch(fail);
  } catch (err) {
    main.append(el("p", { className: "error-box", text: `actdiag could not load this logdir: ${err.message}` }));
    document.body.dataset.state = "error";
  }
}

let generation = 0;

async function showRun(body, run) {
  const mine = ++generation;
  document.body.dataset.state = "loading";
  const q = `run=${encodeURIComponent(run)}`;
  const [report, prof] = await Promise.all([getJSON(`report?${q}`), getJSON(`profile?${q}`)]);
  if (mine !== generation) return;
  body.replaceChildren();
  const width = Math.max(720, Math.min(1360, document.documentElement.clientWidth - 40));
  if (report) {
    const m = report.model;
    body.append(el("p", { className: "meta", text: `${m.name} · ${m.parameters.toLocaleString("en")} parameters · ${report.run.steps} steps, ${report.run.recorded_steps} recorded (every ${report.run.every})` }));
  }
  body.append(findingsView(report));
  const profiles = prof.profiles;
  if (!profiles.length) {
    body.append(el("p", { className: "note", text: "No recorded step yet." }));
    document.body.dataset.state = "ready";
    return;
  }
  const decades = logRange(profiles);
  const slider = el("input", { type: "range", id: "step", min: 0, max: profiles.length - 1, value: profiles.length - 1 });
  const stepLabel = el("span", { className: "meta" });
  const kind = el("select", { id: "kind" }, el("option", { value: "activations", text: "activations" }), el("option", { value: "gradients", text: "gradients" }));
  const profileBox = el("div");
  const healthBox = el("div");
  const histBox = el("div");
  body.append(
    el("h2", { text: "Depth profile" }),
    el("div", { className: "controls" }, el("label", { text: "Recorded step " }, slider), stepLabel),
    legend([...SERIES, ...SHARES], true),
    profileBox,
    el("h2", { text: "Unit health over time" }),
    healthBox,
    el("h2", { text: "Histograms by depth" }),
    el("div", { className: "controls" }, el("label", { text: "Histograms of " }, kind), el("span", { className: "meta", text: "at the chosen step, every layer on one x-axis" })),
    histBox,
  );
  let histToken = 0;
  const drawHist = async (i) => {
    const token = ++histToken;
    try {
      const data = await getJSON(`histograms?${q}&kind=${kind.value}&step=${profiles[i].step}`);
      if (token === histToken && mine === generation) histBox.replaceChildren(histogramChart(data, width));
    } catch (err) {
      histBox.replaceChildren(el("p", { className: "error-box", text: err.message }));
    }
  };
  const heatmaps = [
    heatmap(profiles, "dead_fraction", "Dead units (share per layer)", "No ReLU-family layer in this run: no dead-unit share.", SHARES[0].color, width),
    heatmap(profiles, "saturation", "Saturated units (share per layer)", "No bounded activation (tanh, sigmoid, ...) in this run: no saturated share.", SHARES[1].color, width),
  ];
  healthBox.replaceChildren(...heatmaps);
  let histTimer = null;
  const draw = (i) => {
    stepLabel.textContent = `step ${profiles[i].step} (${i + 1} of ${profiles.length} recorded)`;
    profileBox.replaceChildren(profileChart(profiles[i], decades, width));
    for (const h of heatmaps) h.select(i);
    // Dragging the slider fires many input events: ask for the histograms once it rests.
    clearTimeout(histTimer);
    return new Promise((resolve) => {
      histTimer = setTimeout(() => drawHist(i).then(resolve), 120);
    });
  };
  slider.addEventListener("input", () => draw(Number(slider.value)));
  kind.addEventListener("change", () => drawHist(Number(slider.value)));
  await draw(profiles.length - 1);
  if (mine === generation) document.body.dataset.state = "ready";
}
