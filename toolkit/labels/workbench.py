"""`clipfail annotate`: a local labelling workbench in the browser that writes labels straight into
`annotations`, with the same validation and replace rules as `import-labels`.

One item per page: the caption, the ground-truth image and the top-5 retrieved images (the real
files, scaled by the browser, loaded lazily), the categories as buttons with keys 1-7, a secondary
category (Shift+1-7), notes, skip, back/next with the arrow keys and a progress bar. The page is
`toolkit/data/annotate.html`; this module is the server (Starlette on uvicorn).

Saving: every label is validated and stored as it is given, each in its own transaction, by
`toolkit.labels.label_import.save_label` (the sample must be the annotator's own or the overlap set's, the
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
The model's blame (`clipfail explain`): an item shows the newest explain run's blamed phrase as a hint line
("the model hangs on the attribute 'red' ...") when removing it moves the ground truth up (pessimistic rank
gain > 0, as triage's blame rule); it never marks, selects or saves anything, and overlap items get none
unless --show-suggestions-on-overlap.

Security: the default host is 127.0.0.1 (and then requests must name a local Host, against DNS
rebinding). The Host header must be exactly a host name, an IPv4 address or a bracketed IPv6 address
and at most one port, else 400. Any other --host needs a token per annotator, printed in the links;
a request without the right token gets one 403, the same for a known and an unknown annotator (the
names cannot be listed). The only query parameter is `token`. Only the image files of the
annotator's items (ground truth and top-5) are served, by image id; each request resolves the file
under the subset's image root again and opens it without following links (`userfiles.read_under`),
so a file swapped for a link, a FIFO or a folder after the start is a 404; anything else is a 404.
Requests run only the fixed statements of this module and `save_label`, which writes `annotations`
only (the session's `runs` row is written by the command when it starts, not by a request).
Writes need a JSON body (`Content-Type: application/json`) and an `X-Clipfail` header, which
cross-site pages cannot send. A body is read up to MAX_BODY_BYTES (413 past that, before the rest
is read) and checked field by field (`parse_label_request`): 400 naming the field otherwise.

A failure sample replaced while the server runs (`sample-failures --replace` by another process):
each read and save compares the sample with the one the server loaded (`sample_version`) and
answers 409, saying to restart `clipfail annotate`; a save never lands on a sample that the page
did not show. The page sends the version it was loaded with, so a page left open from an earlier
server is told to reload.
"""

from __future__ import annotations

import contextlib
import errno
import html
import ipaddress
import json
import mimetypes
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import duckdb

from toolkit.errors import UserError
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store.runs import resolve_retrieval_run
from toolkit.store.study import open_study
from toolkit.userfiles import JsonShapeError, parse_json, read_under, want_bool, want_dict, want_int, want_str

STAGE = "annotate"
SOURCE = "clipfail annotate"
SETS = ("all", "mine", "overlap", "backup")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOPN = 5
LOCK_WAIT_S = 5.0  # how long a request waits for a database that another process holds
MAX_BODY_BYTES = 256 * 1024  # a label request is well under 1 KB; notes at their longest, escaped, under 128 KB
MAX_NOTES_CHARS = 10_000
MAX_LABEL_CHARS = 200  # a category or secondary category as typed
MAX_IMAGE_BYTES = 100 * 1024 * 1024
LABEL_FIELDS = ("sample_id", "category", "secondary", "notes", "clear", "sample_version")


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
    images: dict[str, dict[int, Path | None]]  # annotator -> image id -> its file under image_root (None: unknown)
    categories: list[dict]
    image_root: Path | None = None  # the subset's image root, resolved at the start
    sample_version: str = ""  # of the failure sample the items come from (see `sample_version`)
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
        s = _read_sample(con, db_path, names, set_choice, retrieval_run_id, show_suggestions_on_overlap)
    finally:
        con.close()

    # The files themselves are found and checked when they are served (they may change meanwhile).
    root = s.root_path.resolve() if s.root_path is not None else None
    items: dict[str, list[dict]] = {}
    images: dict[str, dict[int, Path | None]] = {}
    for name in s.canonical:
        wanted = {"mine": [name], "overlap": ["overlap"], "all": ["overlap", name]}[set_choice]
        mine = s.table[s.table["set_name"].isin(wanted)]
        if mine.empty:
            raise UserError(
                f"{name} has no samples in set {set_choice!r} of retrieval run {s.rrid}. Give another --set "
                "(mine, overlap or all)."
            )
        items[name], images[name] = [], {}
        for row in mine.itertuples(index=False):
            items[name].append(_item(row, s.lookup, s.suggestions, root, images[name], s.blames))
    categories = [
        {"name": str(c.name), "definition": str(c.definition or ""), "example": str(c.example or "")}
        for c in s.tax.categories.itertuples(index=False)
    ]
    host = host or "127.0.0.1"
    tokens = None if host in LOCAL_HOSTS else {n: secrets.token_urlsafe(18) for n in s.canonical}
    return Workbench(
        db_path,
        s.rrid,
        set_choice,
        s.canonical,
        items,
        images,
        categories,
        image_root=root,
        sample_version=s.version,
        host=host,
        tokens=tokens,
        show_suggestions_on_overlap=bool(show_suggestions_on_overlap),
    )


@dataclass
class _SampleRead:
    """What `prepare` reads from the database, in one connection."""

    rrid: int
    canonical: list[str]  # the annotators, as the failure sample names them
    table: object  # sample_table(): one row per sampled failure
    lookup: dict  # image id -> (file name, path under the image root)
    tax: object  # the taxonomy (its categories are the page's buttons)
    suggestions: dict  # sample id -> {category, evidence} from triage
    root_path: Path | None
    version: str  # sample_version()
    blames: dict = field(default_factory=dict)  # sample id -> {role, phrase, category, text} from explain


def _read_sample(con, db_path, names, set_choice, retrieval_run_id, show_suggestions_on_overlap) -> _SampleRead:
    """The failure sample to label, checked: it exists, the annotators are its own, the set is labelled here."""
    from toolkit.labels.label_import import _SampleInfo, canonical_annotator
    from toolkit.labels.sample import _image_lookup, sample_table
    from toolkit.labels.taxonomy import Taxonomy
    from toolkit.labels.triage import add_suggestions

    if not con.execute("SELECT count(*) FROM failure_samples").fetchone()[0]:
        raise UserError(
            f"Database {db_path} has no sampled failures to label. Run clipfail sample-failures first (and check --db)."
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
    blames = _blame_hints(con, rrid, hints, show_suggestions_on_overlap)
    # stored relative to the database's folder when under it (movable studies): never to the current folder
    root_path = study_paths.resolve(con, root_row[0]) if root_row and root_row[0] else None
    return _SampleRead(
        rrid, canonical, table, lookup, tax, suggestions, root_path, sample_version(con, rrid), blames
    )  # fmt: skip


def _blame_hints(con, rrid: int, hints: list[dict], show_on_overlap: bool) -> dict:
    """sample id -> the newest explain run's blamed phrase ({role, phrase, category, text}) for the failures where
    removing it moves the ground truth up; none on the overlap set unless `show_on_overlap`; {} without a run."""
    row = con.execute("SELECT max(explain_run_id) FROM explain_runs WHERE retrieval_run_id = ?", [rrid]).fetchone()
    if row is None or row[0] is None:
        return {}
    found = {
        int(r[0]): r[1:]
        for r in con.execute(
            "SELECT caption_id, blamed_role, blamed_phrase, blamed_category, gt_rank_before_pessimistic, "
            "gt_rank_after_pessimistic FROM failure_blame WHERE explain_run_id = ? AND rank_gain > 0",
            [int(row[0])],
        ).fetchall()
    }
    out = {}
    for h in hints:
        hit = found.get(h["caption_id"])
        if hit is None or (h["set_name"] == "overlap" and not show_on_overlap):
            continue
        role, phrase, category, before, after = hit
        text = (
            f"the model hangs on the {role} '{phrase}': without it the ground truth moves from rank {before} to "
            f"{after} (clipfail explain, run {int(row[0])})"
        )
        out[h["sample_id"]] = {"role": role, "phrase": phrase, "category": category, "text": text}
    return out


def _item(row, lookup: dict, suggestions: dict, root: Path | None, images: dict, blames: dict | None = None) -> dict:
    """One sampled failure as the page shows it (its caption, ground truth and top images); the paths of the
    images it shows are added to `images` (image id -> path, None where the image is unknown)."""
    gt = int(row.gt_id)
    top = []
    for k, (iid, score) in enumerate(zip(list(row.topk_ids)[:TOPN], list(row.topk_scores)[:TOPN]), start=1):
        iid = int(iid)
        top.append({"rank": k, "image_id": iid, "score": float(score), "is_gt": iid == gt, "name": _name(lookup, iid)})
    for iid in [gt] + [t["image_id"] for t in top]:
        known = root is not None and iid in lookup and lookup[iid][1]
        images[iid] = root / lookup[iid][1] if known else None
    return {
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
        "blame": (blames or {}).get(int(row.sample_id)),
    }


def _name(lookup: dict, image_id: int) -> str:
    return lookup[image_id][0] if image_id in lookup else f"image {image_id}"


def sample_version(con, retrieval_run_id: int) -> str:
    """A fingerprint of the retrieval run's failure sample: its size, the run(s) that drew it and a hash of its rows.
    `sample-failures --replace` changes it (a new run, new sample ids)."""
    n, lo, hi, h = con.execute(
        "SELECT count(*), min(run_id), max(run_id), bit_xor(hash(sample_id, caption_id, set_name, draw_order)) "
        "FROM failure_samples WHERE retrieval_run_id = ?",
        [retrieval_run_id],
    ).fetchone()
    return f"{n}.{lo}.{hi}.{h}"


# ---------------------------------------------------------------------------------------------
# What a request may hold

_HOST = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?))(?::(?P<port>[0-9]{1,5}))?",
    re.ASCII,
)


def host_name(value: str) -> str | None:
    """The host of a Host header, lower case (an IPv6 address compressed, in brackets), or None unless the value is
    exactly a host name, an IPv4 address or a bracketed IPv6 address, then at most one `:port` (1-65535): no
    userinfo (`127.0.0.1:80@evil.example`), spaces, second port, path or zone id."""
    m = _HOST.fullmatch(value)
    if m is None or (m["port"] is not None and not 0 < int(m["port"]) < 65536):
        return None
    if m["v6"] is not None:
        try:
            return f"[{ipaddress.IPv6Address(m['v6']).compressed}]"
        except ValueError:
            return None
    return m["name"].lower()


def _key(name) -> str:
    """A field name as a message shows it: ASCII, short."""
    text = json.dumps(str(name))
    return text if len(text) <= 40 else text[:37] + '..."'


def _no_duplicate_keys(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise JsonShapeError(f"{_key(k)} is given twice in the request body; give each field once.")
        seen.add(k)
    return dict(pairs)


def _lenient(data: bytes):
    """The body parsed again with NaN/Infinity and over-long integers as infinite numbers, and no depth limit of our
    own (None if even that fails): parse_json refuses those without saying where, and the field check of this
    version names the field that holds one."""
    try:
        return json.loads(
            data.decode("utf-8-sig"), parse_constant=float, parse_int=lambda s: int(s) if len(s) <= 4000 else float(s)
        )
    except (ValueError, RecursionError):
        return None


def _label_fields(body) -> dict:
    body = want_dict(body, "the request body")
    unknown = [k for k in body if k not in LABEL_FIELDS]
    if unknown:
        raise JsonShapeError(
            f"{_key(unknown[0])} is not a field of a label request; the fields are {', '.join(LABEL_FIELDS)}."
        )
    if "sample_id" not in body:
        raise JsonShapeError("sample_id is missing: give the id of the sample to label (a whole number).")

    def text(key: str, max_len: int) -> str | None:
        return None if body.get(key) is None else want_str(body[key], key, max_len)

    return {
        "sample_id": want_int(body["sample_id"], "sample_id", lo=1),
        "category": text("category", MAX_LABEL_CHARS),
        "secondary": text("secondary", MAX_LABEL_CHARS),
        "notes": text("notes", MAX_NOTES_CHARS),
        "clear": want_bool(body["clear"], "clear") if "clear" in body else False,
        "sample_version": text("sample_version", 200),
    }


def parse_label_request(data: bytes) -> dict:
    """A label request's body, checked: a JSON object (UTF-8, nested at most userfiles.MAX_JSON_DEPTH, no NaN or
    Infinity, each field once) with `sample_id` (an integer), `category`, `secondary`, `notes` (strings or null;
    notes at most MAX_NOTES_CHARS characters, no lone surrogate), `clear` (true or false) and `sample_version`
    (string or null), and nothing else. UserError (JsonShapeError) naming the field otherwise."""
    try:
        body = parse_json(data, "The request body")
        json.loads(data.decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except UserError:
        lenient = _lenient(data)
        if lenient is not None:
            _label_fields(lenient)  # names the field that holds the value parse_json refused
        raise
    return _label_fields(body)


def _json_media_type(value: str) -> bool:
    """`application/json`, with at most a UTF-8 charset: not a text type that names JSON in a parameter."""
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class Refused(Exception):
    """A request answered with an error (status, message) before it does anything."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request, limit: int | None = None) -> bytes:
    """The request body, read up to `limit` bytes (MAX_BODY_BYTES): Refused(413) as soon as more is announced or has
    come, before the rest is read (with or without a Content-Length, chunked included)."""
    limit = MAX_BODY_BYTES if limit is None else limit
    too_big = (
        f"The request body is more than {limit:,} bytes, more than a label request holds (notes hold at most "
        f"{MAX_NOTES_CHARS:,} characters)."
    )
    lengths = request.headers.getlist("content-length")
    if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
        raise Refused(400, "The request's Content-Length is not one number of bytes.")
    if lengths and (len(lengths[0]) > 15 or int(lengths[0]) > limit):
        raise Refused(413, too_big)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise Refused(413, too_big)
    return bytes(data)


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


_LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]"}  # as host_name() gives them; any port (an SSH tunnel)
_NOT_AUTHORISED = "Forbidden: open the link with your token that clipfail annotate printed."


def build_app(wb: Workbench):
    """The Starlette app that serves `wb`: one route per page or API call, each a method of `_App`."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    app = _App(wb)
    routes = [
        Route("/", app.index),
        Route("/a/{annotator}/", app.page),
        Route("/a/{annotator}/api/state", app.state),
        Route("/a/{annotator}/api/label", app.post_label, methods=["POST"]),
        Route("/a/{annotator}/image/{image_id}", app.image),
    ]
    return Starlette(routes=routes)


def _error(status: int, message: str, **headers):
    """A JSON error answer."""
    from starlette.responses import JSONResponse

    # A message may quote a request's text: never let a lone surrogate in it break the answer.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _not_found(_request=None):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("Not found", status_code=404)


class _App:
    """The workbench's web app over one `Workbench`: who may ask (`refuse`), what the pages read, and the label
    requests that write (through `save_label`, on one short connection each)."""

    def __init__(self, wb: Workbench):
        self.wb = wb
        self.page_template = _page_html()
        self.decoy = secrets.token_urlsafe(18)  # compared for an unknown annotator, as a token would be

    # -------------------------------------------------------------------- who may ask

    def refuse(self, request, annotator: str | None):
        """None if the request may go on, else the response that refuses it."""
        from starlette.responses import PlainTextResponse

        wb = self.wb
        hosts = request.headers.getlist("host")
        host = host_name(hosts[0]) if len(hosts) == 1 else None
        if host is None:
            return PlainTextResponse(
                "Bad request: the Host header must be one host name or address and at most one port.", status_code=400
            )
        if not wb.needs_token and host not in _LOCAL_NAMES:
            return PlainTextResponse("Forbidden: unexpected Host header", status_code=403)
        if annotator is None:
            return None
        params = request.query_params.multi_items()
        if wb.needs_token:
            # One answer for every request that is not authorised, whether the annotator exists or not.
            want = wb.tokens.get(annotator)
            given = [v for k, v in params if k == "token"]
            if not given:
                given = [request.cookies.get(f"clipfail_{annotator}", "")]
            ok = secrets.compare_digest(given[0].encode(), (want or self.decoy).encode())
            if not (ok and want is not None and len(given) == 1):
                return PlainTextResponse(_NOT_AUTHORISED, status_code=403)
        elif annotator not in wb.items:
            return _not_found()
        names = [k for k, _ in params]
        unknown = [k for k in names if k != "token"]
        if unknown:
            return _error(400, f"Unknown query parameter {_key(unknown[0])}: the only one is token.")
        if names.count("token") > 1:
            return _error(400, "The query parameter token is given more than once.")
        return None

    # -------------------------------------------------------------------- what the pages read

    def progress(self, name: str, labels: dict) -> dict:
        return {"labelled": len(labels), "total": len(self.wb.items[name])}

    def my_labels(self, con, name: str) -> dict:
        ids = {it["sample_id"] for it in self.wb.items[name]}
        rows = con.execute(
            "SELECT sample_id, category, secondary_category, notes FROM annotations WHERE annotator = ?", [name]
        ).fetchall()
        return {str(s): {"category": c, "secondary_category": sc, "notes": n} for s, c, sc, n in rows if int(s) in ids}

    def check_sample(self, con) -> None:
        """Refused(409) if the failure sample is not the one the items were loaded from."""
        wb = self.wb
        if sample_version(con, wb.retrieval_run_id) != wb.sample_version:
            raise Refused(
                409,
                f"The failure sample of retrieval run {wb.retrieval_run_id} was replaced after this clipfail annotate "
                "started (another process ran sample-failures --replace?): the items on this page are not in it any "
                "more, so nothing was saved. Stop the server (Ctrl-C), restart clipfail annotate, then reload the "
                "page.",
            )

    async def index(self, request):
        from starlette.responses import HTMLResponse

        bad = self.refuse(request, None)
        if bad:
            return bad
        wb = self.wb
        if wb.needs_token:
            return HTMLResponse("<p>Open the link with your token that <code>clipfail annotate</code> printed.</p>")
        links = "".join(
            f'<li><a href="/a/{html.escape(n)}/">{html.escape(n)}</a> ({len(wb.items[n])} items)</li>'
            for n in wb.annotators
        )
        return HTMLResponse(f"<!doctype html><title>clipfail annotate</title><h1>Annotators</h1><ul>{links}</ul>")

    async def page(self, request):
        from starlette.responses import HTMLResponse, RedirectResponse

        name = request.path_params["annotator"]
        bad = self.refuse(request, name)
        if bad:
            return bad
        wb = self.wb
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
        body = self.page_template.replace("{{CONFIG}}", _json_for_script(config))
        return HTMLResponse(body, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    def state_sync(self, name: str) -> dict:
        wb = self.wb
        with wb.database() as con:
            self.check_sample(con)
            labels = self.my_labels(con, name)
        first = next((i for i, it in enumerate(wb.items[name]) if str(it["sample_id"]) not in labels), 0)
        return {
            "items": wb.items[name],
            "labels": labels,
            "progress": self.progress(name, labels),
            "first_unlabelled": first,
            "sample_version": wb.sample_version,
        }

    def state(self, request):
        from starlette.responses import JSONResponse

        name = request.path_params["annotator"]
        bad = self.refuse(request, name)
        if bad:
            return bad
        try:
            return JSONResponse(self.state_sync(name), headers={"Cache-Control": "no-store"})
        except Refused as exc:
            return _error(exc.status, exc.message)
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    def image(self, request):
        from starlette.responses import Response

        name = request.path_params["annotator"]
        bad = self.refuse(request, name)
        if bad:
            return bad
        wb = self.wb
        text = request.path_params["image_id"]
        if not (text.isascii() and text.isdigit() and len(text) <= 19):
            return _not_found()
        path = wb.images.get(name, {}).get(int(text))
        if path is None or wb.image_root is None:
            return _not_found()
        try:  # resolved and checked now: the file may have been swapped since the start
            data = read_under(wb.image_root, path, "Image", limit=MAX_IMAGE_BYTES)
        except UserError:
            return _not_found()
        return Response(
            data,
            media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    # -------------------------------------------------------------------- the one request that writes

    def label(self, name: str, body: dict):
        from toolkit.labels.label_import import save_label
        from toolkit.labels.taxonomy import LabelError

        wb = self.wb
        sample_id = body["sample_id"]
        if body["sample_version"] is not None and body["sample_version"] != wb.sample_version:
            return _error(
                409,
                "This page was loaded for another failure sample (from an earlier clipfail annotate): reload the "
                "page. Nothing was saved.",
            )
        if sample_id not in {it["sample_id"] for it in wb.items[name]}:
            return _error(404, f"sample {sample_id} is not one of {name}'s items here")
        parts = [v.strip() for v in (body["category"], body["secondary"]) if v and v.strip()]
        has_category = bool(body["category"] and body["category"].strip())
        if body["clear"] and (parts or (body["notes"] or "").strip()):
            return _error(400, "clear: true removes the label; give no category, secondary or notes with it.")
        if parts and not has_category:
            return _error(400, "give a category before a secondary category")
        if not parts and not body["clear"]:  # only an explicit clear removes a stored label
            return _error(400, "give a category, or clear: true to remove the label")
        raw = "; ".join(parts)
        try:
            with wb.database() as con:
                self.check_sample(con)  # on this connection: no other process can change the sample before the save
                saved = save_label(con, sample_id, name, raw, body["notes"], run_id=wb.run_id, source_file=SOURCE)
                labels = self.my_labels(con, name)
        except Refused as exc:
            return _error(exc.status, exc.message)
        except LabelError as exc:
            return _error(400, str(exc))
        except UserError as exc:
            return _error(503 if "locked" in str(exc) else 400, str(exc))
        return {
            "action": saved.action,
            "label": labels.get(str(sample_id)),
            "progress": self.progress(name, labels),
        }

    async def post_label(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        name = request.path_params["annotator"]
        bad = self.refuse(request, name)
        if bad:
            return bad
        if request.headers.get("x-clipfail") != "1":
            return _error(403, "a JSON request with the X-Clipfail header is required")
        if not _json_media_type(request.headers.get("content-type", "")):
            return _error(415, "the body must be JSON: send it with Content-Type: application/json (UTF-8)")
        try:
            body = parse_label_request(await read_body(request))
        except Refused as exc:
            return _error(exc.status, exc.message, **({"Connection": "close"} if exc.status == 413 else {}))
        except UserError as exc:
            return _error(400, str(exc))
        result = await run_in_threadpool(self.label, name, body)
        return result if not isinstance(result, dict) else JSONResponse(result)


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


@contextlib.contextmanager
def stop_signals_as_ctrl_c():
    """Within it, SIGTERM (kill, systemd, docker stop) and SIGHUP (a closed terminal) stop the server as Ctrl-C does:
    uvicorn shuts down on SIGTERM and raises it again when done, which lands here as KeyboardInterrupt; SIGHUP is
    turned into SIGTERM. The previous handlers come back on the way out (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def as_term(signum, frame):
        signal.raise_signal(signal.SIGTERM)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt)}
    if hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, as_term)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(wb: Workbench, sock: socket.socket) -> None:
    """Serve until Ctrl-C (blocking; with `stop_signals_as_ctrl_c`, SIGTERM and SIGHUP too)."""
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
