"""Prompt lists (issue 13): K distinct prompts per caption, the shipped template sets, and coverage; and the
`templates import` / `templates export` commands' refusals.

Pure functions and the shipped data only (a small database only for the seeding test and the templates
commands), so the file is fast.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import refused

from toolkit.errors import UserError
from toolkit.improve import stage as imp
from toolkit.improve import templates
from toolkit.labels import phrases
from toolkit.store import study

CAPTIONS_FILE = Path(__file__).parent / "data" / "coco_style_captions.txt"


def captions() -> list[str]:
    return [line.strip() for line in CAPTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# build_prompts: the caption once, then distinct applicable prompts in order, cut at K


def test_the_caption_comes_once_and_a_template_that_does_not_apply_makes_room_for_the_next():
    caption = "A man riding a horse on a beach."
    tl = [
        "{caption}",
        "a photo of {count}.",
        "a photo of {objects}.",
        "{caption}",
        "{objects}: {caption}",
        "z {caption}",
    ]
    assert phrases.build_prompts(caption, tl, 3) == [
        caption,  # the identity, once (the second {caption} adds nothing)
        "a photo of man and horse.",  # {count} is empty here: skipped, the next template takes its place
        "man and horse: A man riding a horse on a beach.",
    ]
    assert phrases.build_prompts(caption, tl, 10) == [
        caption,
        "a photo of man and horse.",
        "man and horse: A man riding a horse on a beach.",
        "z A man riding a horse on a beach.",
    ]  # fewer than K apply: the caption keeps what it has
    assert phrases.build_prompts(caption, tl, 1) == [caption]
    with pytest.raises(ValueError):
        phrases.build_prompts(caption, tl, 0)


def test_prompts_that_differ_only_in_case_or_white_space_count_once():
    caption = "A Dog on a bed."
    tl = ["a dog on a bed.", "{caption_lc}.", "  {caption} ", "a photo of {objects}.", "A photo of  {objects}."]
    assert phrases.build_prompts(caption, tl, 10) == [caption, "a photo of dog and bed."]
    assert phrases.prompt_key(" A  photo\tOF x ") == "a photo of x"


@pytest.mark.parametrize(
    "caption,clause",
    [
        ("A man riding a horse.", "a man riding a horse"),
        ("  There are two dogs!  ", "there are two dogs"),
        ("TV on a stand", "TV on a stand"),  # an acronym keeps its capitals
        ("McDonald's sign at night.", "McDonald's sign at night"),
        ("a cat", "a cat"),
        ("", ""),
    ],
)
def test_caption_clause(caption, clause):
    assert phrases.caption_clause(caption) == clause
    assert phrases.try_fill("a photo: {caption_lc}.", caption) == f"a photo: {clause}."


def test_fill_and_try_fill():
    assert phrases.try_fill("a photo of {count}.", "A cat.") is None
    assert phrases.fill("a photo of {count}.", "A cat.") == "A cat."  # fill keeps its documented fallback
    assert phrases.try_fill("{count}!", "Two cats.") == "two cats!"
    with pytest.raises(ValueError, match="allowed slots are"):
        phrases.template_slots("{caption_upper}")


# ------------------------------------------------------------------------------------------------
# the shipped sets: names stand for fixed content


def test_shipped_sets_are_pinned_by_content():
    # A shipped set never changes under its name: a new default is a new set (default-v3, ...). If this
    # fails, you edited a shipped file: restore it and ship your templates under a new name.
    assert templates.DEFAULT_SET == "default-v2" and set(templates.SHIPPED_SETS) == {"default", "default-v2"}
    pins = {
        "default": "29119581e7e9cb90fc31f0752327640c762a0e15eaf16bada567f2267bdf09c0",
        "default-v2": "4738f67372216f1be5a030293e00d10a4f2fd8bd49455d5f2e48bdf7e762d3fa",
    }
    for name, sha in pins.items():
        assert templates.templates_sha256(templates.shipped_set(name)) == sha, name


def test_default_v2_reaches_k_10_for_any_caption():
    tdf = templates.shipped_set()
    for cat, grp in tdf.groupby("category"):
        tl = list(grp.sort_values("position")["template"])
        assert tl[0] == "{caption}" and len(tl) == 19, cat
        always = [t for t in tl[1:] if not phrases.template_slots(t) - phrases.CAPTION_FIELDS]
        assert len(always) >= 9, cat  # the caption plus 9 framings: K=10 whatever the phrases found
        # even a caption in which no phrase is found
        assert len(phrases.build_prompts("Nothing but sky.", tl, 10)) == 10, cat


def test_opening_a_database_that_has_the_old_default_adds_default_v2_and_keeps_the_old(tmp_path):
    path = tmp_path / "old.duckdb"
    con = study.open_study(path)
    # a database made before default-v2: only 'default', here with content of its own
    con.execute("DELETE FROM prompt_templates WHERE template_set = 'default-v2'")
    con.execute("UPDATE schema_info SET value = 'older' WHERE key = 'schema_hash'")  # set up by an older clipfail
    con.execute("UPDATE prompt_templates SET template = template || ' (edited)' WHERE position = 3")
    old = con.execute("SELECT * FROM prompt_templates ORDER BY ALL").df()
    con.close()
    con = study.open_study(path)
    try:
        got = con.execute("SELECT * FROM prompt_templates WHERE template_set = 'default' ORDER BY ALL").df()
        assert got.equals(old)  # never rewritten
        v2 = templates.load_set(con, "default-v2")
        assert templates.templates_sha256(v2) == templates.templates_sha256(templates.shipped_set())
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------
# coverage on ~300 COCO-style captions written for the project (benchmarks/prompt_coverage.py prints it)


def test_the_captions_file_covers_the_kinds_of_caption():
    caps = captions()
    assert 280 <= len(caps) <= 320 and len(set(caps)) == len(caps)
    m = [phrases.mentions(c) for c in caps]
    assert sum(x["attribute"] for x in m) >= 50 and sum(x["number"] for x in m) >= 50
    assert sum(x["relation"] for x in m) >= 50
    words = " ".join(caps).lower()
    for w in ("man", "woman", "dog", "giraffe", "bus", "train", "pizza", "kitchen", "beach", "two", "red", "next to"):
        assert w in words, w


def _load_benchmark():
    path = Path(__file__).parent.parent / "benchmarks" / "prompt_coverage.py"
    spec = importlib.util.spec_from_file_location("prompt_coverage", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_set_meets_the_coverage_targets_at_k_10():
    cov = imp.prompt_coverage(captions(), templates.shipped_set(), k=10)
    print(cov.to_string(index=False))
    pct = {(r.category, r.captions): r.pct_at_k for r in cov.itertuples()}
    assert pct[("Object", "all")] >= 95 and pct[("Action", "all")] >= 95
    assert pct[("Attribute", "mention an attribute")] >= 90
    assert pct[("Count", "mention a number")] >= 90
    assert pct[("Spatial", "mention a relation")] >= 90
    assert all(pct[(c, "all")] >= 80 for c in ("Object", "Attribute", "Action", "Context", "Count", "Spatial"))
    # the prompts are the category's own: on captions with the phrase, most come from slot templates
    slot = {(r.category, r.captions): r.mean_slot_prompts for r in cov.itertuples()}
    assert slot[("Attribute", "mention an attribute")] >= 7 and slot[("Count", "mention a number")] >= 7
    # the same check fails for the first default set (why default-v2 exists)
    bench = _load_benchmark()
    assert bench.targets(cov) == []
    assert len(bench.targets(imp.prompt_coverage(captions(), templates.shipped_set("default"), k=10))) >= 4


def test_prompt_coverage_figures_recounted_by_hand():
    """Every figure of prompt_coverage on 5 captions, recounted without the code under test: which caption
    names a number or an attribute was read off its words by hand, and the templates are such that each
    caption's prompts can be counted from that alone."""
    import pandas as pd

    names = {  # caption: (names a number, names an attribute word)
        "two red buses on a street": (True, True),
        "a man riding a horse": (False, False),
        "three dogs in a field": (True, False),
        "a large white kitchen": (False, True),
        "a cat next to a laptop": (False, False),
    }
    # The caption itself; "a photo of ..."; the 3rd gives the same prompt as the 2nd (case and spaces aside);
    # the 4th needs a number, the 5th an attribute. So a caption has 2 + (number) + (attribute) prompts, of
    # which the last (number) + (attribute) come from slot templates; k cuts the list.
    tlist = ["{caption}", "a photo of {caption}", "A Photo  of {caption}", "{count}. {caption}",
             "{attributes}. {caption}"]  # fmt: skip
    tdf = pd.DataFrame([{"template_set": "t", "category": cat, "position": i, "template": t}
                        for cat in ("Count", "Attribute", "Action") for i, t in enumerate(tlist)])  # fmt: skip
    for k in (1, 2, 3, 4):
        cov = imp.prompt_coverage(list(names), tdf, k=k)

        def row(cat, label, group, k=k):
            ks = [min(k, 2 + num + att) for num, att in (names[c] for c in group)]
            slot = [min(k, 2 + num + att) - min(k, 2) for num, att in (names[c] for c in group)]
            return {"category": cat, "captions": label, "n": len(group), "n_at_k": sum(x == k for x in ks),
                    "pct_at_k": round(100 * sum(x == k for x in ks) / len(group), 1),
                    "mean_k": round(sum(ks) / len(group), 2),
                    "mean_slot_prompts": round(sum(slot) / len(group), 2)}  # fmt: skip

        every = list(names)
        expected = [
            row("Count", "all", every),
            row("Count", "mention a number", [c for c in every if names[c][0]]),
            row("Attribute", "all", every),
            row("Attribute", "mention an attribute", [c for c in every if names[c][1]]),
            row("Action", "all", every),
        ]
        assert cov.to_dict("records") == expected, k
    # at k 4, written out: 1 of the 5 captions has both slots, and 1 of the 2 that name a number
    assert [r["pct_at_k"] for r in expected] == [20.0, 50.0, 20.0, 50.0, 20.0]
    assert [r["mean_k"] for r in expected] == [2.8, 3.5, 2.8, 3.5, 2.8]


def test_union_object_attribute_reaches_k_15():
    cov = imp.prompt_coverage(
        captions(), templates.shipped_set(), k=15, mode="union", categories=["Object", "Attribute"]
    )
    assert cov[cov["captions"] == "all"]["pct_at_k"].tolist() == [100.0, 100.0]
    tdf = templates.shipped_set()
    per_cat, union = imp.template_lists(tdf, ["Object", "Attribute"], "union", 15)
    obj = list(tdf[tdf["category"] == "Object"].sort_values("position")["template"])
    att = list(tdf[tdf["category"] == "Attribute"].sort_values("position")["template"])
    assert union == obj + att[1:]  # Object's list, then Attribute's, the shared identity once
    assert per_cat == {"Object": union, "Attribute": union}


def test_benchmark_prints_the_table(capsys):
    bench = _load_benchmark()
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "Attribute mention an attribute" in out and "targets: all met" in out
    assert bench.main(["--set", "default"]) == 1


@pytest.mark.parametrize(
    "mode,k,message",
    [
        ("own", 20, "--k 20 is more than the templates of a category in set 'default-v2' (templates per category: "
                    "Object 19, Attribute 19). Give --k 19 or less"),
        ("union", 38, "--k 38 is more than the 37 distinct templates of Object, Attribute together"),
    ],
)  # fmt: skip
def test_k_above_the_lists_is_refused_with_their_sizes(mode, k, message):
    with pytest.raises(UserError) as err:
        imp.template_lists(templates.shipped_set(), ["Object", "Attribute"], mode, k)
    assert message in str(err.value)
    imp.template_lists(templates.shipped_set(), ["Object", "Attribute"], mode, k - 1)  # the largest K allowed


def test_templates_import_refuses_a_fifo_or_folder_without_opening_it(run_cli, tmp_db, tmp_path):
    import os
    import stat

    import duckdb
    from helpers import invoke_unblocking

    run_cli("--db", tmp_db, "init")

    def sets():
        con = duckdb.connect(tmp_db, read_only=True)
        try:
            return con.execute("SELECT * FROM prompt_templates ORDER BY ALL").fetchall()
        finally:
            con.close()

    before = sets()
    fifo = tmp_path / "mine.csv"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    cases = [
        (fifo, f"Templates file {fifo} is a FIFO"),
        (Path("/dev/zero"), "Templates file /dev/zero is a device"),  # would never end
        (folder, "is a directory"),  # click's own check of the argument
    ]
    for bad, needle in cases:
        res = invoke_unblocking(["--db", tmp_db, "templates", "import", bad, "--set", "mine"], [fifo])
        assert res.exit_code == 2 and "Traceback" not in res.output and needle in res.output, res.output
        assert sets() == before
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("template_set,category,position,template\nmine,Object,0,{caption} caf\xe9\n".encode("latin-1"))
    res = run_cli("--db", tmp_db, "templates", "import", bad, expect=2)
    assert "is not UTF-8 text (byte" in res.output and sets() == before


# ------------------------------------------------------------------ templates import and export (issue 11)


@pytest.mark.parametrize("position", [2**31, 2**32, 2**32 + 1, -1])
def test_template_positions_beyond_int32_are_refused_naming_the_row(run_cli, study_db, tmp_path, position):
    csv = tmp_path / "t.csv"
    rows = [("mine", "Object", 0, "{caption}"), ("mine", "Object", position, "a photo of {objects}")]
    csv.write_text(
        "template_set,category,position,template\n" + "".join(f"{s},{c},{p},{t}\n" for s, c, p, t in rows),
        encoding="utf-8",
    )
    refused(run_cli, study_db, "templates", "import", csv, needles=["row 3", f"position '{position}'", "2147483647"])


def test_one_template_problem_is_one_problem(run_cli, tmp_db, tmp_path):
    bad = tmp_path / "one_bad.csv"
    bad.write_text("template_set,category,position,template\nmine,Object,0,{caption}\nmine,Object,1,{nope}\n")
    res = run_cli("--db", tmp_db, "templates", "import", bad, expect=2)
    assert "(1 problem)" in res.output and "problems)" not in res.output


def test_templates_export_never_overwrites_an_edited_template_csv(run_cli, tmp_db, tmp_path):
    """`templates export --out FILE` wrote over FILE whatever it held: a template CSV the user had edited (the very
    file `templates import` reads) was lost. It is now refused, the file left as it was; the same content again is
    fine, and an --out in a missing folder is one clear message, not a traceback."""
    run_cli("--db", tmp_db, "init")
    mine = tmp_path / "my_templates.csv"
    edited = "template_set,category,position,template\nmine,Object,0,{caption}\nmine,Object,1,my own {objects}\n"
    mine.write_text(edited, encoding="utf-8")
    res = run_cli("--db", tmp_db, "templates", "export", "--set", "default-v2", "--out", mine, expect=2)
    assert "my_templates.csv" in res.output and "--out" in res.output
    assert mine.read_text(encoding="utf-8") == edited
    fresh = tmp_path / "fresh.csv"
    run_cli("--db", tmp_db, "templates", "export", "--set", "default-v2", "--out", fresh)
    first = fresh.read_text(encoding="utf-8")
    run_cli("--db", tmp_db, "templates", "export", "--set", "default-v2", "--out", fresh)  # nothing would be lost
    assert fresh.read_text(encoding="utf-8") == first
    res = run_cli("--db", tmp_db, "templates", "export", "--out", tmp_path / "nowhere" / "t.csv", expect=2)
    assert "nowhere" in res.output and "Traceback" not in res.output
