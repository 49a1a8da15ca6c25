"""`clipfail annotate`: a local labelling workbench in the browser that writes labels straight into
`annotations`, with the same validation and replace rules as `import-labels`.

One item per page: the caption, the ground-truth image and the top-5 retrieved images (the real
files, scaled by the browser, loaded lazily), the categories as buttons with keys 1-7, a secondary
category (Shift+1-7), notes, skip, back/next with the arrow keys and a progress bar. The page is
`toolkit/data/annotate.html`; this module is the server (Starlette on uvicorn).

Saving: every label is validated and stored as it is given, each in its own transaction, by
`toolkit.annotations.save_label` (the sample must be the annotator's own or the overlap set's, the
label resolves through the taxonomy, a new label replaces that annotator's stored one). Killing
the server or the browser loses at most the item on screen. A reopened page resumes at the first
unlabelled item. Browser labels carry `source_file = 'clipfail annotate'` and the run id of the
session's `annotate` run; `analyze`, `status` and the report read them like imported ones.

The database connection: DuckDB lets one process write a file at a time, and a process that holds
it open blocks every other clipfail command, even `status`. So the server never holds it: each
request opens the file, does its one read or one transaction, and closes it (a few milliseconds),
retrying for a few seconds while another process has it. Other commands can run while the
server is idle; a request that cannot get the file answers with the process to stop.

Blind overlap: a page only ever receives its own annotator's labels.

Triage suggestions (`clipfail triage`): an item shows the newest triage run's suggested category and
its evidence as a hint line and a marker on that category's button; it never selects or saves
anything. Overlap items get none unless --show-suggestions-on-overlap (they measure agreement).

Security: the default host is 127.0.0.1 (and then requests must name a local Host, against DNS
rebinding). Any other --host needs a token per annotator, printed in the links; a request without
the right token gets 403. Only the image files of the annotator's items (ground truth and top-5)
are served, by image id, resolved under the subset's image root; anything else is a 404. Requests
run only the fixed statements of this module and `save_label`, which writes `annotations` only
(the session's `runs` row is written by the command when it starts, not by a request).
Writes need a JSON body and an `X-Clipfail` header, which cross-site pages cannot send.
"""

from __future__ import annotations

import contextlib
import errno
import html
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import duckdb

from toolkit import db
from toolkit import paths as study_paths
from toolkit.errors import UserError
from toolkit.runs import resolve_retrieval_run
from toolkit.study import open_study

STAGE = "annotate"
SOURCE = "clipfail annotate"
SETS = ("all", "mine", "overlap", "backup")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOPN = 5
LOCK_WAIT_S = 5.0  # how long a request waits for a database that another process holds


# ---------------------------------------------------------------------------------------------
# The database, opened per request


def _lock_holder(message: str) -> str:
    """'PID 123 (python cli.py status)' from DuckDB's lock error, or a generic phrase."""
    m = re.search(r"\(PID (\d+)\)", message)
    if not m:
        return "another process (a clipfail command, a notebook or a DuckDB shell)"
    pid = m.group(1)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    if not cmd:
        held = re.search(r"held in (.+?) \(PID", message)
        cmd = held.group(1) if held else ""
    return f"process {pid}" + (f" ({cmd[:200]})" if cmd else "")


def locked_message(path: str, exc: Exception) -> str:
    return (
        f"Database {path} is locked by {_lock_holder(str(exc))}, which has it open for writing. Stop that "
        "process (or close its database connection), then try again."
    )


def connect(path: str, wait_s: float = 0.0) -> duckdb.DuckDBPyConnection:
    """Open the database for one short read or transaction; UserError naming the holder if it is locked."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path))
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise UserError(f"Cannot open database {path}: {exc}") from None
            if time.monotonic() >= deadline:
                raise UserError(locked_message(path, exc)) from None
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# What the workbench serves


@dataclass
class Workbench:
    db_path: str
    retrieval_run_id: int
    set_choice: str
    annotators: list[str]
    items: dict[str, list[dict]]  # annotator -> items in draw order
    images: dict[str, dict[int, Path | None]]  # annotator -> image id -> file under the image root (None: missing)
    categories: list[dict]
    host: str = "127.0.0.1"
    port: int = 0
    tokens: dict[str, str] | None = None  # annotator -> token; None on a local host
    run_id: int | None = None
    show_suggestions_on_overlap: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def needs_token(self) -> bool:
        return self.tokens is not None

    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}"

    def links(self) -> dict[str, str]:
        out = {}
        for name in self.annotators:
            url = f"{self.base_url()}/a/{name}/"
            out[name] = url + (f"?token={self.tokens[name]}" if self.tokens else "")
        return out

    @contextlib.contextmanager
    def database(self):
        """One short connection at a time for this process; closed straight after use."""
        with self.lock:
            con = connect(self.db_path, wait_s=LOCK_WAIT_S)
            try:
                yield con
            finally:
                con.close()


def prepare(
    db_path: str,
    annotators,
    set_choice: str = "all",
    retrieval_run_id: int | None = None,
    host: str = "127.0.0.1",
    show_suggestions_on_overlap: bool = False,
) -> Workbench:
    """Check everything and load what the pages show; writes nothing (see `start_session`).

    Each item carries `suggestion` ({category, evidence} from the newest triage run of the retrieval
    run, by the lookup of the CSV export) or None: none without a triage run, none where triage had no
    evidence, and none on the overlap set unless `show_suggestions_on_overlap` (a suggestion seen there
    would bias the agreement that the overlap labels measure)."""
    from toolkit.annotations import _SampleInfo, canonical_annotator
    from toolkit.failures import _image_lookup, sample_table
    from toolkit.taxonomy import Taxonomy
    from toolkit.triage import add_suggestions

    set_choice = (set_choice or "all").strip().lower()
    if set_choice not in SETS:
        raise UserError(f"--set {set_choice!r} is not a set: give one of {', '.join(SETS)}.")
    names = [n.strip() for a in ([annotators] if isinstance(annotators, str) else annotators) for n in a.split(",")]
    names = [n for n in names if n]
    if not names:
        raise UserError("Give --annotator NAME (whose labels the pages record).")
    if not Path(db_path).exists():
        raise UserError(f"Database {db_path} does not exist. Check --db (it should hold a failure sample).")
    connect(db_path).close()  # a lock held by another process: name it before anything else
    con = open_study(db_path)
    try:
        if not con.execute("SELECT count(*) FROM failure_samples").fetchone()[0]:
            raise UserError(
                f"Database {db_path} has no sampled failures to label. Run clipfail sample-failures first "
                "(and check --db)."
            )
        rrid = int(resolve_retrieval_run(con, retrieval_run_id, need="sample", purpose="annotate")["retrieval_run_id"])
        info = _SampleInfo.load(con)
        known = info.annotators.get(rrid, [])
        canonical = []
        for n in names:
            c = canonical_annotator(info, n)
            if c is None or c not in known:
                raise UserError(
                    f"{n!r} is not an annotator of the failure sample of retrieval run {rrid} "
                    f"(its annotators: {', '.join(known) or 'none'})."
                )
            if c not in canonical:
                canonical.append(c)
        if set_choice == "backup":
            raise UserError(
                "The backup set is assigned to nobody, and import-labels refuses labels for it, so the workbench "
                "does not label it either. Label --set mine, overlap or all; to label backup samples, draw them "
                "into an annotator's set with clipfail sample-failures (--per-annotator) before labelling."
            )
        table = sample_table(con, rrid)
        image_ids = set(table["gt_id"].astype(int))
        for ids in table["topk_ids"]:
            image_ids.update(int(x) for x in list(ids)[:TOPN])
        lookup = _image_lookup(con, image_ids)
        root_row = con.execute(
            "SELECT s.image_root FROM retrieval_runs r JOIN subsets s USING (subset_id) WHERE r.retrieval_run_id = ?",
            [rrid],
        ).fetchone()
        tax = Taxonomy.load(con)
        hints = [{"sample_id": int(r.sample_id), "set_name": str(r.set_name), "caption_id": int(r.caption_id)}
                 for r in table.itertuples(index=False)]  # fmt: skip
        add_suggestions(con, rrid, hints, show_on_overlap=show_suggestions_on_overlap)
        suggestions = {
            h["sample_id"]: {"category": h["suggested_category"], "evidence": h["evidence"]}
            for h in hints
            if h["suggested_category"]
        }
        # stored relative to the database's folder when under it (movable studies): never to the current folder
        root_path = study_paths.resolve(con, root_row[0]) if root_row and root_row[0] else None
    finally:
        con.close()

    root = root_path.resolve() if root_path is not None else None

    def image_file(image_id: int) -> Path | None:
        if root is None or image_id not in lookup:
            return None
        path = (root / lookup[image_id][1]).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    files: dict[int, Path | None] = {}
    items: dict[str, list[dict]] = {}
    images: dict[str, dict[int, Path | None]] = {}
    for name in canonical:
        wanted = {"mine": [name], "overlap": ["overlap"], "all": ["overlap", name]}[set_choice]
        mine = table[table["set_name"].isin(wanted)]
        if mine.empty:
            raise UserError(
                f"{name} has no samples in set {set_choice!r} of retrieval run {rrid}. Give another --set "
                "(mine, overlap or all)."
            )
        items[name], images[name] = [], {}
        for row in mine.itertuples(index=False):
            gt = int(row.gt_id)
            top = []
            for k, (iid, score) in enumerate(zip(list(row.topk_ids)[:TOPN], list(row.topk_scores)[:TOPN]), start=1):
                iid = int(iid)
                top.append(
                    {"rank": k, "image_id": iid, "score": float(score), "is_gt": iid == gt, "name": _name(lookup, iid)}
                )
            for iid in [gt] + [t["image_id"] for t in top]:
                if iid not in files:
                    files[iid] = image_file(iid)
                images[name][iid] = files[iid]
            items[name].append(
                {
                    "sample_id": int(row.sample_id),
                    "set_name": str(row.set_name),
                    "caption_id": int(row.caption_id),
                    "caption": "" if row.caption is None else str(row.caption),
                    "gt": {
                        "image_id": gt,
                        "rank": int(row.gt_rank),
                        "score": float(row.gt_score),
                        "name": _name(lookup, gt),
                    },
                    "top": top,
                    "suggestion": suggestions.get(int(row.sample_id)),
                }
            )
    categories = [
        {"name": str(c.name), "definition": str(c.definition or ""), "example": str(c.example or "")}
        for c in tax.categories.itertuples(index=False)
    ]
    host = host or "127.0.0.1"
    tokens = None if host in LOCAL_HOSTS else {n: secrets.token_urlsafe(18) for n in canonical}
    return Workbench(
        db_path,
        rrid,
        set_choice,
        canonical,
        items,
        images,
        categories,
        host=host,
        tokens=tokens,
        show_suggestions_on_overlap=bool(show_suggestions_on_overlap),
    )


def _name(lookup: dict, image_id: int) -> str:
    return lookup[image_id][0] if image_id in lookup else f"image {image_id}"


def start_session(wb: Workbench) -> int:
    """Record the session's `annotate` run (the run id its labels carry), in one transaction."""
    config = {
        "retrieval_run_id": wb.retrieval_run_id,
        "annotators": wb.annotators,
        "set": wb.set_choice,
        "host": wb.host,
        "show_suggestions_on_overlap": wb.show_suggestions_on_overlap,
    }
    with wb.database() as con:
        with db.transaction(con):
            wb.run_id = db.insert_run(con, STAGE, config, db.now())
    return wb.run_id


def finish_session(wb: Workbench) -> int:
    """After the server stops: the number of labels the session's run holds; a run that holds none is removed."""
    if wb.run_id is None:
        return 0
    with wb.database() as con:
        with db.transaction(con):
            n = con.execute("SELECT count(*) FROM annotations WHERE run_id = ?", [wb.run_id]).fetchone()[0]
            if n:
                con.execute("UPDATE runs SET finished_at = ? WHERE run_id = ?", [db.now(), wb.run_id])
            else:
                con.execute("DELETE FROM runs WHERE run_id = ? AND stage = ?", [wb.run_id, STAGE])
    return int(n)


# ---------------------------------------------------------------------------------------------
# The web app


def _page_html() -> str:
    return resources.files("toolkit").joinpath("data/annotate.html").read_text(encoding="utf-8")


def _json_for_script(value) -> str:
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_app(wb: Workbench):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    from toolkit.annotations import save_label
    from toolkit.taxonomy import LabelError

    page_template = _page_html()
    local_names = {"127.0.0.1", "localhost", "[::1]"}

    def local_host_header(value: str) -> bool:
        # Any port: an SSH tunnel (ssh -L 9000:localhost:8765) reaches us as localhost:9000.
        name = value.rsplit(":", 1)[0] if not value.endswith("]") else value
        return name.lower() in local_names

    def not_found(_request=None):
        return PlainTextResponse("Not found", status_code=404)

    def refuse(request: Request, annotator: str | None):
        """None if the request may go on, else the response that refuses it."""
        if not wb.needs_token and not local_host_header(request.headers.get("host", "")):
            return PlainTextResponse("Forbidden: unexpected Host header", status_code=403)
        if annotator is not None and annotator not in wb.items:
            return not_found()
        if wb.needs_token:
            want = wb.tokens.get(annotator or "", "")
            given = request.query_params.get("token") or request.cookies.get(f"clipfail_{annotator}", "")
            if not want or not secrets.compare_digest(given.encode(), want.encode()):
                return PlainTextResponse(
                    "Forbidden: open the link with your token that clipfail annotate printed.", status_code=403
                )
        return None

    def progress(name: str, labels: dict) -> dict:
        return {"labelled": len(labels), "total": len(wb.items[name])}

    def my_labels(con, name: str) -> dict:
        ids = {it["sample_id"] for it in wb.items[name]}
        rows = con.execute(
            "SELECT sample_id, category, secondary_category, notes FROM annotations WHERE annotator = ?", [name]
        ).fetchall()
        return {str(s): {"category": c, "secondary_category": sc, "notes": n} for s, c, sc, n in rows if int(s) in ids}

    def db_error(exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=503)

    async def index(request: Request):
        bad = refuse(request, None) if not wb.needs_token else None
        if bad:
            return bad
        if wb.needs_token:
            return HTMLResponse("<p>Open the link with your token that <code>clipfail annotate</code> printed.</p>")
        links = "".join(
            f'<li><a href="/a/{html.escape(n)}/">{html.escape(n)}</a> ({len(wb.items[n])} items)</li>'
            for n in wb.annotators
        )
        return HTMLResponse(f"<!doctype html><title>clipfail annotate</title><h1>Annotators</h1><ul>{links}</ul>")

    async def page(request: Request):
        name = request.path_params["annotator"]
        bad = refuse(request, name)
        if bad:
            return bad
        if wb.needs_token and "token" in request.query_params:
            # Keep the token in a cookie for this annotator's pages, then drop it from the address bar.
            response = RedirectResponse(f"/a/{name}/", status_code=303)
            response.set_cookie(
                f"clipfail_{name}", request.query_params["token"], path=f"/a/{name}/", httponly=True, samesite="strict"
            )
            return response
        config = {
            "annotator": name,
            "base": f"/a/{name}/",
            "retrieval_run_id": wb.retrieval_run_id,
            "set": wb.set_choice,
            "categories": wb.categories,
        }
        body = page_template.replace("{{CONFIG}}", _json_for_script(config))
        return HTMLResponse(body, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    def state_sync(name: str) -> dict:
        with wb.database() as con:
            labels = my_labels(con, name)
        first = next((i for i, it in enumerate(wb.items[name]) if str(it["sample_id"]) not in labels), 0)
        return {
            "items": wb.items[name],
            "labels": labels,
            "progress": progress(name, labels),
            "first_unlabelled": first,
        }

    def state(request: Request):
        name = request.path_params["annotator"]
        bad = refuse(request, name)
        if bad:
            return bad
        try:
            return JSONResponse(state_sync(name), headers={"Cache-Control": "no-store"})
        except UserError as exc:
            return db_error(exc)

    def label(request: Request, body: dict):
        name = request.path_params["annotator"]
        try:
            sample_id = int(body.get("sample_id"))
        except (TypeError, ValueError):
            return JSONResponse({"error": "sample_id must be a whole number"}, status_code=400)
        if sample_id not in {it["sample_id"] for it in wb.items[name]}:
            return JSONResponse({"error": f"sample {sample_id} is not one of {name}'s items here"}, status_code=404)
        parts = []
        for key in ("category", "secondary"):
            value = body.get(key)
            if value is not None and not isinstance(value, str):
                return JSONResponse({"error": f"{key} must be text"}, status_code=400)
            if value and value.strip():
                parts.append(value.strip())
        notes = body.get("notes")
        if notes is not None and not isinstance(notes, str):
            return JSONResponse({"error": "notes must be text"}, status_code=400)
        if len(parts) == 1 and body.get("secondary"):
            return JSONResponse({"error": "give a category before a secondary category"}, status_code=400)
        if not parts and not body.get("clear"):  # only an explicit clear removes a stored label
            return JSONResponse({"error": "give a category, or clear: true to remove the label"}, status_code=400)
        raw = "; ".join(parts) if not body.get("clear") else ""
        try:
            with wb.database() as con:
                saved = save_label(con, sample_id, name, raw, notes, run_id=wb.run_id, source_file=SOURCE)
                labels = my_labels(con, name)
        except LabelError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except UserError as exc:
            status = 503 if "locked" in str(exc) else 400
            return JSONResponse({"error": str(exc)}, status_code=status)
        return {
            "action": saved.action,
            "label": labels.get(str(sample_id)),
            "progress": progress(name, labels),
        }

    async def post_label(request: Request):
        name = request.path_params["annotator"]
        bad = refuse(request, name)
        if bad:
            return bad
        if request.headers.get("x-clipfail") != "1" or "application/json" not in request.headers.get(
            "content-type", ""
        ):
            return JSONResponse({"error": "a JSON request with the X-Clipfail header is required"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        from starlette.concurrency import run_in_threadpool

        result = await run_in_threadpool(label, request, body)
        return result if not isinstance(result, dict) else JSONResponse(result)

    def image(request: Request):
        name = request.path_params["annotator"]
        bad = refuse(request, name)
        if bad:
            return bad
        path = wb.images.get(name, {}).get(request.path_params["image_id"])
        if path is None:
            return not_found()
        return FileResponse(
            path, headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        )

    routes = [
        Route("/", index),
        Route("/a/{annotator}/", page),
        Route("/a/{annotator}/api/state", state),
        Route("/a/{annotator}/api/label", post_label, methods=["POST"]),
        Route("/a/{annotator}/image/{image_id:int}", image),
    ]
    return Starlette(routes=routes)


# ---------------------------------------------------------------------------------------------
# Serving


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError that names the port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r} is not an address of this machine ({exc.strerror}).") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not over a live listener; only TIME_WAIT
    try:
        sock.bind(addr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"Port {port} on {host} is in use by another program (another clipfail annotate?). Stop it, or "
                f"give another port: --port {port + 1 if port else 8766}."
            ) from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise UserError(f"Cannot listen on {host}:{port}: {exc.strerror}. Give another --host or --port.") from None
        raise UserError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


def _server(wb: Workbench):
    import uvicorn

    config = uvicorn.Config(build_app(wb), log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


def serve(wb: Workbench, sock: socket.socket) -> None:
    """Serve until Ctrl-C (blocking)."""
    wb.port = sock.getsockname()[1]
    _server(wb).run(sockets=[sock])


@dataclass
class Running:
    """A workbench served from a thread (tests, notebooks)."""

    wb: Workbench
    server: object
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.wb.port}" if self.wb.host in LOCAL_HOSTS else self.wb.base_url()

    def stop(self) -> int:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        return finish_session(self.wb)


def serve_in_thread(wb: Workbench, sock: socket.socket) -> Running:
    wb.port = sock.getsockname()[1]
    if wb.run_id is None:
        start_session(wb)
    server = _server(wb)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return Running(wb, server, thread)
