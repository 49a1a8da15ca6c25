"""The Label Studio round trip: export-labelstudio's tasks and config, and import-labels --format labelstudio
on exports written by hand in the layout of Label Studio's documented JSON export (Label Studio itself is
not needed): tasks with `id`, `data`, and `annotations[]` with `completed_by`, `was_cancelled` and
`result[]` items `{from_name, to_name, type: "choices" | "textarea", value: {choices: [...]} | {text: [...]}}`.
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_annotate import base, invoke, rows, suggestions_in_db, triaged, triaged_base  # noqa: F401  (shared fixtures)

from toolkit.study import open_study


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
        assert d["gt_image"] == "/data/local-files/?d=" + files[gt]
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
        ("not json", "is not JSON"),
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
