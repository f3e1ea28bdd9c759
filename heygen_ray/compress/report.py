"""The compression report: one row per variant, a markdown table, an accuracy-vs-latency plot (SVG),
and the quality gate. Pure Python: no torch, ray or mlflow."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

COLUMNS = ("variant", "quality", "quality_delta", "params", "size_bytes", "flops_per_sample",
           "p50_ms_bs1", "p95_ms_bs1", "p50_ms_bs8", "p95_ms_bs8", "throughput_bs8",
           "speedup_bs1_vs_fp32", "speedup_bs1_vs_bf16", "passes_gate")


def apply_gate(rows: List[Dict[str, Any]], *, teacher: str, metric: str, max_drop: float, mode: str = "max") -> None:
    """In place: ``quality``/``quality_delta`` (variant minus teacher, in the metric's units; for a
    "min" metric the sign is flipped so a positive delta is always better) and ``passes_gate``
    (the drop is at most ``max_drop``). The teachers themselves are the reference: not gated."""
    ref = next(r for r in rows if r["variant"] == teacher)["metrics"][metric]
    for r in rows:
        q = r["metrics"][metric]
        delta = (q - ref) if mode == "max" else (ref - q)
        r["quality"], r["quality_delta"] = q, delta
        r["passes_gate"] = bool(delta >= -max_drop - 1e-12)


def pick_alias(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> Optional[str]:
    """The fastest (p50 at batch 1) candidate variant that passes the gate, or None."""
    ok = [r for r in rows if r["variant"] in candidates and r.get("passes_gate")]
    return min(ok, key=lambda r: r["p50_ms_bs1"])["variant"] if ok else None


def add_speedups(rows: List[Dict[str, Any]], fp32: str, bf16: Optional[str]) -> None:
    """Speedups of every row against the fp32 (and, when measured, the bf16) teacher; the bf16 ones
    are None without a bf16 row."""
    ref = {r["variant"]: r for r in rows}
    for r in rows:
        for bs in (1, 8):
            key = f"p50_ms_bs{bs}"
            r[f"speedup_bs{bs}_vs_fp32"] = ref[fp32][key] / r[key]
            r[f"speedup_bs{bs}_vs_bf16"] = ref[bf16][key] / r[key] if bf16 else None


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    head = [c if c != "quality" else metric for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def svg_scatter(rows: Sequence[Mapping[str, Any]], metric: str, x_key: str = "p50_ms_bs1",
                width: int = 560, height: int = 380) -> str:
    """Quality (y) against latency (x), one labelled point per variant."""
    pts = [(float(r[x_key]), float(r["quality"]), str(r["variant"])) for r in rows]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.1
    y0, y1 = y0 - pad, y1 + pad
    L, R, T, B = 60, 20, 20, 45

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * (width - L - R)

    def sy(y: float) -> float:
        return height - B - (y - y0) / (y1 - y0) * (height - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="black"/>',
           f'<text x="{(width + L) / 2}" y="{height - 10}" text-anchor="middle">latency p50, batch 1 (ms)</text>',
           f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{metric}</text>',
           f'<text x="{L - 4}" y="{sy(y1) + 4:.1f}" text-anchor="end">{y1:.3g}</text>',
           f'<text x="{L - 4}" y="{sy(y0) + 4:.1f}" text-anchor="end">{y0:.3g}</text>',
           f'<text x="{width - R}" y="{height - B + 14}" text-anchor="end">{x1:.3g}</text>']
    for x, y, name in pts:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="steelblue"/>')
        out.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
