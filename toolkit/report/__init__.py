"""Report: what a study found, as files and tables for people.

Reads the views (every number a paper would quote is SQL) and writes no table: `analysis` writes
the taxonomy and agreement tables and Figures 1-2 (`clipfail analyze`), `page` writes the
self-contained HTML report with its figures and CSV tables (`clipfail report`), `figures` draws
every chart, `display` builds the tables that the CLI and the report both show, `status` says
where a study stands and what comes next (`clipfail status`), and `outdir` swaps a rewritten
output folder in whole.
"""
