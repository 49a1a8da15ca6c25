"""Section 11: what the model hangs on (clipfail explain): the blamed roles per human category as a figure (view
blame_by_category), their agreement with people and triage (blame_agreement), and example failures with each
phrase of the caption shaded by what removing it does to the ground truth's rank (blame_examples), beside the
ground-truth and top-1 thumbnails."""

from __future__ import annotations

import html
from functools import partial

import pandas as pd

from toolkit.report.htmlpage import Context

N_EXAMPLES = 10
HELP_COLOUR, ANCHOR_COLOUR = (46, 139, 87), (192, 57, 43)  # removing the phrase helps the GT / makes it worse


def _shade(gain: int, top: int) -> str:
    """A background colour for a phrase's pessimistic rank gain: green when removing it helps, red when it
    hurts, white when nothing moves; stronger with |gain| (relative to the example's largest)."""
    if not gain:
        return "#ffffff"
    r, g, b = HELP_COLOUR if gain > 0 else ANCHOR_COLOUR
    alpha = 0.2 + 0.6 * min(1.0, abs(gain) / max(top, 1))
    return f"rgba({r},{g},{b},{alpha:.2f})"


def _find(caption_lower: str, phrase: str) -> tuple[int, int] | None:
    """The character span of the extractor's phrase (lower-case words) in the caption, or None."""
    import re

    words = [re.escape(w) for w in phrase.split()]
    m = re.search(r"(?<![a-z0-9])" + r"\W*".join(words) + r"(?![a-z0-9])", caption_lower) if words else None
    return m.span() if m else None


def shaded_caption(caption: str, variants: pd.DataFrame) -> str:
    """The caption as HTML (escaped), each character shaded by the phrase covering it with the largest |rank
    gain| (the view's numbers), then one labelled chip per phrase: role, phrase, signed rank gain."""
    low = caption.lower() if len(caption.lower()) == len(caption) else caption
    top = int(variants["rank_gain"].abs().max()) if len(variants) else 0
    owner: list[int | None] = [None] * len(caption)
    gains = [int(g) for g in variants["rank_gain"]]
    for i, phrase in enumerate(variants["phrase"]):
        span = _find(low.lower(), str(phrase))
        if span is None:
            continue
        for c in range(*span):
            if owner[c] is None or abs(gains[i]) > abs(gains[owner[c]]):
                owner[c] = i
    out, c = [], 0
    while c < len(caption):
        d = c
        while d < len(caption) and owner[d] == owner[c]:
            d += 1
        text = html.escape(caption[c:d])
        if owner[c] is None:
            out.append(text)
        else:
            i = owner[c]
            style = f"background:{_shade(gains[i], top)}"
            out.append(f'<span style="{style}" title="rank gain {gains[i]:+d}">{text}</span>')
        c = d
    chips = " ".join(
        f'<span class="chip" style="background:{_shade(g, top)};border:1px solid #bbb;padding:0 .3em">'
        f"{html.escape(str(role))}: {html.escape(str(phrase))} {g:+d}</span>"
        for role, phrase, g in zip(variants["role"], variants["phrase"], gains)
    )
    return f'<span class="caption">{"".join(out)}</span><br><small>{chips}</small>'


def render(ctx: Context) -> None:
    """Section 11 (see the module docstring); without an explain run, one line saying how to make one."""
    con, page, rrid, missing = ctx.con, ctx.page, ctx.rrid, ctx.missing
    from toolkit.report.figures import blame_by_category_chart

    page.h2("blame", "11. What the model hangs on")
    has = (
        rrid is not None
        and con.execute("SELECT max(explain_run_id) FROM explain_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()[0]
    )
    if not has:
        page.p("No explain run yet. Run: clipfail explain", cls="missing")
        missing.append("explain: clipfail explain")
        return
    erid = int(has)
    flag = ctx.flag
    page.p(
        f"clipfail explain (explain run {erid}) removes or neutralises one phrase of each failure's caption at a "
        "time (its attributes, count, relation, action, or an object mention) and ranks the ground truth again with "
        "the same model. A failure is blamed on the role whose removal moves the ground truth up the most "
        "(pessimistic rank: rank + ties); 'none' when no removal helps, 'no phrase' when the extractor found none."
    )
    for note in ctx.notes:
        page.p(f"Made with the model of this report: {note}", cls="banner")
    dist = con.execute(
        "SELECT category, blamed_role, n, n_category, percent, is_match FROM blame_by_category "
        "WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    page.table(
        dist,
        "blame_by_category",
        "Table 15. The blamed role per human category (view blame_by_category; 'no labels': not labelled)." + flag,
        {"percent": "f2"},
    )
    num = page.next_figure()
    page.figure(
        partial(
            blame_by_category_chart,
            dist,
            f"Figure {num}. What the model hangs on, per human category",
            page.figures_dir / f"figure{num}_blame",
        ),
        f"Figure {num}. Share of each blamed role among the explained failures of each human category "
        f"(view blame_by_category).{flag}",
    )
    agree = con.execute(
        "SELECT reference, n_labelled, n, n_agree, coverage, accuracy, expected_agreement, kappa FROM blame_agreement "
        "WHERE retrieval_run_id = ?",
        [rrid],
    ).df()
    page.table(
        agree,
        "blame_agreement",
        "Table 16. Agreement of the blamed role's category (attribute → Attribute, count → Count, relation → "
        "Spatial, action → Action, object → Object) with each annotator, the overlap majority, all labels and "
        "triage (view blame_agreement; n counts the labelled failures with a blamed category; once triage used the "
        "blame, its row is not independent)." + flag,
    )
    _examples(ctx, rrid, flag)


def _examples(ctx: Context, rrid: int, flag: str) -> None:
    """Table 17 (the failures whose miss hangs most on one phrase, each phrase shaded) and their thumbnails."""
    con, page = ctx.con, ctx.page
    from toolkit.report.figures import thumbnail_grid
    from toolkit.store import paths as study_paths

    ex = con.execute(
        "SELECT * FROM blame_examples WHERE retrieval_run_id = ? AND example_order <= ? "
        "ORDER BY example_order, variant_index",
        [rrid, N_EXAMPLES],
    ).df()
    if ex.empty:
        return
    rows, items = [], []
    for order, g in ex.groupby("example_order", sort=True):
        first = g.iloc[0]
        blamed = (
            f"{html.escape(str(first['blamed_role']))} '{html.escape(str(first['blamed_phrase']))}' "
            f"(+{int(first['blame_rank_gain'])})"
            if first["blamed_role"] != "none"
            else "none"
        )
        rows.append(
            f'<tr><td class="num">{int(order)}</td><td class="num">{int(first["caption_id"])}</td>'
            f'<td>{shaded_caption(str(first["caption"]), g)}</td><td class="num">'
            f"{int(first['gt_rank_before_pessimistic'])}</td><td>{blamed}</td></tr>"
        )
        root = study_paths.resolve(con, first["image_root"]) if isinstance(first["image_root"], str) else None
        for kind, col, img in (("GT", "gt_rel_path", "gt_image_id"), ("top-1", "top1_rel_path", "top1_image_id")):
            rel = first[col]
            path = root / rel if root is not None and isinstance(rel, str) else None
            items.append((path, f"#{int(order)} {kind}: image {int(first[img])}"))
    page.parts.append(
        '<div class="scroll"><table data-name="blame_examples"><caption>Table 17. The failures whose miss hangs most '
        "on one phrase (view blame_examples): each phrase of the caption shaded by its pessimistic rank gain when "
        "removed (green: removing it helps the ground truth, red: the model anchors on it; the number is the "
        f"gain), the ground truth's rank before, and the blamed role.{html.escape(flag)}</caption><thead><tr>"
        "<th>#</th><th>caption_id</th><th>caption and phrases</th><th>GT rank</th><th>blamed</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    num = page.next_figure()
    page.figure(
        partial(
            thumbnail_grid,
            items,
            f"Figure {num}. Ground truth and top-1 of the examples",
            page.figures_dir / f"figure{num}_blame_examples",
            columns=4,
        ),  # fmt: skip
        f"Figure {num}. The ground-truth (GT) and top-1 image of each example of Table 17, by its number.",
    )
