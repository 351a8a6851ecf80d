"""The speed-quality plot of ``vgen bench speculative`` and ``vgen bench video --sdvg`` reports, drawn with PIL (no
plotting library needed).

One panel per quality metric, side by side (default: Shapes-GenEval, higher is better, and Shapes-FID, lower is
better; ``metrics`` names others, e.g. the video benchmark's caption adherence and per-frame Shapes-FID), against the
wall-time speedup over target-only sampling at the report's smallest batch size. Each report (one method and its
sweep) is one coloured polyline through its settings, labelled with the swept value; target-only is the black point
at speedup 1 and draft-only (when the report has it) the grey point off the line. Without quality numbers the panels
show target forwards per image instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from vgen.imaging import load_font

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
#: settings drawn as lone points in their own colour, not on the report's line
ANCHORS = {"target-only": (0, 0, 0), "draft-only": (120, 120, 120)}
#: the panels of a speculative report: (quality key, title)
IMAGE_METRICS = (("geneval", "Shapes-GenEval (higher is better)"), ("fid", "Shapes-FID (lower is better)"))
PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, MARGIN_T, MARGIN_R = 460, 360, 62, 48, 34, 18


def _points(report: dict, metric: str) -> list[tuple[str, float, float]]:
    """``(label, speedup, metric)`` per setting at the report's smallest batch size."""
    speed = report["speed"]
    smallest = min(row["batch_size"] for row in speed)
    speedup = {row["setting"]: row["speedup"] for row in speed if row["batch_size"] == smallest}
    if "quality" in report:
        values = {row["setting"]: row[metric] for row in report["quality"]}
    else:
        values = {row["setting"]: row["target_forwards_per_image"] for row in speed if row["batch_size"] == smallest}
    return [(label, speedup[label], values[label]) for label in speedup if values.get(label) is not None]


def _nice_range(values: Sequence[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = (hi - lo) or max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, series: list[tuple[str, list]], font, small) -> None:
    xs = [p[1] for _, pts in series for p in pts] + [1.0]
    ys = [p[2] for _, pts in series for p in pts]
    (xlo, xhi), (ylo, yhi) = _nice_range(xs), _nice_range(ys)
    left, top = x0 + MARGIN_L, MARGIN_T
    right, bottom = x0 + PANEL_W - MARGIN_R, PANEL_H - MARGIN_B

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for i in range(5):
        xv, yv = xlo + (xhi - xlo) * i / 4, ylo + (yhi - ylo) * i / 4
        gx, gy = px(xv, yv)
        draw.line([gx, bottom, gx, bottom + 4], fill=(0, 0, 0))
        draw.text((gx - 14, bottom + 6), f"{xv:.2f}", fill=(0, 0, 0), font=small)
        draw.line([left - 4, gy, left, gy], fill=(0, 0, 0))
        draw.text((x0 + 4, gy - 6), f"{yv:.3g}", fill=(0, 0, 0), font=small)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    draw.text((left + (right - left) / 2 - 90, PANEL_H - 20), "wall-time speedup vs target-only", fill=(0, 0, 0),
              font=small)
    for colour, (name, pts) in zip(COLOURS, series):
        line = [px(x, y) for label, x, y in pts if label not in ANCHORS]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for label, x, y in pts:
            cx, cy = px(x, y)
            fill = ANCHORS.get(label, colour)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=fill)
            text = label if label in ANCHORS else label.split(" ", 1)[-1]
            width = draw.textlength(text, font=small)
            # right of the point, or left of it where the label would cross the frame
            tx = cx + 6 if cx + 6 + width <= right else cx - 6 - width
            draw.text((tx, cy - 12), text, fill=fill, font=small)


def plot_speed_quality(reports: dict | Sequence[dict], path: str | Path,
                       metrics: Sequence[tuple[str, str]] = IMAGE_METRICS) -> Path:
    """Draw the plot of one report or several (one line each) into ``path`` (PNG); ``metrics``: one panel per
    ``(key of the quality rows, title)``."""
    reports = [reports] if isinstance(reports, dict) else list(reports)
    has_quality = all("quality" in r for r in reports)
    metrics = list(metrics) if has_quality else [("target_forwards_per_image", "target forwards per image")]
    font, small = load_font(14), load_font(11)
    image = Image.new("RGB", (PANEL_W * len(metrics), PANEL_H + 24 * ((len(reports) + 1) // 2) + 10), "white")
    draw = ImageDraw.Draw(image)
    for i, (metric, title) in enumerate(metrics):
        series = [(r["method"], _points(r, metric)) for r in reports]
        _panel(draw, i * PANEL_W, title, series, font, small)
    for j, (colour, report) in enumerate(zip(COLOURS, reports)):
        smallest = min(row["batch_size"] for row in report["speed"])
        legend = f"{report['method']}" + (f" (drafter {Path(report['drafter']).name})" if report.get("drafter") else
                                          f" (drafter: the model in {report['draft_steps']} steps)"
                                          if report.get("draft_steps") else "")
        x, y = 12 + (j % 2) * PANEL_W, PANEL_H + 6 + 24 * (j // 2)
        draw.rectangle([x, y + 3, x + 14, y + 13], fill=colour)
        draw.text((x + 20, y), f"{legend}, speed at batch {smallest}", fill=(0, 0, 0), font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
