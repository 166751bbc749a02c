// Schedule chart on the FastVAR Pruning node: one bar per scale (tokens forwarded vs total), skipped steps
// and the cache scale marked, and the predicted speedup from the pack's cost model. Display only: the
// widget is kept out of the saved widget values and out of the prompt.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_ID = "FastVAR_Pruning";
const CHART_HEIGHT = 180;
const INPUTS = ["preset", "speed_target", "last_1_drop", "last_2_drop", "last_3_drop", "last_4_drop",
  "last_5_drop", "last_6_drop", "cache_from_end", "first_layer", "last_layer", "chart_for"];

function widgetValues(node) {
  const params = new URLSearchParams();
  for (const w of node.widgets || []) {
    if (INPUTS.includes(w.name)) params.set(w.name, String(w.value));
  }
  return params;
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
  const top = 34, bottom = CHART_HEIGHT - 16, left = 6, right = width - 6;
  const n = data.scales.length;
  const slot = (right - left) / n;
  const maxTokens = Math.max(...data.scales.map((s) => s.tokens));
  ctx.fillStyle = "#ddd";
  ctx.fillText(`${data.model}: predicted ${data.speedup.toFixed(2)}x faster`, left, 12);
  legend(ctx, left, 26);
  data.scales.forEach((s, i) => {
    const x = left + i * slot + 1;
    const barW = Math.max(2, slot - 3);
    const full = ((bottom - top) * s.tokens) / maxTokens;
    const kept = ((bottom - top) * s.forwarded) / maxTokens;
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

function legend(ctx, x, y) {
  const items = [["#4a90d9", "all tokens"], ["#f0a030", "kept (pruned scale)"], ["#7c7", "cache"], ["#e66", "skipped"]];
  ctx.font = "10px sans-serif";
  for (const [color, label] of items) {
    ctx.fillStyle = color;
    ctx.fillRect(x, y - 7, 8, 8);
    ctx.fillStyle = "#aaa";
    ctx.fillText(label, x + 11, y);
    x += 16 + ctx.measureText(label).width;
  }
  ctx.font = "11px sans-serif";
}

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
}

function attachChart(node) {
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
      try {
        const response = await api.fetchApi(`/fastvar/schedule_chart?${widgetValues(node).toString()}`);
        lastData = response.ok ? await response.json() : { error: `chart request failed (${response.status})` };
      } catch (err) {
        lastData = { error: `chart unavailable: ${err}` };
      }
      draw(canvas, lastData);
    }, 120);
  };
  for (const w of node.widgets || []) {
    if (!INPUTS.includes(w.name)) continue;
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

app.registerExtension({
  name: "fastvar.scheduleChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_ID) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const out = onNodeCreated?.apply(this, args);
      attachChart(this);
      return out;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const out = onConfigure?.apply(this, args);
      this.fastvarRefreshChart?.(); // a loaded workflow sets widget values without callbacks
      return out;
    };
  },
});
