"""The overview's per-tenant chart, drawn on the server as inline SVG (no script, no image
request): received, delivered and failed per 5 minutes over the last day
(``overview.BUCKET_MINUTES``), so "acme stopped delivering at 02:14" shows as a green line
that drops to zero while grey goes on."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup, escape

from rilla_bridge.history.overview import BUCKET_MINUTES

WIDTH, HEIGHT, PAD = 720, 120, 18
SERIES = (("received", "#8a8f98"), ("delivered", "#1f9d55"), ("failed", "#d93025"))
BUCKET = BUCKET_MINUTES


def _points(values: list[int], top: int) -> str:
    n = len(values)
    out = []
    for i, v in enumerate(values):
        x = PAD + (WIDTH - 2 * PAD) * i / max(1, n - 1)
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * v / top
        out.append(f"{x:.1f},{y:.1f}")
    return " ".join(out)


def chart_svg(tenant: str, series: dict[str, list[int]], start: float) -> Markup:
    """One tenant's chart; ``series`` as ``overview.per_minute`` returns it."""
    lines = {name: list(series.get(name) or []) for name, _ in SERIES}
    top = max([1, *(max(v or [0]) for v in lines.values())])
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(tenant)}: events per {BUCKET} minutes over 24 hours">',
             f"<title>{escape(tenant)}: received (grey), delivered (green), failed (red) "
             f"per {BUCKET} minutes, last 24 h; peak {top}</title>",
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
             'stroke="#ccc" stroke-width="1"/>']
    for hours_ago in (24, 18, 12, 6, 0):
        x = PAD + (WIDTH - 2 * PAD) * (24 - hours_ago) / 24
        label = datetime.fromtimestamp(start + (24 - hours_ago) * 3600, UTC).strftime("%H:%M")
        parts.append(f'<text x="{x:.0f}" y="{HEIGHT - 4}" font-size="10" fill="#666" '
                     f'text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{PAD}" y="12" font-size="10" fill="#666">peak {top}</text>')
    for name, color in SERIES:
        if lines[name]:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                         f'points="{_points(lines[name], top)}"><title>{name}</title>'
                         "</polyline>")
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - numbers and escaped names only
