// Distillery: a sidebar tab with the training jobs - list, live progress (it/s, ETA), loss and
// grad-norm curves, the latest preview, stop / resume / train more / delete. Plain ES module, no build
// step. Live data comes from the "distillery.job" websocket events the server's job watcher sends; the
// HTTP routes under /distillery/ fill in history (metrics since a cursor) and act.
// Also: the status text the job nodes return (ui.PreviewText) is drawn on their node on the canvas, and
// when a job completes the node definitions are refreshed, so the new student is in the LoRA lists.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  CHARTS,
  EVENT_NAME,
  ACTIVE_STATES,
  STATUS_NODES,
  actionMessage,
  applyEvent,
  applyJobs,
  applyMetrics,
  canDelete,
  canResume,
  canTrainMore,
  createFlash,
  createState,
  deletePath,
  formatDuration,
  formatNumber,
  formatRate,
  jobProgress,
  justCompleted,
  niceTicks,
  parseStepsInput,
  reasonTone,
  removeJob,
  replaceJobs,
  scaleSeries,
  seriesPoints,
  sortedJobs,
  speedAndEta,
  stateLabel,
  suggestedSteps,
  wrapLines,
} from "./distillery_jobs_logic.js";

const TAB_ID = "distillery-jobs";
const state = createState();
const ui = { root: null, list: null, detail: null, message: null, preview: null, timer: null, framePending: false,
  loading: new Set() };

const STYLE = `
.dj-panel { display: flex; flex-direction: column; gap: 8px; padding: 8px; height: 100%; overflow-y: auto;
  font-size: 13px; color: var(--fg-color, #ddd); box-sizing: border-box; }
.dj-header { display: flex; align-items: center; justify-content: space-between; font-weight: 600; }
.dj-list { display: flex; flex-direction: column; gap: 4px; max-height: 35%; overflow-y: auto; }
.dj-row { border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 5px 7px; cursor: pointer; }
.dj-row.dj-selected { border-color: #4fc3f7; background: rgba(79, 195, 247, 0.08); }
.dj-row-top { display: flex; justify-content: space-between; gap: 6px; }
.dj-name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.dj-state { font-size: 11px; padding: 0 6px; border-radius: 8px; background: #555; color: #fff; white-space: nowrap; }
.dj-state-running, .dj-state-starting { background: #1e88e5; }
.dj-state-completed { background: #43a047; }
.dj-state-failed { background: #e53935; }
.dj-state-stopped, .dj-state-interrupted { background: #8d6e63; }
.dj-bar { height: 5px; background: var(--comfy-input-bg, #333); border-radius: 3px; overflow: hidden; margin-top: 4px; }
.dj-fill { height: 100%; background: #4fc3f7; transition: width 0.3s; }
.dj-sub { font-size: 11px; color: var(--descrip-text, #999); display: flex; justify-content: space-between; margin-top: 2px; }
.dj-detail { display: flex; flex-direction: column; gap: 6px; }
.dj-title { font-weight: 600; overflow-wrap: anywhere; }
.dj-stats { display: grid; grid-template-columns: 1fr 1fr; gap: 2px 10px; font-size: 12px; }
.dj-stats span:nth-child(odd) { color: var(--descrip-text, #999); }
.dj-actions { display: flex; flex-wrap: wrap; gap: 6px; }
.dj-actions button, .dj-header button { background: var(--comfy-input-bg, #333); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #555); border-radius: 4px; padding: 2px 10px; cursor: pointer; }
.dj-actions button:disabled { opacity: 0.4; cursor: default; }
.dj-reason { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
.dj-reason-error, .dj-message-error { color: #ef9a9a; }
.dj-reason-warn { color: #ffcc80; }
.dj-reason-neutral { color: var(--descrip-text, #aaa); }
.dj-overlay { position: fixed; inset: 0; background: rgba(0,0,0,0.45); display: flex; align-items: center;
  justify-content: center; z-index: 10000; }
.dj-dialog { background: var(--comfy-menu-bg, #222); color: var(--fg-color, #ddd); border: 1px solid var(--border-color, #555);
  border-radius: 8px; padding: 14px 16px; max-width: 380px; display: flex; flex-direction: column; gap: 10px; font-size: 13px; }
.dj-dialog label { display: flex; gap: 6px; align-items: center; }
.dj-dialog .dj-actions { justify-content: flex-end; }
.dj-danger { border-color: #e57373 !important; }
.dj-log { max-height: 160px; overflow: auto; font-size: 10px; background: rgba(0,0,0,0.3); padding: 4px; margin: 0; white-space: pre-wrap; }
.dj-chart { width: 100%; height: 110px; display: block; border: 1px solid var(--border-color, #444); border-radius: 4px; }
.dj-preview { width: 100%; image-rendering: auto; border-radius: 4px; border: 1px solid var(--border-color, #444); }
.dj-caption, .dj-message, .dj-empty { font-size: 11px; color: var(--descrip-text, #999); }
`;

// --- data --------------------------------------------------------------------------------------------
async function fetchJson(path, options) {
  const response = await api.fetchApi(path, options);
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = {};
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function refreshJobs() {
  const { jobs } = await fetchJson("/distillery/jobs");
  replaceJobs(state, jobs);
  if (state.selected) ensureMetrics(state.selected);
  scheduleRender();
}

async function ensureMetrics(id) {
  if (ui.loading.has(id)) return;
  ui.loading.add(id);
  try {
    for (let round = 0; round < 50; round++) {
      const since = state.cursors.has(id) ? state.cursors.get(id) : -1;
      const body = await fetchJson(`/distillery/jobs/${encodeURIComponent(id)}/metrics?since=${since}`);
      applyMetrics(state, id, body.records, body.cursor);
      if (!body.more) break;
    }
  } catch (err) {
    showMessage(`metrics of ${id}: ${err.message}`, "error");
  } finally {
    ui.loading.delete(id);
    scheduleRender();
  }
}

async function loadJobDetail(id) {
  try {
    const info = await fetchJson(`/distillery/jobs/${encodeURIComponent(id)}?log_lines=40`);
    applyJobs(state, [info]);
    scheduleRender();
  } catch (err) {
    showMessage(err.message, "error");
  }
}

async function act(id, action, body = null) {
  try {
    const options = { method: "POST" };
    if (body) {
      options.headers = { "Content-Type": "application/json" };
      options.body = JSON.stringify(body);
    }
    const info = await fetchJson(`/distillery/jobs/${encodeURIComponent(id)}/${action}`, options);
    applyJobs(state, [info]);
    const { text, tone } = actionMessage(action, id, info);
    showMessage(text, tone);
  } catch (err) {
    const { text, tone } = actionMessage(action, id, null, err.message);
    showMessage(text, tone);
  }
  scheduleRender();
}

function trainMore(job) {
  const answer = window.prompt(
    `Train "${job.name ?? job.id}" further: how many steps in total? (now ${job.steps ?? "?"}; it continues from its last checkpoint and rewrites the LoRA at the end)`,
    String(suggestedSteps(job)),
  );
  const parsed = parseStepsInput(answer, job);
  if (!parsed) return;
  if (parsed.error) {
    showMessage(`train more: ${parsed.error}`, "error");
    return;
  }
  act(job.id, "resume", { steps: parsed.steps });
}

function confirmDelete(job) {
  const checkbox = el("input", { type: "checkbox" });
  const close = () => overlay.remove();
  const doDelete = async () => {
    const deleteLora = checkbox.checked;
    close();
    try {
      const info = await fetchJson(deletePath(job.id, deleteLora), { method: "DELETE" });
      removeJob(state, job.id);
      const { text, tone } = actionMessage("delete", job.id, info);
      showMessage(text, tone);
      if (info.lora_deleted) refreshNodeDefinitions();
    } catch (err) {
      const { text, tone } = actionMessage("delete", job.id, null, err.message);
      showMessage(text, tone);
    }
    scheduleRender();
  };
  const parts = [
    el("div", { text: `Delete the job "${job.name ?? job.id}" (${job.id})? Its folder - checkpoints, previews, curves, log - is removed.` }),
  ];
  if (job.lora_name) {
    parts.push(el("label", {}, [checkbox, el("span", { text: `also delete the LoRA file (${job.lora_name})` })]));
  }
  parts.push(el("div", { class: "dj-actions" }, [
    el("button", { text: "Cancel", onclick: close }),
    el("button", { text: "Delete", class: "dj-danger", onclick: doDelete }),
  ]));
  const overlay = el("div", { class: "dj-overlay", onclick: (e) => e.target === overlay && close() }, [
    el("div", { class: "dj-dialog", role: "dialog", "aria-modal": "true" }, parts),
  ]);
  document.body.append(overlay);
}

// The LoRA lists (Load Distilled LoRA, LoraLoader) come from the node definitions: refresh them when a
// new student is written, as the R key does. app.refreshComboInNodes exists in the frontends we support
// (1.27); older or newer ones without it keep the R key.
let refreshing = null;
function refreshNodeDefinitions() {
  if (typeof app.refreshComboInNodes !== "function" || refreshing) return;
  refreshing = Promise.resolve()
    .then(() => app.refreshComboInNodes())
    .catch((err) => console.warn("[distillery] could not refresh the node definitions", err))
    .finally(() => {
      refreshing = null;
    });
}

function onJobEvent(event) {
  const data = event.detail;
  const known = data?.id && state.cursors.has(data.id);
  const previous = data?.id ? state.jobs.get(data.id) : undefined;
  applyEvent(state, data);
  if (data?.deleted) {
    scheduleRender();
    return;
  }
  if (data?.job && justCompleted(previous, data.job)) refreshNodeDefinitions();
  if (data?.id && data.id === state.selected && !known) ensureMetrics(data.id);
  if (data?.job?.state === "failed" && data.id === state.selected) loadJobDetail(data.id);
  scheduleRender();
}

const flash = createFlash((message) => {
  if (!ui.message) return;
  ui.message.textContent = message?.text ?? "";
  ui.message.className = `dj-message${message?.tone === "error" ? " dj-message-error" : ""}`;
});

function showMessage(text, tone = "info") {
  flash.show(text, tone);
}

// --- rendering ---------------------------------------------------------------------------------------
function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function scheduleRender() {
  if (!ui.root || ui.framePending) return;
  ui.framePending = true;
  requestAnimationFrame(() => {
    ui.framePending = false;
    render();
  });
}

function render() {
  if (!ui.root) return;
  const jobs = sortedJobs(state);
  ui.list.replaceChildren(
    ...(jobs.length
      ? jobs.map(renderRow)
      : [el("div", { class: "dj-empty", text: "No training jobs yet. Queue a 'Distillery Start Distillation' node." })]),
  );
  renderDetail(state.selected ? state.jobs.get(state.selected) : null);
}

function renderRow(job) {
  const { fraction, text } = jobProgress(job);
  const { itPerS, eta } = speedAndEta(job, state.metrics.get(job.id));
  const label = stateLabel(job);
  return el(
    "div",
    {
      class: `dj-row${job.id === state.selected ? " dj-selected" : ""}`,
      "data-job-id": job.id,
      "data-state": job.state,
      "data-step": String(job.step ?? 0),
      onclick: () => {
        state.selected = job.id;
        ensureMetrics(job.id);
        loadJobDetail(job.id);
        scheduleRender();
      },
    },
    [
      el("div", { class: "dj-row-top" }, [
        el("span", { class: "dj-name", text: `${job.name ?? job.id} · ${job.method ?? ""}`, title: job.id }),
        el("span", { class: `dj-state dj-state-${job.state}`, text: label }),
      ]),
      el("div", { class: "dj-bar" }, [el("div", { class: "dj-fill", style: `width:${(fraction * 100).toFixed(1)}%` })]),
      el("div", { class: "dj-sub" }, [
        el("span", { class: "dj-step", text: text }),
        el("span", { text: ACTIVE_STATES.has(job.state) ? `${formatRate(itPerS)} · ETA ${formatDuration(eta)}` : "" }),
      ]),
    ],
  );
}

function renderDetail(job) {
  if (!job) {
    ui.detail.replaceChildren();
    return;
  }
  const records = state.metrics.get(job.id) ?? [];
  const { itPerS, eta } = speedAndEta(job, records);
  const { text } = jobProgress(job);
  const stats = el("div", { class: "dj-stats" }, [
    el("span", { text: "state" }), el("span", { class: "dj-detail-state", text: stateLabel(job) }),
    el("span", { text: "step" }), el("span", { class: "dj-detail-step", text: text || "-" }),
    el("span", { text: "speed" }), el("span", { class: "dj-speed", text: formatRate(itPerS) }),
    el("span", { text: "ETA" }), el("span", { class: "dj-eta", text: ACTIVE_STATES.has(job.state) ? formatDuration(eta) : "-" }),
    el("span", { text: "model" }), el("span", { text: job.model ?? "-" }),
    el("span", { text: "LoRA" }), el("span", { text: job.lora_name ?? "-" }),
  ]);
  const canStop = job.state === "queued" || (ACTIVE_STATES.has(job.state) && !job.stop_requested) || job.resume_pending;
  const enabled = (yes) => (yes ? {} : { disabled: "" });
  const actions = el("div", { class: "dj-actions" }, [
    el("button", { text: "Stop", onclick: () => act(job.id, "stop"), ...enabled(canStop) }),
    el("button", { text: "Resume", onclick: () => act(job.id, "resume"), ...enabled(canResume(job)) }),
    el("button", { text: "Train more…", title: "continue training to a larger total of steps", onclick: () => trainMore(job), ...enabled(canTrainMore(job)) }),
    el("button", { text: "Delete…", onclick: () => confirmDelete(job), ...enabled(canDelete(job)) }),
  ]);
  const parts = [el("div", { class: "dj-title", text: `${job.name ?? job.id}  (${job.id})` }), stats, actions];
  if (job.reason && !ACTIVE_STATES.has(job.state)) {
    parts.push(el("div", { class: `dj-reason dj-reason-${reasonTone(job)}`, text: job.reason }));
  }
  if (job.state === "failed" && job.log_tail) parts.push(el("pre", { class: "dj-log", text: job.log_tail }));
  for (const chart of CHARTS) {
    // a method without a critic (TCD) logs no critic loss: no empty chart for it
    if (records.length && chart.series.every((s) => !records.some((r) => s.key in r))) continue;
    const canvas = el("canvas", { class: "dj-chart", "data-chart": chart.title });
    parts.push(canvas);
    requestAnimationFrame(() => drawChart(canvas, chart, records, job.steps));
  }
  if (job.latest_preview) {
    const src = api.apiURL(`/distillery/jobs/${encodeURIComponent(job.id)}/previews/${encodeURIComponent(job.latest_preview)}`);
    if (!ui.preview || ui.preview.getAttribute("src") !== src) {
      ui.preview = el("img", { class: "dj-preview", src, alt: job.latest_preview }); // reused until a newer one
    }
    parts.push(ui.preview);
    parts.push(el("div", { class: "dj-caption", text: `preview ${job.latest_preview}` }));
  }
  ui.detail.replaceChildren(...parts);
}

function drawChart(canvas, chart, records, totalSteps) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 260;
  const height = canvas.clientHeight || 110;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  const color = getComputedStyle(canvas).color || "#ccc";
  ctx.font = "10px sans-serif";
  ctx.fillStyle = color;
  const box = { x: 38, y: 16, width: width - 46, height: height - 32 };
  const series = chart.series.map((s) => seriesPoints(records, s.key));
  const scaled = scaleSeries(series, box, { xMax: Number(totalSteps) || null });
  ctx.fillText(chart.title, 4, 11);
  let legendX = 12 + ctx.measureText(chart.title).width;
  chart.series.forEach((s, i) => {
    if (!series[i].length || !s.label) return;
    ctx.fillStyle = s.color;
    ctx.fillRect(legendX, 4, 10, 6);
    ctx.fillStyle = color;
    ctx.fillText(s.label, legendX + 13, 11);
    legendX += 20 + ctx.measureText(s.label).width;
  });
  if (!scaled) {
    ctx.fillText("waiting for metrics...", box.x + 8, box.y + box.height / 2);
    return;
  }
  ctx.strokeStyle = "rgba(128,128,128,0.35)";
  ctx.lineWidth = 1;
  for (const tick of niceTicks(scaled.yRange[0], scaled.yRange[1], 3)) {
    const y = scaled.toPixel.y(tick);
    ctx.beginPath();
    ctx.moveTo(box.x, y);
    ctx.lineTo(box.x + box.width, y);
    ctx.stroke();
    ctx.fillText(formatNumber(tick), 2, y + 3);
  }
  for (const tick of niceTicks(scaled.xRange[0], scaled.xRange[1], 3)) {
    ctx.fillText(formatNumber(tick), scaled.toPixel.x(tick) - 6, box.y + box.height + 12);
  }
  scaled.series.forEach((points, i) => {
    if (!points.length) return;
    ctx.strokeStyle = chart.series[i].color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach(([x, y], j) => (j ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    if (points.length === 1) {
      ctx.fillStyle = chart.series[i].color;
      ctx.fillRect(points[0][0] - 2, points[0][1] - 2, 4, 4);
      ctx.fillStyle = color;
    }
  });
}

// --- the tab -----------------------------------------------------------------------------------------
function mount(element) {
  if (!document.getElementById("distillery-jobs-style")) {
    document.head.append(el("style", { id: "distillery-jobs-style", text: STYLE }));
  }
  ui.list = el("div", { class: "dj-list" });
  ui.detail = el("div", { class: "dj-detail" });
  ui.message = el("div", { class: "dj-message" });
  const header = el("div", { class: "dj-header" }, [
    el("span", { text: "Distillery jobs" }),
    el("button", { text: "Refresh", onclick: () => refreshJobs().catch((e) => showMessage(e.message, "error")) }),
  ]);
  ui.root = el("div", { class: "dj-panel", id: "distillery-jobs-panel" }, [header, ui.list, ui.message, ui.detail]);
  element.replaceChildren(ui.root);
  refreshJobs().catch((e) => showMessage(`could not list jobs: ${e.message}`, "error"));
  clearInterval(ui.timer);
  ui.timer = setInterval(() => refreshJobs().catch(() => {}), 5000); // events can be missed on reconnects
  render();
}

function unmount() {
  clearInterval(ui.timer);
  ui.timer = null;
  ui.root = null;
}

// --- status text on the job nodes ---------------------------------------------------------------------
// The nodes return their status as ui.PreviewText ({text: [...]}); the frontend shows that only for its own
// preview nodes, so it is drawn here, under the node's widgets (not a widget: nothing is saved with the
// workflow, and the widget order of saved workflows stays as it is).
const STATUS_LINE_HEIGHT = 14;

function statusTextLines(node) {
  const width = Math.max(16, Math.floor(((node.size?.[0] ?? 240) - 16) / 6.2));
  return wrapLines(node.__distilleryStatus ?? "", width);
}

function fitStatusText(node) {
  const lines = statusTextLines(node);
  const base = node.computeSize ? node.computeSize() : [node.size[0], node.size[1]];
  const needed = base[1] + lines.length * STATUS_LINE_HEIGHT + 8;
  if (node.size[1] < needed) node.setSize ? node.setSize([node.size[0], needed]) : (node.size[1] = needed);
  node.setDirtyCanvas?.(true, true);
}

function addStatusText(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
    if (typeof text !== "string") return;
    this.__distilleryStatus = text;
    fitStatusText(this);
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments);
    if (!this.__distilleryStatus || this.flags?.collapsed) return r;
    const lines = statusTextLines(this);
    ctx.save();
    ctx.font = "12px sans-serif";
    ctx.fillStyle = /failed|reason: (?!stopped on request)/.test(this.__distilleryStatus) ? "#ef9a9a" : "#bbb";
    ctx.textAlign = "left";
    let y = this.size[1] - lines.length * STATUS_LINE_HEIGHT;
    for (const line of lines) {
      ctx.fillText(line, 8, y + 6);
      y += STATUS_LINE_HEIGHT;
    }
    ctx.restore();
    return r;
  };
}

app.registerExtension({
  name: "distillery.jobs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (STATUS_NODES.has(nodeData?.name)) addStatusText(nodeType);
  },
  async setup() {
    api.addEventListener(EVENT_NAME, onJobEvent);
    api.addEventListener("reconnected", () => refreshJobs().catch(() => {}));
    const manager = app.extensionManager;
    if (manager?.registerSidebarTab) {
      manager.registerSidebarTab({
        id: TAB_ID,
        icon: "pi pi-bolt",
        title: "Distillery",
        tooltip: "Distillery training jobs",
        type: "custom",
        render: (element) => mount(element),
        destroy: () => unmount(),
      });
    } else {
      console.warn("[distillery] this ComfyUI frontend has no sidebar tabs; the jobs panel is not shown");
    }
  },
});
