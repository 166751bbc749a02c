// FastVAR Pruning node: the schedule chart (one bar per scale, tokens forwarded vs total, skipped steps and the
// cache scale marked, the cost model's FLOP ratio) for the connected sampler's model and size, and the widgets
// the preset ignores greyed, drawn with what the preset uses instead of their own value, and sent to the server
// as their defaults (so moving one never re-runs the sampler). chart_for is display only: kept out of the prompt.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_ID = "FastVAR_Pruning";
const SAMPLER_ID = "FastVAR_Sampler";
const CHART_HEIGHT = 200;
const INPUTS = ["preset", "speed_target", "last_1_drop", "last_2_drop", "last_3_drop", "last_4_drop",
  "last_5_drop", "last_6_drop", "cache_from_end", "first_layer", "last_layer", "chart_for"];
const SIZE_INPUTS = ["width", "height", "aspect_ratio", "pixel_budget"];

let facts = null; // /fastvar/ui_facts: loader families and the widgets each preset ignores
const factsReady = api.fetchApi("/fastvar/ui_facts").then((r) => r.json()).then((f) => (facts = f)).catch(() => null);

function linkOf(graph, id) {
  return graph?.links?.get ? graph.links.get(id) : graph?.links?.[id];
}

// The loader node feeding an input of `node` (e.g. the sampler's model), or null.
function originOf(node, inputName) {
  const input = node?.inputs?.find((i) => i.name === inputName);
  const link = input?.link != null ? linkOf(node.graph, input.link) : null;
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

function connectedSampler(node) {
  for (const id of node.outputs?.[0]?.links || []) {
    const link = linkOf(node.graph, id);
    const target = link ? node.graph.getNodeById(link.target_id) : null;
    if (target && (target.comfyClass || target.type) === SAMPLER_ID) return target;
  }
  return null;
}

function widgetValues(node) {
  const params = new URLSearchParams();
  for (const w of node.widgets || []) {
    if (INPUTS.includes(w.name)) params.set(w.name, String(w.value));
  }
  const sampler = connectedSampler(node);
  const loader = sampler ? originOf(sampler, "model") : null;
  if (loader) {
    params.set("loader", loader.comfyClass || loader.type);
    params.set("model", String(loader.widgets?.[0]?.value ?? ""));
    for (const w of sampler.widgets || []) {
      if (SIZE_INPUTS.includes(w.name)) params.set(w.name, String(w.value));
    }
  }
  return params;
}

function ignoredWidgets(node) {
  const preset = node.widgets?.find((w) => w.name === "preset")?.value;
  return facts?.pruning_ignored?.[preset] || [];
}

// An ignored widget draws only the grey shape and what the preset uses (a slider: its bar at the preset's
// value), never its own value, which the run does not read. Its own value stays for when it applies again.
function drawIgnored(ctx, { width, showText = true }) {
  const LG = window.LiteGraph;
  const margin = 15, height = LG?.NODE_WIDGET_HEIGHT ?? 20, y = this.y;
  const inner = width - margin * 2;
  ctx.save();
  ctx.fillStyle = LG?.WIDGET_BGCOLOR ?? "#222";
  ctx.beginPath();
  ctx.roundRect(margin, y, inner, height, this.type === "slider" ? 0 : [height * 0.5]);
  ctx.fill();
  if (this.type === "slider" && this.fastvarUsed != null) {
    const { min = 0, max = 100 } = this.options || {};
    ctx.fillStyle = "#456";
    ctx.fillRect(margin, y, (inner * Math.min(Math.max(this.fastvarUsed - min, 0), max - min)) / (max - min), height);
  }
  if (showText) {
    ctx.fillStyle = LG?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
    ctx.textAlign = "left";
    ctx.fillText(fitText(ctx, this.label, inner - 20), margin + 10, y + height * 0.7);
  }
  ctx.restore();
}

// `text` cut with an ellipsis to `maxWidth` pixels.
function fitText(ctx, text, maxWidth) {
  if (ctx.measureText(text).width <= maxWidth) return text;
  let cut = text.length;
  while (cut > 1 && ctx.measureText(`${text.slice(0, cut)}…`).width > maxWidth) cut -= 1;
  return `${text.slice(0, cut)}…`;
}

function markIgnored(node, data) {
  const ignored = ignoredWidgets(node);
  const preset = node.widgets?.find((w) => w.name === "preset")?.value;
  for (const w of node.widgets || []) {
    if (!INPUTS.includes(w.name) || w.name === "preset" || w.name === "chart_for") continue;
    const off = ignored.includes(w.name);
    const tail = /^last_(\d)_drop$/.exec(w.name);
    w.disabled = off;
    w.label = off ? data?.ignored_labels?.[w.name] ?? `${w.name}: ignored by ${preset}` : undefined;
    if (w.fastvarTooltip === undefined) w.fastvarTooltip = w.tooltip ?? null; // the input's own tooltip
    w.tooltip = off ? `Ignored under preset ${preset}; choose preset custom to set it.` : w.fastvarTooltip ?? undefined;
    w.fastvarUsed = off && tail && data?.uses ? data.uses.drop_from_end?.[tail[1]] ?? 0 : null; // no bar without a plan
    if (off) w.drawWidget = drawIgnored;
    else delete w.drawWidget; // back to its class's drawing
  }
  node.setDirtyCanvas?.(true, true);
}

function draw(canvas, data) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  canvas.width = width * ratio;
  canvas.height = CHART_HEIGHT * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, CHART_HEIGHT);
  ctx.font = "11px sans-serif";
  if (!data) return;
  if (data.error) {
    ctx.fillStyle = "#e66";
    wrapText(ctx, data.error, 6, 16, width - 12, 14);
    return;
  }
  const left = 6, right = width - 6;
  ctx.fillStyle = "#ddd";
  let y = wrapText(ctx, `${data.model}: ${data.speedup_text}`, left, 12, right - left, 13);
  if (data.note) {
    ctx.fillStyle = "#e6b450";  // a speed target out of reach: what it reached and why
    y = wrapText(ctx, data.note, left, y + 13, right - left, 13);
    ctx.fillStyle = "#ddd";
  }
  const top = legend(ctx, left, y + 14, right) + 6;
  const bottom = CHART_HEIGHT - 16;
  const n = data.scales.length;
  const slot = (right - left) / n;
  // Square-root heights: a 2K schedule's early scales hold a thousandth of the last one's tokens.
  const maxRoot = Math.sqrt(Math.max(...data.scales.map((s) => s.tokens)));
  const height = (tokens) => (tokens > 0 ? Math.max(2, ((bottom - top) * Math.sqrt(tokens)) / maxRoot) : 0);
  data.scales.forEach((s, i) => {
    const x = left + i * slot + 1;
    const barW = Math.max(2, slot - 3);
    const full = height(s.tokens);
    const kept = height(s.forwarded);
    ctx.fillStyle = "#444";
    ctx.fillRect(x, bottom - full, barW, full);
    ctx.fillStyle = s.skipped ? "#444" : s.forwarded < s.tokens ? "#f0a030" : "#4a90d9";
    ctx.fillRect(x, bottom - kept, barW, kept);
    if (s.skipped) {
      ctx.strokeStyle = "#e66";
      ctx.beginPath();
      ctx.moveTo(x, bottom - full);
      ctx.lineTo(x + barW, bottom);
      ctx.moveTo(x + barW, bottom - full);
      ctx.lineTo(x, bottom);
      ctx.stroke();
    }
    if (s.cache) {
      ctx.strokeStyle = "#7c7";
      ctx.lineWidth = 2;
      ctx.strokeRect(x, bottom - full, barW, full);
      ctx.lineWidth = 1;
    }
    if (n <= 16 || i % 2 === n % 2) {
      ctx.fillStyle = "#aaa";
      ctx.fillText(String(s.w), x, bottom + 12);
    }
  });
}

// Draws the legend, wrapping at `right`; returns the y of its last line.
function legend(ctx, x0, y, right) {
  const items = [["#4a90d9", "all tokens"], ["#f0a030", "kept (pruned scale)"], ["#7c7", "cache"], ["#e66", "skipped"]];
  ctx.font = "10px sans-serif";
  let x = x0;
  for (const [color, label] of items) {
    const w = 16 + ctx.measureText(label).width;
    if (x > x0 && x + w - 5 > right) {
      x = x0;
      y += 12;
    }
    ctx.fillStyle = color;
    ctx.fillRect(x, y - 7, 8, 8);
    ctx.fillStyle = "#aaa";
    ctx.fillText(label, x + 11, y);
    x += w;
  }
  ctx.font = "11px sans-serif";
  return y;
}

// Draws wrapped text; returns the y of its last line.
function wrapText(ctx, text, x, y, maxWidth, lineHeight) {
  let line = "";
  for (const word of text.split(" ")) {
    const test = line ? `${line} ${word}` : word;
    if (ctx.measureText(test).width > maxWidth && line) {
      ctx.fillText(line, x, y);
      line = word;
      y += lineHeight;
    } else {
      line = test;
    }
  }
  if (line) ctx.fillText(line, x, y);
  return y;
}

function attachChart(node, defaults) {
  const canvas = document.createElement("canvas");
  canvas.style.width = "100%";
  canvas.style.height = `${CHART_HEIGHT}px`;
  const widget = node.addDOMWidget("schedule_chart", "fastvar_chart", canvas, {
    serialize: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => CHART_HEIGHT + 6,
    getMaxHeight: () => CHART_HEIGHT + 6,
  });
  widget.serialize = false; // not in the saved workflow's widgets_values
  widget.options = widget.options || {};
  widget.options.serialize = false; // not in the prompt

  let pending = null;
  let lastData = null;
  const refresh = () => {
    clearTimeout(pending);
    pending = setTimeout(async () => {
      await factsReady;
      try {
        const response = await api.fetchApi(`/fastvar/schedule_chart?${widgetValues(node).toString()}`);
        lastData = response.ok ? await response.json() : { error: `chart request failed (${response.status})` };
      } catch (err) {
        lastData = { error: `chart unavailable: ${err}` };
      }
      markIgnored(node, lastData);
      draw(canvas, lastData);
    }, 120);
  };
  for (const w of node.widgets || []) {
    if (!INPUTS.includes(w.name)) continue;
    if (w.name === "chart_for") {
      w.options = w.options || {};
      w.options.serialize = false; // display only: saved with the workflow, never in the prompt
    } else if (w.name in defaults) {
      // An ignored widget goes to the server as its default: the prompt, and ComfyUI's cache, stay the same.
      w.serializeValue = () => (ignoredWidgets(node).includes(w.name) ? defaults[w.name] : w.value);
    }
    const original = w.callback;
    w.callback = function (...args) {
      const out = original?.apply(this, args);
      refresh();
      return out;
    };
  }
  new ResizeObserver(() => draw(canvas, lastData)).observe(canvas);
  node.fastvarRefreshChart = refresh;
  refresh();
}

function refreshCharts() {
  for (const n of app.graph?._nodes || app.graph?.nodes || []) n.fastvarRefreshChart?.();
}

// After a node of this type is created, every widget that `picks` redraws the charts when it changes.
function redrawChartsOnChange(nodeType, picks) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function (...args) {
    const out = onNodeCreated?.apply(this, args);
    for (const w of this.widgets || []) {
      if (!picks(w)) continue;
      const original = w.callback;
      w.callback = function (...a) {
        const r = original?.apply(this, a);
        refreshCharts();
        return r;
      };
    }
    return out;
  };
}

app.registerExtension({
  name: "fastvar.scheduleChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if ((nodeData.output || []).includes("FASTVAR_MODEL")) {
      // A model loader: choosing another file (e.g. 2B -> 8B) redraws the charts of the samplers it feeds.
      redrawChartsOnChange(nodeType, () => true);
      return;
    }
    if (nodeData.name === SAMPLER_ID) {
      // The chart follows the sampler's model and size.
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (...args) {
        const out = onConnectionsChange?.apply(this, args);
        refreshCharts();
        return out;
      };
      redrawChartsOnChange(nodeType, (w) => SIZE_INPUTS.includes(w.name));
      return;
    }
    if (nodeData.name !== NODE_ID) return;
    const defaults = {};
    for (const [name, spec] of Object.entries(nodeData.input?.required || {})) {
      if (spec?.[1] && "default" in spec[1]) defaults[name] = spec[1].default;
    }
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const out = onNodeCreated?.apply(this, args);
      attachChart(this, defaults);
      return out;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const out = onConfigure?.apply(this, args);
      this.fastvarRefreshChart?.(); // a loaded workflow sets widget values without callbacks
      return out;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (...args) {
      const out = onConnectionsChange?.apply(this, args);
      this.fastvarRefreshChart?.();
      return out;
    };
  },
  async afterConfigureGraph() {
    refreshCharts(); // links exist only once the whole graph is configured
  },
});
