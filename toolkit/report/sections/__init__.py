"""The report's sections, in page order. A section is a function `render(ctx)` (toolkit.report.htmlpage.Context)
that reads views, writes its heading, text, tables and figures into ctx.page, and appends to ctx.missing what
has not run yet; the page builder (toolkit.report.page) calls each in turn. A section with nothing to show
either says what to run or writes nothing.
"""

from __future__ import annotations

from toolkit.report.sections import (
    agreement,
    baseline,
    blame,
    comparisons,
    consolidated,
    controls,
    ensembling,
    hubness,
    methods,
    positives,
    provenance,
    taxonomy,
    triage,
)

SECTIONS = [
    baseline.render,  # 1. Recall@K of every retrieval run
    taxonomy.render,  # 2. the failure taxonomy
    agreement.render,  # 3. annotator agreement
    ensembling.render,  # 4. prompt ensembling, per failure subset
    consolidated.render,  # 5. every prompt-ensembling run, K side by side
    controls.render,  # 6. the control runs
    triage.render,  # 7. automatic triage
    comparisons.render,  # 8. comparisons of two retrieval runs
    hubness.render,  # 9. hubness
    methods.render,  # 10. which fix helps which category
    blame.render,  # 11. what the model hangs on (explain)
    positives.render,  # 12. are the misses real? (extended positives: ECCV Caption, CxC)
    provenance.render,  # what made the numbers
]
