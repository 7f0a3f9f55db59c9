// Drives the translation page's script (serve/static/app.js) in node against a running mt-serve,
// with a small stand-in for the few DOM calls the script makes, and prints what the page shows
// as JSON. No browser: it checks the page's logic and its calls, not how it is drawn.
//
//   node tests/page_driver.js http://127.0.0.1:PORT src/transformer_mt/serve/static/app.js
"use strict";

const fs = require("fs");
const vm = require("vm");

const [base, script] = process.argv.slice(2);

class Element {
  constructor(tag, value = "") {
    Object.assign(this, { tag, value, textContent: "", checked: false, className: "", title: "" });
    this.children = [];
    this.listeners = {};
    this.style = {};
  }
  addEventListener(type, listener) { (this.listeners[type] ||= []).push(listener); }
  fire(type) { for (const listener of this.listeners[type] || []) listener(); }
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren(...nodes) {
    this.children = nodes;
    const values = nodes.map((node) => node.value);
    if (this.tag === "select" && !values.includes(this.value)) this.value = values[0] ?? "";
  }
  insertRow() { return this.adopt(new Element("tr")); }
  insertCell() { return this.adopt(new Element("td")); }
  adopt(child) { this.children.push(child); return child; }
  get text() {
    return this.textContent + this.children.map((c) => (typeof c === "string" ? c : c.text)).join("");
  }
}

const page = {
  source: new Element("textarea"), beam: new Element("input", "5"), nbest: new Element("input", "1"),
  words: new Element("input"), kind: new Element("select", "cross"), layer: new Element("select"),
  head: new Element("select"), status: new Element("span"), model: new Element("p"),
  translations: new Element("ol"), heatmap: new Element("div"),
  "attention-translation": new Element("span"),
};
globalThis.document = {
  getElementById: (id) => page[id],
  createElement: (tag) => new Element(tag),
};
globalThis.Option = class { constructor(text, value) { this.text = text; this.value = value; } };
const fetchServer = globalThis.fetch;
let pending = 0; // requests the page has sent and not yet had answered
globalThis.fetch = async (path, options) => {
  pending++;
  try {
    const response = await fetchServer(base + path, options);
    await response.clone().arrayBuffer();
    return response;
  } finally {
    setTimeout(() => pending--, 0); // after the page's own handling of the answer
  }
};

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(condition, what) {
  for (let i = 0; i < 300; i++) {
    if (condition()) return;
    await sleep(20);
  }
  throw new Error(`the page never showed ${what}; status: ${page.status.text}`);
}

function shown() {
  const [table] = page.heatmap.children;
  const [header, ...rows] = table ? table.children : [];
  return {
    status: page.status.text,
    translations: page.translations.children.map((li) => li.children.map((line) => line.text)),
    columns: header ? header.children.slice(1).map((th) => th.text) : [],
    rows: rows.map((row) => row.children[0].text),
    cells: rows.map((row) => row.children.slice(1).map((td) => Number(td.title.split(": ")[1]))),
    layers: page.layer.children.length,
    heads: page.head.children.map((option) => option.value),
  };
}

async function main() {
  vm.runInThisContext(fs.readFileSync(script, "utf8"), { filename: script });
  await until(() => page.model.text, "the model's description");
  const seen = { model: page.model.text };
  page.source.value = "Zwei drei vier.\nEins.";
  page.source.fire("input"); // typed: translated once the typing pauses
  await until(() => page.heatmap.children.length && !pending, "a heat map");
  seen.cross = shown();
  page.nbest.value = "2";
  page.nbest.fire("change");
  await until(() => page.translations.children[0]?.children.length === 2, "two n-best lines");
  await until(() => !pending, "the attention of the new settings");
  seen.nbest = shown();
  page.kind.value = "encoder";
  page.kind.fire("change");
  page.head.value = "1";
  page.head.fire("change");
  seen.encoder = shown();
  page.words.checked = true;
  page.words.fire("change"); // asks for the attention again, over words
  await until(() => !pending, "the attention over words");
  seen.words = shown();
  console.log(JSON.stringify(seen));
}

main().catch((err) => { console.error(err.message); process.exit(1); });
