// The tree list: filters live in the page's query string, so a filtered view can be shared.
"use strict";

const PAGE = 100;
const FACET_FIELDS = ["task", "size", "iteration", "mode", "source"];
let offset = 0;

function currentFilters() {
  const params = new URLSearchParams();
  for (const sel of document.querySelectorAll("#filters select")) {
    if (sel.value !== "") params.set(sel.name, sel.value);
  }
  return params;
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
  const [info, data] = await Promise.all([getJSON("/api/info"), getJSON(`/api/trees?${params}`)]);
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
    el("td", {}, el("a", {href, class: "mono tree-link"}, t.question)),
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
  const sel = document.querySelector(`#filters select[name=${k}]`);
  if (sel) { if (![...sel.options].some(o => o.value === v)) sel.append(el("option", {value: v}, v)); sel.value = v; }
}
document.getElementById("filters").addEventListener("change", () => { offset = 0; load().catch(showError); });
document.getElementById("refresh").addEventListener("click", () => load().catch(showError));
document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load().catch(showError); });
document.getElementById("next").addEventListener("click", () => { offset += PAGE; load().catch(showError); });
load().catch(showError);
