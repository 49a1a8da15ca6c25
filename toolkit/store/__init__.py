"""The study's store: one DuckDB file, and the files it references.

Every other stage reads and writes through this package; on its own it writes only the schema, the
views (queries/*.sql) and the seed rows (the taxonomy's categories and aliases, the shipped template
sets), and `clipfail relocate` rewrites stored paths. `db` holds the primitives (connecting,
transactions, provenance `runs` rows, bulk inserts, config hashes), `study` opens, creates and
upgrades a study's database, `paths` stores paths relative to the database's folder and rebinds
moved ones, `artifacts` saves, registers and verifies the checksummed .npy files (`embedding_sets`,
`embedding_rows`), `runs` resolves which retrieval run a command is about, and `sql` runs
`clipfail sql`'s one read-only query.
"""
