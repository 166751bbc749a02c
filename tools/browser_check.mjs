// Dev tool: checks in a real ComfyUI frontend what the e2e harness cannot see at its zoom (issue #15):
// re-queue cache hits after display-only changes, the aspect-ratio size update, the chart at a narrow node and
// the greyed (ignored) Pruning widgets, the run info on a page opened after the run, with zoomed screenshots.
// Usage: node tools/browser_check.mjs --url http://127.0.0.1:PORT --workflow workflows/X.json --out /tmp/DIR
//          [--steps cache,aspect,legend,ignored,fresh] [--node-dir $FV_E2E_HOME/node] [--timeout 900]
// Needs a running ComfyUI with this pack, e.g. from the e2e env: B=/tmp/fvb; custom_nodes/ComfyUI-FastVAR in $B
// linked to the pack, a user dir seeded like harness.py's DEFAULT_SETTINGS, then in $FV_E2E_HOME/ComfyUI:
//   ../venv/bin/python main.py --cpu --port 8391 --base-directory $B --disable-all-custom-nodes
//     --whitelist-custom-nodes ComfyUI-FastVAR --extra-model-paths-config <yaml pointing at the models>
// Debian's chromium (/usr/bin/chromium, or $CHROMIUM) and playwright-core in --node-dir (the harness's).
// Writes report.json (executed / cached nodes per queue, widget values) and PNGs of the nodes to --out.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";

const argv = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : fallback;
};
const url = opt("url", "http://127.0.0.1:8188");
const workflowFile = opt("workflow", "workflows/infinity_2b_1024_fastvar.json");
const outDir = opt("out", fs.mkdtempSync(path.join(os.tmpdir(), "fv-browser-")));
const steps = opt("steps", "cache,aspect,legend,ignored,fresh").split(",");
const nodeDir = opt("node-dir", path.join(process.env.FV_E2E_HOME || "/work/.fv-e2e", "node"));
const timeoutS = Number(opt("timeout", "900"));
const require = createRequire(path.join(nodeDir, "package.json"));
const { chromium } = require("playwright-core");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const report = { url, workflow: workflowFile, steps: {} };
const say = (m) => console.log(`[browser_check] ${m}`);
report.checks = [];
const check = (what, ok) => {
  report.checks.push({ what, ok });
  say(`${ok ? "ok  " : "FAIL"} ${what}`);
};
fs.mkdirSync(outDir, { recursive: true });

// Queue the graph like the Run button; wait for this prompt's end; which nodes executed / came from the cache.
async function queueAndWait(page) {
  const start = await page.evaluate(() => window.__fvEvents.length);
  const pid = await page.evaluate(async () => {
    window.__fvQueued = null;
    await window.app.queuePrompt(0, 1);
    return window.__fvQueued;
  });
  if (!pid) throw new Error("queuePrompt did not return a prompt id (prompt rejected?)");
  const t0 = Date.now();
  for (;;) {
    const evs = await page.evaluate((s) => window.__fvEvents.slice(s), start);
    // "executing" carries the node id alone (no prompt id); one prompt runs at a time here
    const nodeOf = (e) => (e.detail && typeof e.detail === "object" ? e.detail.node : e.detail);
    const mine = evs.filter((e) => e.detail?.prompt_id === pid || (e.type === "executing" && nodeOf(e) != null));
    const end = mine.find((e) => ["execution_success", "execution_error", "execution_interrupted"].includes(e.type));
    if (end) {
      return {
        prompt_id: pid, end: end.type, wall_s: (Date.now() - t0) / 1000,
        executing: mine.filter((e) => e.type === "executing" && nodeOf(e) != null).map((e) => String(nodeOf(e))),
        cached: mine.filter((e) => e.type === "execution_cached").flatMap((e) => e.detail.nodes || []).map(String),
        error: end.type === "execution_error" ? `${end.detail.node_type}: ${end.detail.exception_message}` : null,
      };
    }
    if (Date.now() - t0 > timeoutS * 1000) throw new Error(`prompt ${pid} did not finish in ${timeoutS}s`);
    await sleep(300);
  }
}

// Zoom the canvas to `scale` with the node of `type` at the top left, and screenshot that node.
async function shootNode(page, type, scale, file, extra = 40) {
  const box = await page.evaluate(({ type, scale }) => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => n.type === type);
    const th = window.LiteGraph.NODE_TITLE_HEIGHT;
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset[0] = -node.pos[0] + 20 / scale;
    app.canvas.ds.offset[1] = -node.pos[1] + (th + 20) / scale;
    app.canvas.setDirty(true, true);
    const rect = app.canvas.canvas.getBoundingClientRect();
    return { x: rect.left + 20 - 5, y: rect.top + 20 - 5, w: node.size[0] * scale + 10, h: (node.size[1] + th) * scale + 10 };
  }, { type, scale });
  await sleep(600);
  const clip = { x: box.x, y: box.y, width: Math.min(box.w + extra, 1590), height: Math.min(box.h + extra, 1190) };
  await page.screenshot({ path: file, clip });
  return file;
}

// Open the frontend (a fresh page), record the queue's events and load the workflow.
async function openWorkflow(page) {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app.canvas && window.comfyAPI?.api?.api, null, { timeout: 120000 });
  await sleep(1500);
  await page.evaluate(() => {
    const api = window.comfyAPI.api.api;
    window.__fvEvents = [];
    for (const t of ["executing", "execution_cached", "execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(t, (e) => window.__fvEvents.push({ type: t, detail: e.detail }));
    }
    const orig = api.queuePrompt.bind(api);
    api.queuePrompt = async (...a) => {
      const r = await orig(...a);
      window.__fvQueued = r?.prompt_id ?? null;
      return r;
    };
  });
  const data = JSON.parse(fs.readFileSync(workflowFile, "utf8"));
  await page.evaluate(async (d) => window.app.loadGraphData(d, true, true, "check"), data);
  await sleep(2500); // the chart's first request
}

const widgetValue = (page, type, name) => page.evaluate(({ type, name }) =>
  window.app.graph.nodes.find((n) => n.type === type).widgets.find((w) => w.name === name).value, { type, name });

// Set a widget the way the canvas does when the user edits it (value, then its callback).
const setWidget = (page, type, name, value) => page.evaluate(({ type, name, value }) => {
  const node = window.app.graph.nodes.find((n) => n.type === type);
  const w = node.widgets.find((x) => x.name === name);
  w.value = value;
  w.callback?.(value, window.app.canvas, node);
  node.graph.setDirtyCanvas(true, true);
}, { type, name, value });

const pruningPrompt = (page) => page.evaluate(async () => {
  const { output } = await window.app.graphToPrompt();
  return Object.values(output).find((n) => n.class_type === "FastVAR_Pruning").inputs;
});

(async () => {
  const userDir = fs.mkdtempSync(path.join(os.tmpdir(), "fv-chromium-"));
  const context = await chromium.launchPersistentContext(userDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"],
    viewport: { width: 1600, height: 1200 }, deviceScaleFactor: 1,
  });
  const page = context.pages()[0] || (await context.newPage());
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  try {
    await openWorkflow(page);

    if (steps.includes("ignored")) {
      const r = (report.steps.ignored = {});
      r.preset = await widgetValue(page, "FastVAR_Pruning", "preset");
      r.widgets = await page.evaluate(() => window.app.graph.nodes.find((n) => n.type === "FastVAR_Pruning").widgets
        .map((w) => ({ name: w.name, type: w.type, value: w.value, disabled: !!w.disabled, label: w.label ?? null })));
      r.shot = await shootNode(page, "FastVAR_Pruning", 1.3, path.join(outDir, `pruning_${r.preset}.png`));
      const hover = await page.evaluate(() => {
        const app = window.app;
        const node = app.graph.nodes.find((n) => n.type === "FastVAR_Pruning");
        const w = node.widgets.find((x) => x.disabled && x.type === "slider");
        if (!w) return null;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const { scale, offset } = app.canvas.ds;
        return { x: rect.left + (node.pos[0] + node.size[0] / 2 + offset[0]) * scale,
                 y: rect.top + (node.pos[1] + w.y + 10 + offset[1]) * scale };
      });
      if (hover) {
        await page.mouse.move(hover.x, hover.y);
        await sleep(1500);
        r.shot_hover = path.join(outDir, "pruning_hover_ignored.png");
        await page.screenshot({ path: r.shot_hover, clip: { x: hover.x - 300, y: hover.y - 150, width: 700, height: 300 } });
        await page.mouse.move(hover.x + 700, hover.y + 600, { steps: 8 }); // onto empty canvas: the tooltip goes
        await sleep(500);
      }
      await setWidget(page, "FastVAR_Pruning", "preset", "custom");
      await sleep(1500);
      r.shot_custom = await shootNode(page, "FastVAR_Pruning", 1.3, path.join(outDir, "pruning_custom.png"));
      await setWidget(page, "FastVAR_Pruning", "preset", r.preset);
      await sleep(1500);
    }

    if (steps.includes("legend")) {
      const r = (report.steps.legend = {});
      for (const width of [360, 300, 240, 200]) {
        await page.evaluate((w) => {
          const node = window.app.graph.nodes.find((n) => n.type === "FastVAR_Pruning");
          node.setSize([w, node.size[1]]);
          node.graph.setDirtyCanvas(true, true);
        }, width);
        await sleep(800);
        r[`shot_${width}`] = await shootNode(page, "FastVAR_Pruning", 1.5, path.join(outDir, `pruning_width_${width}.png`));
        r[`size_${width}`] = await page.evaluate(() => window.app.graph.nodes.find((n) => n.type === "FastVAR_Pruning").size.slice());
      }
    }

    if (steps.includes("aspect")) {
      const r = (report.steps.aspect = {});
      r.before = { width: await widgetValue(page, "FastVAR_Sampler", "width"), height: await widgetValue(page, "FastVAR_Sampler", "height") };
      r.choices = await page.evaluate(() => window.app.graph.nodes.find((n) => n.type === "FastVAR_Sampler")
        .widgets.find((w) => w.name === "aspect_ratio").options.values);
      r.choice = r.choices.find((c) => c.startsWith("16:9"));
      await setWidget(page, "FastVAR_Sampler", "aspect_ratio", r.choice);
      await sleep(1500);
      r.after = { width: await widgetValue(page, "FastVAR_Sampler", "width"), height: await widgetValue(page, "FastVAR_Sampler", "height") };
      r.shot = await shootNode(page, "FastVAR_Sampler", 1.3, path.join(outDir, "sampler_16x9.png"));
      check(`aspect ${r.choice}: width/height shown change`, r.after.width > r.after.height);
      r.shot_chart = await shootNode(page, "FastVAR_Pruning", 1.3, path.join(outDir, "pruning_after_16x9.png"));
      await setWidget(page, "FastVAR_Sampler", "aspect_ratio", "from width/height");
      await setWidget(page, "FastVAR_Sampler", "width", r.before.width);
      await setWidget(page, "FastVAR_Sampler", "height", r.before.height);
      await sleep(1000);
    }

    if (steps.includes("cache")) {
      const r = (report.steps.cache = {});
      const preset = await widgetValue(page, "FastVAR_Pruning", "preset");
      const ignored = await page.evaluate(() => window.app.graph.nodes.find((n) => n.type === "FastVAR_Pruning")
        .widgets.filter((w) => w.disabled).map((w) => w.name));
      const slider = ignored.find((n) => /^last_\d_drop$/.test(n));
      r.preset = preset;
      r.slider = slider;
      r.first = await queueAndWait(page);
      say(`first run: ${JSON.stringify(r.first)}`);
      r.prompt_before = await pruningPrompt(page);
      // a real click at 3/4 of the greyed slider (the canvas ignores clicks on disabled widgets)
      const at = await page.evaluate((name) => {
        const app = window.app;
        const node = app.graph.nodes.find((n) => n.type === "FastVAR_Pruning");
        const w = node.widgets.find((x) => x.name === name);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const { scale, offset } = app.canvas.ds;
        const cx = node.pos[0] + node.size[0] * 0.75, cy = node.pos[1] + w.y + 10;
        return { x: rect.left + (cx + offset[0]) * scale, y: rect.top + (cy + offset[1]) * scale };
      }, slider);
      await page.mouse.click(at.x, at.y);
      await sleep(300);
      r.value_after_click = await widgetValue(page, "FastVAR_Pruning", slider);
      await setWidget(page, "FastVAR_Pruning", slider, 40); // as if set before choosing the preset
      r.prompt_after_slider = await pruningPrompt(page);
      r.after_slider = await queueAndWait(page);
      say(`after moving ignored ${slider}: ${JSON.stringify(r.after_slider)}`);
      await setWidget(page, "FastVAR_Pruning", slider, 0);
      const released = await page.evaluate(() => window.app.graph.nodes.find((n) => n.type === "FastVAR_Pruning")
        .widgets.find((w) => w.name === "chart_for").options.values);
      await setWidget(page, "FastVAR_Pruning", "chart_for", released[released.length - 1]);
      r.chart_for = released[released.length - 1];
      r.prompt_after_chart_for = await pruningPrompt(page);
      r.after_chart_for = await queueAndWait(page);
      say(`after chart_for -> ${r.chart_for}: ${JSON.stringify(r.after_chart_for)}`);
      await setWidget(page, "FastVAR_Pruning", "chart_for", released[0]);
      // control: a widget the preset reads must re-run the sampler
      const layer = await widgetValue(page, "FastVAR_Pruning", "first_layer");
      await setWidget(page, "FastVAR_Pruning", "first_layer", layer === 2 ? 3 : 2);
      r.after_first_layer = await queueAndWait(page);
      say(`after first_layer (read by ${preset}): ${JSON.stringify(r.after_first_layer)}`);
      await sleep(1000); // the previews and the run info arrive with the last events
      r.shot_sampler = await shootNode(page, "FastVAR_Sampler", 1.0, path.join(outDir, "sampler_after_run.png"), 300);
      await setWidget(page, "FastVAR_Pruning", "first_layer", layer);
      const sampler = await page.evaluate(() => String(window.app.graph.nodes.find((n) => n.type === "FastVAR_Sampler").id));
      check(`ignored ${slider} moved: sampler cached`, r.after_slider.cached.includes(sampler) && !r.after_slider.executing.includes(sampler));
      check("chart_for changed: sampler cached", r.after_chart_for.cached.includes(sampler) && !r.after_chart_for.executing.includes(sampler));
      check("first_layer changed: sampler re-runs", r.after_first_layer.executing.includes(sampler));
    }

    if (steps.includes("fresh")) {
      // The artist reopens the page and queues the workflow as it was: served from the cache, the sampler's run
      // info must still fill its box.
      const r = (report.steps.fresh = {});
      await openWorkflow(page);
      r.first = await queueAndWait(page);
      await openWorkflow(page);
      r.again = await queueAndWait(page);
      say(`fresh page, same workflow: ${JSON.stringify(r.again)}`);
      await sleep(1000);
      const samplers = await page.evaluate(() => window.app.graph.nodes.filter((n) => n.type === "FastVAR_Sampler")
        .map((n) => ({ id: String(n.id), info: n.fastvarInfo?.textContent ?? "" })));
      r.samplers = samplers;
      r.shot = await shootNode(page, "FastVAR_Sampler", 1.0, path.join(outDir, "sampler_fresh_cached.png"), 300);
      for (const s of samplers) {
        check(`fresh page: sampler ${s.id} served from the cache`, r.again.cached.includes(s.id) && !r.again.executing.includes(s.id));
        check(`fresh page: sampler ${s.id} shows its run info`, /pruning .*sampling/.test(s.info));
      }
    }
  } catch (e) {
    report.fatal = String(e?.stack || e);
    say(report.fatal);
  } finally {
    report.console_errors = consoleErrors;
    fs.writeFileSync(path.join(outDir, "report.json"), JSON.stringify(report, null, 1));
    say(`report: ${path.join(outDir, "report.json")}`);
    await context.close();
    fs.rmSync(userDir, { recursive: true, force: true });
  }
  process.exitCode = report.fatal || report.checks.some((c) => !c.ok) ? 1 : 0;
})();
