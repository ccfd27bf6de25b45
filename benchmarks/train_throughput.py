"""Training throughput, peak memory and model FLOPs utilization of the distillation methods.

For each architecture (SD1.5 @512, SDXL @1024, an SD3-medium-class flow DiT @1024; random weights) x method
(dmd2; sid and tcd once `trainers.api.make_method` accepts them) x batch (1, 4) x design:

  shared_lora   one frozen bf16 base = teacher; student and critic are rank-64 LoRA adapters on it
  three_copies  frozen bf16 teacher + a full student copy + a full critic copy (fp32 master weights, AdamW),
                as DMD2's reference code keeps them (the engine's full_finetune=True)

it runs the real engine (`trainers.engine.Trainer`: bf16 autocast, gradient checkpointing, AdamW, clipping)
and reports it/s, samples/s, peak allocated memory, and model FLOPs utilization. FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode by replaying the timed iterations (same step numbers, same random
draws) after the timing; see benchmarks/README.md.

    python benchmarks/train_throughput.py                       # GPU: everything (fits the 10-min slots
    python benchmarks/train_throughput.py --archs sdxl --merge  #       better one arch at a time)
    python benchmarks/train_throughput.py --cpu-smoke           # tiny configs, 2 iterations each
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs  # noqa: E402
import report  # noqa: E402

from comfyui_distillery.trainers import api, registry  # noqa: E402
from comfyui_distillery.trainers.engine import TrainConfig, Trainer, TrainingDiverged  # noqa: E402

DESIGNS = {
    "shared_lora": "one frozen base (teacher) + LoRA adapters 'student' and 'critic'",
    "three_copies": "frozen teacher + full student copy + full critic copy",
}


# --- FLOP counting ----------------------------------------------------------------------------------------

def _cpu_flop_mapping() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernels; give it torch's own sdpa ones.

    (On CUDA, attention runs through flash / efficient / cuDNN kernels that the counter already knows.)
    """
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query, key, value)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP goes to the 'Global' total only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode (its formulas, its dispatch-level counting), totals only.

    The stock mode also tracks which module every FLOP belongs to, through hooks on every module call and
    every module output's gradient; that bookkeeping costs more than the tiny CPU models themselves, and
    only the total is used here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_flop_mapping())
    counter.mod_tracker = _GlobalOnly()
    return counter


def phase_cycle(method, probe: int = 64) -> list[str]:
    """The method's repeating pattern of iteration kinds, e.g. DMD2 (ratio 5): student+critic, critic x 4."""
    seq = ["+".join(method.phases(s)) for s in range(probe)]
    for period in range(1, probe // 2 + 1):
        if all(seq[i] == seq[i + period] for i in range(probe - period)):
            return seq[:period]
    return seq


# --- one measurement --------------------------------------------------------------------------------------

def method_options(arch: archs.Arch, name: str) -> dict:
    if name == "dmd2":
        return {"guidance_scale": arch.guidance}
    return {}


def available_methods(names) -> tuple[list[str], dict]:
    """The methods make_method accepts now; the others with the reason they are skipped."""
    ok, skipped = [], {}
    for name in names:
        try:
            api.make_method(name)
            ok.append(name)
        except ValueError as err:
            skipped[name] = f"skipped: trainers.api.make_method does not accept {name!r} yet ({err})"
        except TypeError as err:  # accepted but needs options we do not know how to give
            skipped[name] = f"skipped: make_method({name!r}) needs options this script does not set ({err})"
    return ok, skipped


def _make_method(arch, name):
    try:
        return api.make_method(name, **method_options(arch, name))
    except TypeError:
        return api.make_method(name)


def _free_memory(device: torch.device) -> None:
    """Between GPU runs: drop the last run's tensors (on the CPU smoke there is nothing worth the time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def fresh_accelerator_state() -> None:
    """Forget accelerate's process-wide mixed-precision setting.

    accelerate refuses a second `Accelerator` whose mixed_precision differs from the first one's in the
    same process; the engine makes one per Trainer. Reset before and after each run, so this script
    (bf16) and anything else in the process (e.g. other tests with mixed_precision='no') do not collide.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _gib(nbytes: float) -> float:
    return nbytes / 2 ** 30


def measure(arch: archs.Arch, method_name: str, batch: int, design: str, args, device: torch.device,
            peak_tflops: float | None) -> dict:
    cuda = device.type == "cuda"
    row = {"arch": arch.name, "label": arch.label, "resolution": arch.resolution,
           "latent_shape": list(arch.sample_shape), "method": method_name, "batch": batch, "design": design,
           "lora_rank": args.lora_rank if design == "shared_lora" else None, "mixed_precision": "bf16",
           "gradient_checkpointing": True, "status": "ok", "weights_gib": None, "peak_mem_gib": None,
           "peak_reserved_gib": None}
    net = task = trainer = method = None
    run_dir = tempfile.TemporaryDirectory(prefix="distillery-bench-")
    try:
        _free_memory(device)
        net = archs.build_network(arch, device, torch.bfloat16)
        task = archs.BenchTask(arch, net, device)
        method = _make_method(arch, method_name)
        cycle = phase_cycle(method)
        n_warm = args.warmup_cycles * len(cycle)
        n_timed = args.iterations or args.cycles * len(cycle)
        cfg = TrainConfig(steps=10 ** 9, batch_size=batch, mixed_precision="bf16", gradient_checkpointing=True,
                          full_finetune=design == "three_copies", lora_rank=args.lora_rank, checkpoint_every=0,
                          log_every=10 ** 9, preview_every=0, run_dir=run_dir.name, seed=args.seed)
        _free_memory(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        fresh_accelerator_state()
        trainer = Trainer(task, method, cfg, progress=False)
        adapter_ids = {id(q) for ps in trainer.roles.trainable.values() for q in ps}
        n_base = sum(p.numel() for p in net.parameters() if id(p) not in adapter_ids)
        n_trainable = {r: sum(p.numel() for p in ps) for r, ps in trainer.roles.trainable.items()}
        row.update(base_params=n_base, trainable_params=n_trainable, cycle=cycle,
                   warmup_iterations=n_warm, timed_iterations=n_timed)
        if cuda:
            row["weights_gib"] = _gib(torch.cuda.memory_allocated(device))  # before AdamW's lazy state

        trainer.train(until=trainer.step + n_warm)
        report.sync(device)
        start_step, rng = trainer.step, trainer.generator.get_state()
        kinds, seconds = [], []
        for _ in range(n_timed):
            kinds.append("+".join(method.phases(trainer.step)))
            report.sync(device)
            t0 = time.perf_counter()
            trainer.train(until=trainer.step + 1)
            report.sync(device)
            seconds.append(time.perf_counter() - t0)
        if cuda:
            row["peak_mem_gib"] = _gib(torch.cuda.max_memory_allocated(device))
            row["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved(device))

        # replay the timed iterations (same steps, same random draws: same backward-simulation depths) to
        # count exactly the FLOPs that were timed; FLOPs do not depend on the (since updated) weights
        trainer.step = start_step
        trainer.generator.set_state(rng)
        executed, recompute = [], []
        for _ in range(min(n_timed, args.count_iterations or n_timed)):
            with flop_counter() as counter:
                task.meter.reset(counter)
                trainer.train(until=trainer.step + 1)
            executed.append(counter.get_total_flops())
            recompute.append(task.meter.flops)
            task.meter.reset()
        row.update(_summarise(cycle, kinds, seconds, executed, recompute, batch, peak_tflops))
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except TrainingDiverged as err:
        row["status"] = "diverged"
        row["error"] = str(err).splitlines()[0]
    finally:
        if cuda and row["status"] == "OOM":
            row["peak_mem_gib"] = _gib(torch.cuda.max_memory_allocated(device))
        del net, task, trainer, method
        fresh_accelerator_state()
        _free_memory(device)
        run_dir.cleanup()
    return row


def _summarise(cycle, kinds, seconds, executed, recompute, batch, peak_tflops) -> dict:
    """Per-kind means, then the update-ratio-cycle average: sum_k w_k mean_k / sum_k w_k."""
    weights = {k: cycle.count(k) for k in dict.fromkeys(cycle)}
    by_kind = {}
    for kind in weights:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        cidx = [i for i in idx if i < len(executed)]
        ex = [executed[i] for i in cidx]
        rc = [recompute[i] for i in cidx]
        by_kind[kind] = {
            "iterations_timed": len(idx),
            "seconds_mean": sum(seconds[i] for i in idx) / len(idx),
            "iterations_counted": len(cidx),
            "executed_tflop": sum(ex) / len(ex) / 1e12 if ex else None,
            "recompute_tflop": sum(rc) / len(rc) / 1e12 if rc else None,
            "model_tflop": (sum(ex) - sum(rc)) / len(ex) / 1e12 if ex else None,
        }
    complete = all(k in by_kind for k in weights)
    if complete:  # the cycle average
        w = {k: weights[k] for k in by_kind}
    else:  # a run shorter than one cycle (smoke): plain mean over what was timed
        w = {k: by_kind[k]["iterations_timed"] for k in by_kind}
    total = sum(w.values())

    def avg(field):
        vals = [(w[k], by_kind[k][field]) for k in by_kind]
        if any(v is None for _, v in vals):
            return None
        return sum(wk * v for wk, v in vals) / total

    sec = avg("seconds_mean")
    it_s = 1.0 / sec if sec else None
    model_tflop, executed_tflop = avg("model_tflop"), avg("executed_tflop")
    out = {"by_kind": by_kind, "cycle_weights": weights, "cycle_complete": complete,
           "seconds_per_iteration": sec, "it_per_s": it_s, "samples_per_s": it_s * batch if it_s else None,
           "model_tflop_per_iteration": model_tflop, "executed_tflop_per_iteration": executed_tflop,
           "model_tflops_achieved": model_tflop * it_s if it_s and model_tflop is not None else None}
    if peak_tflops and out["model_tflops_achieved"] is not None:
        out["mfu"] = out["model_tflops_achieved"] / peak_tflops
        out["hfu"] = executed_tflop * it_s / peak_tflops
    else:
        out["mfu"] = out["hfu"] = None
    return out


# --- driver -----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny configs, 2 iterations each, on the CPU: checks the script works")
    p.add_argument("--archs", default="sd15,sdxl,sd3m", help="comma list of sd15, sdxl, sd3m")
    p.add_argument("--methods", default=",".join(registry.method_names()),
                   help="comma list; unknown methods are skipped")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--lora-rank", type=int, default=None, help="default 64 (8 with --cpu-smoke)")
    p.add_argument("--warmup-cycles", type=int, default=None,
                   help="untimed update-ratio cycles first (default 1; 0 with --cpu-smoke)")
    p.add_argument("--cycles", type=int, default=2, help="timed update-ratio cycles (default 2)")
    p.add_argument("--iterations", type=int, default=None,
                   help="timed iterations instead of whole cycles (default: --cycles; 2 with --cpu-smoke)")
    p.add_argument("--count-iterations", type=int, default=None,
                   help="replay only the first N timed iterations for FLOP counting (default: all)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, for GPUs not in the table")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 with --cpu-smoke: tiny ops on a busy machine run far "
                        "faster single-threaded than with OpenMP threads spinning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(report.RESULTS_DIR))
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an earlier run on this machine that this run does not re-measure")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.lora_rank is None:
        args.lora_rank = 8 if args.cpu_smoke else 64
    if args.warmup_cycles is None:
        args.warmup_cycles = 0 if args.cpu_smoke else 1
    if args.iterations is None and args.cpu_smoke:
        args.iterations = 2
    return args


COLUMNS = [("arch", "arch", ""), ("method", "method", ""), ("design", "design", ""), ("batch", "batch", "d"),
           ("status", "status", ""), ("it_per_s", "it/s", ".3g"), ("samples_per_s", "samples/s", ".3g"),
           ("peak_mem_gib", "peak GiB", ".3g"), ("model_tflop_per_iteration", "TFLOP/it", ".3g"),
           ("mfu_pct", "MFU %", ".3g"), ("hfu_pct", "HFU %", ".3g")]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    return report.run_with_threads(parse_args(argv), _main, argv)


def _main(args, argv) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    info = report.device_info() if cuda else {**report.device_info(), "device": "cpu"}
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no GPU: the full-size benchmark needs one; use --cpu-smoke to check the script on CPU")
    peak, peak_source = report.bf16_peak_tflops(info["name"] if cuda else None, args.peak_tflops)
    arch_list = archs.get_archs([a for a in args.archs.split(",") if a], tiny=args.cpu_smoke)
    if not args.cpu_smoke:
        archs.check_param_counts(arch_list)
    methods, skipped = available_methods([m for m in args.methods.split(",") if m])
    designs = [d for d in args.designs.split(",") if d]
    for d in designs:
        if d not in DESIGNS:
            raise SystemExit(f"--designs: {d!r} is not one of {', '.join(DESIGNS)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    for name, note in skipped.items():
        print(f"[{name}] {note}", flush=True)

    rows = []
    for arch in arch_list:
        for method in methods:
            for batch in batches:
                for design in designs:
                    t0 = time.perf_counter()
                    row = measure(arch, method, batch, design, args, device, peak)
                    row["wall_s"] = time.perf_counter() - t0
                    for k in ("mfu", "hfu"):
                        row[f"{k}_pct"] = 100 * row[k] if row.get(k) is not None else None
                    rows.append(row)
                    print(f"{arch.name:10s} {method:5s} {design:12s} b{batch}: {row['status']:8s} "
                          f"it/s={report.fmt(row.get('it_per_s'))} peak={report.fmt(row.get('peak_mem_gib'))} GiB "
                          f"MFU={report.fmt(row.get('mfu_pct'))}% ({row['wall_s']:.1f} s)", flush=True)

    tag = report.machine_tag(info, args.cpu_smoke)
    out_dir = Path(args.out)
    json_path = out_dir / f"train_throughput_{tag}.json"
    if args.merge and json_path.exists():
        import json

        old = json.loads(json_path.read_text()).get("rows", [])
        keys = {(r["arch"], r["method"], r["batch"], r["design"]) for r in rows}
        rows = [r for r in old if (r["arch"], r["method"], r["batch"], r["design"]) not in keys] + rows
    payload = {**report.header("benchmarks/train_throughput.py", argv), "machine": info, "tag": tag,
               "smoke": args.cpu_smoke, "bf16_peak_tflops": peak, "peak_source": peak_source,
               "designs": DESIGNS, "skipped_methods": skipped,
               "settings": {"lora_rank": args.lora_rank, "mixed_precision": "bf16", "gradient_checkpointing": True,
                            "warmup_cycles": args.warmup_cycles, "cycles": args.cycles,
                            "iterations": args.iterations, "seed": args.seed},
               "rows": rows}
    payload["json"] = str(report.write_json(json_path, payload))
    text = report.table(rows, COLUMNS)
    print("\n" + text)
    print(f"\nmachine: {info['name']}; bf16 peak: {report.fmt(peak)} TFLOP/s ({peak_source})")
    if not args.no_plot:
        labels = [f"{r['arch']} {r['method']} b{r['batch']} {'LoRA' if r['design'] == 'shared_lora' else '3 copies'}"
                  for r in rows]
        mem = [r.get("peak_mem_gib") if r["status"] == "ok" else r["status"] for r in rows]
        its = [r.get("it_per_s") if r["status"] == "ok" else r["status"] for r in rows]
        panels = [("peak GiB", mem)] if any(v is not None for v in mem) else []  # none measured on a CPU
        panels.append(("it/s", its))
        if any(r.get("mfu_pct") is not None for r in rows):
            panels.append(("MFU %", [r.get("mfu_pct") if r["status"] == "ok" else r["status"] for r in rows]))
        png = report.bar_plot(out_dir / f"train_throughput_{tag}.png",
                              f"training throughput and memory, {info['name']} (bf16, grad ckpt)", labels, panels)
        payload["png"] = str(png)
    payload["table"] = text
    return payload


if __name__ == "__main__":
    main()
