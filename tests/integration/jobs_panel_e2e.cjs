// End-to-end check of the Distillery jobs panel in headless Chromium against a running ComfyUI.
// Usage: node jobs_panel_e2e.cjs <config.json>
// config: {url, workflows: [paths], workflow: path, widgets: {name: value}, screenshot, chromium,
//          playwright_dir, timeout_ms}
// Prints one JSON line: {ok, missing, seen, timings, pageerrors, ...}; exits 1 on a failure.
const fs = require("fs");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(require.resolve("playwright-core", { paths: [cfg.playwright_dir || process.cwd()] }));

(async () => {
  const t0 = Date.now();
  const mark = {};
  const result = { ok: false, missing: {}, seen: [], timings: mark, pageerrors: [] };
  const browser = await chromium.launch({
    executablePath: cfg.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
    page.on("pageerror", (e) => result.pageerrors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error" && /distillery/i.test(m.text())) result.pageerrors.push(m.text()); });
    // no first-run template dialog over the panel
    await fetch(`${cfg.url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" }).catch(() => {});
    await page.goto(cfg.url, { waitUntil: "domcontentloaded", timeout: 90000 });
    await page.waitForSelector("canvas#graph-canvas", { timeout: 90000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 90000 });
    await page.keyboard.press("Escape");
    mark.ui_ready_ms = Date.now() - t0;

    // every shipped workflow loads with no missing node
    for (const file of cfg.workflows) {
      const wf = JSON.parse(fs.readFileSync(file, "utf8"));
      const missing = await page.evaluate(async (w) => {
        await window.app.loadGraphData(w);
        const known = window.LiteGraph.registered_node_types;
        return window.app.graph._nodes.filter((n) => !(n.type in known)).map((n) => n.type);
      }, wf);
      result.missing[file.split("/").pop()] = missing;
    }

    // the distillation workflow, made tiny, queued from the UI
    const wf = JSON.parse(fs.readFileSync(cfg.workflow, "utf8"));
    const setResult = await page.evaluate(async ({ w, widgets }) => {
      await window.app.loadGraphData(w);
      const node = window.app.graph._nodes.find((n) => n.type === "DistilleryStartDistillation");
      if (!node) return "no DistilleryStartDistillation node";
      for (const [name, value] of Object.entries(widgets)) {
        const widget = node.widgets.find((x) => x.name === name);
        if (!widget) return `no widget ${name}`;
        widget.value = value;
      }
      window.app.graph.setDirtyCanvas(true, true);
      return "ok";
    }, { w: wf, widgets: cfg.widgets });
    if (setResult !== "ok") throw new Error(setResult);
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    mark.queued_ms = Date.now() - t0;

    // open the Distillery sidebar tab
    await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleSidebarTab.distillery-jobs"));
    await page.waitForSelector("#distillery-jobs-panel", { timeout: 30000 });
    await page.evaluate(() => {  // a wider sidebar for the screenshot
      const pane = document.getElementById("distillery-jobs-panel").closest(".p-splitterpanel");
      if (pane) pane.style.flexBasis = "430px";
    });
    mark.panel_open_ms = Date.now() - t0;

    // watch the panel update live until the job completes
    const deadline = Date.now() + (cfg.timeout_ms || 300000);
    let done = null;
    while (Date.now() < deadline) {
      const rows = await page.$$eval(".dj-row", (els) => els.map((e) => ({
        id: e.dataset.jobId, state: e.dataset.state, step: Number(e.dataset.step),
        sub: e.querySelector(".dj-sub")?.textContent ?? "",
      })));
      const row = rows.find((r) => r.id) || null;
      if (row) {
        const last = result.seen[result.seen.length - 1];
        if (!last || last.state !== row.state || last.step !== row.step) {
          result.seen.push({ t_ms: Date.now() - t0, state: row.state, step: row.step, sub: row.sub });
        }
        if (["completed", "failed", "stopped", "interrupted"].includes(row.state)) { done = row; break; }
      }
      await page.waitForTimeout(250);
    }
    mark.done_ms = Date.now() - t0;
    if (!done) throw new Error("the job did not finish in time");
    result.final_state = done.state;
    // charts drawn and preview shown
    await page.waitForFunction(() => {
      const img = document.querySelector(".dj-preview");
      return img && img.complete && img.naturalWidth > 0;
    }, null, { timeout: 30000 });
    await page.keyboard.press("Escape");
    await page.evaluate(() => window.dispatchEvent(new Event("resize")));
    await page.waitForTimeout(800);
    result.detail = await page.$eval("#distillery-jobs-panel", (p) => ({
      charts: p.querySelectorAll("canvas.dj-chart").length,
      speed: p.querySelector(".dj-speed")?.textContent,
      step: p.querySelector(".dj-detail-step")?.textContent,
      preview: p.querySelector(".dj-preview")?.getAttribute("alt"),
      resume_enabled: !p.querySelector(".dj-actions button:nth-child(2)")?.disabled,
    }));
    await page.screenshot({ path: cfg.screenshot });
    mark.total_ms = Date.now() - t0;
    result.ok = true;
  } catch (err) {
    result.error = String(err && err.stack || err);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
})();
