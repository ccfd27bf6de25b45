// node --test web/tests/   (Node's built-in runner; no dependencies, no browser)
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  applyEvent,
  applyJobs,
  createState,
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
