"""Improvement methods as plugins (docs/plugins.md): the example from the doc runs end to end through the CLI and
matches a numpy reference; a broken plugin is one message naming it, and nothing is written; a study of schema
version 1 (placeholders where a method has no value) upgrades to NULLs, keeps its runs, and a re-run is a no-op."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_one_message, study_reader

from toolkit.store.study import open_study

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"
BUILTINS = ["templates", "inverted-softmax", "qb-norm", "query-expansion", "templates+inverted-softmax",
            "templates+qb-norm"]  # fmt: skip


def doc_plugin_code() -> str:
    """The first python block of docs/plugins.md's "A complete plugin" section."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## A complete plugin") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def install_plugin(folder: Path, module: str, code: str, entries: dict[str, str], dist: str) -> Path:
    """A plugin as pip would leave it: the module and `<dist>-0.1.dist-info` (METADATA, entry_points.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(code, encoding="utf-8")
    info = folder / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[clipfail.methods]\n{lines}", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def study_master(labelled_study_master, tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_study")
    shutil.copytree(labelled_study_master[1], root, dirs_exist_ok=True)  # build_labelled_study's, made once
    return root / "study.duckdb"


@pytest.fixture
def study(study_master):
    """A private copy of the labelled study, in the same folder (embedding paths are stored relative)."""
    dest = study_master.with_name(f"copy-{os.getpid()}-{id(object())}.duckdb")
    shutil.copy(study_master, dest)
    yield str(dest)
    dest.unlink()


def counts(path) -> tuple[int, int, int]:
    with study_reader(path) as con:
        return tuple(
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("runs", "improvement_runs", "improvement_ranks")
        )


def reference_ranks(path, caption_ids, weight: float):
    """numpy: the raw scores (evaluate's GEMM, `transforms.raw_scores`), minus weight x each image's score against
    the gallery centroid; rank = 1 + images strictly higher, n_tied = other images with exactly the GT's score."""
    from toolkit.improve.transforms import raw_scores
    from toolkit.store.artifacts import load_embedding_set

    with open_study(path, read_only=True) as con:
        rr = con.execute("SELECT * FROM retrieval_runs ORDER BY retrieval_run_id LIMIT 1").df().iloc[0]
        img = load_embedding_set(con, int(rr["image_embedding_set_id"]))
        txt = load_embedding_set(con, int(rr["text_embedding_set_id"]))
        gt_of = dict(con.execute("SELECT caption_id, image_id FROM captions").fetchall())
    G = np.ascontiguousarray(img.array, dtype=np.float32)
    row = {int(c): i for i, c in enumerate(txt.item_ids)}
    col = {int(i): j for j, i in enumerate(img.item_ids)}
    Q = txt.array[[row[int(c)] for c in caption_ids]]
    gt = np.array([col[int(gt_of[int(c)])] for c in caption_ids])
    T = raw_scores(Q, G) - weight * (G @ G.mean(axis=0))
    g = T[np.arange(len(gt)), gt][:, None]
    return 1 + (T > g).sum(axis=1), (T == g).sum(axis=1) - 1, g[:, 0]


def test_the_doc_plugin_runs_end_to_end_through_the_cli(study, tmp_path, run_cli, plugin_cli):
    plugin = install_plugin(tmp_path / "site", "clipfail_centroid", doc_plugin_code(),
                            {"centroid-shift": "clipfail_centroid:METHOD"}, "clipfail-centroid")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(plugin))  # `python cli.py` from the checkout: no install of it needed
    args = [sys.executable, "cli.py", "--db", study, "improve", "--categories", "Object,Attribute",
            "--method", "centroid-shift", "--shift-weight", "0.5", "--control", "successes:10"]  # fmt: skip
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "method centroid-shift" in res.stdout
    with open_study(study, read_only=True) as con:
        runs = con.execute("SELECT * FROM improvement_runs ORDER BY improvement_id").df()
        ranks = con.execute("SELECT * FROM improvement_ranks ORDER BY improvement_id, caption_id").df()
        mc = con.execute("SELECT * FROM method_comparison WHERE method = 'centroid-shift'").df()
        ids = [int(i) for i in runs["improvement_id"]]
        rec = con.execute("SELECT * FROM improvement_recall WHERE list_contains(?, improvement_id)", [ids]).df()
    assert list(runs["population"]) == ["failures", "successes"]
    assert set(runs["method"]) == {"centroid-shift"} and set(runs["method_params"]) == {"weight=0.5"}
    for col in ("pooling", "tau", "template_set", "templates_sha256", "template_mode", "k_per_category", "k_prompts",
                "bank_subset", "n_bank", "is_bank_overlap"):  # fmt: skip
        assert runs[col].isna().all(), col  # no placeholders: NULL where the method has no value
    assert (ranks["n_prompts"] == 1).all()
    rank, tied, score = reference_ranks(study, ranks["caption_id"], 0.5)
    assert np.array_equal(ranks["improved_rank"], rank) and np.array_equal(ranks["improved_n_tied"], tied)
    assert np.allclose(ranks["improved_score"], score, rtol=0, atol=1e-6)
    assert len(mc) >= 1 and (mc["n"] > 0).all() and mc["share_r1_successes_broken"].notna().all()  # control matched
    assert len(rec) == 6 and set(rec["k"]) == {1, 5, 10}
    before = counts(study)  # the same command again, in this process (a second fresh one costs 5 CPU-seconds)
    again = plugin_cli("clipfail_centroid", doc_plugin_code(), {"centroid-shift": "clipfail_centroid:METHOD"})(
        *args[2:]
    )
    assert again.exit_code == 0 and "nothing changed" in again.output and counts(study) == before
    run_cli("--db", study, "status")
    out = tmp_path / "report"
    run_cli("--db", study, "report", "--out", out, "--no-figures")
    assert "centroid-shift" in (out / "report.html").read_text(encoding="utf-8")


def test_help_from_a_checkout_lists_the_builtins_and_a_plugin(tmp_path):
    plugin = install_plugin(tmp_path / "site", "clipfail_centroid", doc_plugin_code(),
                            {"centroid-shift": "clipfail_centroid:METHOD"}, "clipfail-centroid")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(plugin))
    res = subprocess.run([sys.executable, "cli.py", "improve", "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    choice = re.search(r"--method \[([^\]]+)\]", res.stdout).group(1).split("|")
    assert choice == BUILTINS + ["centroid-shift"]
    assert re.search(r"--shift-weight NUMBER\s+centroid-shift: share of the", res.stdout)


@pytest.fixture
def plugin_cli(tmp_path, monkeypatch):
    """install(module, code, entries) puts a plugin on sys.path and returns a CLI runner built with it (cli.py
    builds improve's options from the registry when it is imported); everything is undone afterwards."""
    import cli as cli_module
    from toolkit.improve import methods

    def install(module: str, code: str, entries: dict[str, str]):
        folder = install_plugin(tmp_path / module, module, textwrap.dedent(code), entries, module.replace("_", "-"))
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        methods.registry.cache_clear()
        fresh = importlib.reload(cli_module)

        def run(*args):
            return CliRunner().invoke(fresh.cli, [str(a) for a in args], catch_exceptions=True)

        return run

    yield install
    monkeypatch.undo()
    methods.registry.cache_clear()
    importlib.reload(cli_module)


BROKEN = """
    import numpy as np
    from dataclasses import dataclass
    from toolkit.improve.methods import Method, MethodParams, option

    @dataclass(frozen=True)
    class P(MethodParams):
        weight: float = option("--bad-weight", "a weight.", 1.0, "float", lo=-10.0, hi=10.0)

        def check(self):
            if self.weight == 0:
                raise ValueError("a weight of 0 is the baseline")

    class Bad(Method):
        name = "{name}"
        Params = P

        def score(self, block):
            return {body}

    METHOD = Bad()
"""

CASES = {
    "wrong-shape": ("block.scores[:, :-1]", [], "returned an array of shape"),
    "nan-scores": ("block.scores * np.nan", [], "not finite"),
    "raises": ("1 / 0", [], "ZeroDivisionError"),
    "rejects-params": ("block.scores", ["--bad-weight", "0"], "a weight of 0 is the baseline"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_broken_plugin_is_one_message_naming_it_and_writes_nothing(study, plugin_cli, name):
    body, extra, needle = CASES[name]
    module = "plug_" + name.replace("-", "_")
    run = plugin_cli(module, BROKEN.replace("{name}", name).replace("{body}", body), {name: f"{module}:METHOD"})
    before = counts(study)
    res = run("--db", study, "improve", "--categories", "Object", "--method", name, *extra)
    assert_one_message(res, name, needle)
    assert counts(study) == before


def test_a_plugin_that_fails_to_import_is_named_and_help_still_works(study, plugin_cli):
    run = plugin_cli("plug_noimport", "import no_such_module_anywhere\n", {"no-import": "plug_noimport:METHOD"})
    assert run("improve", "--help").exit_code == 0
    before = counts(study)
    res = run("--db", study, "improve", "--categories", "Object", "--method", "no-import")
    assert_one_message(res, "no-import", "plug_noimport:METHOD", "plug-noimport", "ModuleNotFoundError")
    assert counts(study) == before
    ok = run("--db", study, "improve", "--categories", "Object", "--method", "query-expansion")
    assert ok.exit_code == 0, ok.output  # the other methods are not affected


def test_a_plugin_that_claims_a_builtin_name_is_refused_by_name_not_run_in_its_place(study, plugin_cli):
    """A third-party package that registers 'qb-norm' too: clipfail does not guess which one a study means, so
    choosing qb-norm names both registrations and writes nothing; the other methods still run."""
    code = BROKEN.format(name="qb-norm", body="block.scores")
    run = plugin_cli("plug_hijack", code, {"qb-norm": "plug_hijack:METHOD"})
    assert run("improve", "--help").exit_code == 0
    before = counts(study)
    res = run("--db", study, "improve", "--categories", "Object", "--method", "qb-norm")
    assert_one_message(res, "'qb-norm'", "two packages register this name", "plug-hijack", "Nothing was written")
    assert counts(study) == before
    ok = run("--db", study, "improve", "--categories", "Object", "--method", "query-expansion")
    assert ok.exit_code == 0, ok.output


def _make_v1(path) -> None:
    """Turn a study into what schema version 1 left: placeholders where a method without prompts has no value,
    NOT NULL on those columns, version 1 and an old schema hash."""
    from toolkit.store.study import _PLACEHOLDERS

    con = open_study(path)
    try:
        for col, value in _PLACEHOLDERS.items():
            con.execute(f"UPDATE improvement_runs SET {col} = ? WHERE {col} IS NULL", [value])
            con.execute(f"ALTER TABLE improvement_runs ALTER COLUMN {col} SET NOT NULL")
        con.execute("UPDATE schema_info SET value = '1' WHERE key = 'schema_version'")
        con.execute("UPDATE schema_info SET value = 'v1' WHERE key = 'schema_hash'")
    finally:
        con.close()


def test_a_version_1_study_upgrades_its_placeholders_to_null_and_a_rerun_is_a_noop(study, run_cli):
    args = ["--db", study, "improve", "--categories", "Object,Attribute", "--method", "qb-norm", "--control",
            "successes:10"]  # fmt: skip
    run_cli(*args)
    with open_study(study, read_only=True) as con:
        fresh = con.execute("SELECT * FROM method_comparison ORDER BY ALL").fetchall()
    before = counts(study)
    _make_v1(study)
    import duckdb

    with duckdb.connect(study, read_only=True) as raw:  # what version 1 held
        held = raw.execute("SELECT DISTINCT pooling, template_mode, k_per_category FROM improvement_runs").fetchall()
        assert held == [("none", "none", "{}")]
    again = run_cli(*args)
    assert "Already computed" in again.output and counts(study) == before
    with open_study(study, read_only=True) as con:
        assert con.execute("SELECT value FROM schema_info WHERE key = 'schema_version'").fetchone()[0] == "2"
        cols = ["pooling", "template_set", "templates_sha256", "template_mode", "k_per_category"]
        nulls = con.execute(f"SELECT {', '.join(f'count({c})' for c in cols)} FROM improvement_runs").fetchone()
        assert nulls == (0,) * len(cols)
        strict = con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'improvement_runs' "
            "AND is_nullable = 'NO'"
        ).fetchall()
        assert not {c for (c,) in strict} & set(cols)
        assert con.execute("SELECT * FROM method_comparison ORDER BY ALL").fetchall() == fresh
