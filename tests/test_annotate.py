"""clipfail annotate: the labelling workbench, its saving semantics (shared with import-labels), its
security rules and bad input, and the page driven by keyboard in a real headless Chromium (Playwright).

The study: a 30-image generated subset ingested by the real CLI, a hand-made text-to-image run (as in
test_failures.py) and a real `sample-failures` sample: overlap 4, A and B 6 each, backup 4.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import import_tool, query_rows, require_tool
from test_failures import make_retrieval_run

from toolkit.errors import UserError
from toolkit.labels import workbench as annotate
from toolkit.store.study import open_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOT = os.environ.get("CLIPFAIL_ANNOTATE_SHOT")  # where to save a 1280x800 screenshot, if set


def invoke(*args):
    from cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def base(synthetic_coco_master, tmp_path_factory):
    root = tmp_path_factory.mktemp("annotate_base")
    path = root / "base.duckdb"
    res = invoke("--db", path, "ingest", "--coco-root", synthetic_coco_master, "--num-images", 30)
    assert res.exit_code == 0, res.output
    con = open_study(path)
    subset_id = con.execute("SELECT subset_id FROM subsets").fetchone()[0]
    rrid = make_retrieval_run(con, subset_id, seed=0)
    con.close()
    res = invoke(
        "--db", path, "sample-failures", "--run", rrid, "--out", root / "fa", "--no-pictures",
        "--n", 20, "--overlap", 4, "--per-annotator", 6, "--annotators", "A,B",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return path


@pytest.fixture
def study(base, tmp_path):
    dest = tmp_path / "db.duckdb"
    shutil.copy(base, dest)
    return str(dest)


@pytest.fixture(scope="module")
def triaged_base(synthetic_coco_master, tmp_path_factory):
    """A study with a real triage run: 30 generated images with their instances, seeded random embeddings
    (as in test_queries.py), evaluate, the same sample sizes as `base`, then clipfail triage."""
    import numpy as np
    from helpers import register_hand_built

    root = tmp_path_factory.mktemp("annotate_triaged")
    path = root / "t.duckdb"
    res = invoke("--db", path, "ingest", "--coco-root", synthetic_coco_master, "--num-images", 30)
    assert res.exit_code == 0, res.output
    con = open_study(path)
    sid, name = con.execute("SELECT subset_id, name FROM subsets").fetchone()
    imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
    caps = con.execute("SELECT caption_id, image_id FROM subset_captions WHERE subset_id = ? ORDER BY 1", [sid]).df()
    rng = np.random.default_rng(0)
    img = rng.normal(size=(len(imgs), 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    pos = {int(i): k for k, i in enumerate(imgs["image_id"])}
    txt = img[[pos[int(i)] for i in caps["image_id"]]] + 1.2 * rng.normal(size=(len(caps), 16)).astype(np.float32)
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    register_hand_built(con, root / "image.npy", "image", img, imgs["image_id"].to_numpy(), sid)
    register_hand_built(con, root / "text.npy", "text", txt, caps["caption_id"].to_numpy(), sid)
    con.close()
    for args in (
        ["evaluate", "--subset", name, "--device", "cpu"],
        ["sample-failures", "--out", root / "fa", "--no-pictures", "--n", 20, "--overlap", 4, "--per-annotator", 6,
         "--annotators", "A,B"],
        ["triage"],
    ):  # fmt: skip
        res = invoke("--db", path, *args)
        assert res.exit_code == 0, res.output
    return path


@pytest.fixture
def triaged(triaged_base, tmp_path):
    dest = tmp_path / "triaged.duckdb"
    shutil.copy(triaged_base, dest)
    return str(dest)


def suggestions_in_db(dbpath) -> dict[int, tuple[str, str, str]]:
    """sample_id -> (set_name, suggested category, evidence) of the newest triage run, straight from the tables."""
    return {
        s: (set_name, c, e)
        for s, set_name, c, e in rows(
            dbpath,
            "SELECT f.sample_id, f.set_name, t.suggested_category, t.evidence FROM failure_samples f "
            "JOIN triage_suggestions t ON t.caption_id = f.caption_id AND t.retrieval_run_id = f.retrieval_run_id "
            "WHERE t.triage_run_id = (SELECT max(triage_run_id) FROM triage_runs) AND t.suggested_category IS NOT NULL",
        )
    }


def rows(dbpath, sql, params=None):
    return query_rows(dbpath, sql, params)


def items_of(dbpath, name):
    """A's items in the order the page shows them (draw order): overlap first, then A's own."""
    return [
        r[0]
        for r in rows(
            dbpath,
            "SELECT sample_id FROM failure_samples WHERE set_name IN ('overlap', ?) ORDER BY draw_order",
            [name],
        )
    ]


@pytest.fixture
def server(study):
    """A running workbench for A and B on 127.0.0.1 (a free port), stopped after the test."""
    started = []

    def start(names=("A", "B"), host="127.0.0.1", set_choice="all"):
        wb = annotate.prepare(study, list(names), set_choice=set_choice, host=host)
        run = annotate.serve_in_thread(wb, annotate.bind(host, 0))
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url, body, headers=None):
    h = {"Content-Type": "application/json", "X-Clipfail": "1"} | (headers or {})
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"text": text.decode()}


def raw_get(port, path, host="127.0.0.1"):
    """GET a path exactly as written (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", f"127.0.0.1:{port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def raw_request(port, data: bytes, host="127.0.0.1"):
    """Send bytes exactly as written (request line, headers, body) and read one response: (status, headers, body).
    The request need not be complete: a server that answers before reading it all is what some tests check."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def post_bytes(port, body: bytes, content_type="application/json", path="/a/A/api/label", extra=""):
    """POST a body given as bytes (any JSON text, valid or not); (status, parsed JSON answer or {'text': ...})."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Clipfail: 1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    status, _, answer = raw_request(port, head.encode() + body)
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, {"text": answer.decode(errors="replace")}


def labels_of(dbpath):
    sql = "SELECT sample_id, annotator, category, secondary_category, notes FROM annotations ORDER BY 1, 2"
    return rows(dbpath, sql)


# ---------------------------------------------------------------------------------------------
# Saving, blind overlap, images, security (HTTP, no browser)


def test_saving_follows_import_labels_rules_and_overlap_is_blind(study, server, tmp_path):
    run = server()
    a = items_of(study, "A")
    overlap = a[0]
    # B labels an overlap sample first; A's page must never see it.
    status, body = post(f"{run.url}/a/B/api/label", {"sample_id": overlap, "category": "Count"})
    assert status == 200 and body["action"] == "saved"
    status, state = 200, json.loads(get(f"{run.url}/a/A/api/state")[1])
    assert state["labels"] == {} and state["progress"] == {"labelled": 0, "total": 10}
    assert "Count" not in json.dumps(state)

    # Primary + secondary + notes, through the taxonomy: stored as import-labels stores a "X; Y" label.
    status, body = post(
        f"{run.url}/a/A/api/label", {"sample_id": a[1], "category": "Object", "secondary": "Attribute", "notes": " n "}
    )
    assert status == 200 and body["progress"]["labelled"] == 1
    got = rows(
        study,
        "SELECT annotator, raw_label, category, secondary_category, notes, source_file, is_simulated, r.stage "
        "FROM annotations JOIN runs r USING (run_id) WHERE sample_id = ?",
        [a[1]],
    )
    assert got == [("A", "Object; Attribute", "Object", "Attribute", "n", "clipfail annotate", False, "annotate")]
    # The same label again writes nothing; another replaces it (one row per sample and annotator).
    assert post(f"{run.url}/a/A/api/label", {"sample_id": a[1], "category": "Object", "secondary": "Attribute",
                                              "notes": "n"})[1]["action"] == "unchanged"  # fmt: skip
    assert post(f"{run.url}/a/A/api/label", {"sample_id": a[1], "category": "Spatial"})[1]["action"] == "replaced"
    assert rows(study, "SELECT category, secondary_category FROM annotations WHERE sample_id = ?", [a[1]]) == [
        ("Spatial", None)
    ]
    # Refused like an import: unknown category, another annotator's sample, a backup sample; nothing written.
    status, body = post(f"{run.url}/a/A/api/label", {"sample_id": a[2], "category": "Colour-ish"})
    assert status == 400 and "unknown category" in body["error"]
    b_own = [s for s in items_of(study, "B") if s not in a][0]
    status, body = post(f"{run.url}/a/A/api/label", {"sample_id": b_own, "category": "Object"})
    assert status == 404
    # save_label itself (what the page calls) refuses B's sample for A with import-labels' reason.
    from toolkit.labels.label_import import save_label

    con = annotate.connect(study)
    try:
        with pytest.raises(UserError, match="in B's set, not A's"):
            save_label(con, b_own, "a", "Object", None, run_id=run.wb.run_id, source_file="x")
        backup = con.execute("SELECT min(sample_id) FROM failure_samples WHERE set_name = 'backup'").fetchone()[0]
        with pytest.raises(UserError, match="backup set"):
            save_label(con, backup, "A", "Object", None, run_id=run.wb.run_id, source_file="x")
    finally:
        con.close()
    # Clearing removes A's label only.
    assert post(f"{run.url}/a/A/api/label", {"sample_id": a[1], "clear": True})[1]["action"] == "cleared"
    assert rows(study, "SELECT annotator FROM annotations ORDER BY 1") == [("B",)]
    # A later CSV import of the same item replaces the browser label (import-labels' documented rule).
    post(f"{run.url}/a/A/api/label", {"sample_id": a[1], "category": "Object"})
    run.stop()
    csv_path = tmp_path / "assign_A.csv"
    csv_path.write_text(f"sample_id,category\n{a[1]},Action\n", encoding="utf-8")
    res = invoke("--db", study, "import-labels", csv_path)
    assert res.exit_code == 0, res.output
    assert rows(study, "SELECT category, source_file FROM annotations WHERE sample_id = ? AND annotator = 'A'",
                [a[1]]) == [("Action", str(csv_path.resolve()))]  # fmt: skip


def test_a_request_without_a_category_never_wipes_a_label(study, server):
    """A label request with notes but no category (or a blank one) deleted the stored label and its notes, as if
    `clear` had been asked: the page always sends the category, but any other client (or a page out of step)
    lost work that way. Only an explicit clear removes a label; anything else without a category is a 400."""
    run = server(names=("A",))
    sid = run.wb.items["A"][0]["sample_id"]
    assert post(f"{run.url}/a/A/api/label", {"sample_id": sid, "category": "Object", "notes": "keep me"})[0] == 200
    for body in ({"sample_id": sid, "notes": "new note"}, {"sample_id": sid, "category": " ", "notes": "x"}):
        status, answer = post(f"{run.url}/a/A/api/label", body)
        assert status == 400 and "clear" in answer["error"], (body, answer)
    assert rows(study, "SELECT category, notes FROM annotations WHERE sample_id = ?", [sid]) == [("Object", "keep me")]
    assert post(f"{run.url}/a/A/api/label", {"sample_id": sid, "clear": True})[1]["action"] == "cleared"
    assert rows(study, "SELECT count(*) FROM annotations") == [(0,)]


def test_status_and_the_views_see_browser_labels(study, server, tmp_path):
    run = server(names=("A",), set_choice="mine")
    mine = [s for s in items_of(study, "A") if s not in items_of(study, "B")]
    for sid, cat in zip(mine, ["Object", "Object", "Count"]):
        assert post(f"{run.url}/a/A/api/label", {"sample_id": sid, "category": cat})[0] == 200
    # status runs while the server is up (the server does not hold the database).
    res = invoke("--db", study, "status")
    assert res.exit_code == 0, res.output
    assert "3 labels on 3 samples" in res.output, res.output
    got = dict(rows(study, "SELECT category, count FROM taxonomy_distribution WHERE count > 0"))
    assert got == {"Object": 2, "Count": 1}
    assert run.stop() == 3
    assert rows(study, "SELECT count(*) FROM runs WHERE stage = 'annotate'") == [(1,)]


def test_a_session_that_saves_nothing_leaves_no_run(study, server):
    run = server()
    assert get(f"{run.url}/a/A/")[0] == 200
    assert run.stop() == 0
    assert rows(study, "SELECT count(*) FROM runs WHERE stage = 'annotate'") == [(0,)]


def test_images_only_the_items_files_and_no_traversal(study, server):
    run = server(names=("A",), set_choice="mine")
    item = run.wb.items["A"][0]
    ok = f"{run.url}/a/A/image/{item['gt']['image_id']}"
    status, body = get(ok)
    assert status == 200 and body[:2] == b"\xff\xd8"  # the real JPEG
    all_a = {i for it in run.wb.items["A"] for i in [it["gt"]["image_id"]] + [t["image_id"] for t in it["top"]]}
    other = rows(study, "SELECT min(image_id) FROM images WHERE image_id NOT IN (SELECT unnest(?))", [list(all_a)])
    assert get(f"{run.url}/a/A/image/{other[0][0]}")[0] == 404  # an image of the subset, but not A's
    port = run.wb.port
    for path in [
        "/a/A/image/../../etc/passwd",
        "/a/A/image/..%2F..%2Fetc%2Fpasswd",
        "/a/A/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/a/A/image/%2E%2E/%2E%2E/etc/passwd",
        "/a/A/image/..%252f..%252fetc%252fpasswd",
        "/a/A/../../../../etc/passwd",
        "/a/A/image/1/../../../../etc/passwd",
        "/a/A/image/-1",
        "/a/Z/image/" + str(item["gt"]["image_id"]),
    ]:
        status, body = raw_get(port, path)
        assert status == 404, (path, status)
        assert b"root:" not in body
    # Writes need the JSON + X-Clipfail header (a cross-site form cannot send it) and touch nothing else.
    status, _ = post(f"{run.url}/a/A/api/label", {"sample_id": item["sample_id"], "category": "Object"},
                     headers={"X-Clipfail": "0"})  # fmt: skip
    assert status == 403
    # A Host that is not local (DNS rebinding) is refused.
    assert get(f"{run.url}/a/A/api/state", headers={"Host": "evil.example:80"})[0] == 403
    assert get(f"{run.url}/a/A/api/state", headers={"Host": "localhost:9000"})[0] == 200  # an SSH tunnel
    assert rows(study, "SELECT count(*) FROM annotations") == [(0,)]


def test_other_hosts_need_each_annotators_token(study, server):
    run = server(host="127.0.0.2")  # a loopback address that is not 127.0.0.1: tokens required
    links = run.wb.links()
    assert set(links) == {"A", "B"} and all("?token=" in u for u in links.values())
    assert links["A"].split("token=")[1] != links["B"].split("token=")[1]
    base = f"http://127.0.0.2:{run.wb.port}"
    assert get(f"{base}/a/A/")[0] == 403
    assert get(f"{base}/a/A/api/state")[0] == 403
    assert get(f"{base}/a/A/api/state?token={links['B'].split('token=')[1]}")[0] == 403  # B's token is not A's
    sid = run.wb.items["A"][0]["sample_id"]
    assert post(f"{base}/a/A/api/label", {"sample_id": sid, "category": "Object"})[0] == 403
    token = links["A"].split("token=")[1]
    status, body = get(f"{base}/a/A/api/state?token={token}")
    assert status == 200 and json.loads(body)["progress"]["total"] == 10
    status, body = post(f"{base}/a/A/api/label", {"sample_id": sid, "category": "Object"},
                        headers={"Cookie": f"clipfail_A={token}"})  # fmt: skip
    assert status == 200
    assert rows(study, "SELECT annotator, category FROM annotations") == [("A", "Object")]
    # The printed link keeps the token in a cookie for A's pages only and drops it from the address.
    conn = http.client.HTTPConnection("127.0.0.2", run.wb.port, timeout=10)
    conn.request("GET", f"/a/A/?token={token}")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    cookie = resp.getheader("set-cookie")
    assert resp.status == 303 and resp.getheader("location") == "/a/A/"
    assert cookie.startswith(f"clipfail_A={token};") and "Path=/a/A/" in cookie and "HttpOnly" in cookie


def table_fingerprints(dbpath):
    """A hash of every table's content, by table name."""
    con = open_study(dbpath, read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        return {n: con.execute(f"SELECT count(*), sum(hash(t)) FROM {n} t").fetchone() for n in names}
    finally:
        con.close()


def test_requests_cannot_run_sql_or_write_outside_annotations(study, server):
    run = server(names=("A",))
    before = table_fingerprints(study)
    sid = run.wb.items["A"][0]["sample_id"]
    hostile = "'); DROP TABLE runs; --"
    for body, status in [
        ({"sample_id": f"{sid} OR 1=1", "category": "Object"}, 400),
        ({"sample_id": sid, "category": hostile}, 400),
        ({"sample_id": sid, "category": ["Object"]}, 400),
        ({"sample_id": sid, "secondary": "Count"}, 400),
        ({"sample_id": sid, "category": "Object", "notes": hostile}, 200),
    ]:
        got, answer = post(f"{run.url}/a/A/api/label", body)
        assert got == status, (body, answer)
    after = table_fingerprints(study)
    assert {k: v for k, v in after.items() if k != "annotations"} == {
        k: v for k, v in before.items() if k != "annotations"
    }
    assert rows(study, "SELECT sample_id, category, notes FROM annotations") == [(sid, "Object", hostile)]


def test_label_fields_must_have_their_json_types(study, server):
    """Issue 24, finding 4: `sample_id: 31.7` was saved on sample 31, `sample_id: true` replaced the label on sample 1,
    and `clear: "false"` (any truthy value) deleted the label. Every field now has one JSON type: ids are integers,
    flags booleans, texts strings or null, and an unknown field is refused; nothing is written on a refusal."""
    run = server(names=("A",))
    a = [it["sample_id"] for it in run.wb.items["A"]]
    for sid in a:  # every item of A labelled, so that a request landing on any of them would show
        assert post(f"{run.url}/a/A/api/label", {"sample_id": sid, "category": "Object", "notes": "kept"})[0] == 200
    before = labels_of(study)
    assert 1 in a  # `true` would be sample 1, one of A's items
    cases = [
        ({"sample_id": a[1] + 0.7, "category": "Count"}, "sample_id"),
        ({"sample_id": float(a[1]), "category": "Count"}, "sample_id"),
        ({"sample_id": True, "category": "Count"}, "sample_id"),
        ({"sample_id": False, "category": "Count"}, "sample_id"),
        ({"sample_id": str(a[1]), "category": "Count"}, "sample_id"),
        ({"sample_id": None, "category": "Count"}, "sample_id"),
        ({"sample_id": [a[1]], "category": "Count"}, "sample_id"),
        ({"sample_id": -a[1], "category": "Count"}, "sample_id"),
        ({"category": "Count"}, "sample_id"),
        ({"sample_id": a[1], "category": "Object", "clear": "false"}, "clear"),
        ({"sample_id": a[1], "clear": "true"}, "clear"),
        ({"sample_id": a[1], "clear": 1}, "clear"),
        ({"sample_id": a[1], "clear": None}, "clear"),
        ({"sample_id": a[1], "category": "Count", "clear": True}, "clear"),  # ambiguous: refused, not guessed
        ({"sample_id": a[1], "category": 3}, "category"),
        ({"sample_id": a[1], "category": True}, "category"),
        ({"sample_id": a[1], "category": {"name": "Count"}}, "category"),
        ({"sample_id": a[1], "category": "Count", "secondary": ["Object"]}, "secondary"),
        ({"sample_id": a[1], "category": "Count", "secondary": 2}, "secondary"),
        ({"sample_id": a[1], "category": "Count", "notes": 5}, "notes"),
        ({"sample_id": a[1], "category": "Count", "notes": ["a"]}, "notes"),
        ({"sample_id": a[1], "category": "Count", "notes": False}, "notes"),
        ({"sample_id": a[1], "categroy": "Count"}, "categroy"),
        ({"sample_id": a[1], "category": "Count", "annotator": "B"}, "annotator"),
        ({"sample_id": a[1], "category": "Count", "sample_version": 7}, "sample_version"),
    ]
    for body, field in cases:
        status, answer = post(f"{run.url}/a/A/api/label", body)
        assert status == 400, (body, status, answer)
        assert field in answer["error"], (body, answer)
    assert labels_of(study) == before
    # The same fields with their right types still work; clear: false is not a clear.
    body = {"sample_id": a[1], "category": "Count", "secondary": None, "notes": None, "clear": False}
    assert post(f"{run.url}/a/A/api/label", body)[1]["action"] == "replaced"
    assert post(f"{run.url}/a/A/api/label", {"sample_id": a[1], "clear": True})[1]["action"] == "cleared"
    assert len(labels_of(study)) == len(before) - 1


BAD_BODIES = [
    # (body bytes, what the message must name)
    (b'{"sample_id": 1e400, "category": "Object"}', "sample_id"),
    (b'{"sample_id": -1e400, "category": "Object"}', "sample_id"),
    (b'{"sample_id": Infinity, "category": "Object"}', "sample_id"),
    (b'{"sample_id": -Infinity, "category": "Object"}', "sample_id"),
    (b'{"sample_id": NaN, "category": "Object"}', "sample_id"),
    (b'{"sample_id": 1' + b"0" * 5000 + b', "category": "Object"}', "sample_id"),  # past Python's int digits
    (b'{"sample_id": SID, "category": "Object", "notes": NaN}', "notes"),
    (b'{"sample_id": SID, "category": "Object", "notes": "\\ud800"}', "notes"),  # a lone surrogate
    (b'{"sample_id": SID, "category": "Object", "notes": "a\\udfffb"}', "notes"),
    (b'{"sample_id": SID, "category": "\\ud800Object"}', "category"),
    (b'{"sample_id": SID, "category": "Object", "secondary": "\\udbff"}', "secondary"),
    (b'{"sample_id": SID, "category": "Object", "notes": ' + b"[" * 500 + b"]" * 500 + b"}", "notes"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b'{"sample_id": SID, "notes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b"[1]", "object"),
    (b'"sample_id"', "object"),
    (b"5", "object"),
    (b"null", "object"),
    (b"", "JSON"),
    (b"   ", "JSON"),
    (b'{"sample_id": SID, "category": "Object"} trailing', "JSON"),
    (b'{"sample_id": SID, "category": "Object"', "JSON"),
    (b"\xff\xfe{\x00}\x00", "UTF-8"),
    (b'{"sample_id": SID, "category": "Obj\xe9ct"}', "UTF-8"),
    (b'{"sample_id": SID, "category": "Object", "category": "Count"}', "category"),  # twice: ambiguous
]


def test_bad_bodies_are_a_400_that_names_the_problem(study, server):
    """Issue 24, finding 14a: `1e400`, `Infinity`, a 100k-deep body and a lone surrogate in notes were 500s with a
    traceback. Every malformed body is now a 400 whose JSON message names the field (or says what is wrong with the
    body as a whole), and nothing is written."""
    run = server(names=("A",))
    sid = run.wb.items["A"][0]["sample_id"]
    assert post(f"{run.url}/a/A/api/label", {"sample_id": sid, "category": "Object", "notes": "kept"})[0] == 200
    before = labels_of(study)
    for raw, named in BAD_BODIES:
        raw = raw.replace(b"SID", str(sid).encode())
        status, answer = post_bytes(run.wb.port, raw)
        assert status == 400, (raw[:80], status, answer)
        assert named in answer["error"], (raw[:80], answer)
        assert "Traceback" not in answer["error"]
    assert labels_of(study) == before
    # The content type must be JSON itself (not a text type naming JSON in a parameter), in UTF-8.
    good = json.dumps({"sample_id": sid, "category": "Count"}).encode()
    for ctype in ("text/plain", "text/plain; x=application/json", "application/jsonx",
                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=application/json",
                  "application/json; charset=latin-1", ""):  # fmt: skip
        status, answer = post_bytes(run.wb.port, good, content_type=ctype)
        assert status in (403, 415), (ctype, status, answer)
        assert "error" in answer, (ctype, answer)
    assert labels_of(study) == before
    for ctype in ("application/json", "Application/JSON; charset=UTF-8", "application/json;charset=utf-8"):
        status, answer = post_bytes(run.wb.port, good, content_type=ctype)
        assert status == 200, (ctype, answer)


def test_request_bodies_and_fields_are_capped(study, server):
    """Issue 24, finding 12: a 20 MB notes POST was read whole and stored. Notes hold at most 10,000 characters, a
    category 200, and a body over the cap is a 413 answered before it is read to the end: with an honest
    Content-Length, one that claims more than is sent, or none at all (chunked)."""
    run = server(names=("A",))
    port = run.wb.port
    sid = run.wb.items["A"][0]["sample_id"]
    url = f"{run.url}/a/A/api/label"
    assert post(url, {"sample_id": sid, "category": "Object", "notes": "kept"})[0] == 200
    before = labels_of(study)
    status, answer = post(url, {"sample_id": sid, "category": "Object", "notes": "x" * 10_001})
    assert status == 400 and "notes" in answer["error"] and "10,000" in answer["error"], answer
    status, answer = post(url, {"sample_id": sid, "category": "O" * 201})
    assert status == 400 and "category" in answer["error"], answer
    assert labels_of(study) == before

    head = (
        f"POST /a/A/api/label HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Clipfail: 1\r\nContent-Type: application/json\r\n"
    )
    start = b'{"sample_id": %d, "category": "Object", "notes": "' % sid
    # 20 MB announced, 1 KB sent: refused on the header, without waiting for the rest.
    data = (head + "Content-Length: 20000000\r\n\r\n").encode() + start + b"x" * 1000
    status, headers, body = raw_request(port, data)
    assert status == 413 and "bytes" in json.loads(body)["error"], body
    assert headers.get("connection") == "close"
    # No Content-Length (chunked): refused once more than the cap has come, the body still unfinished.
    chunk = start + b"x" * (annotate.MAX_BODY_BYTES + 10)
    data = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    status, headers, body = raw_request(port, data)
    assert status == 413 and "bytes" in json.loads(body)["error"], body
    # A Content-Length that is smaller than what follows: only that much is the body (not JSON here), never a 500.
    status, _, body = raw_request(port, (head + "Content-Length: 10\r\n\r\n").encode() + start + b"x" * 5000)
    assert status == 400, body
    assert labels_of(study) == before
    # At the limit: stored whole.
    status, answer = post(url, {"sample_id": sid, "category": "Object", "notes": "y" * 10_000})
    assert status == 200, answer
    assert rows(study, "SELECT length(notes) FROM annotations WHERE sample_id = ?", [sid]) == [(10_000,)]


@pytest.fixture
def own_images(study, synthetic_coco_master, tmp_path):
    """The study's images copied to a folder of this test (which it may damage), the study rebound to it."""
    dest = tmp_path / "coco"
    shutil.copytree(synthetic_coco_master, dest)
    res = invoke("--db", study, "relocate", "--images-root", dest / "val2017")
    assert res.exit_code == 0, res.output
    return dest / "val2017"


def test_images_are_resolved_and_checked_when_they_are_served(study, server, own_images, tmp_path):
    """Issue 24, finding 9: an image swapped for a symlink to a file outside the image root after the server started
    was served. Each request now resolves the file under the image root, refuses a real path outside it, opens
    each part without following a link (a link or folder swapped in between is refused, not followed) and serves
    regular files only: a FIFO swapped in is a 404 at once, never a hung worker."""
    run = server(names=("A",), set_choice="mine")
    item = run.wb.items["A"][0]
    gt = item["gt"]["image_id"]
    other = next(t["image_id"] for t in item["top"] if t["image_id"] != gt)
    names = dict(rows(study, "SELECT image_id, rel_path FROM images WHERE image_id IN (?, ?)", [gt, other]))
    target = own_images / names[gt]
    original = target.read_bytes()
    url = f"{run.url}/a/A/image/{gt}"
    assert get(url) == (200, original)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8SECRET outside the image root")

    def swap(make):
        tmp = own_images / "swap.tmp"
        make(tmp)
        os.replace(tmp, target)

    def refused():
        status, body = get(url)
        assert status == 404 and b"SECRET" not in body, (status, body[:60])

    swap(lambda p: p.symlink_to(secret))
    refused()
    swap(lambda p: p.symlink_to(os.path.relpath(secret, own_images)))  # a relative link out
    refused()
    target.unlink()
    os.link(own_images / names[other], target)  # a hard link inside the root is a regular file there: served
    assert get(url) == (200, (own_images / names[other]).read_bytes())
    target.unlink()
    (own_images / "inside.jpg").write_bytes(original)
    swap(lambda p: p.symlink_to(own_images / "inside.jpg"))  # a link that stays inside the root: served
    assert get(url) == (200, original)
    target.unlink()
    os.mkfifo(target)  # a FIFO: refused without opening it for a blocking read
    refused()
    target.unlink()
    target.mkdir()
    refused()
    target.rmdir()
    refused()  # missing
    target.write_bytes(original)
    assert get(url) == (200, original)
    # The image root itself swapped for a link to a folder outside it that holds a file of the same name.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / names[gt]).write_bytes(secret.read_bytes())
    own_images.rename(tmp_path / "moved")
    own_images.symlink_to(elsewhere)
    refused()
    own_images.unlink()
    (tmp_path / "moved").rename(own_images)
    assert get(url) == (200, original)
    # An image id beyond any integer the database holds is a 404, not an error.
    assert raw_get(run.wb.port, "/a/A/image/" + "9" * 5000)[0] == 404


def test_without_its_token_a_known_and_an_unknown_annotator_get_the_same_answer(study, server):
    """Issue 24, finding 10: with --host 0.0.0.0 an unknown annotator got 404 and a known one 403, so the names could
    be listed without any token. A request that is not authorised now gets one answer, whatever the name."""
    run = server(host="127.0.0.2")
    base = f"http://127.0.0.2:{run.wb.port}"
    token_b = run.wb.links()["B"].split("token=")[1]
    sid = run.wb.items["A"][0]["sample_id"]
    gt = run.wb.items["A"][0]["gt"]["image_id"]
    for suffix in ("/", "/api/state", f"/image/{gt}", "/image/1", "/image/99999999"):
        for query in ("", "?token=", "?token=wrong", f"?token={token_b}"):
            answers = {name: get(f"{base}/a/{name}{suffix}{query}") for name in ("A", "Zed", "a", "b", "A%20")}
            assert len(set(answers.values())) == 1, (suffix, query, answers)
            assert answers["A"][0] == 403
    answers = {name: post(f"{base}/a/{name}/api/label", {"sample_id": sid, "category": "Object"})
               for name in ("A", "Zed")}  # fmt: skip
    assert answers["A"] == answers["Zed"] and answers["A"][0] == 403
    answers = {n: get(f"{base}/a/{n}/", headers={"Cookie": f"clipfail_{n}={token_b}"}) for n in ("A", "Zed")}
    assert answers["A"] == answers["Zed"] and answers["A"][0] == 403
    assert rows(study, "SELECT count(*) FROM annotations") == [(0,)]


def host_get(port, host_lines, path="/a/A/api/state", connect="127.0.0.1"):
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in host_lines) + "Connection: close\r\n\r\n"
    return raw_request(port, head.encode(), host=connect)[0]


MALFORMED_HOSTS = [
    "127.0.0.1:80@evil.example", "user@127.0.0.1", "user:pw@localhost:80", "127.0.0.1 :80", "127.0.0.1: 80",
    "local host", "127.0.0.1\t:80", "127.0.0.1:80:81", "127.0.0.1:80x", "127.0.0.1:", "localhost:99999",
    "localhost:0", "localhost:-1", "localhost:+80", "localhost:0x50", "::1", "[::1", "::1]", "[::1]x",
    "[::1]:80:81", "[::1]]", "[[::1]]", "[::1]:", "[fe80::1%25eth0]", "[::1%lo]", "[not-v6]", "[]", "[127.0.0.1]",
    "localhost/evil", "localhost#x", "localhost?x", "localhost\\evil", "127.0.0.1,evil.example", "localhost;evil",
    "", "http://localhost", "localhost..", ".localhost", "-localhost",
]  # fmt: skip


def test_the_host_header_is_parsed_strictly(study, server):
    """Issue 24, finding 19: `Host: 127.0.0.1:80@evil.example` was taken for 127.0.0.1. A Host header is now a host
    name, an IPv4 address or a bracketed IPv6 address, then at most one port: anything else is a 400 (also with
    tokens), a well-formed host that is not local a 403 as before."""
    run = server(names=("A",))
    port = run.wb.port
    for host in MALFORMED_HOSTS:
        assert host_get(port, [host]) == 400, host
    assert host_get(port, ["127.0.0.1", "evil.example"]) == 400  # two Host headers
    assert host_get(port, ["127.0.0.1", "127.0.0.1"]) == 400
    for host in ("evil.example", "evil.example:80", "127.0.0.2", "127.0.0.1.evil.example", "[::ffff:127.0.0.1]:80",
                 "[::2]", "localhost.evil.example:8765", "0.0.0.0"):  # fmt: skip
        assert host_get(port, [host]) == 403, host
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", "LocalHost:9000", "[::1]", "[::1]:8080",
                 "[0:0:0:0:0:0:0:1]:80"):  # fmt: skip
        assert host_get(port, [host]) == 200, host
    # With tokens any well-formed host may name the server (a machine name, a proxy), never a malformed one.
    run = server(names=("A",), host="127.0.0.2")
    token = run.wb.links()["A"].split("token=")[1]
    path = f"/a/A/api/state?token={token}"
    for host in ("127.0.0.2:80@evil.example", "user@labserver", "labserver:80:81", "[::1", ""):
        assert host_get(run.wb.port, [host], path, "127.0.0.2") == 400, host
    for host in ("labserver", "labserver.example.org:8765", "127.0.0.2"):
        assert host_get(run.wb.port, [host], path, "127.0.0.2") == 200, host


def test_only_the_query_parameter_token_is_taken(study, server):
    """The only query parameter is `token`, once: another name, or the token twice, is refused, never ignored."""
    run = server(names=("A",))
    assert get(f"{run.url}/a/A/api/state?token=x")[0] == 200  # harmless on a local host
    status, body = get(f"{run.url}/a/A/api/state?sample_id=3")
    assert status == 400 and "sample_id" in json.loads(body)["error"]
    assert get(f"{run.url}/a/A/api/state?token=x&token=y")[0] == 400
    run = server(names=("A",), host="127.0.0.2")
    token = run.wb.links()["A"].split("token=")[1]
    base = f"http://127.0.0.2:{run.wb.port}/a/A/api/state"
    assert get(f"{base}?token={token}")[0] == 200
    assert get(f"{base}?token={token}&token={token}")[0] == 403  # not authorised: the same answer as no token
    assert get(f"{base}?token=wrong&token={token}")[0] == 403


def test_a_sample_replaced_while_serving_is_named_and_nothing_is_saved(study, server, tmp_path):
    """Issue 24, finding 16: after `sample-failures --replace` by another process, the server kept serving the old
    items and each save failed with "Sample 206 is not in the failure sample." Each read and save now checks the
    sample against the one the server loaded and says that it was replaced and to restart clipfail annotate; a page
    from an earlier server (another sample) is told to reload. No label lands on a sample the person did not see."""
    run = server(names=("A",))
    url = f"{run.url}/a/A/api/"
    status, body = get(url + "state")
    assert status == 200
    version = json.loads(body)["sample_version"]
    old_ids = [it["sample_id"] for it in run.wb.items["A"]]
    sid = old_ids[0]
    status, answer = post(url + "label", {"sample_id": sid, "category": "Object", "sample_version": version + "x"})
    assert status == 409 and "reload" in answer["error"], answer
    res = invoke(
        "--db", study, "sample-failures", "--run", run.wb.retrieval_run_id, "--out", tmp_path / "fa2",
        "--no-pictures", "--n", 20, "--overlap", 4, "--per-annotator", 6, "--annotators", "A,B", "--seed", 7,
        "--replace",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for body in ({"sample_id": sid, "category": "Object", "sample_version": version},
                 {"sample_id": sid, "category": "Object"}):  # fmt: skip
        status, answer = post(url + "label", body)
        assert status == 409, answer
        assert "replaced" in answer["error"] and "restart clipfail annotate" in answer["error"], answer
    status, body = get(url + "state")
    assert status == 409 and "restart clipfail annotate" in json.loads(body)["error"]
    assert rows(study, "SELECT count(*) FROM annotations") == [(0,)]
    # A restarted server serves the new sample; the old page's version is refused there.
    run.stop()
    run = server(names=("A",))
    url = f"{run.url}/a/A/api/"
    new = json.loads(get(url + "state")[1])
    new_sid = new["items"][0]["sample_id"]
    assert new["sample_version"] != version and new_sid not in old_ids
    status, answer = post(url + "label", {"sample_id": new_sid, "category": "Object", "sample_version": version})
    assert status == 409 and "reload" in answer["error"], answer
    body = {"sample_id": new_sid, "category": "Object", "sample_version": new["sample_version"]}
    assert post(url + "label", body)[0] == 200
    assert rows(study, "SELECT sample_id, category FROM annotations") == [(new_sid, "Object")]


def test_a_locked_database_answers_which_process_to_stop_and_nothing_is_lost(study, server, monkeypatch):
    run = server(names=("A",))
    monkeypatch.setattr(annotate, "LOCK_WAIT_S", 0.3)
    sid = run.wb.items["A"][0]["sample_id"]
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({study!r}); print('ok', flush=True); "
         "sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ok"
        status, body = post(f"{run.url}/a/A/api/label", {"sample_id": sid, "category": "Object"})
        assert status == 503 and f"locked by process {holder.pid}" in body["error"], body
        assert "Stop that process" in body["error"]
    finally:
        holder.communicate("\n", timeout=20)
    status, body = post(f"{run.url}/a/A/api/label", {"sample_id": sid, "category": "Object"})
    assert status == 200 and body["progress"]["labelled"] == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one message, nothing started


def test_bad_input_messages_and_nothing_started(study, tmp_path):
    before = rows(study, "SELECT count(*) FROM runs")
    cases = [
        (["--annotator", "Z"], "'Z' is not an annotator"),
        (["--annotator", "A", "--set", "everything"], "--set 'everything' is not a set"),
        (["--annotator", "A", "--set", "backup"], "backup set is assigned to nobody"),
        (["--annotator", "A", "--run", "999"], "No retrieval run with id 999. Runs with a failure sample:"),
    ]
    for args, message in cases:
        res = invoke("--db", study, "annotate", *args, "--port", 0)
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
    assert rows(study, "SELECT count(*) FROM runs") == before

    empty = tmp_path / "empty.duckdb"
    open_study(empty).close()
    res = invoke("--db", empty, "annotate", "--annotator", "A")
    assert res.exit_code == 2 and "no sampled failures" in res.output

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = invoke("--db", study, "annotate", "--annotator", "A", "--port", port)
        assert res.exit_code == 2 and f"Port {port} on 127.0.0.1 is in use" in res.output, res.output
    assert rows(study, "SELECT count(*) FROM runs") == before

    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({study!r}); print('ok', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ok"
        res = invoke("--db", study, "annotate", "--annotator", "A", "--port", 0)
        assert res.exit_code == 2, res.output
        assert f"locked by process {holder.pid}" in res.output and "Stop that process" in res.output
    finally:
        holder.kill()
        holder.wait()


def start_cli(study):
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "--db", study, "annotate", "--annotator", "a", "--port", "0"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = proc.stdout.readline()
    assert "Labelling retrieval run" in first, first
    line = proc.stdout.readline()
    assert line.strip().startswith("A (10 items): http://127.0.0.1:"), line
    return proc, line.split(": ", 1)[1].strip()


def test_cli_serves_a_killed_server_keeps_every_label_and_ctrl_c_stops_cleanly(study):
    proc, url = start_cli(study)
    try:
        status, body = get(url)
        assert status == 200 and b"clipfail annotate" in body
        sid = items_of(study, "A")[0]
        status, body = post(url + "api/label", {"sample_id": sid, "category": "Action", "notes": "kept"})
        assert status == 200 and body["action"] == "saved"
    finally:
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.communicate(timeout=20)
    assert rows(study, "SELECT sample_id, annotator, category, notes FROM annotations") == [
        (sid, "A", "Action", "kept")
    ]
    # The next session resumes at the first unlabelled item; Ctrl-C stops it cleanly.
    proc, url = start_cli(study)
    try:
        state = json.loads(get(url + "api/state")[1])
        assert state["first_unlabelled"] == 1 and state["labels"][str(sid)]["category"] == "Action"
    finally:
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Stopped. No label was saved in this session (its run record was removed)." in out
    assert rows(study, "SELECT count(*) FROM runs WHERE stage = 'annotate'") == [(1,)]  # the killed one's


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c(study, signame):
    """Issue 24, finding 18: SIGTERM (kill, systemd, docker stop) killed the server with status 143, no summary, and
    left the empty session's run row. It (and SIGHUP, a closed terminal) now stops it like Ctrl-C: the summary,
    the same cleanup, exit status 0. SIGHUP is sent after a label is saved, so the run is kept and finished."""
    import signal

    proc, url = start_cli(study)
    try:
        if signame == "SIGHUP":
            sid = items_of(study, "A")[0]
            assert post(url + "api/label", {"sample_id": sid, "category": "Count"})[0] == 200
        else:
            assert get(url + "api/state")[0] == 200
    finally:
        proc.send_signal(getattr(signal, signame))
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, (proc.returncode, out)
    assert "Traceback" not in out
    runs = rows(study, "SELECT run_id, finished_at IS NOT NULL FROM runs WHERE stage = 'annotate'")
    if signame == "SIGHUP":
        assert len(runs) == 1 and runs[0][1], runs
        assert f"Stopped. The labels of 1 items carry this session's run id {runs[0][0]}." in out, out
    else:
        assert "Stopped. No label was saved in this session (its run record was removed)." in out, out
        assert runs == []


# ---------------------------------------------------------------------------------------------
# The page in a real browser


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        require_tool("chromium", "not installed (Debian: apt-get install chromium)")
    sync_playwright = import_tool("playwright.sync_api", "pip install -e '.[dev]'").sync_playwright
    try:
        pw = sync_playwright().start()
    except Exception as exc:  # pragma: no cover - environment
        require_tool("playwright", f"cannot start: {exc}")
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as exc:  # pragma: no cover - environment
        pw.stop()
        require_tool("chromium", f"cannot be started by Playwright: {str(exc)[:300]}")
    yield b
    b.close()
    pw.stop()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page


def current_sample(page) -> int:
    return int(page.evaluate("location.hash").split("-")[1])


def test_keyboard_labelling_reload_back_and_change(study, server, browser):
    run = server(names=("A",))
    order = [it["sample_id"] for it in run.wb.items["A"]]
    page = open_page(browser, f"{run.url}/a/A/")
    assert page.inner_text("#count") == "0 / 10 labelled"
    assert current_sample(page) == order[0]
    # The images are the real files, served and decoded.
    page.wait_for_function("[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#images figure").count() == 6
    assert page.locator("#images figure.gt").count() >= 1

    # Three labels by keyboard: 2 (Object), Shift+3 then 1 (Ambiguous; Attribute), 6 (Count) + notes.
    page.keyboard.press("2")
    page.wait_for_function("document.getElementById('count').textContent === '1 / 10 labelled'")
    assert current_sample(page) == order[1]
    page.keyboard.press("Shift+3")
    page.keyboard.press("1")
    page.wait_for_function("document.getElementById('count').textContent === '2 / 10 labelled'")
    page.keyboard.press("n")
    page.keyboard.type("two dogs, not three")
    page.keyboard.press("Enter")
    page.keyboard.press("6")
    page.wait_for_function("document.getElementById('count').textContent === '3 / 10 labelled'")
    assert current_sample(page) == order[3]
    if SHOT:
        page.wait_for_function("[...document.querySelectorAll('#images img')].every(i => i.complete)")
        page.screenshot(path=SHOT)

    expected = {
        order[0]: ("Object", None, None),
        order[1]: ("Ambiguous", "Attribute", None),
        order[2]: ("Count", None, "two dogs, not three"),
    }

    def stored():
        return {
            s: (c, sc, n)
            for s, c, sc, n in rows(
                study, "SELECT sample_id, category, secondary_category, notes FROM annotations WHERE annotator = 'A'"
            )
        }

    assert stored() == expected

    # Reload: the labels are kept, shown when going back.
    page.goto(f"{run.url}/a/A/")  # no hash: resumes at the first unlabelled item
    page.wait_for_selector("body[data-ready='1']")
    assert page.inner_text("#count") == "3 / 10 labelled"
    assert current_sample(page) == order[3]
    page.keyboard.press("ArrowLeft")
    assert current_sample(page) == order[2]
    assert page.get_attribute("body", "data-labelled") == "Count"
    assert page.input_value("#notes") == "two dogs, not three"
    page.keyboard.press("ArrowLeft")
    assert page.locator("button[data-cat='Ambiguous'].on").count() == 1
    assert page.locator("button[data-sec='Attribute'].on").count() == 1

    # Change one label: back to the first item, press 5 (Context).
    page.keyboard.press("ArrowLeft")
    assert current_sample(page) == order[0]
    page.keyboard.press("5")
    page.wait_for_function(f"location.hash === '#sample-{order[1]}'")
    expected[order[0]] = ("Context", None, None)
    assert stored() == expected
    assert page.inner_text("#count") == "3 / 10 labelled"
    # The category definitions are a key away.
    page.keyboard.press("?")
    assert page.locator("#help.open").is_visible() and "Count" in page.inner_text("#help")
    page.keyboard.press("Escape")
    # Where the ground truth is among the top 5, it is framed there too.
    j = next(i for i, it in enumerate(run.wb.items["A"]) if any(t["is_gt"] for t in it["top"]))
    page.evaluate(f"show({j})")
    rank = run.wb.items["A"][j]["gt"]["rank"]
    assert page.locator("#images figure.gt").count() == 2
    assert page.locator("#images figure.gt").nth(1).inner_text().startswith(f"#{rank} = ground truth")
    # The page sends the version of the sample it was loaded for: a page from an earlier server is told to reload.
    page.evaluate("sampleVersion = 'the sample of an earlier server'")
    page.keyboard.press("3")
    page.wait_for_function("document.getElementById('status').textContent.includes('reload the page')")
    assert page.inner_text("#status").startswith("NOT SAVED")
    assert stored() == expected
    page.close()


def test_two_pages_label_different_items_at_once(study, server, browser):
    run = server(names=("A", "B"))
    pa = open_page(browser, f"{run.url}/a/A/")
    pb = open_page(browser, f"{run.url}/a/A/")
    a_items = [it["sample_id"] for it in run.wb.items["A"]]
    # Page 2 works from the end of the list while page 1 works from the start; keys alternate.
    pb.evaluate("show(items.length - 5)")
    for k in range(5):
        pa.keyboard.press(str(1 + k % 7))
        pb.keyboard.press(str(7 - k % 7))
        pa.wait_for_function(f"labels[{a_items[k]}] !== undefined && location.hash === '#sample-{a_items[k + 1]}'")
        pb.wait_for_function(f"labels[{a_items[5 + k]}] !== undefined")
    got = dict(rows(study, "SELECT sample_id, category FROM annotations WHERE annotator = 'A'"))
    cats = [c["name"] for c in run.wb.categories]
    want = {a_items[k]: cats[k % 7] for k in range(5)} | {a_items[5 + k]: cats[6 - k % 7] for k in range(5)}
    assert got == want
    # Both pages' counters come from the database: the last save saw all ten.
    pa.reload()
    pa.wait_for_selector("body[data-ready='1']")
    assert pa.inner_text("#count") == "10 / 10 labelled"
    pa.close()
    pb.close()


# ---------------------------------------------------------------------------------------------
# Triage suggestions on the page


def test_suggestions_on_own_items_never_on_overlap_unless_asked(triaged, study, monkeypatch):
    want = suggestions_in_db(triaged)
    sets_with = {v[0] for v in want.values()}
    assert {"overlap", "A"} <= sets_with  # the fixture has suggestions on both, so hiding is tested
    for flag in (False, True):
        run = annotate.serve_in_thread(
            annotate.prepare(triaged, ["A"], show_suggestions_on_overlap=flag), annotate.bind("127.0.0.1", 0)
        )
        try:
            code, body = get(f"{run.url}/a/A/api/state")
            assert code == 200
            items = json.loads(body)["items"]
            got = {it["sample_id"]: it["suggestion"] for it in items}
            expected = {
                it["sample_id"]: (
                    {"category": want[it["sample_id"]][1], "evidence": want[it["sample_id"]][2]}
                    if it["sample_id"] in want and (flag or it["set_name"] != "overlap")
                    else None
                )
                for it in items
            }
            assert got == expected
            assert any(v for k, v in got.items() if want.get(k, ("",))[0] == "A")
            assert any(v for k, v in got.items() if want.get(k, ("",))[0] == "overlap") == flag
        finally:
            run.stop()
    # Showing suggestions saves nothing.
    assert rows(triaged, "SELECT count(*) FROM annotations") == [(0,)]
    # No triage run: no suggestion and no error.
    wb = annotate.prepare(study, ["A"])
    assert [it["suggestion"] for it in wb.items["A"]] == [None] * len(wb.items["A"])

    # The CLI flag reaches the workbench (serve replaced: no server is started).
    seen = []
    monkeypatch.setattr(annotate, "serve", lambda wb, sock: seen.append(wb))
    for extra, flag in (([], False), (["--show-suggestions-on-overlap"], True)):
        res = invoke("--db", triaged, "annotate", "--annotator", "A", "--port", 0, *extra)
        assert res.exit_code == 0, res.output
        wb = seen[-1]
        assert wb.show_suggestions_on_overlap is flag
        overlap = [it["suggestion"] for it in wb.items["A"] if it["set_name"] == "overlap"]
        assert any(overlap) is flag


def test_the_page_shows_the_suggestion_without_selecting_it(triaged, browser):
    run = annotate.serve_in_thread(annotate.prepare(triaged, ["A"]), annotate.bind("127.0.0.1", 0))
    try:
        items = run.wb.items["A"]
        page = open_page(browser, f"{run.url}/a/A/")
        j = next(i for i, it in enumerate(items) if it["suggestion"])
        k = next(i for i, it in enumerate(items) if it["set_name"] == "overlap")
        page.evaluate(f"show({j})")
        sug = items[j]["suggestion"]
        assert page.locator("#suggestion").is_visible()
        text = page.inner_text("#suggestion")
        assert sug["category"] in text and sug["evidence"][:40] in text
        assert page.locator("button[data-cat].suggested").count() == 1
        assert page.get_attribute("button[data-cat].suggested", "data-cat") == sug["category"]
        assert page.locator("button[data-cat].on").count() == 0 and page.inner_text("#count") == "0 / 10 labelled"
        page.evaluate(f"show({k})")  # an overlap item: nothing shown
        assert not page.locator("#suggestion").is_visible() and page.locator("button.suggested").count() == 0
        page.close()
    finally:
        run.stop()
    assert rows(triaged, "SELECT count(*) FROM annotations") == [(0,)]
