// Pure logic of the Distillery jobs panel: metrics bookkeeping, speed and ETA, curve scaling.
// No DOM and no ComfyUI imports: the browser panel (distillery_jobs.js) and Node's test runner
// (web/tests/*.test.mjs) both import it.

export const EVENT_NAME = "distillery.job";
export const ACTIVE_STATES = new Set(["starting", "running"]);
export const TERMINAL_STATES = new Set(["completed", "failed", "stopped", "interrupted"]);
export const RESUMABLE_STATES = new Set(["failed", "stopped", "interrupted"]);

// The curves the panel draws, each chart on its own scale (a generator loss of 1e-3 next to a critic
// loss of 1 would otherwise be a flat line).
export const CHARTS = [
  { title: "student (generator) loss", series: [{ key: "loss/student", label: "", color: "#4fc3f7" }] },
  { title: "critic loss", series: [{ key: "loss/critic", label: "", color: "#ffb74d" }] },
  {
    title: "grad norm",
    series: [
      { key: "grad_norm/student", label: "student", color: "#81c784" },
      { key: "grad_norm/critic", label: "critic", color: "#e57373" },
    ],
  },
];

/** Parse JSON-lines text into metric records; blank, broken or half-written lines are skipped. */
export function parseMetricsLines(text) {
  const out = [];
  for (const line of String(text ?? "").split("\n")) {
    const trimmed = line.trim();
    if (!trimmed) continue;
    try {
      const record = JSON.parse(trimmed);
      if (record && typeof record === "object" && Number.isFinite(Number(record.step))) out.push(record);
    } catch {
      // a line being written right now, or junk: skip it
    }
  }
  return out;
}

/**
 * Merge new metric records into a list sorted by step. A record for a step already present replaces it
 * (a resumed run re-logs the steps after its checkpoint). Returns a new array.
 */
export function mergeMetrics(existing, incoming) {
  const byStep = new Map();
  for (const r of existing ?? []) byStep.set(Number(r.step), r);
  for (const r of incoming ?? []) {
    if (r && Number.isFinite(Number(r.step))) byStep.set(Number(r.step), r);
  }
  return [...byStep.entries()].sort((a, b) => a[0] - b[0]).map(([, r]) => r);
}

/** [[step, value], ...] of one metric, finite values only. */
export function seriesPoints(records, key) {
  const out = [];
  for (const r of records ?? []) {
    const v = Number(r?.[key]);
    const s = Number(r?.step);
    if (r && key in r && Number.isFinite(v) && Number.isFinite(s)) out.push([s, v]);
  }
  return out;
}

/** Exponential moving average of the values of [[x, y]] points (alpha in (0, 1], 1 = no smoothing). */
export function smoothPoints(points, alpha = 0.3) {
  let avg = null;
  return points.map(([x, y]) => {
    avg = avg === null ? y : avg + alpha * (y - avg);
    return [x, avg];
  });
}

/**
 * Iterations per second from the metric records' (step, time) pairs over the last `window` records.
 * `since` (a time, seconds): only records logged from then on count - the current attempt's start, so a
 * resumed job's speed is not averaged over the pause and the earlier attempt.
 * Returns null when it cannot be told (fewer than two timed records, no progress, or no time passed).
 */
export function iterationsPerSecond(records, window = 20, since = null) {
  const from = Number.isFinite(Number(since)) && since !== null ? Number(since) : -Infinity;
  const timed = (records ?? []).filter(
    (r) => Number.isFinite(Number(r?.time)) && Number.isFinite(Number(r?.step)) && Number(r.time) >= from,
  );
  if (timed.length < 2) return null;
  const recent = timed.slice(-Math.max(2, window));
  const first = recent[0];
  const last = recent[recent.length - 1];
  const dSteps = Number(last.step) - Number(first.step);
  const dTime = Number(last.time) - Number(first.time);
  if (!(dSteps > 0) || !(dTime > 0)) return null;
  return dSteps / dTime;
}

/** Seconds left, or null when unknown. */
export function etaSeconds(step, steps, itPerS) {
  const left = Number(steps) - Number(step);
  if (!Number.isFinite(left) || !(itPerS > 0)) return null;
  return Math.max(0, left / itPerS);
}

/** "42s", "3m 05s", "1h 02m", "2d 03h"; "-" for null. */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "-";
  let s = Math.max(0, Math.round(Number(seconds)));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  const pad = (n) => String(n).padStart(2, "0");
  if (d > 0) return `${d}d ${pad(h)}h`;
  if (h > 0) return `${h}h ${pad(m)}m`;
  if (m > 0) return `${m}m ${pad(s)}s`;
  return `${s}s`;
}

/** A rate for display: "12.3 it/s", or "4.2 s/it" when slower than one iteration per second. */
export function formatRate(itPerS) {
  if (!(itPerS > 0) || !Number.isFinite(itPerS)) return "-";
  if (itPerS >= 1) return `${itPerS >= 100 ? itPerS.toFixed(0) : itPerS.toFixed(2)} it/s`;
  return `${(1 / itPerS).toFixed(1)} s/it`;
}

/** Round-number tick values covering [lo, hi] (about `count` of them). */
export function niceTicks(lo, hi, count = 4) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (hi < lo) [lo, hi] = [hi, lo];
  if (hi === lo) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  const ticks = [];
  const start = Math.ceil(lo / step - 1e-9) * step;
  for (let v = start; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/**
 * The value range to draw: [min, max] of all series, with the top clipped at the `clip` quantile so one
 * early spike does not flatten the curve, and a little headroom. Returns null when there is nothing.
 */
export function valueRange(seriesList, clip = 0.98) {
  const values = [];
  for (const points of seriesList) for (const [, v] of points) if (Number.isFinite(v)) values.push(v);
  if (!values.length) return null;
  values.sort((a, b) => a - b);
  const lo = values[0];
  const hiIndex = Math.min(values.length - 1, Math.max(0, Math.ceil(clip * (values.length - 1))));
  let hi = values.length > 20 ? values[hiIndex] : values[values.length - 1];
  if (hi === lo) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    return [lo - pad, hi + pad];
  }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

/**
 * Map series to pixels. box = {x, y, width, height} (the plot area); steps run left to right over
 * [xMin, xMax] (xMax at least `minSteps` so a young job does not stretch), values bottom to top over the
 * range from valueRange. Values above the range are drawn at the top edge.
 * Returns {series: [[[px, py], ...], ...], xRange, yRange} or null when there is nothing to draw.
 */
export function scaleSeries(seriesList, box, { xMax = null, clip = 0.98 } = {}) {
  const yRange = valueRange(seriesList, clip);
  if (!yRange) return null;
  let x0 = Infinity;
  let x1 = -Infinity;
  for (const points of seriesList) {
    for (const [s] of points) {
      x0 = Math.min(x0, s);
      x1 = Math.max(x1, s);
    }
  }
  if (xMax !== null && Number.isFinite(xMax)) x1 = Math.max(x1, xMax);
  if (x1 === x0) x1 = x0 + 1;
  const [y0, y1] = yRange;
  const px = (s) => box.x + ((s - x0) / (x1 - x0)) * box.width;
  const py = (v) => {
    const t = (Math.min(Math.max(v, y0), y1) - y0) / (y1 - y0);
    return box.y + box.height - t * box.height;
  };
  return {
    series: seriesList.map((points) => points.map(([s, v]) => [px(s), py(v)])),
    xRange: [x0, x1],
    yRange,
    toPixel: { x: px, y: py },
  };
}

/** Short number labels for axes: 0.00123 -> "1.23e-3", 12345 -> "12.3k". */
export function formatNumber(v) {
  if (!Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e6) return `${(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${(v / 1e3).toPrecision(3)}k`;
  if (a >= 0.01) return String(Number(v.toPrecision(3)));
  return v.toExponential(1).replace("e+", "e");
}

/** Progress of a job summary: {fraction in [0, 1], text}. */
export function jobProgress(job) {
  const steps = Number(job?.steps) || 0;
  const step = Math.min(Number(job?.step) || 0, steps || Infinity);
  const fraction = steps > 0 ? Math.max(0, Math.min(1, step / steps)) : 0;
  return { fraction, text: steps > 0 ? `${step} / ${steps}` : "" };
}

/** What to write next to a job's name. */
export function stateLabel(job) {
  const state = job?.state ?? "unknown";
  if (job?.resume_pending) return ACTIVE_STATES.has(state) ? "stopping, then resume" : "resuming";
  if (ACTIVE_STATES.has(state) && job?.stop_requested) return "stopping";
  if (state === "queued" && job?.queue_position) return `queued (#${job.queue_position})`;
  if (ACTIVE_STATES.has(state) && job?.phase && job.phase !== "training") return job.phase;
  return state;
}

/**
 * The panel's store. jobs: id -> summary; metrics: id -> records; cursors: id -> step.
 * applyEvent takes one "distillery.job" websocket event ({id, job, metrics, cursor}).
 */
export function createState() {
  return { jobs: new Map(), metrics: new Map(), cursors: new Map(), selected: null, version: 0 };
}

export function applyJobs(state, jobs) {
  for (const job of jobs ?? []) {
    if (!job?.id) continue;
    const previous = state.jobs.get(job.id);
    state.jobs.set(job.id, { ...(previous ?? {}), ...job });
    if (startsAgain(previous, job)) pruneMetrics(state, job.id, Number(job.step) || 0);
  }
  if (!state.selected && jobs?.length) state.selected = jobs[0].id;
  state.version += 1;
  return state;
}

/** A job queued or started again (resume, train more): its run continues from step job.step. */
function startsAgain(previous, job) {
  if (job.state === "queued" || job.state === "starting") return true;
  const a = Number(previous?.attempt);
  const b = Number(job.attempt);
  return Number.isFinite(a) && Number.isFinite(b) && a !== b;
}

/**
 * Drop the records after `step` (a resumed run logs them again from its checkpoint) so the curve has
 * no stale tail; the cursor goes back with them.
 */
export function pruneMetrics(state, id, step) {
  const records = state.metrics.get(id);
  if (!records?.length || Number(records[records.length - 1].step) <= step) return state;
  state.metrics.set(id, records.filter((r) => Number(r.step) <= step));
  state.cursors.set(id, Math.min(state.cursors.get(id) ?? -1, step));
  return state;
}

/** A full listing from the server: jobs it no longer has (deleted elsewhere) go. */
export function replaceJobs(state, jobs) {
  const ids = new Set((jobs ?? []).map((j) => j?.id).filter(Boolean));
  for (const id of [...state.jobs.keys()]) if (!ids.has(id)) removeJob(state, id);
  return applyJobs(state, jobs);
}

export function removeJob(state, id) {
  state.jobs.delete(id);
  state.metrics.delete(id);
  state.cursors.delete(id);
  if (state.selected === id) state.selected = sortedJobs(state)[0]?.id ?? null;
  state.version += 1;
  return state;
}

export function applyMetrics(state, id, records, cursor) {
  const merged = mergeMetrics(state.metrics.get(id) ?? [], records ?? []);
  state.metrics.set(id, merged);
  const last = merged.length ? Number(merged[merged.length - 1].step) : -1;
  state.cursors.set(id, Math.max(Number.isFinite(Number(cursor)) ? Number(cursor) : -1, last));
  state.version += 1;
  return state;
}

export function applyEvent(state, event) {
  if (!event || !event.id) return state;
  if (event.deleted) return removeJob(state, event.id);
  if (event.job) applyJobs(state, [event.job]);
  if (event.metrics?.length) applyMetrics(state, event.id, event.metrics, event.cursor);
  if (!state.selected) state.selected = event.id;
  return state;
}

/** Jobs newest first (ids begin with their creation time). */
export function sortedJobs(state) {
  return [...state.jobs.values()].sort((a, b) => String(b.id).localeCompare(String(a.id)));
}

/**
 * Speed and ETA of a job: from its metrics when there are enough, else from the worker's status. While it
 * runs, only the current attempt counts (records logged since its started_at): after a resume both start
 * over instead of averaging across the pause.
 */
export function speedAndEta(job, records) {
  const running = ACTIVE_STATES.has(job?.state);
  const since = running && Number.isFinite(Number(job?.started_at)) && job?.started_at !== null ? Number(job.started_at) : null;
  const measured = iterationsPerSecond(records, 20, since);
  const itPerS = measured ?? (Number(job?.it_per_s) > 0 ? Number(job.it_per_s) : null);
  const eta = running ? etaSeconds(job?.step ?? 0, job?.steps ?? 0, itPerS) : null;
  return { itPerS, eta };
}

/** True when this update is the moment a job completed (a new student file is there: refresh the lists). */
export function justCompleted(previous, job) {
  return job?.state === "completed" && previous?.state !== "completed";
}

/** How a job's reason reads: a failure in the error colour, a stop on request or a completion neutral. */
export function reasonTone(job) {
  if (job?.state === "failed") return "error";
  if (job?.state === "interrupted") return "warn";
  return "neutral";
}

export function canDelete(job) {
  return Boolean(job) && !ACTIVE_STATES.has(job.state) && !job.resume_pending;
}

export function canTrainMore(job) {
  return Boolean(job) && (job.state === "completed" || RESUMABLE_STATES.has(job.state)) && !job.resume_pending;
}

export function canResume(job) {
  return Boolean(job) && (RESUMABLE_STATES.has(job.state) || (ACTIVE_STATES.has(job.state) && Boolean(job.stop_requested))) &&
    !job.resume_pending;
}

export function deletePath(id, deleteLora) {
  return `/distillery/jobs/${encodeURIComponent(id)}?delete_lora=${deleteLora ? 1 : 0}`;
}

/** The total the "train more" prompt suggests: twice the current one. */
export function suggestedSteps(job) {
  const steps = Number(job?.steps) || 0;
  return Math.max(steps * 2, steps + 1, 1);
}

/**
 * The user's answer to "train to how many steps in total?": {steps} or {error}; null when cancelled.
 * It must be a whole number above what the job has trained.
 */
export function parseStepsInput(text, job) {
  if (text === null || text === undefined) return null;
  const raw = String(text).trim().replace(/[_,\s]/g, "");
  if (!raw) return null;
  if (!/^\d+$/.test(raw)) return { error: `"${String(text).trim()}" is not a whole number of steps` };
  const steps = Number(raw);
  const done = Math.max(Number(job?.step) || 0, Number(job?.checkpoint_step) || 0,
    job?.state === "completed" ? Number(job?.steps) || 0 : 0);
  if (!(steps > done)) return { error: `give a total above the ${done} steps it has trained` };
  return { steps };
}

/** What to say after an action on a job, and in which tone. */
export function actionMessage(action, id, info, error = null) {
  if (error) return { text: `${action} failed: ${error}`, tone: "error" };
  if (action === "delete") {
    const lora = info?.lora_deleted ? " and its LoRA file" : "";
    const note = info?.lora_note ? ` (${info.lora_note})` : "";
    return { text: `deleted job ${id}${lora}${note}`, tone: "info" };
  }
  return { text: `${action}: job ${id} is ${stateLabel(info)}`, tone: "info" };
}

/**
 * A message line that clears itself: show(text, tone) renders it, and after `delayMs` (errors stay twice
 * as long) renders null - unless a newer message came meanwhile.
 */
export function createFlash(render, { delayMs = 5000, setTimer = setTimeout, clearTimer = clearTimeout } = {}) {
  let timer = null;
  let current = null;
  return {
    show(text, tone = "info") {
      current = { text, tone };
      render(current);
      if (timer !== null) clearTimer(timer);
      timer = setTimer(() => {
        timer = null;
        current = null;
        render(null);
      }, tone === "error" ? delayMs * 2 : delayMs);
    },
    get current() {
      return current;
    },
  };
}

/** A node's status text as lines of at most `width` characters (long lines wrap at spaces). */
export function wrapLines(text, width = 48, maxLines = 12) {
  const out = [];
  for (const paragraph of String(text ?? "").split("\n")) {
    let line = "";
    for (const word of paragraph.split(/\s+/).filter(Boolean)) {
      let w = word;
      while (w.length > width) {
        if (line) {
          out.push(line);
          line = "";
        }
        out.push(w.slice(0, width));
        w = w.slice(width);
      }
      if (!line) line = w;
      else if (line.length + 1 + w.length <= width) line += ` ${w}`;
      else {
        out.push(line);
        line = w;
      }
    }
    out.push(line);
  }
  while (out.length && !out[out.length - 1]) out.pop();
  if (out.length > maxLines) return [...out.slice(0, maxLines - 1), "..."];
  return out;
}

/** The node types whose executions report a status text (ui.PreviewText) that the canvas shows. */
export const STATUS_NODES = new Set([
  "DistilleryStartDistillation",
  "DistilleryJobStatus",
  "DistilleryStopJob",
  "DistilleryResumeJob",
]);
