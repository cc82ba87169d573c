// The person's side of ida_ray.experts.HumanQueue: pending requests are polled every second.
// Cards are kept across polls (keyed by request id) so a reply being typed is never lost.
// Serving a training run (`ida-ray train --expert human`), the page starts no trees of its
// own (can_start is false): it shows the run's progress instead of the tree form.
"use strict";

const KIND_TITLE = {fan_out: "Fan-out", fan_in: "Fan-in", answer: "Answer"};
const cards = new Map();

function makeCard(r) {
  const input = el("input", {class: "reply", name: "reply", autocomplete: "off",
                             placeholder: r.kind === "answer" ? "answer" : "!answer or ?q1&q2"});
  const error = el("div", {class: "error"});
  const form = el("form", {}, input, " ", el("button", {type: "submit", class: "send"}, "Send"));
  const card = el("div", {class: "request", dataset: {requestId: r.request_id, kind: r.kind, question: r.question}},
    el("h3", {}, `${KIND_TITLE[r.kind]}: `, el("span", {class: "mono"}, r.question)),
    r.sub ? el("ul", {class: "sub"}, ...r.sub.map(([q, a]) =>
      el("li", {}, el("span", {class: "mono"}, q), " \u2192 ", el("span", {class: "mono"}, a)))) : null,
    el("div", {}, r.instructions),
    el("div", {class: "prompt"}, "the model sees: ", el("code", {}, r.prompt), el("span", {class: "left"})),
    form, error);
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    try {
      await postJSON(`/api/human/requests/${r.request_id}`, {text: input.value});
      card.remove();
      cards.delete(r.request_id);
      poll();
    } catch (e) {
      error.textContent = e.message;
      input.select();
    }
  });
  return card;
}

function updateCard(card, r) {
  card.querySelector(".left").textContent = ` \u00b7 ${Math.round(r.seconds_left)} s left`;
  const error = card.querySelector(".error");
  if (r.error && !error.textContent) error.textContent = r.error;  // e.g. after a page reload
}

function runRow(run) {
  const link = run.tree_id ? el("a", {href: `/tree/${run.tree_id}`, class: "tree-link"}, "view tree") : "";
  return el("tr", {class: `run run-${run.state}`, dataset: {runId: run.run_id, state: run.state}},
    el("td", {class: "mono"}, run.question),
    el("td", {class: run.state === "failed" ? "error" : null},
       run.state + (run.error ? ` (${run.error.kind}: ${run.error.message})` : "")),
    el("td", {class: "mono"}, run.answer ?? "\u2014"), el("td", {class: "num"}, run.expert_calls ?? "\u2014"),
    el("td", {}, link));
}

async function poll() {
  try {
    const [req, runs] = await Promise.all([getJSON("/api/human/requests"), getJSON("/api/human/runs")]);
    const box = document.getElementById("requests");
    const ids = new Set(req.requests.map(r => r.request_id));
    for (const [id, card] of cards) if (!ids.has(id)) { card.remove(); cards.delete(id); }
    for (const r of req.requests) {
      if (!cards.has(r.request_id)) { cards.set(r.request_id, makeCard(r)); box.append(cards.get(r.request_id)); }
      updateCard(cards.get(r.request_id), r);
    }
    box.querySelector(".empty")?.remove();
    if (!req.requests.length) box.append(el("div", {class: "empty"}, "nothing waiting"));
    document.getElementById("status").textContent =
      `${req.requests.length} waiting, ${req.answered} answered, ${req.timed_out} timed out`;
    document.getElementById("runs-section").hidden = !runs.can_start;
    document.getElementById("run-status").textContent = runs.status || "";
    document.querySelector("#runs tbody").replaceChildren(...runs.runs.map(runRow));
  } catch (e) {
    document.getElementById("status").replaceChildren(el("span", {class: "error"}, e.message));
  }
}

document.getElementById("nav").replaceWith(navBar("human"));
document.getElementById("start-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const q = document.getElementById("new-question");
  const err = document.getElementById("start-error");
  try {
    await postJSON("/api/human/runs", {question: q.value});
    err.textContent = "";
    q.value = "";
    poll();
  } catch (e) {
    err.textContent = e.message;
  }
});
poll();
setInterval(poll, 1000);
