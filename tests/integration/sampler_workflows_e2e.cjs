// Load the sampler example workflows in the real ComfyUI frontend (headless Chromium) and export them.
// Usage: node sampler_workflows_e2e.cjs <config.json>
// config: {url, workflows: [paths], chromium, playwright_dir, timeout_ms}
// Prints one JSON line: {ok, missing: {file: [types]}, prompts: {file: api_prompt}, widgets: {file: {...}},
// toasts: {file: [text]}, pageerrors}; a workflow node whose type the frontend does not know is a "missing node".
const fs = require("fs");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(require.resolve("playwright-core", { paths: [cfg.playwright_dir || process.cwd()] }));

(async () => {
  const result = { ok: false, missing: {}, prompts: {}, widgets: {}, toasts: {}, pageerrors: [] };
  const browser = await chromium.launch({
    executablePath: cfg.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on("pageerror", (e) => result.pageerrors.push(String(e)));
    await page.addInitScript(() => {  // every toast shown (a workflow that fails the zod schema gets one)
      window.__toasts = [];
      const seen = new WeakSet();
      new MutationObserver(() => {
        for (const el of document.querySelectorAll(".p-toast-message")) {
          if (!seen.has(el)) { seen.add(el); window.__toasts.push(el.innerText.replace(/\s+/g, " ").trim()); }
        }
      }).observe(document, { childList: true, subtree: true });
    });
    await fetch(`${cfg.url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" }).catch(() => {});
    const timeout = cfg.timeout_ms || 120000;
    await page.goto(cfg.url, { waitUntil: "domcontentloaded", timeout });
    await page.waitForSelector("canvas#graph-canvas", { timeout });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout });
    await page.keyboard.press("Escape");
    for (const file of cfg.workflows) {
      const wf = JSON.parse(fs.readFileSync(file, "utf8"));
      const name = file.split("/").pop();
      const toastsBefore = await page.evaluate(() => window.__toasts.length);
      const out = await page.evaluate(async (w) => {
        await window.app.loadGraphData(w);
        const known = window.LiteGraph.registered_node_types;
        const nodes = window.app.graph._nodes;
        const missing = nodes.filter((n) => !(n.type in known) || n.has_errors).map((n) => n.type);
        const widgets = {};
        for (const n of nodes) {
          if (n.type.startsWith("Distillery")) widgets[n.id] = (n.widgets || []).map((x) => [x.name, x.value]);
        }
        const prompt = (await window.app.graphToPrompt()).output;
        return { missing, widgets, prompt };
      }, wf);
      result.missing[name] = out.missing;
      result.widgets[name] = out.widgets;
      result.prompts[name] = out.prompt;
      await page.waitForTimeout(400);  // toasts are added after the load resolves
      result.toasts[name] = await page.evaluate((n) => window.__toasts.slice(n), toastsBefore);
      await page.$$eval(".p-toast-close-button", (els) => els.forEach((e) => e.click())).catch(() => {});
    }
    result.ok = true;
  } catch (e) {
    result.error = String(e && e.stack ? e.stack : e);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
})();
