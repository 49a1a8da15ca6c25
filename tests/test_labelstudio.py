"""The Label Studio round trip: export-labelstudio's tasks and config, and import-labels --format labelstudio
on exports written by hand in the layout of Label Studio's documented JSON export (Label Studio itself is
not needed): tasks with `id`, `data`, and `annotations[]` with `completed_by`, `was_cancelled` and
`result[]` items `{from_name, to_name, type: "choices" | "textarea", value: {choices: [...]} | {text: [...]}}`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import study_reader
from test_annotate import base, invoke, rows, suggestions_in_db, triaged, triaged_base  # noqa: F401  (shared fixtures)

from toolkit.store.study import open_study


@pytest.fixture
def study(base, tmp_path):  # noqa: F811
    dest = tmp_path / "db.duckdb"
    shutil.copy(base, dest)
    return str(dest)


def export(study, out, *extra, expect=0):
    res = invoke("--db", study, "export-labelstudio", out, *extra)
    assert res.exit_code == expect, res.output
    return res


def sets(study):
    return {
        name: [r[0] for r in rows(study, "SELECT sample_id FROM failure_samples WHERE set_name = ? ORDER BY 1", [name])]
        for name in ("overlap", "A", "B", "backup")
    }


def test_export_tasks_and_config(study, tmp_path):
    out = tmp_path / "ls"
    res = export(study, out)
    assert "tasks.json" in res.output and "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=" in res.output
    root = Path(rows(study, "SELECT image_root FROM subsets")[0][0])
    flat = " ".join(res.output.split())
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root.parent} " in flat and f"absolute path {root}." in flat
    tasks = json.loads((out / "tasks.json").read_text("utf-8"))
    s = sets(study)
    assert sorted(t["data"]["sample_id"] for t in tasks) == sorted(s["overlap"] + s["A"] + s["B"])  # no backup
    root = Path(rows(study, "SELECT image_root FROM subsets")[0][0])
    truth = {
        sid: (cap, gt, rank, list(ids)[:5], list(scores)[:5])
        for sid, cap, gt, rank, ids, scores in rows(
            study,
            "SELECT f.sample_id, c.text, r.gt_id, r.gt_rank, r.topk_ids, r.topk_scores FROM failure_samples f "
            "JOIN retrieval_ranks r ON r.query_id = f.caption_id AND r.retrieval_run_id = f.retrieval_run_id "
            "JOIN captions c ON c.caption_id = f.caption_id",
        )
    }
    files = dict(rows(study, "SELECT image_id, rel_path FROM images"))
    for t in tasks:
        d = t["data"]
        cap, gt, rank, ids, scores = truth[d["sample_id"]]
        assert d["caption"] == cap and d["gt_rank"] == rank
        # d= is relative to Label Studio's document root, the folder above the images (it refuses a storage on the
        # root itself), so the URL names the image folder too
        assert d["gt_image"] == "/data/local-files/?d=" + root.name + "/" + files[gt]
        assert Path(d["gt_file"]) == root / files[gt] and Path(d["gt_file"]).is_file()
        for k in range(5):
            assert d[f"top{k + 1}_file"] == str(root / files[ids[k]])
            assert d[f"top{k + 1}_score"] == pytest.approx(scores[k], abs=1e-6)
            assert d[f"top{k + 1}_is_gt"] == (ids[k] == gt)

    config = (out / "labeling_config.xml").read_text("utf-8")
    tree = ET.fromstring(config)
    cat = tree.find(".//Choices[@name='category']")
    assert cat.get("toName") == "caption" and cat.get("choice") == "single-radio"
    names = [c[0] for c in rows(study, "SELECT name FROM categories ORDER BY position")]
    assert [c.get("value") for c in cat] == names
    assert [c.get("hotkey") for c in cat] == [str(i) for i in range(1, 8)]
    sec = tree.find(".//Choices[@name='secondary']")
    assert [c.get("value") for c in sec] == names and len({c.get("hotkey") for c in sec} | set("1234567")) == 14
    assert tree.find(".//TextArea[@name='notes']").get("toName") == "caption"
    assert tree.find(".//Text[@name='caption']").get("value") == "$caption"
    # Every $field the config shows is in every task.
    fields = set(re.findall(r"\$(\w+)", config))
    assert fields and all(fields <= set(t["data"]) for t in tasks)

    # Re-export: unchanged. An edited file is never overwritten without --force.
    assert "already up to date: tasks.json, labeling_config.xml" in export(study, out).output
    (out / "labeling_config.xml").write_text(config.replace("Notes (optional)", "My notes"), "utf-8")
    res = export(study, out, expect=2)
    assert "labeling_config.xml already exists with other content" in res.output
    assert "My notes" in (out / "labeling_config.xml").read_text("utf-8")
    export(study, out, "--force")
    assert (out / "labeling_config.xml").read_text("utf-8") == config
    # Plain URLs for images served elsewhere.
    export(study, tmp_path / "ls2", "--image-url-prefix", "https://img.example/coco/")
    t0 = json.loads((tmp_path / "ls2" / "tasks.json").read_text("utf-8"))[0]["data"]
    assert t0["gt_image"].startswith("https://img.example/coco/") and t0["gt_image"].endswith(".jpg")


def ls_annotation(ann_id, user, category=None, secondary=None, notes=None, cancelled=False):
    """One annotation as Label Studio's JSON export writes it."""
    result = []
    if category:
        cats = category if isinstance(category, list) else [category]
        result.append({"id": f"r{ann_id}a", "from_name": "category", "to_name": "caption", "type": "choices",
                       "origin": "manual", "value": {"choices": cats}})  # fmt: skip
    if secondary:
        result.append({"id": f"r{ann_id}b", "from_name": "secondary", "to_name": "caption", "type": "choices",
                       "origin": "manual", "value": {"choices": [secondary]}})  # fmt: skip
    if notes:
        result.append({"id": f"r{ann_id}c", "from_name": "notes", "to_name": "caption", "type": "textarea",
                       "origin": "manual", "value": {"text": [notes]}})  # fmt: skip
    return {
        "id": ann_id, "completed_by": user, "result": result, "was_cancelled": cancelled, "ground_truth": False,
        "created_at": "2026-11-20T10:00:00.000000Z", "updated_at": "2026-11-20T10:00:05.000000Z",
        "lead_time": 5.2, "prediction": {}, "result_count": 0, "task": None, "parent_prediction": None,
        "parent_annotation": None, "last_action": None, "project": 3,
        "updated_by": user if isinstance(user, int) else 1,
    }  # fmt: skip


def ls_export(tasks_json: Path, annotations: dict[int, list[dict]]) -> list[dict]:
    """Label Studio's JSON export of the tasks clipfail exported, with these annotations per sample."""
    out = []
    for i, t in enumerate(json.loads(tasks_json.read_text("utf-8"))):
        sid = t["data"]["sample_id"]
        anns = annotations.get(sid, [])
        for a in anns:
            a["task"] = 100 + i
        out.append(
            {"id": 100 + i, "annotations": anns, "file_upload": "tasks.json", "drafts": [], "predictions": [],
             "data": t["data"], "meta": {}, "created_at": "2026-11-20T09:00:00.000000Z",
             "updated_at": "2026-11-20T10:00:05.000000Z", "inner_id": i + 1, "total_annotations": len(anns),
             "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
             "last_comment_updated_at": None, "project": 3, "updated_by": 1, "comment_authors": []}
        )  # fmt: skip
    return out


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1), "utf-8")
    return path


def labels(study):
    return rows(
        study,
        "SELECT sample_id, annotator, raw_label, category, secondary_category, notes FROM annotations ORDER BY 1, 2",
    )


def test_import_labelstudio_export(study, tmp_path):
    out = tmp_path / "ls"
    export(study, out)
    s = sets(study)
    ov, a, b = s["overlap"], s["A"], s["B"]
    user_a = {"id": 7, "first_name": "Ann", "last_name": "Lee", "email": "a@lab.example"}  # older/API form
    anns = {
        ov[0]: [ls_annotation(1, user_a, "Object", "Attribute", "red, not blue"), ls_annotation(2, 9, "Count")],
        a[0]: [ls_annotation(3, user_a, "Spatial")],
        a[1]: [ls_annotation(4, user_a, cancelled=True)],  # skipped in Label Studio: unlabeled
        b[0]: [ls_annotation(5, 9, ["Action"])],
    }
    path = write(tmp_path / "project-3-at-2026-11-20.json", ls_export(out / "tasks.json", anns))
    # User 9 is a bare id: it names nobody until mapped.
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", path)
    assert (
        res.exit_code == 2 and "its user (user id 9) is not an annotator" in res.output and "--user-map" in res.output
    )
    assert labels(study) == []
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", "--user-map", "9=b", path)
    assert res.exit_code == 0, res.output
    assert "Imported 4 labels" in res.output
    want = sorted(
        [
            (ov[0], "A", "Object; Attribute", "Object", "Attribute", "red, not blue"),
            (ov[0], "B", "Count", "Count", None, None),
            (a[0], "A", "Spatial", "Spatial", None, None),
            (b[0], "B", "Action", "Action", None, None),
        ]
    )
    assert labels(study) == want
    run = rows(study, "SELECT stage, config_json FROM runs WHERE run_id = (SELECT max(run_id) FROM annotations)")[0]
    assert run[0] == "import-labels" and json.loads(run[1])["format"] == "labelstudio"
    assert set(r[0] for r in rows(study, "SELECT source_file FROM annotations")) == {str(path.resolve())}
    # Re-import: a no-op. The views see the labels like imported CSVs.
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", "--user-map", "9=B", path)
    assert res.exit_code == 0 and "already imported exactly as they are" in res.output
    assert dict(rows(study, "SELECT annotator, count FROM taxonomy_by_annotator WHERE category = 'Spatial'")) == {
        "A": 1,
        "B": 0,
    }

    # A second export where A changed a label: it replaces A's label, never duplicates.
    anns2 = {a[0]: [ls_annotation(3, user_a, "Context", notes="on second look")]}
    path2 = write(tmp_path / "second.json", ls_export(out / "tasks.json", anns2))
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", path2)
    assert res.exit_code == 0, res.output
    assert "1 earlier labels were replaced" in res.output
    got = [r for r in labels(study) if r[0] == a[0]]
    assert got == [(a[0], "A", "Context", "Context", None, "on second look")]
    assert len(labels(study)) == 4


def test_import_problems_are_all_or_nothing(study, tmp_path):
    out = tmp_path / "ls"
    export(study, out)
    s = sets(study)
    good = {s["A"][0]: [ls_annotation(1, {"id": 1, "email": "A@x.org"}, "Object")]}
    bad = {
        s["A"][1]: [ls_annotation(2, {"id": 1, "email": "A@x.org"}, "Colourish")],  # unknown category
        s["B"][0]: [ls_annotation(3, {"id": 1, "email": "A@x.org"}, "Object")],  # B's sample, labelled by A
        s["A"][2]: [
            ls_annotation(4, {"id": 1, "email": "A@x.org"}, "Object"),
            ls_annotation(5, {"id": 1, "email": "a@y.org"}, "Count"),
        ],  # A twice  # fmt: skip
    }
    path = write(tmp_path / "bad.json", ls_export(out / "tasks.json", good | bad))
    before = rows(study, "SELECT count(*) FROM runs")
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", path)
    assert res.exit_code == 2, res.output
    assert "Nothing was imported: 3 problems" in res.output
    assert "unknown category 'colourish'" in res.output.lower()
    assert f"sample {s['B'][0]} is in B's set, not A's" in res.output
    assert f"sample {s['A'][2]} is labelled by A twice" in res.output
    assert labels(study) == [] and rows(study, "SELECT count(*) FROM runs") == before

    # --annotator names whose labels they are, whatever the user.
    path = write(tmp_path / "good.json", ls_export(out / "tasks.json", {s["A"][0]: [ls_annotation(1, 42, "count")]}))
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", "--annotator", "a", path)
    assert res.exit_code == 0, res.output
    assert labels(study) == [(s["A"][0], "A", "count", "Count", None, None)]

    for content, message in [
        ("not json", "is not valid JSON"),
        ('{"tasks": 1}', "is not a Label Studio JSON export"),
        ("[]", "holds no annotations"),
    ]:
        p = tmp_path / "x.json"
        p.write_text(content, "utf-8")
        res = invoke("--db", study, "import-labels", "--format", "labelstudio", p)
        assert res.exit_code == 2 and message in res.output, res.output
    res = invoke("--db", study, "import-labels", "--user-map", "1=A", tmp_path / "x.json")
    assert res.exit_code == 2 and "--user-map is for --format labelstudio" in res.output


def test_export_carries_triage_suggestions_as_predictions(triaged, study, tmp_path):  # noqa: F811
    want = suggestions_in_db(triaged)
    scores = dict(
        rows(
            triaged,
            "SELECT f.sample_id, t.score FROM failure_samples f JOIN triage_suggestions t USING (caption_id) "
            "WHERE t.triage_run_id = (SELECT max(triage_run_id) FROM triage_runs)",
        )
    )
    trid = rows(triaged, "SELECT max(triage_run_id) FROM triage_runs")[0][0]
    for extra, on_overlap in (([], False), (["--show-suggestions-on-overlap"], True)):
        out = tmp_path / f"ls{int(on_overlap)}"
        res = export(triaged, out, *extra)
        tasks = json.loads((out / "tasks.json").read_text("utf-8"))
        cat = ET.fromstring((out / "labeling_config.xml").read_text("utf-8")).find(".//Choices[@name='category']")
        n = 0
        for t in tasks:
            sid, set_name = t["data"]["sample_id"], t["data"]["set_name"]
            if sid in want and (on_overlap or set_name != "overlap"):
                n += 1
                assert t["predictions"] == [
                    {
                        "model_version": f"clipfail triage run {trid}",
                        "score": pytest.approx(scores[sid]),
                        "result": [
                            {"from_name": cat.get("name"), "to_name": cat.get("toName"), "type": "choices",
                             "value": {"choices": [want[sid][1]]}}
                        ],
                    }
                ]  # fmt: skip
                assert want[sid][1] in [c.get("value") for c in cat]
                assert (t["data"]["suggested_category"], t["data"]["evidence"]) == want[sid][1:]
            else:
                assert "predictions" not in t and t["data"]["suggested_category"] == t["data"]["evidence"] == ""
        assert n and any(want[s][0] == "overlap" for s in want)  # the hiding had something to hide
        assert f"{n} carry a prediction from triage run {trid}" in res.output
        assert ("none on the overlap set" in res.output) is not on_overlap
    # No triage run: no predictions, no error.
    export(study, tmp_path / "plain")
    assert all("predictions" not in t for t in json.loads((tmp_path / "plain" / "tasks.json").read_text("utf-8")))


def test_import_reads_annotations_never_predictions(triaged, tmp_path):  # noqa: F811
    out = tmp_path / "ls"
    export(triaged, out)
    tasks = json.loads((out / "tasks.json").read_text("utf-8"))
    predicted = [t for t in tasks if t.get("predictions")]
    assert predicted
    # Label Studio's export of the project before anyone labelled: the predictions come back, no annotations.
    export_json = ls_export(out / "tasks.json", {})
    for task, t in zip(export_json, tasks):
        task["predictions"] = t.get("predictions", [])
    path = write(tmp_path / "predictions-only.json", export_json)
    before = rows(triaged, "SELECT count(*) FROM runs")
    res = invoke("--db", triaged, "import-labels", "--format", "labelstudio", "--annotator", "A", path)
    assert res.exit_code == 2 and "holds no annotations" in res.output, res.output
    assert labels(triaged) == [] and rows(triaged, "SELECT count(*) FROM runs") == before
    # An annotator who changed the pre-filled prediction: the annotation's category is stored, not the prediction's.
    task = next(t for t in predicted if t["data"]["set_name"] == "A")
    suggested = task["data"]["suggested_category"]
    other = next(c for c in ("Context", "Action") if c != suggested)
    export_json = ls_export(
        out / "tasks.json", {task["data"]["sample_id"]: [ls_annotation(1, {"id": 1, "email": "a@x"}, other)]}
    )
    for t_out, t in zip(export_json, tasks):
        t_out["predictions"] = t.get("predictions", [])
    res = invoke("--db", triaged, "import-labels", "--format", "labelstudio", write(tmp_path / "one.json", export_json))
    assert res.exit_code == 0, res.output
    assert [(r[0], r[1], r[3]) for r in labels(triaged)] == [(task["data"]["sample_id"], "A", other)]


def test_export_needs_a_sample(tmp_path):
    empty = tmp_path / "e.duckdb"
    open_study(empty).close()
    res = invoke("--db", empty, "export-labelstudio", tmp_path / "out")
    assert res.exit_code == 2 and "no sampled failures" in res.output
    assert not (tmp_path / "out").exists()


def test_export_into_a_folder_that_cannot_be_made_is_one_message(study, tmp_path):
    # an --out under a file: one message, no traceback, nothing written
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = export(study, blocker / "ls", expect=2)
    assert "Cannot write the Label Studio files" in res.output and "Traceback" not in res.output
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# Issue 24: a label is never made up from input that only looks like one; the export's shape is checked
# as a whole before anything is written; FIFOs and other non-regular files are refused, never opened.


@pytest.fixture(scope="module")
def ls_labelled(base, tmp_path_factory):  # noqa: F811
    """A copy of `base` where A labelled A's first sample 'Attribute' (through a Label Studio import), and
    clipfail's tasks.json for it."""
    root = tmp_path_factory.mktemp("ls_labelled")
    dest = root / "db.duckdb"
    shutil.copy(base, dest)
    export(str(dest), root / "ls")
    a0 = sets(str(dest))["A"][0]
    path = write(
        root / "first.json", ls_export(root / "ls" / "tasks.json", {a0: [ls_annotation(1, USER_A, "Attribute")]})
    )
    res = invoke("--db", dest, "import-labels", "--format", "labelstudio", path)
    assert res.exit_code == 0, res.output
    return dest, root / "ls" / "tasks.json"


USER_A = {"id": 1, "email": "a@lab.example"}


@pytest.fixture
def lstudy(ls_labelled, tmp_path):
    """(database with A's stored 'Attribute' label on A's first sample, tasks.json, A's first two samples)."""
    src, tasks_json = ls_labelled
    dest = tmp_path / "db.duckdb"
    shutil.copy(src, dest)
    a = sets(str(dest))["A"]
    return str(dest), tasks_json, a[0], a[1]


def snapshot(dbpath) -> dict[str, list]:
    """What an import writes (annotations, and runs for its run row): a refused one leaves them as they were."""
    with study_reader(dbpath) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("annotations", "runs")}


def refused_import(dbpath, path, *needles, extra=()):
    before = snapshot(dbpath)
    data = Path(path).read_bytes()
    res = invoke("--db", dbpath, "import-labels", "--format", "labelstudio", *extra, path)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, repr(res.exception)
    assert res.output.count("Error:") == 1, res.output
    for needle in needles:
        assert needle in res.output, res.output
    assert snapshot(dbpath) == before and Path(path).read_bytes() == data
    return res


def _task_index(export_json, sample_id):
    return next(i for i, t in enumerate(export_json) if t["data"]["sample_id"] == sample_id)


def test_a_secondary_choice_alone_never_replaces_the_stored_category(lstudy, tmp_path):
    dbpath, tasks_json, a0, _ = lstudy
    assert [r[2:5] for r in labels(dbpath)] == [("Attribute", "Attribute", None)]
    # only the secondary control chosen (the category left empty): not a label of category Object
    exp = ls_export(tasks_json, {a0: [ls_annotation(7, USER_A, secondary="Object")]})
    res = refused_import(dbpath, write(tmp_path / "sec.json", exp), "a secondary category (Object) but no category")
    assert f"task {exp[_task_index(exp, a0)]['id']} (sample {a0}), annotation 7" in res.output
    assert [r[2:5] for r in labels(dbpath)] == [("Attribute", "Attribute", None)]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("two choices in category", "2 choices (Object, Count) in 'category'"),
        ("two category results", "2 choices (Object, Count) in 'category'"),
        ("two choices in secondary", "2 choices (Object, Count) in 'secondary'"),
        ("a choice naming two categories", "choice 'Object; Count' in 'category' names two categories"),
        ("an empty choice", "an empty choice in 'category'"),
        ("unknown choice", "unknown category 'zebra'"),
        ("a textarea from category", "a 'textarea' result from 'category', which is a choices control"),
        ("choices from notes", "choices from 'notes', which the clipfail config does not have"),
    ],
)
def test_ambiguous_choices_are_refused_naming_the_task_and_annotation(lstudy, tmp_path, case, needle):
    dbpath, tasks_json, a0, _ = lstudy
    ann = ls_annotation(7, USER_A, "Object")
    choice = ann["result"][0]
    if case == "two choices in category":
        choice["value"]["choices"] = ["Object", "Count"]
    elif case == "two category results":
        ann["result"].append({**choice, "id": "r7z", "value": {"choices": ["Count"]}})
    elif case == "two choices in secondary":
        ann["result"].append({**choice, "from_name": "secondary", "value": {"choices": ["Object", "Count"]}})
    elif case == "a choice naming two categories":
        choice["value"]["choices"] = ["Object; Count"]
    elif case == "an empty choice":
        choice["value"]["choices"] = [""]
    elif case == "a textarea from category":
        ann["result"] = [{**choice, "type": "textarea", "value": {"text": ["Object"]}}]
    elif case == "choices from notes":
        ann["result"].append({**choice, "from_name": "notes", "value": {"choices": ["Count"]}})
    else:
        choice["value"]["choices"] = ["Zebra"]
    exp = ls_export(tasks_json, {a0: [ann]})
    res = refused_import(dbpath, write(tmp_path / "amb.json", exp), needle, "Nothing was imported")
    assert f"task {exp[_task_index(exp, a0)]['id']} (sample {a0}), annotation 7" in res.output
    assert [r[2:5] for r in labels(dbpath)] == [("Attribute", "Attribute", None)]


def _ann0(exp, i):
    return exp[i]["annotations"][0]


def _setter(get, key, value):
    def fn(exp, i):
        get(exp, i)[key] = value

    return fn


def _deleter(get, key):
    def fn(exp, i):
        del get(exp, i)[key]

    return fn


_task = lambda exp, i: exp[i]  # noqa: E731
_data = lambda exp, i: exp[i]["data"]  # noqa: E731
_res = lambda k: lambda exp, i: _ann0(exp, i)["result"][k]  # noqa: E731
_val = lambda k: lambda exp, i: _ann0(exp, i)["result"][k]["value"]  # noqa: E731
_user = lambda exp, i: _ann0(exp, i)["completed_by"]  # noqa: E731


def _replace_all(value):
    def fn(exp, i):
        exp.clear()
        exp.append(value)

    return fn


# (mutation of an export where A labels A's first sample Object with notes, the path the message names)
SHAPES = {
    "a task that is not an object": (lambda exp, i: exp.__setitem__(i, 5), "tasks[{i}] must be an object"),
    "task id a string": (_setter(_task, "id", "7"), "tasks[{i}].id must be a whole number"),
    "task id a fraction": (_setter(_task, "id", 7.5), "tasks[{i}].id must be a whole number"),
    "task id a boolean": (_setter(_task, "id", True), "tasks[{i}].id must be a whole number"),
    "data missing": (_deleter(_task, "data"), "tasks[{i}].data must be an object"),
    "data a list": (_setter(_task, "data", [1]), "tasks[{i}].data must be an object"),
    "sample_id a string": (_setter(_data, "sample_id", "12"), "tasks[{i}].data.sample_id must be a whole number"),
    "sample_id a fraction": (_setter(_data, "sample_id", 12.5), "tasks[{i}].data.sample_id must be a whole number"),
    "sample_id a boolean": (_setter(_data, "sample_id", True), "tasks[{i}].data.sample_id must be a whole number"),
    "annotations a number": (_setter(_task, "annotations", 5), "tasks[{i}].annotations must be a list"),
    "annotations an object": (_setter(_task, "annotations", {}), "tasks[{i}].annotations must be a list"),
    "annotations null": (_setter(_task, "annotations", None), "tasks[{i}].annotations must be a list"),
    "an annotation that is a string": (
        lambda exp, i: exp[i]["annotations"].__setitem__(0, "Object"),
        "tasks[{i}].annotations[0] must be an object",
    ),
    "annotation id a string": (_setter(_ann0, "id", "1"), "tasks[{i}].annotations[0].id must be a whole number"),
    "completed_by a string": (
        _setter(_ann0, "completed_by", "7"),
        "tasks[{i}].annotations[0].completed_by must be a user id or an object",
    ),
    "completed_by a list": (
        _setter(_ann0, "completed_by", [1]),
        "tasks[{i}].annotations[0].completed_by must be a user id or an object",
    ),
    "completed_by a boolean": (
        _setter(_ann0, "completed_by", True),
        "tasks[{i}].annotations[0].completed_by must be a user id or an object",
    ),
    "completed_by.id a string": (_setter(_user, "id", "1"), "tasks[{i}].annotations[0].completed_by.id"),
    "completed_by.email a number": (_setter(_user, "email", 5), "tasks[{i}].annotations[0].completed_by.email"),
    "was_cancelled a string": (
        _setter(_ann0, "was_cancelled", "false"),
        "tasks[{i}].annotations[0].was_cancelled must be true or false",
    ),
    "was_cancelled a number": (
        _setter(_ann0, "was_cancelled", 0),
        "tasks[{i}].annotations[0].was_cancelled must be true or false",
    ),
    "created_username a number": (
        _setter(_ann0, "created_username", 5),
        "tasks[{i}].annotations[0].created_username must be a string",
    ),
    "result a number": (_setter(_ann0, "result", 5), "tasks[{i}].annotations[0].result must be a list"),
    "result an object": (_setter(_ann0, "result", {}), "tasks[{i}].annotations[0].result must be a list"),
    "result null": (_setter(_ann0, "result", None), "tasks[{i}].annotations[0].result must be a list"),
    "a result that is a string": (
        lambda exp, i: _ann0(exp, i)["result"].__setitem__(0, "Object"),
        "tasks[{i}].annotations[0].result[0] must be an object",
    ),
    "from_name a number": (_setter(_res(0), "from_name", 5), "result[0].from_name must be a string"),
    "from_name missing": (_deleter(_res(0), "from_name"), "result[0].from_name must be a string"),
    "type a number": (_setter(_res(0), "type", 5), "result[0].type must be a string"),
    "type missing": (_deleter(_res(0), "type"), "result[0].type must be a string"),
    "to_name a number": (_setter(_res(0), "to_name", 5), "result[0].to_name must be a string"),
    "value a list": (_setter(_res(0), "value", ["Object"]), "tasks[{i}].annotations[0].result[0].value must be an"),
    "value a string": (_setter(_res(0), "value", "Object"), "tasks[{i}].annotations[0].result[0].value must be an"),
    "value missing": (_deleter(_res(0), "value"), "tasks[{i}].annotations[0].result[0].value must be an object"),
    "choices a number": (_setter(_val(0), "choices", 5), "result[0].value.choices must be a list"),
    "choices a bare string": (_setter(_val(0), "choices", "Object"), "result[0].value.choices must be a list"),
    "choices missing": (_deleter(_val(0), "choices"), "result[0].value.choices must be a list"),
    "a choice that is a number": (_setter(_val(0), "choices", [5]), "result[0].value.choices[0] must be a string"),
    "a choice that is null": (_setter(_val(0), "choices", [None]), "result[0].value.choices[0] must be a string"),
    "a choice with a lone surrogate": (
        _setter(_val(0), "choices", ["Obj\ud800ect"]),
        "result[0].value.choices[0] holds a lone surrogate",
    ),
    "text a bare string": (_setter(_val(1), "text", "hello"), "tasks[{i}].annotations[0].result[1].value.text must"),
    "text a number": (_setter(_val(1), "text", 5), "result[1].value.text must be a list"),
    "a text that is a number": (_setter(_val(1), "text", [5]), "result[1].value.text[0] must be a string"),
    "notes with a lone surrogate": (
        _setter(_val(1), "text", ["red \udc80 not blue"]),
        "tasks[{i}].annotations[0].result[1].value.text[0] holds a lone surrogate",
    ),
    "top level a number": (lambda exp, i: None, "tasks must be a list"),
}


# The cases of the finding (and one of each kind besides) go through the CLI; every case through check_export.
CLI_SHAPES = [
    "annotations a number",
    "result a number",
    "choices a number",
    "value a list",
    "value a string",
    "text a bare string",
    "notes with a lone surrogate",
    "choices a bare string",
    "a task that is not an object",
    "task id a string",
    "data missing",
    "sample_id a string",
    "completed_by a string",
    "was_cancelled a string",
    "a choice that is a number",
    "top level a number",
]


def _malformed(tasks_json, a0, a1, case):
    anns = {
        a0: [ls_annotation(1, dict(USER_A), "Object", notes="red, not blue")],
        a1: [ls_annotation(2, dict(USER_A), "Count")],  # a good label beside it is not imported either
    }
    exp = ls_export(tasks_json, anns)
    i = _task_index(exp, a0)
    mutate, needle = SHAPES[case]
    mutate(exp, i)
    return (5 if case == "top level a number" else exp), needle.format(i=i)


@pytest.fixture(scope="module")
def shared_lstudy(ls_labelled, tmp_path_factory):
    """One copy of ls_labelled for the refusals (each checks that it left the tables as they were)."""
    src, tasks_json = ls_labelled
    dest = tmp_path_factory.mktemp("ls_refusals") / "db.duckdb"
    shutil.copy(src, dest)
    a = sets(str(dest))["A"]
    return str(dest), tasks_json, a[0], a[1]


@pytest.mark.parametrize("case", CLI_SHAPES)
def test_a_malformed_export_is_refused_naming_the_path_to_the_bad_value(shared_lstudy, tmp_path, case):
    dbpath, tasks_json, a0, a1 = shared_lstudy
    doc, needle = _malformed(tasks_json, a0, a1, case)
    res = refused_import(dbpath, write(tmp_path / "export.json", doc), needle, "Nothing was imported")
    assert "not a Label Studio JSON export" in res.output


def test_every_malformed_shape_names_its_path(shared_lstudy):
    from toolkit.labels.labelstudio import check_export
    from toolkit.userfiles import JsonShapeError

    _, tasks_json, a0, a1 = shared_lstudy
    for case in SHAPES:
        doc, needle = _malformed(tasks_json, a0, a1, case)
        with pytest.raises(JsonShapeError) as exc:
            check_export(json.loads(json.dumps(doc)))  # as parsed from a file
        assert needle in str(exc.value), (case, str(exc.value))
    # the unchanged export passes as it is (and so does an empty one)
    exp = json.loads(json.dumps(ls_export(tasks_json, {a0: [ls_annotation(1, dict(USER_A), "Object", "Count", "n")]})))
    assert check_export(exp) == exp and check_export([]) == []


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[" * 100 + b"]" * 100, "nested more than"),
        (b'[{"id": NaN, "data": {"sample_id": 1}}]', "NaN is not a JSON number"),
        (b'[{"id": 1, "data": {"sample_id": 1, "caption": "\xff"}}]', "is not UTF-8 text (byte 48"),
        (b"", "is not valid JSON"),
        (b'{"tasks": 1}', "tasks must be a list"),
        (b'"tasks"', "tasks must be a list"),
        (b'[{"id": 1, "data": {"sample_id": 1}, "annotations": [], "completions": [{"result": []}]}]', "both"),
    ],
)
def test_an_export_that_is_not_json_of_the_right_kind_is_one_message(lstudy, tmp_path, content, needle):
    dbpath = lstudy[0]
    path = tmp_path / "export.json"
    path.write_bytes(content)
    refused_import(dbpath, path, needle, "Nothing was imported")


def test_a_fifo_given_as_the_export_is_refused_not_opened(lstudy, tmp_path):
    from helpers import invoke_unblocking

    dbpath = lstudy[0]
    fifo = tmp_path / "export.json"
    os.mkfifo(fifo)
    before = snapshot(dbpath)
    res = invoke_unblocking(["--db", dbpath, "import-labels", "--format", "labelstudio", fifo], [fifo])
    assert res.exit_code == 2 and "FIFO" in res.output and str(fifo) in res.output, res.output
    assert "Traceback" not in res.output and snapshot(dbpath) == before
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    res = invoke("--db", dbpath, "import-labels", "--format", "labelstudio", "/dev/zero")  # would never end
    assert res.exit_code == 2 and "/dev/zero is a device" in res.output and snapshot(dbpath) == before


@pytest.mark.parametrize("name", ["tasks.json", "labeling_config.xml"])
def test_export_over_a_fifo_or_folder_is_refused_and_changes_nothing(study, tmp_path, name):
    from helpers import invoke_unblocking

    for kind in ("fifo", "folder"):
        out = tmp_path / kind
        out.mkdir()
        if kind == "fifo":
            os.mkfifo(out / name)
        else:
            (out / name).mkdir()
            (out / name / "keep.txt").write_text("mine", "utf-8")
        for extra in ([], ["--force"]):  # --force overwrites a file that differs, never a FIFO or a folder
            res = invoke_unblocking(["--db", study, "export-labelstudio", out, *extra], [out / name])
            assert res.exit_code == 2, res.output
            assert "Traceback" not in res.output and str(out / name) in res.output, res.output
            assert ("a FIFO" if kind == "fifo" else "a folder") in res.output, res.output
            assert sorted(p.name for p in out.iterdir()) == [name]  # the other file is not written either
        if kind == "fifo":
            assert stat.S_ISFIFO(os.stat(out / name).st_mode)
        else:
            assert (out / name / "keep.txt").read_text("utf-8") == "mine"


@pytest.mark.parametrize("name", ["tasks.json", "labeling_config.xml"])
def test_export_over_a_file_that_is_not_utf8_is_a_clash_not_a_traceback(study, tmp_path, name):
    out = tmp_path / "ls"
    out.mkdir()
    junk = b"\xff\xfe not UTF-8 \x80\x81"
    (out / name).write_bytes(junk)
    res = export(study, out, expect=2)
    assert f"{name} already exists with other content" in res.output and "Traceback" not in res.output
    assert (out / name).read_bytes() == junk and sorted(p.name for p in out.iterdir()) == [name]
    export(study, out, "--force")
    assert (out / name).read_bytes() != junk
    assert "already up to date: tasks.json, labeling_config.xml" in export(study, out).output


def test_export_removes_what_a_killed_export_left_and_keeps_a_live_ones(study, tmp_path):
    from toolkit import staging
    from toolkit.labels.labelstudio import STAGING_PREFIX

    out = tmp_path / "ls"
    export(study, out)
    dead = staging.make(out, STAGING_PREFIX)  # killed while writing: the lock file is there, held by nobody
    (dead.path / "tasks.json").write_text("[", "utf-8")
    os.close(dead.fd)
    live = staging.make(out, STAGING_PREFIX)  # another export writing into the folder now
    try:
        assert "already up to date" in export(study, out).output
        assert sorted(p.name for p in out.iterdir()) == sorted([live.path.name, "labeling_config.xml", "tasks.json"])
    finally:
        live.remove()


# ----------------------------------------------------------------------------- images stored relative to the database


def test_annotate_and_labelstudio_find_images_stored_relative_to_the_database(labelled_study, tmp_path, monkeypatch):
    """Since studies are movable (issue 11) an image root under the database's folder is stored relative to it
    ("coco/val2017"). annotate resolved it against the current folder, so started anywhere else it served no
    image (every picture 404), and export-labelstudio wrote relative file paths and told Label Studio a relative
    document root. Both now resolve it against the database's folder, as sample-failures' pictures do."""
    from toolkit.labels import workbench as annotate
    from toolkit.labels.labelstudio import export_labelstudio

    path, root = labelled_study
    con = open_study(path, read_only=True)
    try:
        stored = con.execute("SELECT image_root FROM subsets").fetchone()[0]
    finally:
        con.close()
    assert not stored.startswith("/") and (root / stored).is_dir()  # the case at hand: stored relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    wb = annotate.prepare(str(path), ["A"], set_choice="mine")
    files = [p for imgs in wb.images.values() for p in imgs.values()]
    assert files and all(p is not None and p.is_file() for p in files)
    con = open_study(path, read_only=True)
    try:
        res = export_labelstudio(con, tmp_path / "ls")
    finally:
        con.close()
    assert res.image_root == str((root / stored).resolve())
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    assert tasks and all(
        Path(t["data"]["gt_file"]).is_absolute() and Path(t["data"]["gt_file"]).is_file() for t in tasks
    )
