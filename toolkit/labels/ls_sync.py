"""`clipfail labelstudio push` and `pull`: the failure sample to a Label Studio project, and its labels back,
through Label Studio's REST API (toolkit.labels.ls_api).

push sends exactly what `export-labelstudio` writes (toolkit.labels.labelstudio.export_labelstudio: the
labelling config, and the tasks with the triage predictions on each annotator's own items), so the file
route and the API route give Label Studio the same project:

1. the project: `--project ID`, or the one titled `--title` (default `clipfail <database> run <N>`), created
   when there is none (`POST /api/projects`); an existing project's labelling config is updated when it
   differs (`PATCH /api/projects/ID`; Label Studio refuses a config that its annotations do not fit);
2. the images: by default a Local Files storage on the image folder (`POST /api/storages/localfiles`, never
   synced: syncing would import the images as tasks), with task URLs `/data/local-files/?d=<image folder
   relative to the document root>/<image>`. Label Studio accepts such a storage only below its
   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (not the root itself), so the document root is the image folder's
   parent unless `document_root` says otherwise. With `image_url_prefix` the URLs are prefix + path and no
   storage is made;
3. the tasks: those of the sample that the project does not hold yet (`POST /api/projects/ID/import`), known
   by (sample_id, retrieval_run_id, caption_id) in their data, so a second push adds none twice. A project
   that holds tasks of another sample (another run, another database, or not clipfail's) is refused unless
   `force`; overlap tasks get an overlap of the number of annotators (`PATCH /api/tasks/ID`), so that Label
   Studio hands each of them to every annotator.

A project that push created is deleted again when a later step fails, so a failed push leaves nothing.

pull exports the project as JSON (`GET /api/projects/ID/export?exportType=JSON`), whose annotations name
their user by id only, and replaces each id with the user from Label Studio's user list (`GET /api/users`:
id, email, username, first and last name), so that `user_map` takes an id, an e-mail or a user name and an
annotator named like the e-mail's local part or the user name is found. Tasks of another sample are listed
and nothing is imported. The export, with the users filled in, is saved (by default beside the database as
`labelstudio-project-<ID>.json`) and imported through toolkit.labels.labelstudio.import_labelstudio: the same
checks, the same all-or-nothing writing and the same report as `import-labels --format labelstudio`.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError
from toolkit.labels.ls_api import LabelStudio
from toolkit.userfiles import want_dict, want_int, want_list, want_str

IMPORT_CHUNK = 500  # tasks per import request
PAGE_SIZE = 100  # tasks per page when listing a project's tasks
MAX_LISTED = 10
STORAGE_TITLE = "clipfail images"
STORAGE_NOTE = "Serves the task images of clipfail labelstudio push. Do not sync it: push imported the tasks."


@dataclass
class PushResult:
    project_id: int
    project_url: str
    title: str
    created: bool  # a new project
    config_updated: bool  # an existing project's labelling config was replaced
    retrieval_run_id: int
    n_tasks: int  # tasks of the sample (every set but backup)
    n_added: int  # imported now
    n_present: int  # there already (not sent again)
    n_foreign: int  # tasks of another sample in the project (only with force)
    n_predictions: int  # predictions on the tasks added now
    triage_run_id: int | None
    storage: str  # 'created', 'present' or 'none' (image_url_prefix)
    image_root: str | None
    document_root: str | None
    image_url_prefix: str


@dataclass
class PullResult:
    project_id: int
    export_path: Path
    n_tasks: int  # tasks in the export (those with annotations)
    n_annotations: int
    users: dict  # user id -> e-mail of the users that annotated


def default_title(db_path, retrieval_run_id: int) -> str:
    return f"clipfail {Path(db_path).name} run {retrieval_run_id}"


# ---------------------------------------------------------------------------------------------
# Finding the project


def find_project(ls: LabelStudio, project_id: int | None, title: str | None) -> dict | None:
    """The project {id, title, label_config} given by id (a 404 is an error) or by exact title (None if none)."""
    if project_id is not None:
        path = f"/api/projects/{project_id}"
        answer = ls.request(
            "GET",
            path,
            what=f"read project {project_id}",
            not_found=f"Label Studio has no project {project_id}: it was deleted, or the id is wrong. Check "
            "--project (the number in the project's address), or leave it out to push a new project",
        )
        return _project(ls, answer, f"GET {path}")
    name = f"GET {ls.url}/api/projects?title=..."
    found = []
    page = 1
    while True:
        answer = ls.request(
            "GET",
            "/api/projects",
            query={"title": title, "page": page, "page_size": PAGE_SIZE},
            what="look for the project by title",
        )
        answer = ls.checked(answer, lambda v: want_dict(v, "answer"), name)
        results = ls.checked(answer.get("results"), lambda v: want_list(v, "answer.results"), name)
        found += [p for p in (_project(ls, r, name) for r in results) if p["title"] == title]
        if not answer.get("next") or not results:
            break
        page += 1
    if len(found) > 1:
        raise UserError(
            f"Label Studio has {len(found)} projects titled {title!r} (ids {', '.join(str(p['id']) for p in found)}). "
            "Give the one to use with --project ID."
        )
    if found and found[0].get("label_config") is None:  # the list may leave the config out: read the project
        return find_project(ls, found[0]["id"], None)
    return found[0] if found else None


def _project(ls: LabelStudio, value, name: str) -> dict:
    def check(v):
        want_dict(v, "project")
        return {
            "id": want_int(v.get("id"), "project.id"),
            "title": "" if v.get("title") is None else want_str(v["title"], "project.title"),
            "label_config": None if v.get("label_config") is None else want_str(v["label_config"], "label_config"),
        }

    return ls.checked(value, check, name)


def list_tasks(ls: LabelStudio, project_id: int) -> list[dict]:
    """Every task of the project as {id, data}, page by page."""
    tasks: list[dict] = []
    page = 1
    while True:
        query = {"project": project_id, "page": page, "page_size": PAGE_SIZE, "fields": "all", "include": "id,data"}
        name = f"GET {ls.url}/api/tasks?project={project_id}&page={page}"
        answer = ls.request(
            "GET",
            "/api/tasks",
            query=query,
            what=f"list the tasks of project {project_id}",
            # past the last page Label Studio answers 404 "Invalid page."; the total says when to stop first
            not_found=f"Label Studio has no page {page} of the tasks of project {project_id}: was it deleted "
            "meanwhile?",
        )

        def check(v):
            want_dict(v, "answer")
            total = want_int(v.get("total"), "answer.total")
            rows = want_list(v.get("tasks"), "answer.tasks")
            out = []
            for i, t in enumerate(rows):
                want_dict(t, f"answer.tasks[{i}]")
                out.append(
                    {
                        "id": want_int(t.get("id"), f"answer.tasks[{i}].id"),
                        "data": want_dict(t.get("data"), f"tasks[{i}].data"),
                    }
                )
            return total, out

        total, rows = ls.checked(answer, check, name)
        tasks += rows
        if not rows or len(tasks) >= total:
            return tasks
        page += 1


def _identity(data: dict):
    """(sample_id, retrieval_run_id, caption_id) of a clipfail task's data; None for another task."""
    keys = ("sample_id", "retrieval_run_id", "caption_id")
    vals = [data.get(k) for k in keys]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return tuple(vals)
    return None


def _describe(task: dict) -> str:
    ident = _identity(task["data"])
    if ident is None:
        return f"task {task['id']} (not made by clipfail: its data has no sample_id, retrieval_run_id and caption_id)"
    return f"task {task['id']} (sample {ident[0]} of retrieval run {ident[1]}, caption {ident[2]})"


# ---------------------------------------------------------------------------------------------
# push


def _image_folder(con, retrieval_run_id: int | None) -> tuple[int, Path | None]:
    from toolkit.store import paths as study_paths
    from toolkit.store.runs import resolve_retrieval_run

    run = resolve_retrieval_run(con, retrieval_run_id, need="sample", purpose="labelstudio push")
    rrid = int(run["retrieval_run_id"])
    row = con.execute(
        "SELECT s.image_root FROM retrieval_runs r JOIN subsets s USING (subset_id) WHERE r.retrieval_run_id = ?",
        [rrid],
    ).fetchone()
    root = study_paths.resolve(con, row[0]).resolve() if row and row[0] else None
    return rrid, root


def local_files_prefix(image_root: Path, document_root: Path) -> str:
    """The image URL prefix under which Label Studio serves the image folder: `/data/local-files/?d=` and the
    folder's path relative to the document root. The folder must lie strictly below the document root."""
    if image_root == document_root or document_root not in image_root.parents:
        raise UserError(
            f"The images are in {image_root}, which is not a subfolder of the document root {document_root}. Label "
            "Studio serves local files only from a Local Files storage BELOW its "
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (not the root itself): start it with "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={image_root.parent} and "
            "leave out --document-root, or give --image-url-prefix for images served elsewhere."
        )
    rel = image_root.relative_to(document_root).as_posix()
    return "/data/local-files/?d=" + urllib.parse.quote(rel + "/", safe="/")


def _url_prefix(rrid: int, image_root, image_url_prefix, document_root):
    """(Label Studio's document root or None, the image URL prefix of the tasks)."""
    if image_url_prefix is not None:
        return None, image_url_prefix
    if image_root is None:
        raise UserError(
            f"Retrieval run {rrid}'s subset has no image folder, so Label Studio cannot serve its images; give "
            "--image-url-prefix with the address where they are served."
        )
    doc_root = Path(os.path.abspath(os.path.expanduser(document_root))) if document_root else image_root.parent
    return doc_root, local_files_prefix(image_root, doc_root)


def _exported(con, rrid: int, prefix: str, show_suggestions_on_overlap: bool):
    """(export result, tasks, labelling config) exactly as export-labelstudio writes them (written to a private
    folder, read back)."""
    from toolkit.labels.labelstudio import export_labelstudio

    with tempfile.TemporaryDirectory(prefix="clipfail-labelstudio-") as tmp:
        exp = export_labelstudio(
            con,
            tmp,
            retrieval_run_id=rrid,
            image_url_prefix=prefix,
            show_suggestions_on_overlap=show_suggestions_on_overlap,
        )
        tasks = json.loads((Path(tmp) / "tasks.json").read_text("utf-8"))
        config = (Path(tmp) / "labeling_config.xml").read_text("utf-8")
    return exp, tasks, config


def _create_project(ls: LabelStudio, title: str, rrid: int, db_path, config: str) -> dict:
    answer = ls.request(
        "POST",
        "/api/projects",
        {
            "title": title,
            "description": f"Failure sample of retrieval run {rrid} ({db_path}), by clipfail.",
            "label_config": config,
        },
        what="create the project",
        refused="Label Studio's reason is quoted; check --title.",
    )
    return _project(ls, answer, f"POST {ls.url}/api/projects")


def _update_config(ls: LabelStudio, project: dict, config: str) -> bool:
    """PATCH the project's labelling config when it differs; whether it did."""
    pid = project["id"]
    if (project.get("label_config") or "").strip() == config.strip():
        return False
    ls.request(
        "PATCH",
        f"/api/projects/{pid}",
        {"label_config": config},
        what=f"update the labelling config of project {pid}",
        not_found=f"Label Studio has no project {pid} any more: it was deleted meanwhile",
        refused="Label Studio keeps a project's config while annotations use what the new one lacks; push to "
        "a new project (--title) or change the project by hand.",
    )
    return True


def _refuse_foreign(project: dict, foreign: list, rrid: int, db_path) -> None:
    pid = project["id"]
    shown = "; ".join(_describe(t) for t in foreign[:MAX_LISTED])
    more = f"; and {len(foreign) - MAX_LISTED} more" if len(foreign) > MAX_LISTED else ""
    raise UserError(
        f"Project {pid} ({project['title']!r}) holds {len(foreign)} task{'s' if len(foreign) != 1 else ''} "
        f"that are not of this sample (retrieval run {rrid} of {db_path}): {shown}{more}. Nothing was pushed. "
        "Push to another project (--title or --project), or give --force to add this sample's tasks beside "
        "them (pull then refuses annotations on the others)."
    )


def _import_tasks(ls: LabelStudio, pid: int, new: list) -> None:
    for start in range(0, len(new), IMPORT_CHUNK):
        chunk = new[start : start + IMPORT_CHUNK]
        answer = ls.request(
            "POST",
            f"/api/projects/{pid}/import",
            chunk,
            what=f"import the tasks into project {pid}",
            not_found=f"Label Studio has no project {pid} any more: it was deleted meanwhile",
            refused="Check that the project's labelling config is clipfail's.",
        )
        n = ls.checked(
            answer, lambda v: want_int(want_dict(v, "answer").get("task_count"), "answer.task_count"), "import"
        )
        if n != len(chunk):
            raise UserError(
                f"Label Studio imported {n} of {len(chunk)} tasks into project {pid} (POST "
                f"{ls.url}/api/projects/{pid}/import). Look at the project, then push again: tasks already there "
                "are not sent twice."
            )


def _set_overlap(ls: LabelStudio, pid: int, new: list, ours: dict, present: set, n_annotators: int) -> None:
    """Every annotator is handed the overlap tasks just imported (overlap = the number of annotators)."""
    overlap_samples = {t["data"]["sample_id"] for t in new if t["data"].get("set_name") == "overlap"}
    for t in list_tasks(ls, pid):
        ident = _identity(t["data"])
        if ident in ours and ident not in present and ident[0] in overlap_samples:
            ls.request(
                "PATCH",
                f"/api/tasks/{t['id']}",
                {"overlap": n_annotators},
                what=f"let every annotator label overlap task {t['id']}",
                not_found=f"Label Studio has no task {t['id']} any more: it was deleted meanwhile",
            )


def push(
    con,
    ls: LabelStudio,
    *,
    db_path,
    project_id: int | None = None,
    title: str | None = None,
    retrieval_run_id: int | None = None,
    image_url_prefix: str | None = None,
    document_root=None,
    force: bool = False,
    show_suggestions_on_overlap: bool = False,
) -> PushResult:
    """Create or update the Label Studio project of the failure sample (see the module docstring)."""
    from toolkit.labels.label_import import _SampleInfo

    rrid, image_root = _image_folder(con, retrieval_run_id)
    doc_root, prefix = _url_prefix(rrid, image_root, image_url_prefix, document_root)
    exp, tasks, config = _exported(con, rrid, prefix, show_suggestions_on_overlap)
    info = _SampleInfo.load(con)
    n_annotators = max(1, len(info.annotators.get(rrid, [])))
    title = title or default_title(db_path, rrid)

    project = find_project(ls, project_id, None if project_id is not None else title)
    created = project is None
    if created:
        project = _create_project(ls, title, rrid, db_path, config)
    pid = project["id"]
    try:
        config_updated = not created and _update_config(ls, project, config)
        existing = [] if created else list_tasks(ls, pid)
        ours = {(t["data"]["sample_id"], rrid, t["data"]["caption_id"]): t for t in tasks}
        present = {_identity(t["data"]) for t in existing} & set(ours)
        foreign = [t for t in existing if _identity(t["data"]) not in ours]
        if foreign and not force:
            _refuse_foreign(project, foreign, rrid, db_path)
        storage = "none"
        if image_url_prefix is None:
            storage = _ensure_storage(ls, pid, image_root, doc_root)
        new = [t for key, t in ours.items() if key not in present]
        _import_tasks(ls, pid, new)
        if new and n_annotators > 1:
            _set_overlap(ls, pid, new, ours, present, n_annotators)
    except BaseException:
        if created:  # leave nothing half-made behind: the project is new and only this push used it
            try:
                ls.request("DELETE", f"/api/projects/{pid}", what=f"delete the half-made project {pid}")
            except UserError:
                pass
        raise
    return PushResult(
        project_id=pid,
        project_url=ls.project_url(pid),
        title=project["title"],
        created=created,
        config_updated=config_updated,
        retrieval_run_id=rrid,
        n_tasks=len(tasks),
        n_added=len(new),
        n_present=len(present),
        n_foreign=len(foreign),
        n_predictions=sum(1 for t in new if t.get("predictions")),
        triage_run_id=exp.triage_run_id,
        storage=storage,
        image_root=None if image_root is None else str(image_root),
        document_root=None if doc_root is None else str(doc_root),
        image_url_prefix=prefix,
    )


def _ensure_storage(ls: LabelStudio, pid: int, image_root: Path, doc_root: Path) -> str:
    """A Local Files storage on the image folder in project `pid`: 'present' or 'created' (never synced)."""
    name = f"GET {ls.url}/api/storages/localfiles?project={pid}"
    answer = ls.request("GET", "/api/storages/localfiles", query={"project": pid}, what="list the project's storages")

    def check(v):
        out = []
        for i, s in enumerate(want_list(v, "answer")):
            want_dict(s, f"answer[{i}]")
            out.append(want_str(s.get("path") or "", f"answer[{i}].path"))
        return out

    if any(Path(p) == image_root for p in ls.checked(answer, check, name)):
        return "present"
    ls.request(
        "POST",
        "/api/storages/localfiles",
        {
            "project": pid,
            "title": STORAGE_TITLE,
            "description": STORAGE_NOTE,
            "path": str(image_root),
            "use_blob_urls": False,
        },
        what=f"add a Local Files storage for {image_root}",
        refused=f"Start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
        f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={doc_root} (the folder above the images; or tell push the root it "
        "uses with --document-root), on the machine that holds the images; or give --image-url-prefix for images "
        "served elsewhere.",
    )
    return "created"


# ---------------------------------------------------------------------------------------------
# pull


def pull(
    con,
    ls: LabelStudio,
    *,
    db_path,
    project_id: int | None = None,
    title: str | None = None,
    out=None,
    annotator: str | None = None,
    user_map=None,
    clear_blank: bool = False,
):
    """Export the project's annotations, fill in their users, and import them; returns (PullResult, ImportResult)."""
    from toolkit.labels.labelstudio import import_labelstudio

    pulled = fetch_export(con, ls, db_path=db_path, project_id=project_id, title=title, out=out, user_map=user_map)
    result = import_labelstudio(
        con, [pulled.export_path], annotator=annotator, user_map=user_map, clear_blank=clear_blank
    )
    return pulled, result


def fetch_export(
    con, ls: LabelStudio, *, db_path, project_id: int | None = None, title: str | None = None, out=None, user_map=None
) -> PullResult:
    """pull's first half: the project's JSON export with its users filled in, checked against the study's failure
    sample and saved to `out` (default: labelstudio-project-<ID>.json beside the database), ready for
    import_labelstudio. Nothing is written to the study."""
    from toolkit.labels.labelstudio import check_export, parse_user_map
    from toolkit.store.runs import resolve_retrieval_run
    from toolkit.userfiles import JsonShapeError, parse_json

    parse_user_map(user_map)  # a bad --user-map is refused before any request
    if project_id is None:
        rrid = int(resolve_retrieval_run(con, None, need="sample", purpose="labelstudio pull")["retrieval_run_id"])
        title = title or default_title(db_path, rrid)
    project = find_project(ls, project_id, title)
    if project is None:
        raise UserError(
            f"Label Studio has no project titled {title!r}. Give --project ID (the number in the project's address) "
            "or the --title it was pushed with."
        )
    pid = project["id"]
    users = _users(ls)
    path = f"/api/projects/{pid}/export"
    body = ls.request(
        "GET",
        path,
        query={"exportType": "JSON"},
        what=f"export project {pid}",
        not_found=f"Label Studio has no project {pid} any more: it was deleted meanwhile",
        raw=True,
    )
    name = f"GET {ls.url}{path}?exportType=JSON"
    doc = parse_json(body, f"Label Studio's answer to {name}", "Is --url the Label Studio server?")
    try:
        tasks = check_export(doc)
    except JsonShapeError as exc:
        raise UserError(
            f"Label Studio's answer to {name} is not a JSON export as clipfail reads it: {exc} Nothing was imported."
        ) from None

    # Tasks of another sample: listed, and nothing is imported.
    known = {
        int(s): (int(r), int(c))
        for s, r, c in con.execute("SELECT sample_id, retrieval_run_id, caption_id FROM failure_samples").fetchall()
    }
    alien = []
    for t in tasks:
        if not t.get("annotations", t.get("completions")):
            continue
        ident = _identity(t["data"])
        if ident is None or known.get(ident[0]) != ident[1:]:
            alien.append({"id": t.get("id", "?"), "data": t["data"]})
    if alien:
        shown = "; ".join(_describe(t) for t in alien[:MAX_LISTED])
        more = f"; and {len(alien) - MAX_LISTED} more" if len(alien) > MAX_LISTED else ""
        raise UserError(
            f"Nothing was imported: project {pid} holds annotations on {len(alien)} "
            f"{'tasks that are' if len(alien) != 1 else 'task that is'} not of this study's failure sample: "
            f"{shown}{more}. Pull from the project that was pushed from this database, or delete those tasks in "
            "Label Studio."
        )

    annotated: dict[int, str] = {}
    n_annotations = 0
    for t in tasks:
        for ann in t.get("annotations", t.get("completions", [])):
            n_annotations += 1
            user = ann.get("completed_by")
            if isinstance(user, int) and not isinstance(user, bool) and user in users:
                ann["completed_by"] = dict(users[user])
            who = ann.get("completed_by")
            if isinstance(who, dict) and isinstance(who.get("id"), int):
                annotated[who["id"]] = str(who.get("email") or who.get("username") or who["id"])
        if "completions" in t and "annotations" in t:  # both, equal (checked): keep the filled-in one
            t["completions"] = t["annotations"]

    text = json.dumps(tasks, ensure_ascii=False, indent=1) + "\n"
    target = _export_target(Path(out) if out else None, Path(db_path).resolve().parent, pid, text)
    if not target.exists():  # else it holds exactly this export already
        _write_atomic(target, text)
    return PullResult(pid, target, len(tasks), n_annotations, annotated)


def _users(ls: LabelStudio) -> dict[int, dict]:
    name = f"GET {ls.url}/api/users"
    answer = ls.request("GET", "/api/users", what="read Label Studio's user list")

    def check(v):
        rows = v.get("results") if isinstance(v, dict) else v  # a paginated answer, or the plain list of 1.23
        out = {}
        for i, u in enumerate(want_list(rows, "answer")):
            want_dict(u, f"answer[{i}]")
            uid = want_int(u.get("id"), f"answer[{i}].id")
            user = {"id": uid}
            for key in ("email", "username", "first_name", "last_name"):
                if u.get(key) is not None:
                    user[key] = want_str(u[key], f"answer[{i}].{key}")
            out[uid] = user
        return out

    return ls.checked(answer, check, name)


def _same_text(path: Path, text: str) -> bool:
    from toolkit.userfiles import read_bytes

    return read_bytes(path, "the saved export") == text.encode("utf-8")


def _default_export(folder: Path, pid: int, text: str) -> Path:
    """labelstudio-project-<ID>.json, or -2, -3, ...: the first name that is free or already holds this very
    export (an earlier pull's file is never overwritten: it may hold annotations deleted in Label Studio since)."""
    n = 1
    while True:
        path = folder / f"labelstudio-project-{pid}{'' if n == 1 else f'-{n}'}.json"
        if not os.path.lexists(path) or (path.is_file() and _same_text(path, text)):
            return path
        n += 1


def _export_target(out: Path | None, folder: Path, pid: int, text: str) -> Path:
    """Where to save the export: a free name, or a file that holds exactly this export already. An existing --out
    with other content is refused: it is never overwritten."""
    if out is None:
        return _default_export(folder, pid, text)
    if os.path.lexists(out) and not (out.is_file() and _same_text(out, text)):
        raise UserError(
            f"--out {out} exists and holds something else; it was left as it is and nothing was imported. Give "
            "--out a new file name (or leave --out out: pull then saves labelstudio-project-<ID>.json, or -2, -3, "
            "..., beside the database)."
        )
    return out


def _write_atomic(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.clipfail-tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        raise UserError(
            f"Cannot save Label Studio's export as {target}: {exc.strerror or exc}. Give --out a file in a folder you "
            "can write to. Nothing was imported."
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
