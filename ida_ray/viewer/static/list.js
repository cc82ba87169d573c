// The run's first page: the progress plot (held-out accuracy by size and expert calls per
// tree, per iteration; each point links to its trees) and the tree list. Filters and the
// search live in the page's query string, so a view can be shared. While "follow the run" is
// on, the page polls and shows new iterations and trees as a live run writes them.
"use strict";

const PAGE = 100;
const POLL_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const FACET_FIELDS = ["task", "size", "iteration", "mode", "source"];
let offset = 0;

function currentFilters() {
  const params = new URLSearchParams();
  for (const sel of document.querySelectorAll("#filters select, #filters input[type=search]")) {
    if (sel.value !== "") params.set(sel.name, sel.value);
  }
  return params;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// A line chart: series = [{label, points: [{x, y, href, title}]}], y from 0 to yMax.
function lineChart(title, series, yMax, yLabel) {
  const W = 460, H = 220, L = 44, R = 90, T = 22, B = 30;
  const xs = series.flatMap(s => s.points.map(p => p.x));
  const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
  const X = x => L + (x - x0) / (x1 - x0 || 1) * (W - L - R), Y = y => H - B - y / yMax * (H - T - B);
  const g = svg("svg", {width: W, height: H, class: "line-chart", "data-title": title},
    svg("text", {x: L, y: 14, class: "chart-title"}, title),
    svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}),
    svg("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}),
    svg("text", {x: (L + W - R) / 2, y: H - 6, class: "axis-label"}, "iteration"),
    svg("text", {x: 4, y: H - B + 24, class: "axis-label"}, yLabel));
  for (const t of [0, 0.5, 1]) g.append(svg("text", {x: L - 6, y: Y(t * yMax) + 4, class: "tick"}, (t * yMax).toFixed(yMax < 2 ? 1 : 0)));
  series.forEach((s, i) => {
    const colour = `hsl(${(i * 67 + 210) % 360}, 60%, 42%)`;
    g.append(svg("polyline", {points: s.points.map(p => `${X(p.x)},${Y(p.y)}`).join(" "), fill: "none",
                              stroke: colour, "stroke-width": 2}));
    for (const p of s.points) {
      const dot = svg("circle", {cx: X(p.x), cy: Y(p.y), r: 4, fill: colour, class: "point"},
                      svg("title", {}, p.title));
      g.append(p.href ? svg("a", {href: p.href, class: "point-link", "data-iteration": p.x, "data-series": s.label}, dot)
                      : dot);
    }
    g.append(svg("text", {x: W - R + 8, y: T + 14 * i + 8, fill: colour, class: "legend-text"}, s.label));
  });
  return g;
}

function drawProgress(iterations) {
  const box = document.getElementById("progress");
  box.hidden = !iterations.length;
  if (!iterations.length) return;
  const sizes = [...new Set(iterations.flatMap(m => Object.keys(m.accuracy_by_size)))].sort((a, b) => a - b);
  const acc = sizes.map(s => ({label: `size ${s}`, points: iterations.filter(m => s in m.accuracy_by_size).map(m => ({
    x: m.iteration, y: m.accuracy_by_size[s], href: `/?iteration=${m.iteration}&size=${s}`,
    title: `iteration ${m.iteration}, size ${s}: accuracy ${Number(m.accuracy_by_size[s]).toFixed(2)}`}))}));
  const calls = [{label: "expert calls", points: iterations.map(m => ({x: m.iteration, y: m.expert_calls_per_tree,
    href: `/?iteration=${m.iteration}&mode=amplify`,
    title: `iteration ${m.iteration}: ${Number(m.expert_calls_per_tree).toFixed(2)} expert calls per tree`}))}];
  const most = Math.max(1, ...iterations.map(m => m.expert_calls_per_tree));
  document.getElementById("accuracy-chart").replaceChildren(
    lineChart("held-out accuracy (model alone)", acc, 1, "acc"));
  document.getElementById("calls-chart").replaceChildren(
    lineChart("expert calls per amplification tree", calls, Math.ceil(most), "calls"));
}

function fillSelect(sel, values, chosen, extra) {
  sel.replaceChildren(el("option", {value: ""}, "any"),
                      ...(extra || []).map(([v, t]) => el("option", {value: v}, t)),
                      ...values.map(v => el("option", {value: String(v)}, String(v))));
  sel.value = chosen || "";
  if (sel.value !== (chosen || "")) sel.value = "";  // a stale value from the URL
}

async function load() {
  const params = currentFilters();
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
  params.set("offset", offset);
  params.set("limit", PAGE);
  const [info, data, metrics] = await Promise.all([getJSON("/api/info"), getJSON(`/api/trees?${params}`),
                                                   getJSON("/api/metrics")]);
  drawProgress(metrics.iterations);
  lastSeen = info.trees;
  const infoBox = document.getElementById("info");
  infoBox.replaceChildren(`run ${info.run_dir}: ${info.trees} trees`,
                          info.trees_dir_exists ? "" : " (no trees/ directory yet)",
                          ...info.problems.map(p => el("div", {class: "problems"}, p)));
  const chosen = Object.fromEntries(currentFilters());
  for (const f of FACET_FIELDS) fillSelect(document.querySelector(`select[name=${f}]`), data.facets[f], chosen[f]);
  fillSelect(document.querySelector("select[name=error]"), data.facets.error, chosen.error,
             [["any", "any error"], ["none", "no error"]]);
  document.getElementById("count").textContent =
    data.total ? `${data.total} trees match; showing ${offset + 1}\u2013${offset + data.trees.length}` : "no trees match";
  document.querySelector("#trees tbody").replaceChildren(...data.trees.map(row));
  document.getElementById("prev").disabled = offset === 0;
  document.getElementById("next").disabled = offset + PAGE >= data.total;
}

function row(t) {
  const href = `/tree/${t.tree_id}`;
  return el("tr", {class: "tree-row", dataset: {treeId: t.tree_id}, onclick: () => { location.href = href; }},
    el("td", {class: "num"}, t.iteration), el("td", {}, t.task), el("td", {}, t.mode), el("td", {class: "num"}, t.size),
    el("td", {}, el("a", {href, class: "mono tree-link"}, t.question), " ",
       el("a", {href: `/question?q=${encodeURIComponent(t.question)}`, class: "across",
                title: "this question's trees across iterations", onclick: e => e.stopPropagation()}, "\u21c4")),
    el("td", {class: "mono"}, t.answer ?? "\u2014"), el("td", {}, correctMark(t.correct)),
    el("td", {}, whoBadge(t.answered_by)), el("td", {class: "num"}, t.expert_calls),
    el("td", {class: "num"}, t.model_calls), el("td", {class: "num"}, t.nodes), el("td", {class: "num"}, t.depth),
    el("td", {}, t.weight_versions.join(", ")), el("td", {}, t.source),
    el("td", {class: "err"}, t.error || ""));
}

function showError(e) {
  document.getElementById("info").replaceChildren(el("span", {class: "error"}, `could not load trees: ${e.message}`));
}

document.getElementById("nav").replaceWith(navBar("trees"));
// Start from the filters in the URL: the selects are empty until the first load fills them.
for (const [k, v] of new URLSearchParams(location.search)) {
  if (k === "q") { document.getElementById("search").value = v; continue; }
  const sel = document.querySelector(`#filters select[name=${k}]`);
  if (sel) { if (![...sel.options].some(o => o.value === v)) sel.append(el("option", {value: v}, v)); sel.value = v; }
}
document.getElementById("filters").addEventListener("change", () => { offset = 0; load().catch(showError); });
document.getElementById("search").addEventListener("input", () => { offset = 0; load().catch(showError); });
document.getElementById("filters").addEventListener("submit", e => e.preventDefault());

// Following a live run: reload when the run has written trees the page has not shown.
let lastSeen = null;
setInterval(async () => {
  if (!document.getElementById("follow").checked) return;
  try {
    const info = await getJSON("/api/info");
    if (info.trees !== lastSeen) await load();
  } catch (e) { /* the run's server may be restarting: try again at the next tick */ }
}, POLL_MS);
document.getElementById("refresh").addEventListener("click", () => load().catch(showError));
document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load().catch(showError); });
document.getElementById("next").addEventListener("click", () => { offset += PAGE; load().catch(showError); });
load().catch(showError);
