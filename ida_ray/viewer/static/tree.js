// One tree: each node is a <details> element; its body lists the node's steps (who took
// them, log-probs, adversary scores, weight versions) and its fan-in rounds with children.
"use strict";

const STEP_HEAD = ["step", "who", "output", "model's greedy output", "log-prob", "adversary score",
                   "target log-prob", "weights"];

function stepRow(label, s) {
  if (!s) return null;
  return el("tr", {class: `step step-${s.role}`},
    el("td", {}, label), el("td", {}, whoBadge(s.who)),
    el("td", {class: "mono", title: s.output}, s.role === "answer" ? (s.output || "\u2014") : stepText(s.output)),
    el("td", {class: "mono", title: s.model_output ?? ""},
       s.model_output === null ? "\u2014" : (s.role === "answer" ? s.model_output : stepText(s.model_output))),
    el("td", {class: "num"}, num(s.logprob)), el("td", {class: "num"}, num(s.adversary_score)),
    el("td", {class: "num"}, num(s.target_logprob)), el("td", {class: "num"}, s.weight_version ?? "\u2014"));
}

function stepTable(rows) {
  rows = rows.filter(Boolean);
  if (!rows.length) return null;
  return el("table", {class: "steps"}, el("thead", {}, el("tr", {}, ...STEP_HEAD.map(h => el("th", {}, h)))),
            el("tbody", {}, ...rows));
}

function roundBlock(r, k) {
  const subRows = r.subquestions.map((q, i) => el("tr", {class: r.chosen.includes(i) ? "chosen" : null},
    el("td", {class: "mono"}, q), el("td", {class: "mono"}, r.model_answers[i] ?? "\u2014"),
    el("td", {class: "num"}, num(r.adversary_scores[i])),
    el("td", {}, r.chosen.includes(i) ? "recursed" : "model's answer kept"),
    el("td", {class: "mono"}, r.answers[i] ?? "\u2014")));
  return el("div", {class: "round"},
    el("h4", {}, `round ${k + 1}`),
    el("table", {}, el("thead", {}, el("tr", {}, ...["subquestion", "model answer", "adversary score", "branch",
                                                      "answer used"].map(h => el("th", {}, h)))),
       el("tbody", {}, ...subRows)),
    ...r.children.filter(Boolean).map(c => renderNode(c, false)),
    stepTable([stepRow("fan-in", r.fan_in)]));
}

function renderNode(n, open) {
  const summary = el("summary", {},
    el("span", {class: "q"}, n.question), " \u2192 ",
    el("span", {class: "mono a"}, n.answer ?? "no answer"), " ", n.answer === null ? "" : correctMark(n.correct),
    whoBadge(n.answered_by),
    n.error ? el("span", {class: "badge err"}, n.error.kind) : "",
    el("span", {class: "info"}, `  depth ${n.depth}` + (n.rounds.length ? `, ${n.rounds.length} round(s)` : "")));
  const body = el("div", {class: "node-body"},
    n.error ? el("div", {class: "error"}, `${n.error.kind}: ${n.error.message}`) : null,
    n.correct === false ? el("div", {class: "wrong"}, `the right answer is ${n.truth}`) : null,
    stepTable([stepRow("answer: M(q), target A", n.answer_step), stepRow("fan-out", n.fan_out)]),
    ...n.rounds.map(roundBlock));
  return el("details", {class: "node", open: open, dataset: {question: n.question, depth: n.depth}}, summary, body);
}

function renderSummary(t) {
  const rows = [["question", el("span", {class: "mono"}, t.question)],
                ["answer", el("span", {}, el("span", {class: "mono"}, t.root.answer ?? "none"), " ",
                              t.root.answer === null ? "" : correctMark(t.correct),
                              t.correct === false ? ` (right: ${t.truth})` : "")],
                ["task / size", `${t.task} / ${t.size}`], ["mode", t.mode], ["iteration", t.iteration],
                ["source", t.source], ["expert calls", t.expert_calls], ["model calls", t.model_calls],
                ["weight versions", t.weight_versions.join(", ") || "\u2014"],
                ["error", t.error ? el("span", {class: "error"}, `${t.error.kind}: ${t.error.message}`) : "none"],
                ["tree id", el("span", {class: "mono"}, t.tree_id)]];
  return el("table", {id: "tree-summary"}, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
}

async function main() {
  document.getElementById("nav").replaceWith(navBar("trees"));
  const id = decodeURIComponent(location.pathname.split("/").pop());
  try {
    const t = await getJSON(`/api/trees/${encodeURIComponent(id)}`);
    document.title = `ida-ray: ${t.question}`;
    const box = document.getElementById("summary");
    box.classList.remove("info");
    box.replaceChildren(renderSummary(t));
    document.getElementById("tree").replaceChildren(renderNode(t.root, true));
  } catch (e) {
    document.getElementById("summary").replaceChildren(el("span", {class: "error"}, e.message));
  }
  const setAll = open => document.querySelectorAll("details.node").forEach(d => { d.open = open; });
  document.getElementById("expand-all").addEventListener("click", () => setAll(true));
  document.getElementById("collapse-all").addEventListener("click", () => setAll(false));
}

main();
