"""The report's page: what a section writes into (headings, paragraphs, tables with their CSVs, figures), the
formatting of values, the style sheet, and the context every section is given.

A section (toolkit.report.sections) reads views and hands their rows to `Page`; `Page` formats values
(decimal places, a sign) and never computes one.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from toolkit.sheets import write_frame_csv


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def fmt(value, kind: str) -> str:
    """Format one value; kind: 'int', 'id' (no separators), 'f2', 'f4', 'pp' (signed, 2 decimals),
    'p' (p-value), 'bool', 'text'."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if kind == "int":
        return f"{int(value):,}"
    if kind == "id":
        return str(int(value))
    if kind == "f2":
        return f"{float(value):.2f}"
    if kind == "f4":
        return f"{float(value):.4f}"
    if kind == "pp":
        return f"{float(value):+.2f}"
    if kind == "p":
        v = float(value)
        return "<0.0001" if v < 1e-4 else f"{v:.4f}"
    if kind == "bool":
        return "yes" if bool(value) else "no"
    return str(value)


def guess_kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "f4"
    return "text"


class Page:
    """Collects sections of HTML, the CSVs and the figures of one report. With `draw_figures=False` (clipfail
    report --no-figures) no figure is drawn: each keeps its number and caption, and says that it was left out."""

    def __init__(self, out_dir: Path, draw_figures: bool = True):
        self.out_dir = out_dir
        self.draw_figures = draw_figures
        self.tables_dir = out_dir / "tables"
        self.figures_dir = out_dir / "figures"
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.tables: list[Path] = []
        self.figures: list[Path] = []
        self.n_figure = 0

    def h2(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def h3(self, title: str) -> None:
        self.parts.append(f"<h3>{html.escape(title)}</h3>")

    def p(self, text: str, cls: str | None = None, raw: bool = False) -> None:
        body = text if raw else html.escape(text)
        self.parts.append(f'<p class="{cls}">{body}</p>' if cls else f"<p>{body}</p>")

    def table(
        self,
        df: pd.DataFrame,
        name: str,
        caption: str,
        formats: dict[str, str] | None = None,
        csv: bool = True,
        html_columns: list[str] | None = None,
    ) -> None:
        """An HTML table of df (formatted per column; only html_columns, if given) and, with csv=True,
        tables/<name>.csv of all the raw values."""
        formats = formats or {}
        if csv:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
            path = write_frame_csv(df, self.tables_dir / f"{name}.csv")  # text cells guarded against formulas
            self.tables.append(path)
        if html_columns is not None:
            df = df[html_columns]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        kinds = {c: formats.get(c) or guess_kind(df[c]) for c in df.columns}
        for c in df.columns:  # ids and seeds are labels, not quantities: no thousands separators
            if c not in formats and kinds[c] in ("int", "f4") and (str(c).endswith("_id") or c == "seed"):
                kinds[c] = "id"
        rows = []
        for rec in df.itertuples(index=False):
            cells = []
            for col, value in zip(df.columns, rec):
                kind = kinds[col]
                cls = ' class="num"' if kind in ("int", "id", "f2", "f4", "pp", "p") else ""
                cells.append(f"<td{cls}>{html.escape(fmt(value, kind))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        link = f' <a class="csv" href="tables/{name}.csv">{name}.csv</a>' if csv else ""
        self.parts.append(
            f'<div class="scroll"><table data-name="{html.escape(name)}"><caption>{html.escape(caption)}{link}'
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )

    def figure(self, draw: Callable[[], list[Path]], caption: str) -> None:
        """The figure that `draw()` writes (its PNG and SVG paths), embedded with its caption; with figures
        left out, `draw` is not called and the caption stands in its place."""
        if not self.draw_figures:
            self.parts.append(
                f'<p class="missing figure-left-out">{html.escape(caption)} Not drawn: this report was written with '
                "--no-figures.</p>"
            )
            return
        paths = draw()
        png = next(p for p in paths if p.suffix == ".png")
        self.figures.extend(paths)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        links = " ".join(f'<a href="figures/{p.name}">{p.suffix[1:].upper()}</a>' for p in paths)
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)} ({links})</figcaption></figure>"
        )

    def next_figure(self) -> int:
        self.n_figure += 1
        return self.n_figure


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#1d1d1d;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #3b6ea5;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}
div.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.8em 0 1.4em;font-size:.85em}
caption{text-align:left;font-weight:600;padding-bottom:.3em}
th,td{border:1px solid #c8c8c8;padding:.25em .6em}th{background:#eef2f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}figure img{max-width:min(100%,760px);border:1px solid #ddd}figcaption{font-size:.9em;color:#444}
.meta{color:#555;font-size:.9em}.note{color:#444;font-size:.9em}
.banner{background:#fff1d6;border:2px solid #d48806;padding:.7em 1em;font-weight:600;margin:1em 0}
.missing{background:#f4f4f4;border-left:4px solid #999;padding:.5em 1em}
a.csv{font-weight:normal;font-size:.85em;margin-left:.5em}
nav ul{columns:2;list-style:none;padding-left:0}
code{background:#f2f2f2;padding:0 .2em}
dl.configs dd{margin:0 0 .5em 1em;word-break:break-all;font-size:.85em}
summary{cursor:pointer;color:#3b6ea5}
"""


@dataclass
class Context:
    """What every section is given: the open connection, the page, the retrieval run the report is about (None
    when there is none), whether its labels are simulated and how many there are, and the list of what has not
    run yet (each section appends its own, with the command)."""

    con: object
    page: Page
    rrid: int | None
    simulated: bool = False
    n_labelled: int = 0
    missing: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # rows that several sections read (sections.common)
    notes: list[str] = field(default_factory=list)  # the page's notes (the demo's: its model is random)
    generated_images: bool = False  # the study's images are generated (the demo): no COCO positive can apply

    @property
    def flag(self) -> str:
        """The note after a caption whose rows come from simulated labels."""
        return " SIMULATED labels." if self.simulated else ""
