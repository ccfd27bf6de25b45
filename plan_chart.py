"""A VRAM plan as a picture: one stacked bar per iteration kind (what is alive at its peak), the card's
memory as a line. Drawn with PIL only, for the ComfyUI plan node and `distillery plan --png`."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

GIB = 2 ** 30
COLORS = {"frozen weights": (96, 125, 139), "trainable weights": (66, 165, 245), "optimizer state": (171, 71, 188),
          "gradients": (239, 83, 80), "activations": (255, 167, 38), "temporaries": (255, 238, 88),
          "data": (102, 187, 106)}
FITS, DOES_NOT_FIT = (0, 230, 118), (255, 23, 68)  # the card's line


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def render(plan: dict, vram_bytes: int | None = None, width: int = 960) -> Image.Image:
    """`plan`: Plan.to_json(); `vram_bytes`: the card's memory (None: no line)."""
    iterations = plan["iterations"]
    top = max([it["peak_bytes"] for it in iterations] + [vram_bytes or 0])
    scale_max = top * 1.08 or 1
    left, right, bar_h, gap, head = 210, 40, 56, 26, 70
    height = head + len(iterations) * (bar_h + gap) + 120
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)
    title, small = _font(20), _font(14)
    span = width - left - right

    def x_of(nbytes):
        return left + span * nbytes / scale_max

    fits = vram_bytes is None or max(it["peak_bytes"] for it in iterations) <= vram_bytes
    verdict = "" if vram_bytes is None else (" - fits" if fits else " - does NOT fit")
    draw.text((16, 12), f"{plan['arch']} @ {plan['resolution']}px, {plan['method']}: peak "
                        f"{plan['peak_bytes'] / GIB:.3g} GiB{verdict}", fill=(240, 240, 240), font=title)
    draw.text((16, 40), f"planned for {plan['device']} on fake tensors; at {plan['peak_at']}",
              fill=(170, 170, 170), font=small)
    name, unit = ("GiB", GIB) if top >= GIB else ("MiB", 2 ** 20)
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if scale_max / unit / s <= 10)
    for tick in range(0, int(scale_max / unit) + 1, step):
        x = x_of(tick * unit)
        draw.line([(x, head), (x, height - 110)], fill=(55, 55, 62))
        draw.text((x - 6, height - 106), f"{tick}", fill=(150, 150, 150), font=small)
    draw.text((left + span / 2 - 20, height - 88), name, fill=(150, 150, 150), font=small)
    for i, it in enumerate(iterations):
        y = head + i * (bar_h + gap)
        draw.text((16, y + bar_h / 2 - 16), "+".join(it["phases"]) + " iteration", fill=(230, 230, 230), font=small)
        draw.text((16, y + bar_h / 2 + 2), it["peak_stage"][:26], fill=(150, 150, 150), font=small)
        x = left
        for category, color in COLORS.items():
            nbytes = it["breakdown"].get(category, 0)
            if nbytes <= 0:
                continue
            x_end = x_of(sum(it["breakdown"].get(c, 0) for c in list(COLORS)[:list(COLORS).index(category) + 1]))
            draw.rectangle([x, y, max(x, x_end - 1), y + bar_h], fill=color)
            x = x_end
        draw.text((x + 6, y + bar_h / 2 - 8), f"{it['peak_bytes'] / unit:.2f} {name}", fill=(240, 240, 240),
                  font=small)
    if vram_bytes:
        x = x_of(vram_bytes)
        draw.line([(x, head - 8), (x, height - 110)], fill=FITS if fits else DOES_NOT_FIT, width=3)
        draw.text((x + 4, head - 22), f"card {vram_bytes / unit:.3g} {name}", fill=(240, 240, 240), font=small)
    lx, ly = 16, height - 62
    for category, color in COLORS.items():
        draw.rectangle([lx, ly, lx + 14, ly + 14], fill=color)
        draw.text((lx + 20, ly - 1), category, fill=(210, 210, 210), font=small)
        lx += 30 + int(draw.textlength(category, font=small))
        if lx > width - 150:
            lx, ly = 16, ly + 24
    return image
