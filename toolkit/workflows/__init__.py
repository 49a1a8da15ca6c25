"""Workflows: whole studies built from the stages, each through its own function.

They read and write what their stages do. `pipeline` is `clipfail run` (ingest, embed, evaluate and
sample-failures in one go, resuming what is done), and `demo` is `clipfail demo` (the whole study
offline on a generated dataset, a tiny random model and simulated annotators).
"""
