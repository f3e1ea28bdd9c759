"""Plots without new dependencies: PNG through matplotlib's object API when it is importable, else
hand-written SVG (the MLflow UI shows both).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, List, Mapping, Sequence, Tuple
from xml.sax.saxutils import escape

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _image_format(file: str, image_format: str) -> str:
    ext = os.path.splitext(file)[1].lower().lstrip(".")
    fmt = image_format if image_format != "auto" else (ext if ext in ("png", "svg") else "auto")
    if fmt == "png" and not _have_matplotlib():
        fmt = "svg"
    if fmt == "auto":
        fmt = "png" if _have_matplotlib() else "svg"
    if fmt not in ("png", "svg"):
        raise ValueError(f"image_format must be 'auto', 'png' or 'svg', got {image_format!r}")
    return fmt


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _clean_series(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    pts = [(float(s), float(v)) for s, v in points]
    return sorted((s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v))


def svg_curves(history: Mapping[str, Sequence[Tuple[float, float]]], width: int = 640, panel_height: int = 170) -> str:
    """One small line chart per metric, stacked (metrics keep their own y scale)."""
    left, right, top, bottom = 64, 16, 24, 26
    names = list(history)
    height = max(1, len(names)) * panel_height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for i, name in enumerate(names):
        pts = _clean_series(history[name])
        y0 = i * panel_height
        pw, ph = width - left - right, panel_height - top - bottom
        last = f" (last {_fmt(pts[-1][1])})" if pts else " (no finite values)"
        parts.append(f'<text x="{left}" y="{y0 + 15}" font-weight="bold">{escape(name)}{escape(last)}</text>')
        parts.append(
            f'<rect x="{left}" y="{y0 + top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
        )
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1.0
        if ymax == ymin:
            pad = abs(ymin) * 0.05 or 0.5
            ymin, ymax = ymin - pad, ymax + pad

        def sx(x: float) -> float:
            return left + (x - xmin) / (xmax - xmin) * pw

        def sy(y: float) -> float:
            return y0 + top + (1.0 - (y - ymin) / (ymax - ymin)) * ph

        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(xs[0]):.1f}" cy="{sy(ys[0]):.1f}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.append(f'<text x="{left - 4}" y="{y0 + top + 4}" text-anchor="end">{_fmt(ymax)}</text>')
        parts.append(f'<text x="{left - 4}" y="{y0 + top + ph}" text-anchor="end">{_fmt(ymin)}</text>')
        parts.append(f'<text x="{left}" y="{y0 + top + ph + 14}">{_fmt(xmin)}</text>')
        parts.append(f'<text x="{left + pw}" y="{y0 + top + ph + 14}" text-anchor="end">step {_fmt(max(xs))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str = "confusion matrix") -> str:
    """Confusion-matrix heat map: rows = true class, columns = predicted; shade = row fraction."""
    n = len(labels)
    cell = max(6, min(40, 560 // max(n, 1)))
    margin = 16 + 7 * max((min(len(str(label)), 18) for label in labels), default=1)
    top = margin + 24
    width, height = margin + n * cell + 16, top + n * cell + 16
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="4" y="14" font-weight="bold">{escape(title)} (rows: true, columns: predicted)</text>',
    ]
    for r in range(n):
        total = float(sum(matrix[r])) or 1.0
        y = top + r * cell
        parts.append(f'<text x="{margin - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{escape(str(labels[r])[:18])}</text>')
        for c in range(n):
            frac = float(matrix[r][c]) / total
            shade = int(round(255 * (1.0 - frac)))
            x = margin + c * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},255)" stroke="#ddd">'
                f"<title>{escape(str(labels[r]))} -> {escape(str(labels[c]))}: {_fmt(float(matrix[r][c]))}</title></rect>"
            )
            if n <= 20 and cell >= 18:
                ink = "white" if frac > 0.5 else "black"
                parts.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" fill="{ink}">'
                    f"{_fmt(float(matrix[r][c]))}</text>"
                )
    for c in range(n):
        x = margin + c * cell + cell / 2 + 4
        parts.append(
            f'<text x="{x:.1f}" y="{top - 4}" transform="rotate(-90 {x:.1f} {top - 4})">{escape(str(labels[c])[:18])}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _png_curves(history: Mapping[str, Sequence[Tuple[float, float]]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(history) or ["(empty)"]
    fig = Figure(figsize=(6.4, 1.8 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        pts = _clean_series(history.get(name, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_COLORS[i % len(_COLORS)], marker="." if len(pts) == 1 else None)
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _png_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str]) -> bytes:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=float)
    frac = m / np.clip(m.sum(axis=1, keepdims=True), 1e-12, None)
    n = len(labels)
    size = min(12.0, 2.0 + 0.45 * n)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), [str(label) for label in labels], rotation=90, fontsize=8)
    ax.set_yticks(range(n), [str(label) for label in labels], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for r in range(n):
            for c in range(n):
                ax.text(c, r, _fmt(m[r, c]), ha="center", va="center", fontsize=7, color="white" if frac[r, c] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()




# --------------------------------------------------------------------------------------------------
# Scatter panels: a metric against each swept parameter (one point per trial)
# --------------------------------------------------------------------------------------------------

ScatterPoint = Tuple[Any, float, str]  # (x: number or category, y, group such as "completed")


def _scatter_axis(points: Sequence[ScatterPoint], log_x: bool) -> Tuple[List[float], List[str], bool]:
    """x positions, tick labels for categorical x (empty when numeric), and whether x is log."""
    numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for p in points)
    if numeric:
        xs = [float(p[0]) for p in points]
        use_log = log_x and all(x > 0 for x in xs)
        return ([math.log10(x) for x in xs] if use_log else xs), [], use_log
    cats: List[str] = []
    for p in points:
        if str(p[0]) not in cats:
            cats.append(str(p[0]))
    return [float(cats.index(str(p[0]))) for p in points], cats, False


def svg_scatter(panels: Mapping[str, Sequence[ScatterPoint]], y_label: str, log_x: Sequence[str] = (),
                width: int = 640, panel_height: int = 190) -> str:
    """One scatter panel per parameter: ``y_label`` against the parameter, colour = group."""
    left, right, top, bottom = 64, 16, 24, 30
    names = list(panels)
    groups = sorted({g for pts in panels.values() for _, _, g in pts})
    height = max(1, len(names)) * panel_height + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for gi, g in enumerate(groups):
        parts.append(f'<circle cx="{left + gi * 130}" cy="10" r="4" fill="{_COLORS[gi % len(_COLORS)]}"/>'
                     f'<text x="{left + gi * 130 + 8}" y="14">{escape(g)}</text>')
    for i, name in enumerate(names):
        pts = [p for p in panels[name] if isinstance(p[1], (int, float)) and math.isfinite(float(p[1]))]
        y0 = 20 + i * panel_height
        pw, ph = width - left - right, panel_height - top - bottom
        xs, cats, is_log = _scatter_axis(pts, name in log_x) if pts else ([], [], False)
        title = f"{y_label} vs {name}" + (" (log x)" if is_log else "")
        parts.append(f'<text x="{left}" y="{y0 + 15}" font-weight="bold">{escape(title)}</text>')
        parts.append(f'<rect x="{left}" y="{y0 + top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        if not pts:
            continue
        ys = [float(p[1]) for p in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if cats:
            xmin, xmax = -0.5, len(cats) - 0.5
        if xmax == xmin:
            xmin, xmax = xmin - 0.5, xmax + 0.5
        if ymax == ymin:
            pad = abs(ymin) * 0.05 or 0.5
            ymin, ymax = ymin - pad, ymax + pad
        sx = lambda x: left + (x - xmin) / (xmax - xmin) * pw  # noqa: E731
        sy = lambda y: y0 + top + (1.0 - (y - ymin) / (ymax - ymin)) * ph  # noqa: E731
        for x, y, (raw, _, g) in zip(xs, ys, pts):
            color = _COLORS[groups.index(g) % len(_COLORS)]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}" fill-opacity="0.8">'
                         f"<title>{escape(str(raw))}: {_fmt(y)} ({escape(g)})</title></circle>")
        parts.append(f'<text x="{left - 4}" y="{y0 + top + 4}" text-anchor="end">{_fmt(ymax)}</text>')
        parts.append(f'<text x="{left - 4}" y="{y0 + top + ph}" text-anchor="end">{_fmt(ymin)}</text>')
        if cats:
            for ci, c in enumerate(cats):
                parts.append(f'<text x="{sx(ci):.1f}" y="{y0 + top + ph + 14}" text-anchor="middle">{escape(c[:16])}</text>')
        else:
            lo, hi = (10 ** xmin, 10 ** xmax) if is_log else (xmin, xmax)
            parts.append(f'<text x="{left}" y="{y0 + top + ph + 14}">{_fmt(lo)}</text>')
            parts.append(f'<text x="{left + pw}" y="{y0 + top + ph + 14}" text-anchor="end">{_fmt(hi)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _png_scatter(panels: Mapping[str, Sequence[ScatterPoint]], y_label: str, log_x: Sequence[str] = ()) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(panels) or ["(empty)"]
    groups = sorted({g for pts in panels.values() for _, _, g in pts})
    fig = Figure(figsize=(6.4, 2.2 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        pts = [p for p in panels.get(name, []) if isinstance(p[1], (int, float)) and math.isfinite(float(p[1]))]
        if pts:
            xs, cats, is_log = _scatter_axis(pts, name in log_x)
            if is_log:
                xs = [10 ** x for x in xs]
                ax.set_xscale("log")
            for gi, g in enumerate(groups):
                sel = [(x, float(p[1])) for x, p in zip(xs, pts) if p[2] == g]
                if sel:
                    ax.scatter([a for a, _ in sel], [b for _, b in sel], color=_COLORS[gi % len(_COLORS)], label=g, s=18)
            if cats:
                ax.set_xticks(range(len(cats)), [c[:16] for c in cats], fontsize=8)
            if i == 0:
                ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{y_label} vs {name}", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _matrix_rows(matrix: Any) -> List[List[float]]:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu()
    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    return [[float(v) for v in row] for row in matrix]


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


