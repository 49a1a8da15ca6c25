"""clipfail labelstudio push / pull against a live Label Studio on 127.0.0.1.

Label Studio pins its own Django stack, so it lives in its own venv: $CLIPFAIL_LABEL_STUDIO_VENV, by default
.venv-labelstudio in the checkout, which .ci/run creates (label-studio==1.23.2 and sentry-sdk<3: sentry-sdk 3
stops the server from starting). Where it is not installed the test skips saying so (and fails in CI,
tests/helpers.py require_tool).

The test starts the server on a free port with a fresh data folder, a user and a legacy API token, and a
document root one level above the demo's image folder; pushes the demo's failure sample (twice: the second
push adds nothing); signs a second user up through the organization's invite link and takes that user's own
token; posts annotations through the API as the two users; pulls; and asserts the labels in the database
exactly. It also fetches one task's image URL, as a browser would, and compares the bytes with the file. The
server is stopped by its PID (its process group) however the test ends.

The fresh data folder is a copy of one whose database already has every Label Studio migration applied
(`migrated_template`: made once per Label Studio venv, beside it, by `label-studio version`, which migrates
before it prints; .ci/run makes it while it installs Label Studio). Migrating an empty database takes about a
CPU-minute, a start on a migrated one seconds; the server still checks, at its start, that none is missing.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import duckdb
from helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("CLIPFAIL_LABEL_STUDIO_VENV") or ROOT / ".venv-labelstudio")
INSTALL = "python3 -m venv .venv-labelstudio && .venv-labelstudio/bin/pip install 'label-studio==1.23.2' 'sentry-sdk<3'"
ADMIN, PASSWORD, TOKEN = "admin@lab.example", "clipfail-admin-pw", "clipfail-live-test-token"
START_TIMEOUT_S = 420  # a start that must migrate an empty database takes 2.5 min on 2 busy cores
TEMPLATE = VENV / "clipfail-test-data"  # .ci/run makes it the same way: keep the two in step


def ls_env(data_dir: Path, document_root: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
    )
    if document_root is not None:
        env.update(
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(document_root),
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def _migrate(data_dir: Path) -> None:
    proc = subprocess.run(
        [str(VENV / "bin" / "label-studio"), "version"], env=ls_env(data_dir), capture_output=True, timeout=600
    )
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")[-3000:]
    assert proc.returncode == 0, f"label-studio version (which migrates) failed:\n{out}"


def migrated_template(scratch: Path) -> Path:
    """A Label Studio data folder with every migration applied, made once per venv (in a temporary folder
    renamed into place, so a killed run leaves none half-made); in `scratch`, for this run only, where the venv's
    folder cannot be written to."""
    if (TEMPLATE / "label_studio.sqlite3").exists():
        return TEMPLATE
    try:
        making = Path(tempfile.mkdtemp(prefix=".clipfail-test-data.", dir=VENV))
    except OSError:
        (scratch / "migrated").mkdir()
        _migrate(scratch / "migrated")
        return scratch / "migrated"
    try:
        _migrate(making)
        try:
            making.rename(TEMPLATE)
        except OSError:  # another worker made it first
            assert (TEMPLATE / "label_studio.sqlite3").exists(), f"could not make {TEMPLATE}"
    finally:
        shutil.rmtree(making, ignore_errors=True)
    return TEMPLATE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None, token=TOKEN, raw=False):
    req = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        data = resp.read()
        return (resp.status, resp.headers.get("Content-Type"), data) if raw else json.loads(data)


@contextmanager
def label_studio(data_dir: Path, document_root: Path):
    """A Label Studio server (its base URL) that is stopped by PID on the way out, whatever happened."""
    exe = VENV / "bin" / "label-studio"
    if not exe.exists():
        require_tool("label-studio", f"not installed in {VENV} (set CLIPFAIL_LABEL_STUDIO_VENV, or run: {INSTALL})")
    shutil.copytree(migrated_template(data_dir.parent), data_dir, dirs_exist_ok=True)
    port = free_port()
    env = ls_env(data_dir, document_root)
    log_path = data_dir / "server.log"
    args = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    args += ["--username", ADMIN, "--password", PASSWORD, "--user-token", TOKEN, "--enable-legacy-api-token"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            tail = log_path.read_text("utf-8", "replace")[-3000:]
            assert proc.poll() is None, f"Label Studio exited with status {proc.returncode} while starting:\n{tail}"
            assert time.monotonic() - started < START_TIMEOUT_S, f"Label Studio did not start in time:\n{tail}"
            time.sleep(1)
        print(f"Label Studio answered after {time.monotonic() - started:.1f} s")
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: the group's id is the server's PID
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def second_user(base, email, password) -> str:
    """Sign a user up through the organization's invite link and return that user's own legacy token."""
    invite = call(base, "GET", "/api/invite")["token"]
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    signup = f"{base}/user/signup/?token={urllib.parse.quote(invite)}"
    opener.open(signup, timeout=60).read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": csrf, "email": email, "password": password}).encode()
    opener.open(urllib.request.Request(signup, data=form, headers={"Referer": signup}), timeout=60).read()
    with opener.open(f"{base}/api/current-user/token", timeout=60) as resp:
        return json.loads(resp.read())["token"]


def result(category=None, secondary=None, notes=None):
    out = []
    for name, value in (("category", category), ("secondary", secondary)):
        if value:
            out.append({"from_name": name, "to_name": "caption", "type": "choices", "value": {"choices": [value]}})
    if notes:
        out.append({"from_name": "notes", "to_name": "caption", "type": "textarea", "value": {"text": [notes]}})
    return out


def test_push_annotate_pull_against_a_live_label_studio(demo, tmp_path, run_cli):
    started = time.monotonic()
    study = tmp_path / "demo"
    shutil.copytree(demo[0], study, ignore=shutil.ignore_patterns("report", "model"))
    db = study / "demo.duckdb"
    images = study / "coco" / "val2017"
    (tmp_path / "ls-data").mkdir()
    with label_studio(tmp_path / "ls-data", images.parent) as base:
        ls = ["--url", base, "--token", TOKEN]
        res = run_cli("--db", db, "labelstudio", "push", *ls)
        pid = int(re.search(r"Created project (\d+)", res.output).group(1))
        assert f"{base}/projects/{pid}/data" in res.output
        assert "180 tasks of retrieval run 1: 180 added, 0 there already." in res.output, res.output
        again = run_cli("--db", db, "labelstudio", "push", *ls)
        assert f"project {pid}" in again.output and "0 added, 180 there already." in again.output, again.output
        project = call(base, "GET", f"/api/projects/{pid}")
        n_predictions = int(re.search(r"(\d+) of the added tasks carry a prediction", res.output).group(1))
        assert project["task_number"] == 180 and project["total_predictions_number"] == n_predictions > 0

        tasks = []
        for page in (1, 2):
            tasks += call(base, "GET", f"/api/tasks?project={pid}&page={page}&page_size=100&fields=all")["tasks"]
        by_set: dict[str, list[dict]] = {}
        for t in sorted(tasks, key=lambda t: t["data"]["sample_id"]):
            by_set.setdefault(t["data"]["set_name"], []).append(t)
        assert {k: len(v) for k, v in by_set.items()} == {"overlap": 30, "A": 50, "B": 50, "C": 50}
        assert {t["overlap"] for t in by_set["overlap"]} == {3} and {t["overlap"] for t in by_set["A"]} == {1}

        # One task's image, as the labelling page loads it.
        url = by_set["A"][0]["data"]["gt_image"]
        status, ctype, body = call(base, "GET", url, raw=True)
        assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
        assert body == Path(by_set["A"][0]["data"]["gt_file"]).read_bytes()

        # Two users, each with their own token.
        token_b = second_user(base, "bob@lab.example", "clipfail-bob-pw")
        ov, own_a, own_b = by_set["overlap"][0], by_set["A"][0], by_set["B"]
        posts = [
            (ov, TOKEN, {"result": result("Object", "Count", "two dogs, one cat")}),
            (ov, token_b, {"result": result("Action")}),
            (own_a, TOKEN, {"result": result("Spatial")}),
            (own_b[0], token_b, {"result": result("Attribute", None, "red, not blue")}),
            (own_b[1], token_b, {"result": [], "was_cancelled": True}),  # skipped: keeps B's simulated label
        ]
        for task, token, body in posts:
            call(base, "POST", f"/api/tasks/{task['id']}/annotations", body, token=token)
        users = {u["email"]: u for u in call(base, "GET", "/api/users")}
        assert set(users) == {ADMIN, "bob@lab.example"}
        assert users["bob@lab.example"]["username"] == "bob"  # a signed-up user is named after the e-mail's local part

        kept = duckdb.connect(str(db), read_only=True).execute(
            "SELECT category FROM annotations WHERE sample_id = ? AND annotator = 'B'", [own_b[1]["data"]["sample_id"]]
        )
        kept_label = kept.fetchall()
        kept.close()
        saved = tmp_path / "pulled.json"
        res = run_cli(
            "--db", db, "labelstudio", "pull", *ls, "--project", pid, "--out", saved,
            "--user-map", f"{ADMIN}=A", "--user-map", f"{users['bob@lab.example']['username']}=B",
        )  # fmt: skip
        assert "5 annotations on 4 tasks" in res.output and "Imported 4 labels" in res.output, res.output
        # A personal access token (a JWT, exchanged at /api/token/refresh/) works as well: the same pull, a no-op.
        pat = call(base, "POST", "/api/token/")["token"]
        res = run_cli(
            "--db", db, "labelstudio", "pull", "--url", base, "--token", pat, "--project", pid, "--out", saved,
            "--user-map", f"{users[ADMIN]['id']}=A", "--user-map", f"{users['bob@lab.example']['id']}=B",
        )  # fmt: skip
        assert "already imported exactly as they are" in res.output, res.output

    con = duckdb.connect(str(db), read_only=True)
    try:
        got = con.execute(
            "SELECT sample_id, annotator, raw_label, category, secondary_category, notes, is_simulated "
            "FROM annotations "
            "WHERE source_file = ? ORDER BY 1, 2",
            [str(saved)],
        ).fetchall()
        sid = lambda t: t["data"]["sample_id"]  # noqa: E731
        assert got == sorted(
            [
                (sid(ov), "A", "Object; Count", "Object", "Count", "two dogs, one cat", False),
                (sid(ov), "B", "Action", "Action", None, None, False),
                (sid(own_a), "A", "Spatial", "Spatial", None, None, False),
                (sid(own_b[0]), "B", "Attribute", "Attribute", None, "red, not blue", False),
            ]
        )
        assert (
            kept_label
            and con.execute(
                "SELECT category FROM annotations WHERE sample_id = ? AND annotator = 'B'", [sid(own_b[1])]
            ).fetchall()
            == kept_label
        )
    finally:
        con.close()
    print(f"live Label Studio test: {time.monotonic() - started:.1f} s")
