// End-to-end check of the Distillery jobs panel in headless Chromium against a running ComfyUI.
// Usage: node jobs_panel_e2e.cjs <config.json>
// config: {url, workflows: [paths], workflow: path, widgets: {node type: {widget name: value}}, screenshot,
//          chromium, playwright_dir, timeout_ms}
// Prints one JSON line: {ok, missing, toasts, console, queued, seen, timings, pageerrors, ...}; exits 1 on a
// failure. Every workflow is loaded the way a user opens it (app.loadGraphData, which validates it against the
// frontend's zod schema and shows a toast when it does not fit); the toasts and console warnings of each load
// are recorded per file. The distillation workflow is then converted with app.graphToPrompt() and that very
// prompt is POSTed to /prompt, and the sidebar is watched until the job it starts ends.
const fs = require("fs");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(require.resolve("playwright-core", { paths: [cfg.playwright_dir || process.cwd()] }));

(async () => {
  const t0 = Date.now();
  const mark = {};
  const result = { ok: false, missing: {}, toasts: {}, console: {}, seen: [], timings: mark, pageerrors: [] };
  const browser = await chromium.launch({
    executablePath: cfg.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const consoleLines = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
    page.on("pageerror", (e) => result.pageerrors.push(String(e && e.stack || e)));
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warning") consoleLines.push(`${m.type()}: ${m.text()}`);
      if (m.type() === "error" && /distillery/i.test(m.text())) result.pageerrors.push(m.text());
    });
    // every toast that appears, in order (zod validation errors of a loaded workflow are shown as toasts)
    await page.addInitScript(() => {
      window.__toasts = [];
      const seen = new WeakSet();
      new MutationObserver(() => {
        for (const el of document.querySelectorAll(".p-toast-message")) {
          if (!seen.has(el)) { seen.add(el); window.__toasts.push(el.innerText.replace(/\s+/g, " ").trim()); }
        }
      }).observe(document, { childList: true, subtree: true });
    });
    // no first-run template dialog over the panel
    await fetch(`${cfg.url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" }).catch(() => {});
    await page.goto(cfg.url, { waitUntil: "domcontentloaded", timeout: 90000 });
    await page.waitForSelector("canvas#graph-canvas", { timeout: 90000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 90000 });
    await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
    mark.ui_ready_ms = Date.now() - t0;

    // every shipped workflow loads with no missing node, no toast and no zod complaint
    for (const file of cfg.workflows) {
      const name = file.split("/").pop();
      const wf = JSON.parse(fs.readFileSync(file, "utf8"));
      const toastsBefore = await page.evaluate(() => window.__toasts.length);
      const consoleBefore = consoleLines.length;
      const missing = await page.evaluate(async (w) => {
        await window.app.loadGraphData(w);
        const known = window.LiteGraph.registered_node_types;
        return window.app.graph._nodes.filter((n) => !(n.type in known)).map((n) => n.type);
      }, wf);
      await page.waitForTimeout(400);  // toasts are added after the load resolves
      result.missing[name] = missing;
      result.toasts[name] = await page.evaluate((n) => window.__toasts.slice(n), toastsBefore);
      result.console[name] = consoleLines.slice(consoleBefore);
      await page.$$eval(".p-toast-close-button", (els) => els.forEach((e) => e.click())).catch(() => {});
    }

    // the distillation workflow, made tiny, converted by the frontend itself and queued
    const jobIds = async () => page.evaluate(async () => (await (await fetch("/distillery/jobs")).json()).jobs.map((j) => j.id));
    const earlier = await jobIds();
    const wf = JSON.parse(fs.readFileSync(cfg.workflow, "utf8"));
    const queued = await page.evaluate(async ({ w, widgets }) => {
      await window.app.loadGraphData(w);
      for (const [type, values] of Object.entries(widgets)) {
        const node = window.app.graph._nodes.find((n) => n.type === type);
        if (!node) return { error: `no ${type} node` };
        for (const [name, value] of Object.entries(values)) {
          const widget = (node.widgets || []).find((x) => x.name === name);
          if (!widget) return { error: `${type}: no widget ${name}` };
          widget.value = value;
        }
      }
      window.app.graph.setDirtyCanvas(true, true);
      const p = await window.app.graphToPrompt();
      const res = await fetch("/prompt", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: p.output, client_id: "distillery-e2e", extra_data: { extra_pnginfo: { workflow: p.workflow } } }),
      });
      return { status: res.status, answer: await res.json(), prompt: p.output };
    }, { w: wf, widgets: cfg.widgets });
    result.queued = queued;
    if (queued.error) throw new Error(queued.error);
    if (queued.status !== 200) throw new Error(`/prompt answered ${queued.status}: ${JSON.stringify(queued.answer)}`);
    mark.queued_ms = Date.now() - t0;
    let jobId = null;  // the job this prompt started (the panel lists the jobs of other tests too)
    for (const until = Date.now() + 60000; !jobId && Date.now() < until; await page.waitForTimeout(250)) {
      jobId = (await jobIds()).find((id) => !earlier.includes(id)) || null;
    }
    if (!jobId) throw new Error("the queued prompt started no job");
    result.job_id = jobId;

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
    let selected = false;
    while (Date.now() < deadline) {
      const rows = await page.$$eval(".dj-row", (els) => els.map((e) => ({
        id: e.dataset.jobId, state: e.dataset.state, step: Number(e.dataset.step),
        sub: e.querySelector(".dj-sub")?.textContent ?? "",
      })));
      const row = rows.find((r) => r.id === jobId) || null;
      if (row && !selected) {  // its detail (charts, preview) in the panel
        // a DOM click: the panel redraws its rows on every progress event, too often for page.click's checks
        selected = await page.$eval(`.dj-row[data-job-id="${jobId}"]`, (e) => { e.click(); return true; }).catch(() => false);
      }
      if (row) {
        const last = result.seen[result.seen.length - 1];
        if (!last || last.state !== row.state || last.step !== row.step) {
          result.seen.push({ t_ms: Date.now() - t0, id: row.id, state: row.state, step: row.step, sub: row.sub });
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
