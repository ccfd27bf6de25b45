// node --test web/tests/   (Node's built-in runner; no dependencies, no browser)
import { test } from "node:test";
import assert from "node:assert/strict";

import {
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
  justCompleted,
  parseStepsInput,
  reasonTone,
  replaceJobs,
  suggestedSteps,
  wrapLines,
  etaSeconds,
  formatDuration,
  formatNumber,
  formatRate,
  iterationsPerSecond,
  jobProgress,
  mergeMetrics,
  niceTicks,
  parseMetricsLines,
  scaleSeries,
  seriesPoints,
  smoothPoints,
  sortedJobs,
  speedAndEta,
  stateLabel,
  valueRange,
} from "../distillery_jobs_logic.js";

test("metrics lines: good records kept, half-written and junk lines skipped", () => {
  const text = '{"step": 1, "loss/student": 0.5}\n\nnot json\n{"no_step": 1}\n{"step": 2, "loss/student": 0.4}\n{"step": 3';
  const records = parseMetricsLines(text);
  assert.deepEqual(records.map((r) => r.step), [1, 2]);
  assert.deepEqual(parseMetricsLines(""), []);
  assert.deepEqual(parseMetricsLines(undefined), []);
});

test("merge keeps step order and lets a re-logged step replace the old one", () => {
  const a = [{ step: 1, v: 1 }, { step: 3, v: 3 }];
  const merged = mergeMetrics(a, [{ step: 2, v: 2 }, { step: 3, v: 30 }, { step: "x" }]);
  assert.deepEqual(merged.map((r) => [r.step, r.v]), [[1, 1], [2, 2], [3, 30]]);
  assert.deepEqual(a.map((r) => r.v), [1, 3], "inputs are not modified");
});

test("series skip missing and non-finite values", () => {
  const records = [{ step: 1, "loss/student": 1 }, { step: 2 }, { step: 3, "loss/student": NaN }, { step: 4, "loss/student": 0.5 }];
  assert.deepEqual(seriesPoints(records, "loss/student"), [[1, 1], [4, 0.5]]);
  assert.deepEqual(smoothPoints([[1, 1], [2, 3]], 0.5), [[1, 1], [2, 2]]);
});

test("it/s from step and time over a window; ETA from it", () => {
  const records = Array.from({ length: 30 }, (_, i) => ({ step: i + 1, time: 1000 + i * 0.5 }));
  assert.equal(iterationsPerSecond(records), 2); // one step per half second
  assert.equal(iterationsPerSecond(records.slice(0, 1)), null);
  assert.equal(iterationsPerSecond([{ step: 1, time: 5 }, { step: 1, time: 6 }]), null);
  assert.equal(etaSeconds(100, 400, 2), 150);
  assert.equal(etaSeconds(500, 400, 2), 0);
  assert.equal(etaSeconds(1, 10, null), null);
  assert.equal(etaSeconds(1, 10, 0), null);
});

test("speed and ETA fall back to the worker's own it/s and only count while running", () => {
  assert.deepEqual(speedAndEta({ state: "running", step: 10, steps: 20, it_per_s: 5 }, []), { itPerS: 5, eta: 2 });
  assert.deepEqual(speedAndEta({ state: "completed", step: 20, steps: 20, it_per_s: 5 }, []), { itPerS: 5, eta: null });
  const records = [{ step: 1, time: 0 }, { step: 11, time: 10 }];
  assert.deepEqual(speedAndEta({ state: "running", step: 11, steps: 21, it_per_s: 99 }, records), { itPerS: 1, eta: 10 });
});

test("durations, rates and numbers read well", () => {
  assert.equal(formatDuration(42), "42s");
  assert.equal(formatDuration(185), "3m 05s");
  assert.equal(formatDuration(3720), "1h 02m");
  assert.equal(formatDuration(3 * 86400 + 7200), "3d 02h");
  assert.equal(formatDuration(null), "-");
  assert.equal(formatRate(12.345), "12.35 it/s");
  assert.equal(formatRate(0.25), "4.0 s/it");
  assert.equal(formatRate(0), "-");
  assert.equal(formatNumber(12345), "12.3k");
  assert.equal(formatNumber(0.5), "0.5");
  assert.equal(formatNumber(0.00123), "1.2e-3");
  assert.equal(formatNumber(0), "0");
});

test("nice ticks are round numbers inside the range", () => {
  assert.deepEqual(niceTicks(0, 1, 4), [0, 0.5, 1]);
  assert.deepEqual(niceTicks(0, 1, 5), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assert.deepEqual(niceTicks(0.13, 0.91, 4), [0.2, 0.4, 0.6, 0.8]);
  assert.deepEqual(niceTicks(5, 5), [5]);
  assert.deepEqual(niceTicks(10, 0, 2), [0, 5, 10]);
  assert.deepEqual(niceTicks(NaN, 1), []);
});

test("value range clips one early spike and pads flat curves", () => {
  const spiky = [[[0, 100], ...Array.from({ length: 50 }, (_, i) => [i + 1, 1 + (i % 5) * 0.1])]];
  const [lo, hi] = valueRange(spiky);
  assert.ok(lo < 1 && hi < 2, `range ${lo}..${hi} ignores the spike`);
  assert.deepEqual(valueRange([[[0, 2], [1, 2]]]), [1.8, 2.2]);
  assert.deepEqual(valueRange([[[0, 0]]]), [-1, 1]);
  assert.equal(valueRange([[]]), null);
});

test("scaling maps steps left to right and values bottom to top inside the box", () => {
  const box = { x: 10, y: 20, width: 100, height: 50 };
  const scaled = scaleSeries([[[0, 0], [10, 1]]], box, { xMax: 20 });
  const [[p0, p1]] = scaled.series;
  assert.equal(p0[0], 10); // step 0 at the left edge
  assert.equal(p1[0], 60); // step 10 of 20 in the middle
  assert.ok(p0[1] > p1[1], "larger values are higher up");
  for (const [px, py] of scaled.series[0]) {
    assert.ok(px >= box.x && px <= box.x + box.width && py >= box.y && py <= box.y + box.height);
  }
  assert.equal(scaleSeries([[]], box), null);
  const single = scaleSeries([[[5, 3]]], box);
  assert.ok(Number.isFinite(single.series[0][0][0]) && Number.isFinite(single.series[0][0][1]));
});

test("websocket events update jobs and metrics; the newest job is listed first", () => {
  const state = createState();
  applyJobs(state, [{ id: "20260101-000000-aaaaaa", state: "completed", step: 4, steps: 4 }]);
  applyEvent(state, {
    id: "20260102-000000-bbbbbb",
    job: { id: "20260102-000000-bbbbbb", state: "running", step: 2, steps: 10 },
    metrics: [{ step: 1, "loss/student": 1 }, { step: 2, "loss/student": 0.8 }],
    cursor: 2,
  });
  applyEvent(state, { id: "20260102-000000-bbbbbb", job: { id: "20260102-000000-bbbbbb", state: "running", step: 3 }, metrics: [{ step: 3, "loss/student": 0.7 }], cursor: 3 });
  assert.deepEqual(sortedJobs(state).map((j) => j.id), ["20260102-000000-bbbbbb", "20260101-000000-aaaaaa"]);
  assert.equal(state.jobs.get("20260102-000000-bbbbbb").steps, 10, "partial summaries merge");
  assert.deepEqual(state.metrics.get("20260102-000000-bbbbbb").map((r) => r.step), [1, 2, 3]);
  assert.equal(state.cursors.get("20260102-000000-bbbbbb"), 3);
  applyEvent(state, null);
  applyEvent(state, {});
});

test("progress and labels", () => {
  assert.deepEqual(jobProgress({ step: 5, steps: 20 }), { fraction: 0.25, text: "5 / 20" });
  assert.deepEqual(jobProgress({}), { fraction: 0, text: "" });
  assert.equal(stateLabel({ state: "running", stop_requested: true }), "stopping");
  assert.equal(stateLabel({ state: "queued", queue_position: 2 }), "queued (#2)");
  assert.equal(stateLabel({ state: "running", phase: "loading the checkpoint" }), "loading the checkpoint");
  assert.equal(stateLabel({ state: "running", phase: "training" }), "running");
  assert.equal(stateLabel({ state: "failed" }), "failed");
});

test("after a resume, it/s and ETA count only the current attempt (not the pause nor the last attempt)", () => {
  // attempt 1: steps 1..30 at 2 it/s; a pause of 1000 s; attempt 2 from the checkpoint of step 20 at 10 it/s
  const first = Array.from({ length: 30 }, (_, i) => ({ step: i + 1, time: 1000 + i * 0.5 }));
  const second = Array.from({ length: 5 }, (_, i) => ({ step: 21 + i, time: 2100 + i * 0.1 }));
  const state = createState();
  applyMetrics(state, "j", first, 30);
  applyJobs(state, [{ id: "j", state: "queued", step: 20, steps: 100, attempt: 1 }]); // resumed: continues at 20
  assert.deepEqual(state.metrics.get("j").map((r) => r.step), Array.from({ length: 20 }, (_, i) => i + 1));
  assert.equal(state.cursors.get("j"), 20, "the cursor goes back to the checkpoint");
  applyMetrics(state, "j", second, 25);
  const job = { id: "j", state: "running", step: 25, steps: 100, started_at: 2099.5, it_per_s: 9 };
  const { itPerS, eta } = speedAndEta(job, state.metrics.get("j"));
  assert.ok(Math.abs(itPerS - 10) < 1e-6, `it/s ${itPerS}`);
  assert.ok(Math.abs(eta - 7.5) < 1e-6);
  // right after the start nothing of this attempt is measured yet: the worker's own (fresh) it/s, not the old
  assert.equal(speedAndEta({ ...job, started_at: 5000 }, state.metrics.get("j")).itPerS, 9);
  assert.equal(speedAndEta({ ...job, started_at: 5000, it_per_s: null }, state.metrics.get("j")).eta, null);
  assert.equal(iterationsPerSecond(first, 20, 5000), null);
  // a new attempt seen only through its attempt number (a missed "queued" event) also drops the stale tail
  const other = createState();
  applyJobs(other, [{ id: "k", state: "running", step: 30, attempt: 1 }]);
  applyMetrics(other, "k", first, 30);
  applyJobs(other, [{ id: "k", state: "running", step: 22, attempt: 2 }]);
  assert.equal(other.metrics.get("k").at(-1).step, 22);
});

test("deleted jobs leave the panel, by event or by a listing without them", () => {
  const state = createState();
  applyJobs(state, [{ id: "20260102-000000-bbbbbb", state: "completed" }, { id: "20260101-000000-aaaaaa", state: "stopped" }]);
  applyMetrics(state, "20260102-000000-bbbbbb", [{ step: 1 }], 1);
  state.selected = "20260102-000000-bbbbbb";
  applyEvent(state, { id: "20260102-000000-bbbbbb", deleted: true });
  assert.deepEqual(sortedJobs(state).map((j) => j.id), ["20260101-000000-aaaaaa"]);
  assert.equal(state.metrics.has("20260102-000000-bbbbbb"), false);
  assert.equal(state.selected, "20260101-000000-aaaaaa");
  replaceJobs(state, [{ id: "20260103-000000-cccccc", state: "queued" }]);
  assert.deepEqual(sortedJobs(state).map((j) => j.id), ["20260103-000000-cccccc"]);
  assert.equal(deletePath("a b", true), "/distillery/jobs/a%20b?delete_lora=1");
  assert.equal(deletePath("x", false), "/distillery/jobs/x?delete_lora=0");
});

test("which actions a job offers", () => {
  assert.equal(canDelete({ state: "running" }), false);
  assert.equal(canDelete({ state: "starting" }), false);
  assert.equal(canDelete({ state: "stopped", resume_pending: true }), false);
  assert.equal(canDelete({ state: "completed" }), true);
  assert.equal(canDelete({ state: "queued" }), true);
  assert.equal(canTrainMore({ state: "completed" }), true);
  assert.equal(canTrainMore({ state: "running" }), false);
  assert.equal(canResume({ state: "completed" }), false);
  assert.equal(canResume({ state: "stopped" }), true);
  assert.equal(canResume({ state: "running", stop_requested: true }), true, "Resume while it is stopping");
  assert.equal(canResume({ state: "running" }), false);
  assert.equal(canResume({ state: "stopped", resume_pending: true }), false);
  assert.equal(stateLabel({ state: "running", stop_requested: true, resume_pending: true }), "stopping, then resume");
  assert.equal(stateLabel({ state: "stopped", resume_pending: true }), "resuming");
});

test("train more asks for a total above what the job has trained", () => {
  const job = { state: "completed", step: 2000, steps: 2000 };
  assert.equal(suggestedSteps(job), 4000);
  assert.deepEqual(parseStepsInput("3000", job), { steps: 3000 });
  assert.deepEqual(parseStepsInput(" 4,000 ", job), { steps: 4000 });
  assert.equal(parseStepsInput(null, job), null, "cancelled");
  assert.equal(parseStepsInput("  ", job), null);
  assert.match(parseStepsInput("2000", job).error, /above the 2000 steps/);
  assert.match(parseStepsInput("12.5", job).error, /not a whole number/);
  assert.match(parseStepsInput("-5", job).error, /not a whole number/);
  assert.deepEqual(parseStepsInput("1500", { state: "stopped", step: 800, steps: 2000, checkpoint_step: 800 }), { steps: 1500 });
});

test("a stop on request reads neutral, a failure in the error colour; completion refreshes the lists once", () => {
  assert.equal(reasonTone({ state: "stopped", reason: "stopped on request" }), "neutral");
  assert.equal(reasonTone({ state: "failed", reason: "boom" }), "error");
  assert.equal(reasonTone({ state: "interrupted" }), "warn");
  assert.deepEqual(actionMessage("stop", "j", { state: "running", stop_requested: true }), { text: "stop: job j is stopping", tone: "info" });
  assert.equal(actionMessage("resume", "j", null, "HTTP 409").tone, "error");
  assert.match(actionMessage("delete", "j", { lora_deleted: true }).text, /and its LoRA file/);
  assert.match(actionMessage("delete", "j", { lora_deleted: false, lora_note: "kept" }).text, /\(kept\)/);
  assert.equal(justCompleted({ state: "running" }, { state: "completed" }), true);
  assert.equal(justCompleted(undefined, { state: "completed" }), true);
  assert.equal(justCompleted({ state: "completed" }, { state: "completed" }), false);
  assert.equal(justCompleted({ state: "running" }, { state: "running" }), false);
});

test("action messages clear after a few seconds, unless a newer one replaced them", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const shown = [];
  const flash = createFlash((m) => shown.push(m?.text ?? null), { delayMs: 5000 });
  flash.show("stop requested");
  t.mock.timers.tick(3000);
  flash.show("resume: queued");
  t.mock.timers.tick(3000);
  assert.equal(flash.current.text, "resume: queued", "the first timer did not clear the newer message");
  t.mock.timers.tick(2000);
  assert.equal(flash.current, null);
  flash.show("resume failed", "error");
  t.mock.timers.tick(6000);
  assert.equal(flash.current.text, "resume failed", "errors stay longer");
  t.mock.timers.tick(4000);
  assert.equal(flash.current, null);
  assert.deepEqual(shown, ["stop requested", "resume: queued", null, "resume failed", null]);
});

test("node status text wraps to the node's width", () => {
  const lines = wrapLines("job 20260101-000000-aaaaaa: running, step 10/2000, 3.20 it/s, ETA 10m22s\nreason: x", 30);
  assert.ok(lines.every((l) => l.length <= 30), JSON.stringify(lines));
  assert.equal(lines.join(" ").replace(/\s+/g, " "), "job 20260101-000000-aaaaaa: running, step 10/2000, 3.20 it/s, ETA 10m22s reason: x");
  assert.deepEqual(wrapLines("a".repeat(25), 10), ["aaaaaaaaaa", "aaaaaaaaaa", "aaaaa"]);
  assert.deepEqual(wrapLines(""), []);
  assert.equal(wrapLines(Array.from({ length: 40 }, (_, i) => `line ${i}`).join("\n"), 20, 5).length, 5);
});
