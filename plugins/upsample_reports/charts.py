"""Chart geometry for the run page, computed here and drawn as inline SVG by the templates (no JS, no CDN).

Pure functions: numbers in, rectangles out. Labels stay plain strings; the templates escape them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from include.cosmos_upsample.report_model import ReportItem

TOKEN_CHART_WIDTH = 800
TOKEN_CHART_HEIGHT = 200
# Over-budget bars (only `invalid` items can be over) are drawn up to this share of the budget, then clipped.
TOKEN_CHART_CEILING = 1.25
TOKEN_CHART_MAX_BARS = 400
HBAR_WIDTH = 520
HBAR_LABEL_WIDTH = 100
HBAR_ROW_HEIGHT = 26


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    status: str
    title: str


@dataclass(frozen=True)
class TokenChart:
    width: int
    height: int
    budget_y: float
    bars: list[Bar]
    counted: int
    uncounted: int
    over_budget: int
    max_share: float


def token_chart(items: list[ReportItem]) -> TokenChart:
    """One bar per item with a token count: tokens.prompt / tokens.budget, with a line at the budget. Past
    TOKEN_CHART_MAX_BARS items, each bar stands for a run of neighbouring items and shows the largest of them, so a
    10,000-item run draws a chart of the same size as a 400-item one and no over-budget item hides."""
    width, height = TOKEN_CHART_WIDTH, TOKEN_CHART_HEIGHT
    counted = [item for item in items if _token_share(item) is not None]
    shares = [_token_share(item) or 0.0 for item in counted]
    plot_height = height - 10
    budget_y = round(height - plot_height / TOKEN_CHART_CEILING, 2)
    groups = _groups(len(counted), TOKEN_CHART_MAX_BARS)
    slot = width / max(len(groups), 1)
    gap = slot * 0.15 if slot >= 4 else 0.0
    bars = []
    for index, (start, end) in enumerate(groups):
        top = max(range(start, end), key=shares.__getitem__)
        item, share = counted[top], shares[top]
        bar_height = plot_height * min(share, TOKEN_CHART_CEILING) / TOKEN_CHART_CEILING
        title = f"{item.spec_id}: {item.tokens.prompt} of {item.tokens.budget} tokens ({share:.0%})"
        if end - start > 1:
            title = f"{counted[start].spec_id} to {counted[end - 1].spec_id} ({end - start} items), largest {title}"
        bars.append(
            Bar(
                x=round(index * slot + gap / 2, 2),
                y=round(height - bar_height, 2),
                width=round(max(slot - gap, 0.5), 2),
                height=round(bar_height, 2),
                status=item.status,
                title=title,
            )
        )
    return TokenChart(
        width=width,
        height=height,
        budget_y=budget_y,
        bars=bars,
        counted=len(counted),
        uncounted=len(items) - len(counted),
        over_budget=sum(1 for share in shares if share > 1.0),
        max_share=max(shares, default=0.0),
    )


def _groups(count: int, most: int) -> list[tuple[int, int]]:
    """`count` items as at most `most` runs of neighbours, (start, end) each, sizes differing by one at most."""
    bars = min(count, most)
    return [(count * index // bars, count * (index + 1) // bars) for index in range(bars)]


def _token_share(item: ReportItem) -> float | None:
    prompt, budget = item.tokens.prompt, item.tokens.budget
    if prompt is None or budget <= 0:
        return None
    return prompt / budget


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class HBarRow:
    label: str
    value_text: str
    y: float
    width: float
    css_class: str


@dataclass(frozen=True)
class HBarChart:
    width: int
    height: int
    label_width: int
    row_height: int
    rows: list[HBarRow]


def hbar_chart(values: list[tuple[str, float, str, str]]) -> HBarChart:
    """Horizontal bars, one per (label, value, value text, css class), scaled to the largest value."""
    largest = max((value for _, value, _, _ in values), default=0.0) or 1.0
    plot_width = HBAR_WIDTH - HBAR_LABEL_WIDTH - 70
    rows = [
        HBarRow(
            label=label,
            value_text=text,
            y=index * HBAR_ROW_HEIGHT,
            width=round(plot_width * max(value, 0.0) / largest, 2),
            css_class=css_class,
        )
        for index, (label, value, text, css_class) in enumerate(values)
    ]
    return HBarChart(
        width=HBAR_WIDTH,
        height=max(len(rows), 1) * HBAR_ROW_HEIGHT,
        label_width=HBAR_LABEL_WIDTH,
        row_height=HBAR_ROW_HEIGHT,
        rows=rows,
    )


def status_chart(counts: dict[str, int], statuses: tuple[str, ...]) -> HBarChart:
    present = [status for status in statuses if counts.get(status) or status in {"upsampled", "invalid", "failed"}]
    return hbar_chart([(status, counts.get(status, 0), str(counts.get(status, 0)), status) for status in present])


def stage_chart(stages: dict[str, Any]) -> HBarChart:
    timed = [(str(name), float(seconds)) for name, seconds in stages.items() if _is_number(seconds)]
    return hbar_chart([(name, seconds, format_seconds(seconds), "stage") for name, seconds in timed])


def format_seconds(seconds: float | None) -> str:
    """12.3 s, 4m 05s, 2h 03m: short enough for a table cell."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
