// The translation page: translate as you type (debounced), show the n-best lists, and draw the
// chosen attention (kind, layer, head) of the first sentence as a heat map.
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 300;
let info = null; // GET /info
let maps = null; // POST /attention of the first line
let timer = null;
let latest = 0; // number of the newest update: older answers are dropped

async function call(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function sourceLines() {
  const lines = $("source").value.split("\n").filter((line) => line.trim());
  return lines.slice(0, info ? info.bounds.max_sentences : 1);
}

async function update() {
  const mine = ++latest;
  const lines = sourceLines();
  $("status").textContent = "";
  if (!lines.length) {
    $("translations").replaceChildren();
    maps = null;
    draw();
    return;
  }
  const beam = Number($("beam").value);
  const nbest = Math.min(Number($("nbest").value), beam);
  try {
    const answer = await call("/translate", { text: lines, beam_size: beam, nbest });
    if (mine !== latest) return;
    showTranslations(answer, nbest);
    const attention = await call("/attention", { text: lines[0], words: $("words").checked });
    if (mine !== latest) return;
    maps = attention;
    fillChoices();
    draw();
  } catch (err) {
    if (mine === latest) $("status").textContent = err.message;
  }
}

function showTranslations(answer, nbest) {
  const items = answer.translations.map((entry, i) => {
    const texts = nbest === 1 ? [entry] : entry;
    const scores = nbest === 1 ? [answer.scores[i]] : answer.scores[i];
    const li = document.createElement("li");
    texts.forEach((text, k) => {
      const line = document.createElement("div");
      if (k > 0) line.className = "alt";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = scores[k].toFixed(3);
      line.append(score, text);
      li.append(line);
    });
    return li;
  });
  $("translations").replaceChildren(...items);
}

function setOptions(select, labels) {
  const keep = select.value;
  select.replaceChildren(...labels.map(([value, text]) => new Option(text, value)));
  if (labels.some(([value]) => value === keep)) select.value = keep;
}

function fillChoices() {
  const layers = maps[$("kind").value];
  setOptions($("layer"), layers.map((_, i) => [String(i), String(i + 1)]));
  const heads = layers[0].map((_, i) => [String(i), String(i + 1)]);
  setOptions($("head"), [["mean", "mean of heads"], ...heads]);
}

// Rows and columns of each kind: who looks (rows) at whom (columns).
function axes(kind) {
  if (kind === "encoder") return [maps.source, maps.source];
  if (kind === "decoder") return [maps.output, maps.target_in];
  return [maps.output, maps.source];
}

function matrix(kind, layer, head) {
  const heads = maps[kind][layer];
  if (head !== "mean") return heads[Number(head)];
  return heads[0].map((row, r) =>
    row.map((_, c) => heads.reduce((sum, h) => sum + h[r][c], 0) / heads.length));
}

function draw() {
  const heatmap = $("heatmap");
  if (!maps) {
    heatmap.replaceChildren();
    $("attention-translation").textContent = "";
    return;
  }
  $("attention-translation").textContent = maps.translation;
  const kind = $("kind").value;
  const weights = matrix(kind, Number($("layer").value), $("head").value);
  const [rows, cols] = axes(kind);
  const table = document.createElement("table");
  const head = table.insertRow();
  head.append(document.createElement("th"));
  for (const label of cols) {
    const th = document.createElement("th");
    th.className = "col";
    th.textContent = label;
    head.append(th);
  }
  rows.forEach((label, r) => {
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.className = "row";
    th.textContent = label;
    tr.append(th);
    weights[r].forEach((w, c) => {
      const td = tr.insertCell();
      td.className = "cell";
      td.style.background = `rgba(25, 90, 200, ${w})`;
      td.title = `${label} → ${cols[c]}: ${w.toFixed(3)}`;
    });
  });
  heatmap.replaceChildren(table);
}

function scheduled() {
  clearTimeout(timer);
  timer = setTimeout(update, DEBOUNCE_MS);
}

async function start() {
  info = await call("/info");
  const m = info.model;
  $("model").textContent =
    `${info.source_language} → ${info.target_language}: ${m.arch}, ` +
    `${m.parameters.toLocaleString()} parameters, ${info.vocabulary.kind} vocabulary ` +
    `(${info.checkpoint.run_name || info.checkpoint.path})`;
  $("beam").value = info.decode_defaults.beam_size;
  $("source").addEventListener("input", scheduled);
  for (const id of ["beam", "nbest", "words"]) $(id).addEventListener("change", update);
  $("kind").addEventListener("change", () => { if (maps) { fillChoices(); draw(); } });
  for (const id of ["layer", "head"]) $(id).addEventListener("change", draw);
}

start().catch((err) => { $("status").textContent = err.message; });
