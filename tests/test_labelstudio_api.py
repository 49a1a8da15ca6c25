"""clipfail labelstudio push / pull against a tiny fake Label Studio (http.server in a thread): every failed
request is one message naming the request, the status and what to do (unreachable, bad token, project gone,
server error, an answer that is not JSON or not of the expected shape), push's refusal of a project holding
another sample's tasks, pull's refusal of another sample's annotations, and pull's user look-up. The routes
answer in the shapes that Label Studio 1.23.2 gave (tests/test_labelstudio_live.py runs the real server).
Also: import-labels refuses a JSON-MIN export by name.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import assert_one_message
from test_annotate import base, invoke, rows  # noqa: F401  (shared fixtures)
from test_labelstudio import ls_annotation, ls_export, write

CONFIG = "<View/>"


class FakeLabelStudio:
    """routes: (METHOD, path) -> (status, answer) where answer is a JSON-able value, bytes, or a callable
    (query, body) -> (status, answer). Every request is recorded as (method, path, query, body, headers)."""

    def __init__(self):
        self.routes: dict = {}
        self.requests: list = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.requests.append((self.command, parts.path, query, body, dict(self.headers)))
                route = fake.routes.get((self.command, parts.path))
                status, answer = route(query, body) if callable(route) else (route or (404, {"detail": "Not found."}))
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def sent(self, method, path=None):
        return [r for r in self.requests if r[0] == method and (path is None or r[1] == path)]


@pytest.fixture
def fake():
    server = FakeLabelStudio()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture
def study(base, tmp_path):  # noqa: F811
    dest = tmp_path / "db.duckdb"
    shutil.copy(base, dest)
    return str(dest)


def ls(study, fake_url, *args, token="tok-123"):
    return invoke("--db", study, "labelstudio", *args, "--url", fake_url, "--token", token)


def sample_tasks(study):
    """(sample_id, retrieval_run_id, caption_id, set_name) of the failure sample (backup left out)."""
    return rows(
        study,
        "SELECT sample_id, retrieval_run_id, caption_id, set_name FROM failure_samples WHERE set_name <> 'backup' "
        "ORDER BY 1",
    )


def project_routes(fake, pid=3, tasks=()):
    """An existing project `pid` holding `tasks` (its {id, data}), taking imports and a storage."""
    fake.routes[("GET", f"/api/projects/{pid}")] = (200, {"id": pid, "title": "mine", "label_config": CONFIG})
    fake.routes[("PATCH", f"/api/projects/{pid}")] = (200, {"id": pid, "title": "mine"})
    fake.routes[("GET", "/api/tasks")] = lambda q, b: (200, {"total": len(tasks), "tasks": list(tasks)})
    fake.routes[("GET", "/api/storages/localfiles")] = (200, [])
    fake.routes[("POST", "/api/storages/localfiles")] = (201, {"id": 1, "path": "x"})
    fake.routes[("POST", f"/api/projects/{pid}/import")] = lambda q, b: (201, {"task_count": len(b)})


# --------------------------------------------------------------------------- one message per failed request


def test_unreachable_url(study):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = ls(study, f"http://127.0.0.1:{port}", "push")
    assert_one_message(res, "Cannot reach Label Studio", f"GET http://127.0.0.1:{port}/api/projects", "Check --url")


@pytest.mark.parametrize("status", [401, 403])
def test_bad_token(study, fake, status):
    fake.routes[("GET", "/api/projects/5")] = (status, {"status_code": status, "detail": "Invalid token."})
    res = ls(study, fake.url, "pull", "--project", 5)
    assert_one_message(res, "refused the token", f"GET {fake.url}/api/projects/5", f"HTTP {status}", "Invalid token.")
    assert "LABEL_STUDIO_API_KEY" in res.output
    assert fake.requests[0][4]["Authorization"] == "Token tok-123"  # legacy token auth


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--token", "tok\n123", "not plain ASCII"),  # a paste that took a line break: no header can carry it
        ("--token", "tok-12€", "not plain ASCII"),
        ("--token", "tok 123", "holds a space"),
        ("--url", "http://[::1", "is not a Label Studio address"),
        ("--url", "http://localhost:port", "is not a Label Studio address"),
    ],
)
def test_a_token_or_url_that_cannot_make_a_request_is_one_message(study, fake, option, value, needle):
    args = {"--url": fake.url, "--token": "tok-123", option: value}
    res = invoke("--db", study, "labelstudio", "pull", "--project", 5, *[x for kv in args.items() for x in kv])
    assert_one_message(res, needle)
    assert fake.requests == []


def test_no_token(study, fake, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    res = invoke("--db", study, "labelstudio", "push", "--url", fake.url)
    assert_one_message(res, "No Label Studio API token", "--token or LABEL_STUDIO_API_KEY")
    assert fake.requests == []


def test_project_gone(study, fake):
    res = ls(study, fake.url, "pull", "--project", 7)
    assert_one_message(res, "Label Studio has no project 7", "HTTP 404", "--project")
    res = ls(study, fake.url, "push", "--project", 7)
    assert_one_message(res, "Label Studio has no project 7", "HTTP 404")
    assert fake.sent("POST") == []


def test_server_error_on_create_leaves_nothing(study, fake):
    fake.routes[("GET", "/api/projects")] = (200, {"count": 0, "next": None, "previous": None, "results": []})
    fake.routes[("POST", "/api/projects")] = (500, b"<!doctype html><h1>Server Error (500)</h1>")
    res = ls(study, fake.url, "push")
    assert_one_message(res, "server error", f"POST {fake.url}/api/projects", "HTTP 500", "Its log says why")
    assert "doctype" not in res.output


def test_server_error_after_create_deletes_the_new_project(study, fake):
    fake.routes[("GET", "/api/projects")] = (200, {"count": 0, "next": None, "previous": None, "results": []})
    fake.routes[("POST", "/api/projects")] = (201, {"id": 9, "title": "t", "label_config": CONFIG})
    fake.routes[("GET", "/api/storages/localfiles")] = (200, [])
    fake.routes[("POST", "/api/storages/localfiles")] = (201, {"id": 1})
    fake.routes[("POST", "/api/projects/9/import")] = (502, {"detail": "Bad gateway"})
    fake.routes[("DELETE", "/api/projects/9")] = (204, b"")
    res = ls(study, fake.url, "push")
    assert_one_message(res, "server error", "POST", "/api/projects/9/import", "HTTP 502", "Bad gateway")
    assert len(fake.sent("DELETE", "/api/projects/9")) == 1


def test_answer_not_json(study, fake):
    fake.routes[("GET", "/api/projects/3")] = (200, b"<html>a login page</html>")
    res = ls(study, fake.url, "pull", "--project", 3)
    assert_one_message(res, f"answer to GET {fake.url}/api/projects/3", "not valid JSON", "Is --url")


def test_answer_of_another_shape(study, fake):
    fake.routes[("GET", "/api/projects/3")] = (200, {"id": 3, "title": "t", "label_config": CONFIG})
    fake.routes[("GET", "/api/users")] = (200, {"users": "nobody"})
    res = ls(study, fake.url, "pull", "--project", 3)
    assert_one_message(res, f"answer to GET {fake.url}/api/users is not what clipfail expects", "answer must be")
    fake.routes[("GET", "/api/users")] = (200, [{"id": "7", "email": "a@lab.org"}])
    res = ls(study, fake.url, "pull", "--project", 3)
    assert_one_message(res, "answer[0].id must be")


def test_validation_error_is_quoted(study, fake):
    project_routes(fake)
    fake.routes[("POST", "/api/storages/localfiles")] = (
        400,
        {"detail": "Validation error", "validation_errors": {"non_field_errors": ['Absolute local path "/x" must be a '
         'subdirectory of LOCAL_FILES_DOCUMENT_ROOT="/y" by security reasons.']}},
    )  # fmt: skip
    res = ls(study, fake.url, "push", "--project", 3)
    assert_one_message(res, "refused to add a Local Files storage", "HTTP 400", "must be a subdirectory")
    assert "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=" in res.output and "--image-url-prefix" in res.output
    assert fake.sent("POST", "/api/projects/3/import") == []  # no task was sent before the images could load


def test_personal_access_token_is_exchanged(study, fake):
    fake.routes[("POST", "/api/token/refresh/")] = (200, {"access": "short-lived"})
    res = ls(study, fake.url, "pull", "--project", 4, token="aaa.bbb.ccc")
    assert res.exit_code == 2
    assert fake.requests[0][1] == "/api/token/refresh/" and fake.requests[0][3] == {"refresh": "aaa.bbb.ccc"}
    assert fake.requests[1][4]["Authorization"] == "Bearer short-lived"


# --------------------------------------------------------------------------- push: tasks, duplicates, other samples


def test_push_adds_each_task_once_and_refuses_another_sample(study, fake):
    ours = sample_tasks(study)
    there = [{"id": 50, "data": {"sample_id": s, "retrieval_run_id": r, "caption_id": c}} for s, r, c, _ in ours[:3]]
    project_routes(fake, tasks=there)
    res = ls(study, fake.url, "push", "--project", 3)
    assert res.exit_code == 0, res.output
    sent = [t for r in fake.sent("POST", "/api/projects/3/import") for t in r[3]]
    assert sorted(t["data"]["sample_id"] for t in sent) == [s for s, *_ in ours[3:]]
    assert (
        f"{len(ours)} tasks of retrieval run" in res.output and f"{len(ours) - 3} added, 3 there already" in res.output
    )
    assert f"{fake.url}/projects/3/data" in res.output
    # the storage is on the image folder, whose parent is the document root; the URLs name the folder
    root = rows(study, "SELECT image_root FROM subsets")[0][0]
    storage = fake.sent("POST", "/api/storages/localfiles")[0][3]
    assert storage["path"] == root and storage["project"] == 3 and storage["use_blob_urls"] is False
    folder = root.rstrip("/").rsplit("/", 1)[1]
    assert all(t["data"]["gt_image"].startswith(f"/data/local-files/?d={folder}/") for t in sent)
    # overlap tasks are given to both annotators
    overlap = {s for s, *_, name in ours if name == "overlap"}
    assert overlap and len(fake.sent("PATCH")) >= 1

    # a task of another sample (another caption under the same sample id) or not clipfail's: refused
    fake.requests.clear()
    s, r, c, _ = ours[0]
    other = [{"id": 60, "data": {"sample_id": s, "retrieval_run_id": r, "caption_id": c + 1}}, {"id": 61, "data": {}}]
    project_routes(fake, tasks=other)
    res = ls(study, fake.url, "push", "--project", 3)
    assert_one_message(
        res, "holds 2 tasks that are not of this sample", "task 60 (sample", "task 61 (not made", "--force"
    )
    assert fake.sent("POST") == []
    res = ls(study, fake.url, "push", "--project", 3, "--force")
    assert res.exit_code == 0 and "2 tasks of another sample" in res.output, res.output
    assert len([t for r in fake.sent("POST", "/api/projects/3/import") for t in r[3]]) == len(ours)


def test_push_with_image_url_prefix_makes_no_storage(study, fake):
    project_routes(fake)
    res = ls(study, fake.url, "push", "--project", 3, "--image-url-prefix", "https://img.example/coco/")
    assert res.exit_code == 0, res.output
    assert fake.sent("POST", "/api/storages/localfiles") == [] and fake.sent("GET", "/api/storages/localfiles") == []
    sent = fake.sent("POST", "/api/projects/3/import")[0][3]
    assert sent[0]["data"]["gt_image"].startswith("https://img.example/coco/")


def test_push_refuses_a_document_root_that_is_the_image_folder(study, fake):
    root = rows(study, "SELECT image_root FROM subsets")[0][0]
    res = ls(study, fake.url, "push", "--project", 3, "--document-root", root)
    assert_one_message(res, "not a subfolder of the document root", "BELOW")
    assert fake.requests == []


# --------------------------------------------------------------------------- pull


def pull_routes(fake, study, tmp_path, annotations, users):
    out = tmp_path / "ls"
    assert invoke("--db", study, "export-labelstudio", out).exit_code == 0
    export = [t for t in ls_export(out / "tasks.json", annotations) if t["annotations"]]
    fake.routes[("GET", "/api/projects/3")] = (200, {"id": 3, "title": "t", "label_config": CONFIG})
    fake.routes[("GET", "/api/users")] = (200, users)
    fake.routes[("GET", "/api/projects/3/export")] = (200, export)
    return export


def test_pull_maps_users_by_email_or_username(study, fake, tmp_path):
    s = {n: [r[0] for r in sample_tasks(study) if r[3] == n] for n in ("overlap", "A", "B")}
    users = [
        {"id": 1, "email": "admin@lab.org", "username": "", "first_name": "", "last_name": ""},
        {"id": 2, "email": "bob@lab.org", "username": "bobby", "first_name": "", "last_name": ""},
    ]
    pull_routes(fake, study, tmp_path, {
        s["overlap"][0]: [ls_annotation(1, 1, "Object", "Count", "two"), ls_annotation(2, 2, "Action")],
        s["B"][0]: [ls_annotation(3, 2, "Spatial")],
        s["B"][1]: [ls_annotation(4, 2, cancelled=True)],
    }, users)  # fmt: skip
    saved = tmp_path / "pulled.json"
    res = ls(study, fake.url, "pull", "--project", 3, "--out", saved)
    assert_one_message(res, "its user (admin@lab.org) is not an annotator", "its user (bob@lab.org)", "Nothing")
    assert rows(study, "SELECT count(*) FROM annotations") == [(0,)]
    res = ls(study, fake.url, "pull", "--project", 3, "--out", saved, "--user-map", "admin@lab.org=A", "--user-map",
             "bobby=b")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Imported 3 labels" in res.output and "unlabeled" in res.output  # import-labels' own report
    got = rows(study, "SELECT sample_id, annotator, category, secondary_category, notes, source_file FROM annotations "
                      "ORDER BY 1, 2")  # fmt: skip
    assert got == sorted([
        (s["overlap"][0], "A", "Object", "Count", "two", str(saved)),
        (s["overlap"][0], "B", "Action", None, None, str(saved)),
        (s["B"][0], "B", "Spatial", None, None, str(saved)),
    ])  # fmt: skip
    # the saved export names the users, so import-labels reads it again the same way
    first = json.loads(saved.read_text("utf-8"))[0]["annotations"][0]["completed_by"]
    assert first["email"] == "admin@lab.org" and first["id"] == 1
    res = ls(study, fake.url, "pull", "--project", 3, "--out", saved, "--user-map", "1=A", "--user-map", "2=B")
    assert res.exit_code == 0 and "already imported exactly as they are" in res.output, res.output


def test_pull_never_overwrites_a_saved_export(study, fake, tmp_path):
    """An existing --out with other content is refused and left as it is; without --out, a later export that
    differs is saved beside the earlier one (-2), which keeps what it held."""
    import shutil

    s = sample_tasks(study)
    db = tmp_path / "copy.duckdb"
    shutil.copy(study, db)
    users = [{"id": 1, "email": "a@x"}]
    pull_routes(fake, db, tmp_path, {s[0][0]: [ls_annotation(1, 1, "Object")]}, users)
    mine = write(tmp_path / "mine.json", {"kept": "by hand"})
    before = mine.read_bytes()
    res = ls(db, fake.url, "pull", "--project", 3, "--user-map", "1=A", "--out", mine)
    assert_one_message(res, f"--out {mine} exists and holds something else", "nothing was imported")
    assert mine.read_bytes() == before and rows(db, "SELECT count(*) FROM annotations") == [(0,)]
    assert ls(db, fake.url, "pull", "--project", 3, "--user-map", "1=A").exit_code == 0
    first = tmp_path / "labelstudio-project-3.json"
    kept = first.read_bytes()
    pull_routes(fake, db, tmp_path, {s[0][0]: [ls_annotation(1, 1, "Count")]}, users)  # relabelled in Label Studio
    res = ls(db, fake.url, "pull", "--project", 3, "--user-map", "1=A")
    assert res.exit_code == 0 and str(tmp_path / "labelstudio-project-3-2.json") in res.output, res.output
    assert first.read_bytes() == kept and b'"Count"' in (tmp_path / "labelstudio-project-3-2.json").read_bytes()


def test_pull_refuses_annotations_of_another_sample(study, fake, tmp_path):
    s = sample_tasks(study)
    export = pull_routes(fake, study, tmp_path, {s[0][0]: [ls_annotation(1, 1, "Object")]}, [{"id": 1, "email": "a@x"}])
    export[0]["data"]["caption_id"] += 1  # the same sample id, another caption: another database's sample
    res = ls(study, fake.url, "pull", "--project", 3, "--user-map", "1=A", "--out", tmp_path / "p.json")
    assert_one_message(res, "Nothing was imported", "1 task that is not of this study's failure sample", "task 100")
    assert rows(study, "SELECT count(*) FROM annotations") == [(0,)]


def test_import_refuses_json_min_by_name(study, tmp_path):
    s = sample_tasks(study)
    json_min = [{"sample_id": s[0][0], "caption": "x", "id": 1, "category": "Object", "annotator": 1,
                 "annotation_id": 1, "created_at": "2026-12-07T18:15:02Z", "lead_time": None}]  # fmt: skip
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", write(tmp_path / "min.json", json_min))
    assert_one_message(res, "JSON-MIN export", "Export the project as JSON (not JSON-MIN)", "Nothing was imported")


def test_import_hints_at_user_ids(study, tmp_path):
    out = tmp_path / "ls"
    assert invoke("--db", study, "export-labelstudio", out).exit_code == 0
    s = sample_tasks(study)
    path = write(tmp_path / "e.json", ls_export(out / "tasks.json", {s[0][0]: [ls_annotation(1, 4, "Object")]}))
    res = invoke("--db", study, "import-labels", "--format", "labelstudio", "--user-map", "bob@lab.org=A", path)
    assert_one_message(res, "(user id 4)", "names a user by id only", "--user-map 1=A", "labelstudio pull")


def test_an_error_answer_nested_too_deep_for_the_parser_is_quoted_not_a_traceback():
    from toolkit.labels import ls_api

    assert ls_api._detail(b"[" * 200_000).startswith("[[[")  # json.loads raises RecursionError on it
