"""The one table the suite prints, its markdown twin for RESULTS.md, and number formatting."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One line of the table: a measured figure, its ratio, the target and whether it is met."""

    section: str
    case: str
    result: str
    ratio: str = ""
    target: str = ""
    ok: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def mark(self) -> str:
        return {True: "ok", False: "MISS", None: ""}[self.ok]


COLS = ("section", "case", "result", "ratio", "target", "")


def _cells(r: Row) -> list[str]:
    return [r.section, r.case, r.result, r.ratio, r.target, r.mark]


def grouped(rows: list[Row]) -> list[Row]:
    """Rows grouped by section number ("0 ceiling" ... "8 profile"; FAILED rows of a scenario
    without a number last), stable within a section."""

    def key(r: Row) -> int:
        head = r.section.split(" ", 1)[0]
        return int(head) if head.isdigit() else 99

    return sorted(rows, key=key)


def text_table(rows: list[Row]) -> str:
    """Fixed-width table for the terminal; a blank line between sections."""
    cells = [list(COLS)] + [_cells(r) for r in grouped(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLS))]
    out, prev = [], None
    for i, c in enumerate(cells):
        if i > 1 and c[0] != prev:
            out.append("")
        prev = c[0]
        out.append("  ".join(c[j].ljust(widths[j]) for j in range(len(COLS))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def md_table(rows: list[Row]) -> str:
    """The same table as GitHub markdown (pipes in cells escaped)."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(c or "ok?" for c in COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in grouped(rows)]
    return "\n".join(lines)


def rps(x: float) -> str:
    return f"{x:,.0f} req/s"


def ms(x: float) -> str:
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def nbytes(x: float) -> str:
    if x < 1024:
        return f"{x:.0f} B"
    if x < 1024 * 1024:
        return f"{x / 1024:.1f} KiB"
    return f"{x / 1024 / 1024:.1f} MiB"
