"""The results of a run as markdown tables and PNG plots: `docs/benchmarks.md` and `docs/benchmarks/`.

Groups describe what they measured as `Section`s (tables and charts); `write_report` renders them
with the command, the machine and the library versions. The hand-written block between
`NOTES_BEGIN` and `NOTES_END` in an existing report (profiles and explanations) is carried over into
the new one, so regenerating the numbers never loses the analysis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Stats, format_rate, format_us

NOTES_BEGIN = "<!-- notes:begin (kept when the report is regenerated) -->"
NOTES_END = "<!-- notes:end -->"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned column indexes

    def render(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "| " + " | ".join("---:" if i in self.right else "---" for i in range(len(self.columns))) + " |"
        body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        return "\n".join([head, rule, *body])


@dataclass
class Row:
    """One line of a latency table: measured (`stats`) or not (`note` says why)."""

    label: str
    stats: Stats | None
    note: str = ""


def latency_table(rows: Sequence[Row], *, first: str = "operation", note: str = "side by side") -> Table:
    table_rows = []
    for row in rows:
        if row.stats is None:
            table_rows.append([row.label, "—", "—", "—", row.note])
        else:
            s = row.stats
            table_rows.append([row.label, format_us(s.p50_us), format_us(s.p99_us), format_rate(s.ops_per_s), row.note])
    return Table([first, "p50", "p99", "ops/s", note], table_rows, right={1, 2, 3})


@dataclass
class Bars:
    """Horizontal bars of p50 latency with the p99 as a marker, log scale."""

    filename: str
    title: str
    labels: list[str]
    p50_us: list[float]
    p99_us: list[float] | None = None


@dataclass
class Lines:
    filename: str
    title: str
    x: list[float]
    series: dict[str, list[float | None]]
    xlabel: str
    ylabel: str
    logx: bool = True
    logy: bool = True


Chart = Bars | Lines


@dataclass
class Section:
    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    target: str
    measured: str
    verdict: str  # "met", "missed", "not measured"


@dataclass
class Report:
    command: str
    mode: str
    duration_seconds: float
    machine: dict[str, str]
    versions: dict[str, str]
    sections: list[Section]
    verdicts: list[Verdict] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_charts(charts: Sequence[Chart], directory: Path) -> list[Path]:
    """Write each chart as a PNG into `directory`. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for chart in charts:
        if isinstance(chart, Bars):
            height = max(2.2, 0.45 * len(chart.labels) + 1.2)
            fig, ax = plt.subplots(figsize=(9, height))
            positions = list(range(len(chart.labels)))[::-1]
            values = [max(v, 1e-3) for v in chart.p50_us]
            ax.barh(positions, values, color="#4c72b0", label="p50")
            if chart.p99_us is not None:
                ax.scatter(
                    [max(v, 1e-3) for v in chart.p99_us],
                    positions,
                    color="#c44e52",
                    marker="|",
                    s=250,
                    label="p99",
                    zorder=3,
                )
            for y, value in zip(positions, chart.p50_us, strict=True):
                ax.annotate(
                    format_us(value),
                    (max(value, 1e-3), y),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8,
                )
            ax.set_yticks(positions, chart.labels, fontsize=8)
            ax.set_xscale("log")
            # Room on the right for the value labels and the legend.
            ax.set_xlim(right=max([*values, *(chart.p99_us or [])]) * 8)
            ax.set_xlabel("latency per operation (µs, log scale)")
            ax.legend(loc="upper right", fontsize=8)
        else:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for name, ys in chart.series.items():
                points = [(x, y) for x, y in zip(chart.x, ys, strict=True) if y is not None and not math.isnan(y)]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            if chart.logx:
                ax.set_xscale("log")
            if chart.logy:
                ax.set_yscale("log")
            ax.set_xlabel(chart.xlabel)
            ax.set_ylabel(chart.ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax.set_title(chart.title, fontsize=10)
        fig.tight_layout()
        path = directory / chart.filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _kept_notes(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
    if start == -1 or end == -1 or end < start:
        return ""
    return text[start + len(NOTES_BEGIN) : end].strip("\n")


def render_markdown(report: Report, image_dir: str, *, notes: str = "", charts_written: bool = True) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{report.command}` ({report.mode} mode, {report.duration_seconds:.0f} s). Every row of a table "
        "was measured in the same run, side by side (interleaved rounds; p50 is the median of the rounds' p50s, p99 "
        "the 99th percentile of all samples, ops/s is per sequential caller). Benchmarks run on demand, never as "
        "tests. The machine is shared and noisy: compare rows within a table, and read ratios rather than absolute "
        "numbers across runs.",
        "",
        "## Machine and versions",
        "",
        Table(["", ""], [[k, v] for k, v in report.machine.items()]).render(),
        "",
        Table(["library or server", "version"], [[k, v] for k, v in report.versions.items()]).render(),
        "",
    ]
    if report.verdicts:
        lines += [
            "## Targets",
            "",
            "Goals this report is read against (not asserted by tests). Where one is missed, the notes below explain "
            "why, from a profile.",
            "",
            Table(
                ["target", "measured (this run)", "verdict"],
                [[v.target, v.measured, v.verdict] for v in report.verdicts],
            ).render(),
            "",
        ]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        for table in section.tables:
            lines += [table.render(), ""]
        for note in section.notes:
            lines += [note, ""]
        for chart in section.charts:
            if charts_written:
                lines += [f"![{chart.title}]({image_dir}/{chart.filename})", ""]
        if section.charts and not charts_written:
            lines += ["(plots not drawn: matplotlib is not installed; `pip install -e '.[bench]'`)", ""]
    lines += [
        "## Notes and profiles",
        "",
        NOTES_BEGIN,
        notes or "(none yet)",
        NOTES_END,
        "",
    ]
    return "\n".join(lines)


def write_report(report: Report, output: Path) -> list[Path]:
    """Write `output` (markdown) and its PNGs in a folder named after it (docs/benchmarks.md ->
    docs/benchmarks/). Returns every file written."""
    image_dir = output.parent / output.stem
    charts = [chart for section in report.sections for chart in section.charts]
    try:
        written = render_charts(charts, image_dir) if charts else []
        charts_written = True
    except ImportError:
        written, charts_written = [], False
    notes = _kept_notes(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        render_markdown(report, output.stem, notes=notes, charts_written=charts_written), encoding="utf-8"
    )
    return [output, *written]


def chart_name(section: str, what: str) -> str:
    return f"{_slug(section)}-{_slug(what)}.png"


@dataclass
class Outcome:
    """What a group hands back: its sections for the report, and key figures for the targets."""

    sections: list[Section] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
