"""Dependency-free pictures (PIL only): scatter plots of 2-D samples and line plots of losses."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def scatter_png(path, panels, size: int = 320, extent: float = 3.2) -> Path:
    """Side-by-side scatter panels [(title, points [N, 2], labels [N])], colored by label."""
    img = Image.new("RGB", (size * len(panels), size + 18), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, pts, labels) in enumerate(panels):
        ox = p * size
        draw.rectangle([ox, 18, ox + size - 1, size + 17], outline=(200, 200, 200))
        draw.text((ox + 6, 3), str(title), fill=(0, 0, 0))
        pts = torch.as_tensor(pts).detach().float().cpu()[:, :2]
        labels = torch.as_tensor(labels).cpu()
        for (x, y), c in zip(pts.tolist(), labels.tolist()):
            px = ox + (x / extent * 0.5 + 0.5) * size
            py = 18 + (0.5 - y / extent * 0.5) * size
            if ox <= px < ox + size and 18 <= py < size + 18:
                draw.point([(px, py)], fill=PALETTE[int(c) % len(PALETTE)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def line_plot_png(path, series: dict, title: str = "", size=(640, 320), log_y: bool = False) -> Path:
    """Simple multi-series line plot {name: [(x, y), ...]}."""
    import math

    w, h = size
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    pts_all = [(x, y) for s in series.values() for x, y in s if y == y and abs(y) != float("inf")]
    if not pts_all:
        img.save(path)
        return Path(path)
    tf = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xs = [x for x, _ in pts_all]
    ys = [tf(y) for _, y in pts_all]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    m = 40
    draw.rectangle([m, 20, w - 10, h - m], outline=(180, 180, 180))
    draw.text((m, 4), title, fill=(0, 0, 0))
    draw.text((4, 20), f"{y1:.3g}", fill=(90, 90, 90))
    draw.text((4, h - m - 10), f"{y0:.3g}", fill=(90, 90, 90))
    draw.text((m, h - m + 4), f"{x0:.3g}", fill=(90, 90, 90))
    draw.text((w - 60, h - m + 4), f"{x1:.3g}", fill=(90, 90, 90))
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = [(m + (x - x0) / (x1 - x0) * (w - 10 - m), h - m - (tf(y) - y0) / (y1 - y0) * (h - m - 20))
                  for x, y in s if y == y and abs(y) != float("inf")]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        draw.text((w - 150, 24 + 12 * i), name, fill=color)
    img.save(path)
    return Path(path)


def scatter_decoder(size: int = 96, extent: float = 3.2, labels: torch.Tensor | None = None):
    """A ``decode`` for sampling.diffusion_targets.dt_grid on 2-D point clouds (the Gaussian-mixture world):
    the whole batch as one scatter plot [1, size, size, 3] in [0, 1], colored by label."""

    def decode(x0: torch.Tensor) -> torch.Tensor:
        pts = x0.detach().to("cpu", torch.float32)[:, :2]
        img = torch.ones(size, size, 3)
        px = ((pts[:, 0] / extent * 0.5 + 0.5) * size).long()
        py = ((0.5 - pts[:, 1] / extent * 0.5) * size).long()
        keep = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        colors = torch.tensor(PALETTE, dtype=torch.float32) / 255.0
        lab = labels[: len(pts)] if labels is not None else torch.zeros(len(pts), dtype=torch.long)
        img[py[keep], px[keep]] = colors[lab[keep].long() % len(colors)]
        return img[None]
    return decode
