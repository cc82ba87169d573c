// Shared helpers for the viewer pages. DOM is built with el(), never from HTML strings,
// so questions and model outputs are always shown as text.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || r.statusText);
    const e = new Error(detail);
    e.status = r.status;
    throw e;
  }
  return body;
}

function postJSON(url, data) {
  return getJSON(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)});
}

const WHO_LABEL = {expert: "expert", model: "model", model_via_hprime: "model via H\u2032"};

function whoBadge(who) {
  if (!who) return el("span", {class: "unknown"}, "\u2014");
  return el("span", {class: `badge who-${who}`, title: who}, WHO_LABEL[who] || who);
}

function correctMark(c) {
  if (c === true) return el("span", {class: "ok", title: "correct"}, "\u2713");
  if (c === false) return el("span", {class: "wrong", title: "wrong"}, "\u2717");
  return el("span", {class: "unknown", title: "no ground truth"}, "?");
}

function num(x, digits = 3) {
  return x === null || x === undefined ? "\u2014" : Number(x).toFixed(digits);
}

// "!31" -> answer 31 ; "?1,2&3,4" -> split 1,2 | 3,4 (the prompt format of ida_ray.prompts)
function stepText(out) {
  if (!out) return "\u2014";
  if (out[0] === "!") return `answer ${out.slice(1)}`;
  if (out[0] === "?") return `split ${out.slice(1).split("&").join(" | ")}`;
  return out;
}

function navBar(current) {
  const link = (href, text, key) => el("a", {href, class: current === key ? "current" : null}, text);
  return el("header", {}, el("span", {class: "title"}, "ida-ray"),
            link("/", "Trees", "trees"), link("/human", "Human expert", "human"));
}
