"""The Label Studio round trip: export the failure sample as Label Studio tasks and a labelling config,
and import Label Studio's JSON export into `annotations` with import-labels' checks and rules.

Label Studio is not a dependency. The formats follow its documentation, and were checked against a
running Label Studio 1.23.2 (tests/test_labelstudio_live.py; toolkit.labels.ls_sync talks to its API):

- Tasks (`tasks.json`, imported in Label Studio with Import): a JSON list of `{"data": {...}}`; the
  labelling config refers to data fields as `$field`. clipfail's tasks carry `sample_id`,
  `set_name`, `caption`, `gt_image`, `top1_image` ... `top5_image` (URLs), titles for them, and the
  local file paths (`gt_file`, `top1_file`, ...).
- Image URLs: by default Label Studio's local-files form `/data/local-files/?d=<folder>/<path>`, the
  image folder's name and the path under it. Label Studio serves such a URL only from a Local Files
  storage that is a subfolder of its document root (it refuses a storage on the root itself), so start
  it with `LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true` and
  `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<the folder above the images>`, and add a Local Files storage
  for the image folder (no sync: the tasks are imported). `image_url_prefix` gives plain URLs instead
  (prefix + the image's path under the root), for images served elsewhere or another document root.
- The labelling config (`labeling_config.xml`): a `Text` control for the caption, `Image` tags for
  the ground truth and top-5, `Choices name="category"` (the taxonomy's categories, hotkeys 1-7),
  `Choices name="secondary"` (hotkeys q w e r t y u) and `TextArea name="notes"`, all with
  `toName="caption"`.
- Predictions: after `clipfail triage`, a task whose failure has a suggestion from the newest triage
  run carries it as Label Studio's pre-annotation, `"predictions": [{"model_version": "clipfail
  triage run N", "score": the rule's score, "result": [{"from_name": "category", "to_name":
  "caption", "type": "choices", "value": {"choices": [CATEGORY]}}]}]`, and the evidence text in
  `data.suggested_category` / `data.evidence`. Overlap tasks carry neither unless
  show_suggestions_on_overlap (a suggestion seen there biases the agreement they measure). Label
  Studio shows a prediction pre-filled on the labelling page; the annotator's submission is an
  annotation. The import reads annotations only, never predictions.
- The export (Label Studio's "JSON" export): a list of tasks, each with `id`, `data` (as imported)
  and `annotations`, each annotation with `completed_by` (a bare user id in 1.23, or an object with `id`,
  `email`, `first_name`, `last_name` in older versions and in what `labelstudio pull` saves), `was_cancelled`, and
  `result`: a list of `{"from_name", "to_name", "type", "value"}` where a Choices result has
  `type: "choices"` and `value: {"choices": [...]}` and a TextArea result `type: "textarea"` and
  `value: {"text": [...]}`. The older `completions` key is read as `annotations`.

Whose label (per annotation, first that applies): `annotator` (the CLI's --annotator), `user_map`
(a Label Studio user id or email -> annotator), then the annotation's user: its email, the part of
the email before `@`, username, first name, or first and last name, matched to the sample's
annotators ignoring case (also `created_username`, which some versions write).

Before any of that, the whole export is checked for shape (`check_export`: the type of every value
the import reads, each message naming the path to the bad value, such as
`tasks[3].annotations[0].result[1].value.text`), and the file is read through toolkit.userfiles (a
FIFO or a device is refused before it is opened; invalid UTF-8, NaN and deep nesting are refused). A
label is never guessed at: each Choices control holds one choice and each choice names one category,
so two choices in `category` (or `secondary`), a choice such as "Object; Count", or a `secondary`
choice without a `category` is a problem of that annotation, never a primary plus a secondary.

The rows then go through the same checks as an import of CSVs (sample in the failure sample and
the annotator's, known categories, no sample twice for one annotator) and the same writing: all or
nothing in one transaction, a label replaces that annotator's stored one, a cancelled (skipped) or
empty annotation is unlabeled and keeps a stored label unless clear_blank.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from toolkit import staging
from toolkit.errors import UserError
from toolkit.store import paths as study_paths
from toolkit.store.runs import resolve_retrieval_run
from toolkit.userfiles import (
    JsonShapeError,
    parse_json,
    read_bytes,
    regular_problem,
    shape_error,
    want_bool,
    want_dict,
    want_int,
    want_list,
    want_str,
    want_str_list,
)

TOPN = 5
SECONDARY_KEYS = "qwertyu"
MAX_LISTED = 30
STAGING_PREFIX = ".clipfail-staging-"  # the files are written there first (toolkit.staging)


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    retrieval_run_id: int
    out_dir: Path
    n_tasks: int
    written: list[str]
    unchanged: list[str]
    image_root: str | None
    url_mode: str  # 'local-files' or 'prefix'
    triage_run_id: int | None = None  # the triage run whose suggestions are the predictions (None: no triage run)
    n_predictions: int = 0


def labeling_config(categories: list[dict]) -> str:
    """The Label Studio labelling config for clipfail's tasks."""
    cols = ['    <View style="min-width: 0"><Header value="$gt_title" size="6"/>'
            '<Image name="gt_image" value="$gt_image" maxWidth="100%"/></View>']  # fmt: skip
    for k in range(1, TOPN + 1):
        cols.append(
            f'    <View style="min-width: 0"><Header value="$top{k}_title" size="6"/>'
            f'<Image name="top{k}_image" value="$top{k}_image" maxWidth="100%"/></View>'
        )
    primary, secondary = [], []
    for i, c in enumerate(categories):
        hint = quoteattr(c.get("definition") or "")
        key = f' hotkey="{i + 1}"' if i < 9 else ""
        primary.append(f"    <Choice value={quoteattr(c['name'])}{key} hint={hint}/>")
        key = f' hotkey="{SECONDARY_KEYS[i]}"' if i < len(SECONDARY_KEYS) else ""
        secondary.append(f"    <Choice value={quoteattr(c['name'])}{key}/>")
    return "\n".join(
        [
            "<View>",
            '  <Text name="caption" value="$caption"/>',
            '  <View style="display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 8px">',
            *cols,
            "  </View>",
            '  <Header value="Category (keys 1-7)" size="5"/>',
            '  <Choices name="category" toName="caption" choice="single-radio" showInline="true" required="true">',
            *primary,
            "  </Choices>",
            f'  <Header value="{escape("Secondary category, optional (keys " + " ".join(SECONDARY_KEYS) + ")")}"'
            ' size="6"/>',
            '  <Choices name="secondary" toName="caption" choice="single" showInline="true">',
            *secondary,
            "  </Choices>",
            '  <TextArea name="notes" toName="caption" placeholder="Notes (optional)" rows="2" editable="true"'
            ' maxSubmissions="1"/>',
            "</View>",
            "",
        ]
    )


def export_labelstudio(
    con,
    out_dir,
    retrieval_run_id: int | None = None,
    image_url_prefix: str | None = None,
    force: bool = False,
    show_suggestions_on_overlap: bool = False,
) -> ExportResult:
    """Write tasks.json and labeling_config.xml for the failure sample (every set but backup) into out_dir."""
    from toolkit.labels.sample import _image_lookup, sample_table
    from toolkit.labels.taxonomy import Taxonomy

    run = resolve_retrieval_run(con, retrieval_run_id, need="sample", purpose="the Label Studio export")
    rrid = int(run["retrieval_run_id"])
    table = sample_table(con, rrid)
    table = table[table["set_name"] != "backup"]
    ids = set(table["gt_id"].astype(int))
    for top in table["topk_ids"]:
        ids.update(int(x) for x in list(top)[:TOPN])
    lookup = _image_lookup(con, ids)
    row = con.execute(
        "SELECT s.image_root FROM retrieval_runs r JOIN subsets s USING (subset_id) WHERE r.retrieval_run_id = ?",
        [rrid],
    ).fetchone()
    # stored relative to the database's folder when under it (movable studies): Label Studio needs the real folder
    root = str(study_paths.resolve(con, row[0]).resolve()) if row and row[0] else None
    tax = Taxonomy.load(con)
    categories = [{"name": str(c.name), "definition": str(c.definition or "")} for c in tax.categories.itertuples()]
    tasks = _tasks(table, rrid, lookup, root, image_url_prefix)
    triage_run_id, n_predictions = _add_predictions(con, rrid, tasks, categories, show_suggestions_on_overlap)
    out_dir = Path(out_dir)
    contents = {
        "tasks.json": json.dumps(tasks, ensure_ascii=False, indent=1) + "\n",
        "labeling_config.xml": labeling_config(categories),
    }
    written, unchanged = _write_export(out_dir, contents, force)
    return ExportResult(
        rrid,
        out_dir,
        len(tasks),
        written,
        unchanged,
        root,
        "prefix" if image_url_prefix else "local-files",
        triage_run_id,
        n_predictions,
    )


def _tasks(table, rrid: int, lookup: dict, root: str | None, image_url_prefix: str | None) -> list[dict]:
    """One Label Studio task per sampled failure: its caption, ground truth and top images (URL and file)."""

    # d= is relative to Label Studio's document root, which must be a folder above the image folder
    folder = urllib.parse.quote(Path(root).name + "/", safe="/") if root and Path(root).name else ""

    def url(image_id: int) -> str:
        rel = lookup[image_id][1] if image_id in lookup else f"missing-image-{image_id}"
        rel = rel.replace("\\", "/")
        if image_url_prefix:
            return image_url_prefix + urllib.parse.quote(rel)
        return "/data/local-files/?d=" + folder + urllib.parse.quote(rel, safe="/")

    def file(image_id: int) -> str:
        if image_id not in lookup or root is None:
            return ""
        return str(Path(root) / lookup[image_id][1])

    tasks = []
    for r in table.itertuples(index=False):
        gt = int(r.gt_id)
        data = {
            "sample_id": int(r.sample_id),
            "set_name": str(r.set_name),
            "retrieval_run_id": rrid,
            "caption_id": int(r.caption_id),
            "caption": "" if r.caption is None else str(r.caption),
            "gt_rank": int(r.gt_rank),
            "gt_score": round(float(r.gt_score), 6),
            "gt_image": url(gt),
            "gt_file": file(gt),
            "gt_title": f"Ground truth: rank {int(r.gt_rank)}, score {float(r.gt_score):.4f}",
        }
        for k, (iid, score) in enumerate(zip(list(r.topk_ids)[:TOPN], list(r.topk_scores)[:TOPN]), start=1):
            iid = int(iid)
            data[f"top{k}_image"] = url(iid)
            data[f"top{k}_file"] = file(iid)
            data[f"top{k}_score"] = round(float(score), 6)
            data[f"top{k}_is_gt"] = iid == gt
            data[f"top{k}_title"] = f"#{k}{' = GROUND TRUTH' if iid == gt else ''}: score {float(score):.4f}"
        tasks.append({"data": data})
    return tasks


def _add_predictions(con, rrid: int, tasks: list[dict], categories: list[dict], show_on_overlap: bool):
    """Triage's suggestions as each task's data and, where the taxonomy has the category, as a Label Studio
    prediction. Returns (the triage run they come from or None, the number of predictions)."""
    from toolkit.labels.triage import add_suggestions, latest_suggestions

    # The same lookup and overlap rule as the annotator CSVs; the score and run come from the same newest run.
    add_suggestions(con, rrid, [t["data"] for t in tasks], show_on_overlap=show_on_overlap)
    found = latest_suggestions(con, rrid)
    triage_run_id = int(found["triage_run_id"].iloc[0]) if len(found) else None
    scores = {int(c): (None if v != v else float(v)) for c, v in zip(found["caption_id"], found["score"])}
    choice_names = {c["name"] for c in categories}
    n_predictions = 0
    for t in tasks:
        category = t["data"]["suggested_category"]
        if not category or category not in choice_names:  # a category the taxonomy no longer has is no choice
            continue
        prediction = {"model_version": f"clipfail triage run {triage_run_id}"}
        score = scores.get(t["data"]["caption_id"])
        if score is not None:
            prediction["score"] = score
        prediction["result"] = [
            {"from_name": "category", "to_name": "caption", "type": "choices", "value": {"choices": [category]}}
        ]
        t["predictions"] = [prediction]
        n_predictions += 1
    return triage_run_id, n_predictions


def _write_export(out_dir: Path, contents: dict[str, str], force: bool) -> tuple[list[str], list[str]]:
    """Write the files whose content changed (all staged first, then moved in); other content in their place
    only with --force. Returns (written, unchanged) file names."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a folder for the Label Studio files.")
    # What is there already, as bytes (an old file in another encoding simply differs); a FIFO or a folder in
    # a file's place is refused before it is opened, --force or not.
    hint = f"Move it out of {out_dir} (or give another folder) and run again. Nothing was written."
    old = {
        n: read_bytes(out_dir / n, "The existing", hint)
        for n in contents
        if out_dir.is_dir() and regular_problem(out_dir / n) != "not found"
    }
    clash = [n for n, text in contents.items() if n in old and old[n] != text.encode("utf-8")]
    if clash and not force:
        raise UserError(
            f"{', '.join(str(out_dir / n) for n in clash)} already exist{'s' if len(clash) == 1 else ''} with other "
            "content (an earlier export, or edited by hand). Nothing was written. Give another folder, or --force to "
            "overwrite."
        )
    written = [n for n, text in contents.items() if old.get(n) != text.encode("utf-8")]
    unchanged = [n for n in contents if n not in written]
    stage = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging.remove_stale(out_dir, (STAGING_PREFIX,))  # what a killed export left; never a live one's
        if written:
            stage = staging.make(out_dir, STAGING_PREFIX)
            for name in written:  # every file is written whole before any replaces its old version
                (stage.path / name).write_text(contents[name], encoding="utf-8")
            for name in written:
                os.replace(stage.path / name, out_dir / name)
    except OSError as exc:
        raise UserError(
            f"Cannot write the Label Studio files into {out_dir}: {exc.strerror or exc}. "
            "Give a folder you can write to."
        ) from None
    finally:
        if stage is not None:
            stage.remove()
    return written, unchanged


# ---------------------------------------------------------------------------------------------
# Import


def parse_user_map(values) -> dict[str, str]:
    """['12=A', 'b@lab.org=B'] -> {'12': 'A', 'b@lab.org': 'B'} (keys lower-cased)."""
    out = {}
    for v in values or []:
        key, sep, name = str(v).partition("=")
        if not sep or not key.strip() or not name.strip():
            raise UserError(f"--user-map {v!r} is not USER=ANNOTATOR (e.g. --user-map 12=A or a@lab.org=A).")
        out[key.strip().lower()] = name.strip()
    return out


def _user_candidates(annotation: dict) -> tuple[list[str], str]:
    """Names to try for an annotation's user, and how to describe the user in a message."""
    user = annotation.get("completed_by")
    cands: list[str] = []
    if isinstance(user, dict):
        email = str(user.get("email") or "")
        first, last = str(user.get("first_name") or ""), str(user.get("last_name") or "")
        cands += [
            "" if user.get("id") is None else str(user["id"]),
            email,
            email.split("@")[0],
            str(user.get("username") or ""),
            first,
        ]
        cands.append(f"{first} {last}".strip())
        shown = email or f"{first} {last}".strip() or f"user id {user.get('id')}"
    elif user is not None:
        cands.append(str(user))
        shown = f"user id {user}"
    else:
        shown = "no user"
    created = annotation.get("created_username")
    if isinstance(created, str):
        for part in created.split(","):
            part = part.strip()
            cands += [part, part.split("@")[0]]
    return [c for c in cands if c], shown


EXPORT_HINT = (
    "Nothing was imported. Export the project from Label Studio as JSON (not CSV or JSON-MIN) and import that."
)
BY_ID_HINT = (
    "Label Studio's JSON export names a user by id only: map the id (--user-map 1=A), or run clipfail "
    "labelstudio pull, which reads Label Studio's user list and so also takes an e-mail or user name."
)
CONTROLS = ("category", "secondary")  # the Choices of clipfail's labelling config; each holds one choice


def _required(obj: dict, key: str, where: str, want, expected: str):
    """obj[key] checked by `want`, or a JsonShapeError that says it is missing."""
    if key not in obj:
        raise JsonShapeError(f"{where}.{key} must be {expected}; it is missing.")
    return want(obj[key], f"{where}.{key}")


def _check_user(user, where: str) -> None:
    if user is None:
        return
    if isinstance(user, dict):
        if user.get("id") is not None:
            want_int(user["id"], f"{where}.id")
        for key in ("email", "first_name", "last_name", "username"):
            if user.get(key) is not None:
                want_str(user[key], f"{where}.{key}")
    elif isinstance(user, int) and not isinstance(user, bool):
        want_int(user, where)
    else:
        raise shape_error(where, "a user id or an object", user)


def check_export(doc) -> list[dict]:
    """The tasks of a Label Studio JSON export, after checking the type of every value the import reads.

    Raises JsonShapeError naming the path to the first bad value (`tasks[3].annotations[0].result[1].value`):
    a task is an object with an integer `id`, a `data` object whose `sample_id` is an integer, and a list of
    `annotations` (or `completions`, the older name; both at once must agree); an annotation is an object
    with an integer `id`, `completed_by` a user id or an object (integer `id`, string `email`, names),
    `was_cancelled` true or false, `created_username` a string, and a list `result`; a result is an object
    with string `from_name`, `type` and `to_name`, and a `value` object, which holds a list of strings,
    `choices` for type choices and `text` for type textarea (a bare string is never split into letters)."""
    if isinstance(doc, dict) and "data" in doc:  # one task on its own
        doc = [doc]
    tasks = want_list(doc, "tasks")
    for i, task in enumerate(tasks):
        w = f"tasks[{i}]"
        want_dict(task, w)
        if "id" in task:
            want_int(task["id"], f"{w}.id")
        data = _required(task, "data", w, want_dict, "an object")
        if "sample_id" in data:
            want_int(data["sample_id"], f"{w}.data.sample_id")
        keys = [k for k in ("annotations", "completions") if k in task]
        if len(keys) == 2 and task["annotations"] != task["completions"]:
            raise JsonShapeError(
                f"{w} has both annotations and completions (the older name for them), and they differ; "
                "it is not clear which are the labels."
            )
        for key in keys[:1]:
            for j, ann in enumerate(want_list(task[key], f"{w}.{key}")):
                a = f"{w}.{key}[{j}]"
                want_dict(ann, a)
                if "id" in ann:
                    want_int(ann["id"], f"{a}.id")
                _check_user(ann.get("completed_by"), f"{a}.completed_by")
                if "was_cancelled" in ann:
                    want_bool(ann["was_cancelled"], f"{a}.was_cancelled")
                if ann.get("created_username") is not None:
                    want_str(ann["created_username"], f"{a}.created_username")
                for k, res in enumerate(want_list(ann["result"], f"{a}.result") if "result" in ann else []):
                    r = f"{a}.result[{k}]"
                    want_dict(res, r)
                    _required(res, "from_name", r, want_str, "a string")
                    kind = _required(res, "type", r, want_str, "a string")
                    if "to_name" in res:
                        want_str(res["to_name"], f"{r}.to_name")
                    value = _required(res, "value", r, want_dict, "an object")
                    if kind == "choices":
                        _required(value, "choices", f"{r}.value", want_str_list, "a list of strings")
                    elif kind == "textarea":
                        _required(value, "text", f"{r}.value", want_str_list, "a list of strings")
    return tasks


def _annotator_of(ann: dict, option_name: str | None, user_map: dict, info) -> tuple[str | None, str]:
    """(the sample's annotator who made a Label Studio annotation, or None; its user as a message shows it):
    --annotator for every one, else the first of its user's names that --user-map or the sample knows."""
    from toolkit.labels.label_import import canonical_annotator

    cands, shown = _user_candidates(ann)
    if option_name is not None:
        return option_name, shown
    annotator = None
    for c in cands:
        mapped = user_map.get(c.lower())
        annotator = canonical_annotator(info, mapped) if mapped else canonical_annotator(info, c)
        if annotator:
            break
    return annotator, shown


def _read_results(ann: dict, tax, parsed):
    """What one annotation chose: (choices per control, notes, category, secondary category, problems). Each
    control holds one choice naming one category; a result of clipfail's config of another type is a problem."""
    from toolkit.labels.taxonomy import LabelError

    picked: dict[str, list[str]] = {name: [] for name in CONTROLS}
    notes: list[str] = []
    bad = []
    for res in [] if ann.get("was_cancelled") else ann.get("result", []):
        name, kind, value = res["from_name"], res["type"], res["value"]
        if kind == "choices" and name in picked:
            picked[name] += value["choices"]
        elif kind == "textarea" and name == "notes":
            notes += value["text"]
        elif kind == "choices":
            bad.append(
                f"choices from {name!r}, which the clipfail config does not have (it has category "
                "and secondary); export with the config that clipfail export-labelstudio wrote"
            )
        elif name in (*CONTROLS, "notes"):  # a control of clipfail's config, of another type: not read
            want = "textarea" if name == "notes" else "choices"
            bad.append(
                f"a {kind!r} result from {name!r}, which is a {want} control in the config that clipfail "
                "export-labelstudio wrote; export with that config"
            )
    # Each control holds one choice, and each choice names one category: anything else is refused,
    # never read as a primary and a secondary category.
    chosen: dict[str, str | None] = {}
    for control, choices in picked.items():
        if len(choices) > 1:
            bad.append(
                f"{len(choices)} choices ({', '.join(choices)}) in {control!r}, which takes one; keep one "
                "in Label Studio (a second category goes in 'secondary') and export again"
            )
        elif choices and not choices[0].strip():
            bad.append(f"an empty choice in {control!r}")
        elif choices:
            try:
                category, secondary = tax.resolve(choices[0])
            except LabelError as exc:
                bad.append(str(exc).split("; known categories")[0])
                parsed.has_label_errors = True
                continue
            if secondary is not None:
                bad.append(f"choice {choices[0]!r} in {control!r} names two categories; a choice names one")
            chosen[control] = category
    category, secondary = chosen.get("category"), chosen.get("secondary")
    if not bad and category is None and secondary is not None:
        bad.append(f"a secondary category ({secondary}) but no category; choose the category in Label Studio too")
    return picked, notes, category, secondary, bad


def is_json_min(doc) -> bool:
    """True for Label Studio's JSON-MIN export: a list of flat records, one per annotation, each with the
    task's data fields at the top level and `annotation_id` / `annotator` beside them (no `data`, no
    `annotations`)."""
    return (
        isinstance(doc, list)
        and any(isinstance(t, dict) for t in doc)
        and all(isinstance(t, dict) and not {"data", "annotations", "completions"} & t.keys() for t in doc)
        and any({"annotation_id", "annotator"} & t.keys() for t in doc)
    )


def _read_export(path: Path, option: str | None, user_map: dict, info, tax, seen: dict):
    from toolkit.labels.label_import import _ParsedFile, _Row, assignment_problem, canonical_annotator

    data = read_bytes(path, "Label Studio export", EXPORT_HINT)
    doc = parse_json(data, f"Label Studio export {path}", EXPORT_HINT)
    if is_json_min(doc):  # it leaves out skipped annotations and turns a choice into a bare string: not read
        raise UserError(
            f"{path} is Label Studio's JSON-MIN export (one flat record per annotation), which clipfail does not "
            "read. Export the project as JSON (not JSON-MIN) and import that. Nothing was imported."
        )
    try:
        tasks = check_export(doc)
    except JsonShapeError as exc:
        raise UserError(f"{path} is not a Label Studio JSON export as clipfail reads it: {exc} {EXPORT_HINT}") from None
    parsed = _ParsedFile(path=path, sha256=hashlib.sha256(data).hexdigest())
    known = info.all_annotators
    option_name = None
    if option is not None:
        option_name = canonical_annotator(info, option)
        if option_name is None:
            raise UserError(
                f"--annotator {option!r} is not an annotator of any failure sample (known: {', '.join(known)})."
            )
    for i, task in enumerate(tasks):
        where = f"task {task.get('id', '#' + str(i + 1))}"
        sample_id = task["data"].get("sample_id")
        annotations = task.get("annotations", task.get("completions", []))
        if sample_id is None:
            if annotations:
                parsed.problems.append(f"{where}: no data.sample_id; import tasks made by clipfail export-labelstudio")
            continue
        for j, ann in enumerate(annotations):
            here = f"{where} (sample {sample_id}), annotation {ann.get('id', j + 1)}"
            annotator, shown = _annotator_of(ann, option_name, user_map, info)
            if annotator is None:
                parsed.problems.append(
                    f"{here}: its user ({shown}) is not an annotator of the sample ({', '.join(known)}); give "
                    "--annotator NAME, or --user-map USER=NAME"
                )
                continue
            problem = assignment_problem(info, sample_id, annotator)
            if problem:
                parsed.problems.append(f"{here}: {problem}")
                continue
            key = (sample_id, annotator)
            if key in seen:
                parsed.problems.append(
                    f"{here}: sample {sample_id} is labelled by {annotator} twice (also {seen[key]})"
                )
                continue
            seen[key] = here
            picked, notes, category, secondary, bad = _read_results(ann, tax, parsed)
            if bad:
                parsed.problems += [f"{here}: {msg}" for msg in bad]
                continue
            raw = "; ".join(picked["category"] + picked["secondary"])
            text = "\n".join(n.strip() for n in notes if n.strip()) or None
            parsed.rows.append(
                _Row(i + 1, sample_id, annotator, raw, category, None if secondary == category else secondary, text)
            )
    return parsed


def import_labelstudio(con, files, annotator: str | None = None, user_map=None, clear_blank: bool = False) -> object:
    """Check every annotation of the exports, then write all labels in one transaction (or nothing).

    Returns toolkit.labels.label_import.ImportResult (one FileSummary per export file)."""
    from toolkit.labels.label_import import _SampleInfo, _write_labels
    from toolkit.labels.taxonomy import Taxonomy
    from toolkit.store import db

    started = db.now()
    paths = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not paths:
        raise UserError("Give the JSON file that Label Studio exported.")
    annotator = annotator.strip() if isinstance(annotator, str) and annotator.strip() else None
    umap = user_map if isinstance(user_map, dict) else parse_user_map(user_map)
    info = _SampleInfo.load(con)
    tax = Taxonomy.load(con)
    parsed, seen = [], {}
    for path in paths:
        parsed.append(_read_export(path, annotator, umap, info, tax, seen))
    problems = [(p.path, m) for p in parsed for m in p.problems]
    if problems:
        lines = [f"Nothing was imported: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the export."]
        for path, msg in problems[:MAX_LISTED]:
            lines.append(f"  {path}: {msg}")
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more.")
        if any(p.has_label_errors for p in parsed):
            lines.append(f"Known categories: {', '.join(tax.names)}.")
        if any("its user (user id " in m for _, m in problems):
            lines.append(BY_ID_HINT)
        lines.append("Fix these (in Label Studio, or with --annotator / --user-map) and import again.")
        raise UserError("\n".join(lines))
    if not any(p.rows for p in parsed):
        raise UserError(
            f"{', '.join(map(str, paths))} holds no annotations. Label the tasks in Label Studio, then export them as "
            "JSON. Nothing was imported."
        )
    config = {
        "format": "labelstudio",
        "files": [{"path": str(p.path.resolve()), "sha256": p.sha256} for p in parsed],
        "annotator": annotator,
        "user_map": umap,
        "simulated": False,
        "clear_blank": bool(clear_blank),
    }
    return _write_labels(con, parsed, info, config, started, simulated=False, clear_blank=clear_blank)
