"""The overview chart: per-minute series as step paths, so the minute a line drops is exact,
a flat run costs a few bytes and a busy day stays small."""

from __future__ import annotations

import random
import re

from app.console.chart import PLOT_HEIGHT, chart_svg
from rilla_bridge.history.overview import BUCKET_MINUTES


def _levels(svg: str, name: str) -> list[int]:
    """The y of each minute, read back from the series' path (M, then h runs and V jumps)."""
    m = re.search(r'<path [^>]*d="([^"]*)"><title>' + name + "</title>", svg)
    assert m, name
    d = m.group(1)
    start = re.match(r"M0,(\d+)", d)
    assert start
    y, out = int(start.group(1)), []
    for cmd, n in re.findall(r"([hV])(\d+)", d[start.end():]):
        if cmd == "h":
            out += [y] * int(n)
        else:
            y = int(n)
    return out


def test_a_stop_shows_at_its_minute() -> None:
    assert BUCKET_MINUTES == 1
    minutes, stop = 1440, 1000   # delivered 5 a minute until minute 1000, then nothing
    series = {"received": [5] * minutes, "delivered": [5] * stop + [0] * (minutes - stop),
              "failed": [0] * minutes}
    svg = str(chart_svg("acme", series, start=0.0))
    assert "per minute" in svg and 'viewBox="0 0 1440 84"' in svg
    delivered = _levels(svg, "delivered")
    assert len(delivered) == minutes
    assert delivered[:stop] == [0] * stop                          # at the peak (y 0)
    assert delivered[stop:] == [PLOT_HEIGHT] * (minutes - stop)    # on the axis from 1000
    assert _levels(svg, "received") == [0] * minutes
    assert re.search(r'd="M0,84h1440"><title>failed', svg)   # a flat day: a few bytes


def test_every_minute_is_drawn_at_its_height() -> None:
    rnd = random.Random(7)
    values = [rnd.randint(0, 40) for _ in range(1440)]
    svg = str(chart_svg("acme", {"received": values, "delivered": values, "failed": values},
                        start=0.0))
    top = max(values)
    assert _levels(svg, "received") == [round(PLOT_HEIGHT - PLOT_HEIGHT * v / top)
                                        for v in values]
    # Three lines of 1,440 changing minutes: about 6 bytes a change.
    assert len(svg) < 3 * 1440 * 7 + 2000
