"""The overview's per-tenant chart, drawn on the server as inline SVG (no script, no image
request): received, delivered and failed per minute over the last day
(``overview.BUCKET_MINUTES``), so "acme stopped delivering at 02:14" shows as a green line
that drops to zero while grey goes on. Each line is a step path, one unit per minute, that
spells out only the minutes where its height changes: a quiet tenant's chart is a few hundred
bytes, a busy one's at most about 9 KB a line."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup, escape

from rilla_bridge.history.overview import BUCKET_MINUTES

WIDTH, HEIGHT, PAD = 720, 120, 18
PLOT_HEIGHT = 84   # the plot's own units: the peak is 84 above the axis
SERIES = (("received", "#8a8f98"), ("delivered", "#1f9d55"), ("failed", "#d93025"))
BUCKET = BUCKET_MINUTES


def _steps(values: list[int], top: int) -> str:
    """A step line, one unit of x per minute and whole units of y (``PLOT_HEIGHT`` is the
    peak): ``h`` runs along equal values, ``V`` jumps at the minute a value changes. A flat
    day is a few bytes; a busy one about 6 bytes per change. (A day's three lines for 20
    tenants are 86,400 values, redrawn after every publish: each distinct value is scaled
    once, and only the minutes where the height changes are visited in Python.)"""
    if not values:
        return ""
    scale = {v: round(PLOT_HEIGHT - PLOT_HEIGHT * v / top) for v in set(values)}
    levels = [scale[v] for v in values]
    changes = [i for i in range(1, len(levels)) if levels[i] != levels[i - 1]]
    out, start = [f"M0,{levels[0]}"], 0
    for i in changes:
        out.append(f"h{i - start}V{levels[i]}")
        start = i
    out.append(f"h{len(levels) - start}")
    return "".join(out)


def _per(bucket: int) -> str:
    return "minute" if bucket == 1 else f"{bucket} minutes"


def chart_svg(tenant: str, series: dict[str, list[int]], start: float) -> Markup:
    """One tenant's chart; ``series`` as ``overview.per_minute`` returns it."""
    lines = {name: list(series.get(name) or []) for name, _ in SERIES}
    top = max([1, *(max(v or [0]) for v in lines.values())])
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(tenant)}: events per {_per(BUCKET)} over 24 hours">',
             f"<title>{escape(tenant)}: received (grey), delivered (green), failed (red) "
             f"per {_per(BUCKET)}, last 24 h; peak {top}</title>",
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
             'stroke="#ccc" stroke-width="1"/>']
    for hours_ago in (24, 18, 12, 6, 0):
        x = PAD + (WIDTH - 2 * PAD) * (24 - hours_ago) / 24
        label = datetime.fromtimestamp(start + (24 - hours_ago) * 3600, UTC).strftime("%H:%M")
        parts.append(f'<text x="{x:.0f}" y="{HEIGHT - 4}" font-size="10" fill="#666" '
                     f'text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{PAD}" y="12" font-size="10" fill="#666">peak {top}</text>')
    # The plot: one unit per bucket across, stretched to the frame (the strokes keep their
    # width); labels stay in the frame's own units.
    n = max((len(v) for v in lines.values()), default=0)
    parts.append(f'<svg x="{PAD}" y="{HEIGHT - PAD - PLOT_HEIGHT}" width="{WIDTH - 2 * PAD}" '
                 f'height="{PLOT_HEIGHT}" viewBox="0 0 {max(1, n)} {PLOT_HEIGHT}" '
                 'preserveAspectRatio="none">')
    for name, color in SERIES:
        if lines[name]:
            parts.append(f'<path fill="none" stroke="{color}" stroke-width="1.5" '
                         'vector-effect="non-scaling-stroke" '
                         f'd="{_steps(lines[name], top)}"><title>{name}</title></path>')
    parts.append("</svg></svg>")
    return Markup("".join(parts))  # noqa: S704 - numbers and escaped names only
