// FastVAR Sampler: what the run did (size, pruning, timing) in a fixed box of its own, above the previews; the
// controls the connected model's family ignores greyed and sent as their defaults (tau, the negative prompt);
// only the pixel budgets that family takes offered; choosing an aspect ratio shows the width and height it runs.
// Which control applies comes from the server's family facts (/fastvar/ui_facts), never from a family's name.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const INFO_HEIGHT = 62; // four 11 px monospace lines: the run line and the memory line each wrap once at the default width
let facts = null;
const factsReady = api.fetchApi("/fastvar/ui_facts").then((r) => r.json()).then((f) => (facts = f)).catch(() => null);

function linkOf(graph, id) {
  return graph?.links?.get ? graph.links.get(id) : graph?.links?.[id];
}

// The family facts of the loader feeding `inputName` of `node` (following the link), or null.
function familyOf(node, inputName) {
  const input = node?.inputs?.find((i) => i.name === inputName);
  const link = input?.link != null ? linkOf(node.graph, input.link) : null;
  const origin = link ? node.graph.getNodeById(link.origin_id) : null;
  return origin ? { facts: facts?.loaders?.[origin.comfyClass || origin.type], origin } : null;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// Grey `w` with the reason, or restore it; an ignored widget is sent as `fallback`.
function setIgnored(w, reason, fallback) {
  if (!w) return;
  w.fastvarIgnored = reason;
  w.disabled = !!reason;
  w.label = reason ? `${w.name} (${reason})` : undefined;
  if (!w.fastvarSerialize) {
    w.fastvarSerialize = true;
    w.serializeValue = () => (w.fastvarIgnored ? fallback : w.value);
  }
  const el = w.element || w.inputEl; // multiline text widgets are DOM elements
  if (el) {
    el.disabled = !!reason;
    el.style.opacity = reason ? "0.45" : "";
    el.title = reason || "";
  }
}

function updateSampler(node, defaults) {
  const found = familyOf(node, "model");
  const f = found?.facts;
  setIgnored(widget(node, "tau"), f && !f.has_tau ? `ignored for ${f.label}` : null, defaults.tau);
  const budget = widget(node, "pixel_budget");
  if (budget) {
    budget.options.values = f ? f.pixel_budgets : defaults.pixel_budget_choices;
    if (!budget.options.values.includes(budget.value)) budget.value = budget.options.values[0];
  }
  node.setDirtyCanvas?.(true, true);
}

function updateTextEncode(node) {
  const f = familyOf(node, "text_encoder")?.facts;
  setIgnored(widget(node, "negative_prompt"), f && !f.negative_prompt ? `ignored for ${f.label}` : null, "");
  node.setDirtyCanvas?.(true, true);
}

// After an aspect-ratio or budget choice: show the width and height the sampler will run.
async function showRunSize(node) {
  const aspect = widget(node, "aspect_ratio")?.value;
  const origin = familyOf(node, "model")?.origin;
  if (!origin || aspect === "from width/height") return;
  const params = new URLSearchParams({ loader: origin.comfyClass || origin.type, model: String(origin.widgets?.[0]?.value ?? "") });
  for (const name of ["width", "height", "aspect_ratio", "pixel_budget"]) params.set(name, String(widget(node, name)?.value));
  try {
    const size = await (await api.fetchApi(`/fastvar/sampler_size?${params}`)).json();
    if (size.error) return;
    widget(node, "width").value = size.width;
    widget(node, "height").value = size.height;
    node.setDirtyCanvas?.(true, true);
  } catch (err) {
    /* the size stays as typed; the run snaps it anyway */
  }
}

function addInfoBox(node) {
  const box = document.createElement("div");
  box.style.cssText = `font: 11px monospace; color: #ccc; white-space: pre-wrap; overflow: auto; padding: 2px 4px;
    height: ${INFO_HEIGHT}px; box-sizing: border-box; background: rgba(0,0,0,0.25); border-radius: 4px;`;
  const w = node.addDOMWidget("run_info", "fastvar_info", box, {
    serialize: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => INFO_HEIGHT,
    getMaxHeight: () => INFO_HEIGHT,
  });
  w.serialize = false;
  w.options = w.options || {};
  w.options.serialize = false;
  node.fastvarInfo = box;
}

function hook(nodeType, name, after) {
  const original = nodeType.prototype[name];
  nodeType.prototype[name] = function (...args) {
    const out = original?.apply(this, args);
    after.apply(this, args);
    return out;
  };
}

app.registerExtension({
  name: "fastvar.samplerInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "FastVAR_TextEncode") {
      hook(nodeType, "onConnectionsChange", function () { factsReady.then(() => updateTextEncode(this)); });
      hook(nodeType, "onConfigure", function () { setTimeout(() => factsReady.then(() => updateTextEncode(this)), 0); });
      return;
    }
    if (nodeData.name !== "FastVAR_Sampler") return;
    const required = nodeData.input?.required || {};
    const defaults = { tau: required.tau?.[1]?.default, pixel_budget_choices: required.pixel_budget?.[0] || [] };
    hook(nodeType, "onNodeCreated", function () {
      addInfoBox(this); // from the start, so the previews below never move under it
      for (const name of ["aspect_ratio", "pixel_budget"]) {
        const w = widget(this, name);
        const original = w?.callback;
        if (w) w.callback = (...args) => { const r = original?.apply(w, args); showRunSize(this); return r; };
      }
    });
    hook(nodeType, "onConnectionsChange", function () { factsReady.then(() => updateSampler(this, defaults)); });
    hook(nodeType, "onConfigure", function () { setTimeout(() => factsReady.then(() => updateSampler(this, defaults)), 0); });
    hook(nodeType, "onExecuted", function (message) {
      const text = message?.fastvar_info?.join("\n");
      if (text && this.fastvarInfo) this.fastvarInfo.textContent = text;
    });
  },
});
