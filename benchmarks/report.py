"""Shared by the benchmark scripts: the machine, the GPU's bf16 peak, tables, JSON and bar plots."""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks (TFLOP/s, no structured sparsity), from the vendors' datasheets.
# Matched in order against torch.cuda.get_device_name(); the first hit wins.
GPU_BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
    ("RTX 4090", 165.0),
]


def bf16_peak_tflops(device_name: str | None, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from). `override` (--peak-tflops) wins; unknown GPUs give None."""
    if override:
        return float(override), "--peak-tflops"
    if not device_name:
        return None, "no GPU"
    for key, peak in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak, f"table entry '{key}'"
    return None, f"'{device_name}' is not in the table: pass --peak-tflops"


def device_info() -> dict:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": torch.cuda.get_device_name(0),
                "memory_gib": round(props.total_memory / 2 ** 30, 1), "capability": [props.major, props.minor],
                "torch": torch.__version__, "cuda": torch.version.cuda}
    return {"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def machine_tag(info: dict, smoke: bool) -> str:
    name = info["name"] if info["device"] == "cuda" else f"cpu-{platform.machine()}"
    tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    return f"{tag}-smoke" if smoke else tag


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_with_threads(args, body, argv):
    """body(args, argv) with torch's CPU threads set to --threads (1 for --cpu-smoke), restored after: a
    CPU smoke run beside other work stays on one core, and a caller in the same process keeps its count."""
    threads = torch.get_num_threads()
    if args.threads or args.cpu_smoke:
        torch.set_num_threads(args.threads or 1)
    try:
        return body(args, argv)
    finally:
        torch.set_num_threads(threads)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(obj):
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def header(script: str, argv) -> dict:
    return {"script": script, "argv": list(argv), "python": sys.version.split()[0],
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; columns are (key, title, format spec)."""
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), spec) for k, _, spec in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# --- plots ------------------------------------------------------------------------------------------------

def bar_plot(path: Path, title: str, labels: list[str], panels: list[tuple[str, list]]) -> Path:
    """One bar panel per (y label, values); a value that is a string (e.g. "OOM") is drawn as a marker.

    matplotlib when it is installed (it is not a dependency of the package), else a plain PIL drawing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _bar_plot_pil(path, title, labels, panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.55 * len(labels) + 2), 3.2 * len(panels)),
                             squeeze=False)
    xs = list(range(len(labels)))
    for ax, (ylabel, values) in zip(axes[:, 0], panels):
        nums = [v if isinstance(v, (int, float)) and v is not None else 0.0 for v in values]
        bars = ax.bar(xs, nums, color="#4C72B0")
        top = max(nums) if any(nums) else 1.0
        for x, v, b in zip(xs, values, bars):
            if isinstance(v, str) or v is None:
                ax.text(x, top * 0.02, v or "-", ha="center", va="bottom", color="#C44E52", rotation=90, fontsize=8)
            else:
                ax.text(x, v, fmt(v), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_plot_pil(path: Path, title: str, labels: list[str], panels: list[tuple[str, list]]) -> Path:
    from PIL import Image, ImageDraw

    bar_w, gap, panel_h, left, label_h = 26, 10, 220, 70, 150
    width = left + len(labels) * (bar_w + gap) + 40
    height = 30 + len(panels) * (panel_h + 30) + label_h
    img = Image.new("RGB", (max(width, 420), height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for i, (ylabel, values) in enumerate(panels):
        top = 30 + i * (panel_h + 30) + 15
        base = top + panel_h
        nums = [v if isinstance(v, (int, float)) and v is not None else 0.0 for v in values]
        vmax = max(nums) if any(nums) else 1.0
        draw.line((left - 5, top, left - 5, base), fill="black")
        draw.line((left - 5, base, width - 20, base), fill="black")
        draw.text((5, top), ylabel[:11], fill="black")
        draw.text((5, top + 14), fmt(vmax), fill="gray")
        for j, v in enumerate(values):
            x0 = left + j * (bar_w + gap)
            if isinstance(v, (int, float)) and v is not None:
                h = int((panel_h - 12) * v / vmax)
                draw.rectangle((x0, base - h, x0 + bar_w, base), fill=(76, 114, 176))
                draw.text((x0, base - h - 11), fmt(v, ".2g"), fill="black")
            else:
                draw.text((x0, base - 12), str(v or "-")[:4], fill=(196, 78, 82))
    y = 30 + len(panels) * (panel_h + 30)
    for j, label in enumerate(labels):  # vertical labels: one character per line is unreadable; write lines
        x0 = left + j * (bar_w + gap)
        txt = Image.new("RGB", (label_h, 12), "white")
        ImageDraw.Draw(txt).text((0, 0), label[:26], fill="black")
        img.paste(txt.rotate(90, expand=True), (x0 + 6, y))
    img.save(path)
    return path
