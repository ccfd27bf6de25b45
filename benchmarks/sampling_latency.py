"""Sampling latency per image: the base with CFG vs the few-step student vs hybrid, on one architecture.

For each architecture (SD1.5 @512, SDXL @1024, SD3-medium-class flow DiT @1024; random weights, bf16):

  base_25_cfg      the base, 25 steps of deterministic DDIM / flow Euler (trailing grid for SD, the
                   FlowMatchEuler grid with shift 3 for the DiT), CFG (a guided step = one batched pair)
  student_4        the student, DMD2's 4 steps 999, 749, 499, 249 (x0 + fresh noise), CFG 1; the LoRA
                   merged into the weights (what ComfyUI's LoraLoader does), so the same network as the base
  student_4_lora   the same with the rank-64 LoRA kept as an unmerged peft adapter (diffusers without fuse)
  hybrid           the guided base on its own 25-step grid down to the student's second level (t = 749),
                   then the student for its remaining 3 steps (sampling.hybrid.sample_hybrid)

Latency covers the network evaluations and the sampler arithmetic on latents (text encoding and VAE
decoding are the same for every row and are not included). GPU: warm-up runs first, then the median of
--repeats timed runs, with torch.cuda.synchronize around each.

    python benchmarks/sampling_latency.py              # GPU
    python benchmarks/sampling_latency.py --cpu-smoke  # tiny configs on the CPU: checks the script works
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs  # noqa: E402
import report  # noqa: E402

from comfyui_distillery.core.models import Guided  # noqa: E402
from comfyui_distillery.sampling import SAMPLERS, timesteps_to_sigmas  # noqa: E402
from comfyui_distillery.sampling.api import initial_state, make_noise, sigmas_for  # noqa: E402
from comfyui_distillery.sampling.hybrid import sample_hybrid  # noqa: E402
from comfyui_distillery.trainers import lora  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU: checks the script works")
    p.add_argument("--archs", default="sd15,sdxl,sd3m")
    p.add_argument("--batch", type=int, default=1, help="images per run; latency is reported per image")
    p.add_argument("--base-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=None, help="base CFG scale (default: the arch's, 1.75 / 8 / 4.5)")
    p.add_argument("--student-timesteps", default="999,749,499,249")
    p.add_argument("--hybrid-student-index", type=int, default=1,
                   help="hand over at the student's j-th level (1: its second timestep, 749)")
    p.add_argument("--lora-rank", type=int, default=None, help="the unmerged-LoRA row's rank (default 64; 8 smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 2; 0 with --cpu-smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5; 1 with --cpu-smoke)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="weights (default bf16 on GPU, fp32 with --cpu-smoke)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 with --cpu-smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(report.RESULTS_DIR))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.lora_rank = args.lora_rank or (8 if smoke else 64)
    args.warmup = args.warmup if args.warmup is not None else (0 if smoke else 2)
    args.repeats = args.repeats or (1 if smoke else 5)
    args.dtype = args.dtype or ("fp32" if smoke else "bf16")
    return args


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timed(fn, device, warmup: int, repeats: int):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        report.sync(device)
        t0 = time.perf_counter()
        fn()
        report.sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_arch(arch: archs.Arch, args, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    rows: list[dict] = []
    net = None
    try:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        net = archs.build_network(arch, device, DTYPES[args.dtype], seed=args.seed)
        model = archs.make_model(arch, net)
        schedule = model.schedule
        cfg = args.cfg if args.cfg is not None else arch.guidance
        cond, uncond = archs.batch_conditioning(arch, args.batch, device, seed=args.seed)
        noise = make_noise((args.batch, *arch.sample_shape), seed=args.seed, device=device)
        base_preset = "flow_euler" if schedule.prediction_type == "flow" else "trailing"
        base_sigmas = sigmas_for(model, preset=base_preset, steps=args.base_steps)
        student_ts = [float(t) for t in args.student_timesteps.split(",")]
        student_sigmas = timesteps_to_sigmas(schedule, student_ts)
        ddim, x0_renoise = SAMPLERS["ddim"], SAMPLERS["x0_renoise"]
        state = {}

        def run_plain(sampler, guided, sigmas):
            def go():
                x = initial_state(model, noise, float(sigmas[0]))
                with torch.no_grad():
                    state["x"] = sampler(guided, x, sigmas.to(device), extra_args={"seed": args.seed},
                                         disable=True, schedule=schedule)
            return go

        def run_hybrid(base_guided, student_guided):
            def go():
                x = initial_state(model, noise, float(base_sigmas[0]))
                with torch.no_grad():
                    state["x"], state["info"] = sample_hybrid(
                        base_guided, student_guided, x, base_sigmas, student_sigmas, schedule=schedule,
                        student_index=args.hybrid_student_index, extra_args={"seed": args.seed}, disable=True)
            return go

        def record(name, desc, guided_models, fn, steps, row_cfg, extra=None):
            for g in guided_models:
                g.calls = 0
            times = _timed(fn, device, args.warmup, args.repeats)
            runs = args.warmup + args.repeats
            evals = sum(g.calls for g in guided_models) / runs  # per run (a CFG pair counts 2)
            med = statistics.median(times)
            row = {"arch": arch.name, "label": arch.label, "resolution": arch.resolution, "row": name,
                   "description": desc, "steps": steps, "cfg": row_cfg, "batch": args.batch,
                   "evals_per_image": evals, "seconds_per_run": times, "seconds_per_image": med / args.batch,
                   "images_per_s": args.batch / med, "finite": bool(torch.isfinite(state["x"]).all()),
                   "status": "ok", **(extra or {})}
            rows.append(row)
            return row

        base = Guided(model, cond, uncond, cfg)
        record("base_25_cfg", f"base, {args.base_steps} {base_preset} steps, CFG {cfg:g}", [base],
               run_plain(ddim, base, base_sigmas), args.base_steps, cfg)
        student = Guided(model, cond)  # merged LoRA: the same network
        record("student_4", f"student (LoRA merged), {len(student_ts)} steps x0+noise, CFG 1", [student],
               run_plain(x0_renoise, student, student_sigmas), len(student_ts), 1.0)
        hb, hs = Guided(model, cond, uncond, cfg), Guided(model, cond)
        hrow = record("hybrid", f"base CFG {cfg:g} down to the student's level {args.hybrid_student_index}, "
                      f"then the student", [hb, hs], run_hybrid(hb, hs), None, cfg)
        info = state.get("info", {})
        hrow.update(steps=info.get("base_steps", 0) + info.get("student_steps", 0),
                    base_steps=info.get("base_steps"), student_steps=info.get("student_steps"),
                    handoff_timestep=info.get("handoff_timestep"))
        # the unmerged adapter last: once injected, every LoRA layer runs its (disabled) adapter check
        lora.add_lora_adapter(net, "student", args.lora_rank, None, arch.lora_targets)
        for p in lora.adapter_parameters(net, "student"):  # peft keeps adapters in fp32; infer in the
            p.data = p.data.to(DTYPES[args.dtype])         # weights' dtype, as a loaded LoRA runs
        lora.set_role(net, "student")
        unmerged = Guided(model, cond)
        record("student_4_lora", f"student (rank-{args.lora_rank} LoRA unmerged), {len(student_ts)} steps, CFG 1",
               [unmerged], run_plain(x0_renoise, unmerged, student_sigmas), len(student_ts), 1.0)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
        base_s = rows[0]["seconds_per_image"]
        for r in rows:
            r["speedup_vs_base"] = base_s / r["seconds_per_image"]
            r["peak_mem_gib"] = peak
    except torch.OutOfMemoryError:
        rows.append({"arch": arch.name, "row": "all", "status": "OOM"})
    finally:
        del net
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
    return rows


COLUMNS = [("arch", "arch", ""), ("row", "sampler", ""), ("steps", "steps", ""), ("cfg", "CFG", ".3g"),
           ("evals_per_image", "evals/image", ".3g"), ("seconds_per_image", "s/image", ".3g"),
           ("speedup_vs_base", "speed-up", ".3g"), ("peak_mem_gib", "peak GiB", ".3g")]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    return report.run_with_threads(parse_args(argv), _main, argv)


def _main(args, argv) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no GPU: the full-size benchmark needs one; use --cpu-smoke to check the script on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    info = report.device_info() if cuda else {**report.device_info(), "device": "cpu"}
    arch_list = archs.get_archs([a for a in args.archs.split(",") if a], tiny=args.cpu_smoke)
    if not args.cpu_smoke:
        archs.check_param_counts(arch_list)
    rows = []
    for arch in arch_list:
        t0 = time.perf_counter()
        arch_rows = run_arch(arch, args, device)
        rows += arch_rows
        for r in arch_rows:
            print(f"{arch.name:10s} {r['row']:15s} {r['status']:4s} s/image={report.fmt(r.get('seconds_per_image'))} "
                  f"evals={report.fmt(r.get('evals_per_image'))} speed-up={report.fmt(r.get('speedup_vs_base'))}",
                  flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    tag = report.machine_tag(info, args.cpu_smoke)
    out_dir = Path(args.out)
    payload = {**report.header("benchmarks/sampling_latency.py", argv), "machine": info, "tag": tag,
               "smoke": args.cpu_smoke,
               "settings": {"batch": args.batch, "base_steps": args.base_steps, "cfg": args.cfg,
                            "student_timesteps": args.student_timesteps,
                            "hybrid_student_index": args.hybrid_student_index, "lora_rank": args.lora_rank,
                            "warmup": args.warmup, "repeats": args.repeats, "dtype": args.dtype},
               "rows": rows}
    payload["json"] = str(report.write_json(out_dir / f"sampling_latency_{tag}.json", payload))
    text = report.table(rows, COLUMNS)
    print("\n" + text + f"\n\nmachine: {info['name']}")
    if not args.no_plot:
        ok = [r for r in rows if r["status"] == "ok"]
        labels = [f"{r['arch']} {r['row']}" for r in ok]
        png = report.bar_plot(out_dir / f"sampling_latency_{tag}.png",
                              f"sampling latency per image, {info['name']} ({args.dtype}, batch {args.batch})",
                              labels, [("s / image", [r["seconds_per_image"] for r in ok]),
                                       ("speed-up vs base", [r["speedup_vs_base"] for r in ok])])
        payload["png"] = str(png)
    payload["table"] = text
    return payload


if __name__ == "__main__":
    main()
