// What the real frontend's node search box finds, in headless Chromium against a running ComfyUI.
// Usage: node node_search_e2e.cjs <config.json>
// config: {url, queries: [text], chromium, playwright_dir, timeout_ms}
// Prints one JSON line: {ok, results: {query: [node id, ...]}, pageerrors}; exits 1 on a failure.
// The search box is opened with the frontend's own command (Workspace.SearchBox.Toggle), the query typed into
// its input, and the node ids read from the listed options (the "show node id" setting is turned on for that).
const fs = require("fs");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(require.resolve("playwright-core", { paths: [cfg.playwright_dir || process.cwd()] }));

(async () => {
  const result = { ok: false, results: {}, pageerrors: [] };
  const browser = await chromium.launch({
    executablePath: cfg.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on("pageerror", (e) => result.pageerrors.push(String(e)));
    const timeout = cfg.timeout_ms || 120000;
    for (const [key, value] of [["Comfy.TutorialCompleted", true], ["Comfy.NodeSearchBoxImpl.ShowIdName", true]]) {
      await fetch(`${cfg.url}/settings/${key}`, { method: "POST", body: JSON.stringify(value) }).catch(() => {});
    }
    await page.goto(cfg.url, { waitUntil: "domcontentloaded", timeout });
    await page.waitForSelector("canvas#graph-canvas", { timeout });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout });
    await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
    const known = await page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types));
    for (const query of cfg.queries) {
      await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.SearchBox.Toggle"));
      const input = page.locator("input[id^=comfy-vue-node-search-box-input]");
      await input.waitFor({ timeout: 15000 });
      await input.fill(query);
      await page.waitForTimeout(800);
      const texts = await page.$$eval("li.p-autocomplete-option", (els) => els.map((e) => e.innerText));
      // each option shows "<display name> <node id> <category> <source>": keep the registered node id
      result.results[query] = texts.map((t) => t.split(/\s+/).find((w) => known.includes(w)) || t.trim());
      await page.keyboard.press("Escape");
      await page.waitForTimeout(300);
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
