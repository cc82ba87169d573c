// One question's trees across iterations, side by side: per tree, the questions it asked (depth
// first), who answered each and how; an answer that differs from the previous tree's answer
// to the same question is marked as changed.
"use strict";

function flatten(node, out) {
  out.push(node);
  for (const r of node.rounds) for (const c of r.children) if (c) flatten(c, out);
  return out;
}

function column(tree, previous) {
  const nodes = flatten(tree.root, []);
  const rows = nodes.map(n => {
    const before = previous.get(n.question);
    const changed = before !== undefined && before !== n.answer;
    return el("tr", {class: changed ? "changed" : null, dataset: {question: n.question, changed: changed}},
      el("td", {class: "mono", style: `padding-left: ${6 + 14 * n.depth}px`}, n.question),
      el("td", {}, whoBadge(n.answered_by)),
      el("td", {class: "mono"}, n.answer ?? "\u2014", " ", n.answer === null ? "" : correctMark(n.correct),
         changed ? el("span", {class: "info"}, ` (was ${before ?? "none"})`) : ""));
  });
  return el("div", {class: "column", dataset: {treeId: tree.tree_id, iteration: tree.iteration}},
    el("h3", {}, el("a", {href: `/tree/${tree.tree_id}`}, `iteration ${tree.iteration} \u00b7 ${tree.mode}`)),
    el("div", {}, "answer ", el("span", {class: "mono"}, tree.root.answer ?? "none"), " ",
       tree.root.answer === null ? "" : correctMark(tree.correct),
       el("span", {class: "info"}, ` \u00b7 ${tree.expert_calls} expert, ${tree.model_calls} model calls`)),
    tree.error ? el("div", {class: "error"}, `${tree.error.kind}: ${tree.error.message}`) : null,
    el("table", {class: "steps"}, el("thead", {}, el("tr", {}, el("th", {}, "question"), el("th", {}, "who"),
                                                     el("th", {}, "answer"))), el("tbody", {}, ...rows)));
}

async function main() {
  document.getElementById("nav").replaceWith(navBar("trees"));
  const q = new URLSearchParams(location.search).get("q") || "";
  document.getElementById("question").textContent = q;
  if (!q) { document.getElementById("info").textContent = "no question given (?q=...)"; return; }
  const data = await getJSON(`/api/question?q=${encodeURIComponent(q)}`);
  document.getElementById("info").textContent = data.total > data.trees.length
    ? `${data.total} trees of this question; the newest ${data.trees.length} shown` : `${data.total} tree(s) of this question`;
  const columns = [];
  let previous = new Map();
  for (const t of data.trees) {
    columns.push(column(t, previous));
    previous = new Map(flatten(t.root, []).map(n => [n.question, n.answer]));
  }
  document.getElementById("columns").replaceChildren(...columns);
}

main().catch(e => {
  document.getElementById("info").replaceChildren(el("span", {class: "error"}, `could not load: ${e.message}`));
});
