"""Improvement methods: the interface every fix implements, and the registry that finds them.

An improvement method is one `Method` object (see docs/plugins.md for a complete plugin):

- ``name``: what ``clipfail improve --method`` takes;
- ``Params``: a dataclass of its parameters (subclass of `MethodParams`). Each field is declared with `option`
  (its CLI flag, help, type and range), so the dataclass validates itself (a UserError that names the flag
  and the allowed range) and the CLI renders its options from it;
- what it needs: ``needs_prompts`` (templated prompts and a text encoder), ``needs_bank`` (a set of normalising
  queries), ``needs_images`` (the retrieval run's image embeddings: every method so far);
- ``score(block)``: a `Block` of captions -> their new scores against every image, a (n_queries, n_images)
  float array. The stage ranks them (`toolkit.improve.pooling.gt_rank_counts`: the one ranking and tie
  count), and stores runs, ranks, statistics, intervals, McNemar and controls as for every method.

Methods register through the entry-point group ``clipfail.methods`` (``name = "module:attribute"``, the
attribute a `Method` instance or class), the built-in ones in clipfail's own pyproject.toml, exactly as a
third-party package would. `registry()` reads them with `importlib.metadata.entry_points`. A source checkout
that is run without being installed (``python cli.py``, or an editable install whose metadata predates a new
method) has no or stale metadata for clipfail itself: when a ``pyproject.toml`` of project ``clipfail`` sits
beside the imported ``toolkit`` package, its ``[project.entry-points."clipfail.methods"]`` table is read
instead of the installed clipfail distribution's, since that file describes the code that is running. Other
distributions' entry points (third-party plugins) are always read from their metadata.

A method that cannot be loaded (its import fails, it is not a Method, two packages claim its name, its options
clash with improve's) stays in the registry as broken: ``clipfail improve --help`` still works, and choosing
it is one message that names the plugin.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata as md
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from toolkit.errors import UserError

GROUP = "clipfail.methods"
COUNT_MAX = 2**31 - 1  # whole-number options (--k-bank, --top)
BUILTIN_DIST = "clipfail"


# ------------------------------------------------------------------------------ parameters


def option(flag: str, help: str, default: Any = None, kind: str = "float", *, lo=None, hi=None, choices=(), why=""):
    """A parameter field. kind: 'float' (finite, in [lo, hi]), 'count' (whole number in [lo or 1, hi or
    2^31-1]), 'text', 'flag' (a boolean switch) or 'choice' (one of `choices`). `why` ends the message that
    refuses a bad value; `help` is the CLI help (the method names are put before it)."""
    meta = {"flag": flag, "help": help, "kind": kind, "lo": lo, "hi": hi, "choices": tuple(choices), "why": why}
    return field(default=default, metadata=meta)


def _number(value, flag: str, lo: float, hi: float, why: str) -> float:
    """A finite float in [lo, hi], else a UserError that names the option and the range."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        v = float("nan")
    if isinstance(value, bool) or not (math.isfinite(v) and lo <= v <= hi):
        raise UserError(f"{flag} must be a number from {lo:g} to {hi:g} (got {value}){': ' + why if why else '.'}")
    return v


def _count(value, flag: str, lo: int, hi: int, why: str) -> int:
    """A whole number in [lo, hi], else a UserError that names the option."""
    try:
        ok = not isinstance(value, bool) and float(value) == int(value) and lo <= int(value) <= hi
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise UserError(f"{flag} must be a whole number from {lo} to {hi} (got {value}){': ' + why if why else ''}.")
    return int(value)


@dataclass(frozen=True)
class MethodParams:
    """Base of a method's parameters. Fields are declared with `option`; `__post_init__` checks each value
    against its declaration (and then `check`, for rules across fields)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            m = f.metadata
            v = getattr(self, f.name)
            if v is None or "kind" not in m:
                continue
            if m["kind"] == "float":
                v = _number(v, m["flag"], m["lo"] if m["lo"] is not None else -math.inf,
                            m["hi"] if m["hi"] is not None else math.inf, m["why"])  # fmt: skip
            elif m["kind"] == "count":
                v = _count(v, m["flag"], m["lo"] or 1, m["hi"] or COUNT_MAX, m["why"])
            elif m["kind"] == "flag":
                v = bool(v)
            elif m["kind"] == "choice" and v not in m["choices"]:
                raise UserError(f"{m['flag']} must be one of {', '.join(m['choices'])} (got {v!r}).")
            object.__setattr__(self, f.name, v)
        self.check()

    def check(self) -> None:
        """Rules across fields (override); raise a UserError naming the flags."""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def text(self) -> str | None:
        """The parameters as improvement_runs.method_params ('name=value' pairs; NULL when there are none)."""
        return params_text(self.as_dict())


def params_text(params: dict) -> str | None:
    """'beta=20 k_bank=1 bank=s30': floats with %g; None for no parameters."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or None


@dataclass(frozen=True)
class NoParams(MethodParams):
    pass


# ------------------------------------------------------------------------------ the interface


@dataclass
class Block:
    """A block of one population's captions, as a method's `score` receives it."""

    population: str  # 'failures', 'successes' or 'all'
    rows: np.ndarray  # their positions in the population (int64)
    caption_ids: np.ndarray  # (n,) int64
    queries: np.ndarray  # (n, d) float32: the captions' text embeddings (the retrieval run's)
    images: np.ndarray  # (M, d) float32: the retrieval run's image embeddings (the gallery)
    scores: np.ndarray | None  # (n, M) float32: the raw scores, bit for bit evaluate's (None: uses_scores False)
    state: Any = None  # what the method's `load` returned
    params: MethodParams | None = None


class Method:
    """One improvement method. Subclass it (or instantiate it with keyword arguments) and register the
    instance (or the class) under the entry-point group ``clipfail.methods``."""

    name: str = ""
    version: str = "1"  # part of every run's configuration: change it when the scores change
    Params: ClassVar[type[MethodParams]] = NoParams
    needs_prompts: bool = False  # templated prompts and a text encoder
    needs_bank: bool = False  # normalising queries (a query bank)
    needs_images: bool = True  # the retrieval run's image embeddings
    uses_scores: bool = True  # Block.scores holds the raw caption scores
    summary: str = ""  # one line for docs and --help

    is_combination: bool = False  # a chain of two methods (its options are listed under its parts)

    # --- what a plugin writes
    def score(self, block: Block) -> np.ndarray:
        raise NotImplementedError(f"method {self.name} has no score()")

    # --- hooks the built-ins use (a plugin leaves them alone)
    def score_variants(self, block: Block) -> dict:
        """{variant key: scores}; a method with one variant (every plugin) returns {None: score(block)}."""
        return {None: self.score(block)}

    def variants(self, run) -> list[tuple[Any, dict]]:
        """[(variant key, its configuration keys)]: one improvement run per population and variant."""
        return [(None, {})]

    def config(self, run) -> dict:
        """The method's part of each unit's configuration (its hash is the "already done?" key)."""
        return {"method": self.name, "method_version": self.version, "params": run.params.as_dict(),
                "image_sha256": run.image_sha256, "text_sha256": run.text_sha256}  # fmt: skip

    def prepare(self, con, run) -> None:
        """Checks and plans that need the database, before any population is chosen."""

    def attach(self, con, run, pops) -> None:
        """Checks and plans that need the populations (a bank that must not leak, prompts), before any score."""

    def signature_rows(self, pop) -> list:
        caps = pop.captions
        return [
            [int(c), None if pd.isna(s) else int(s), None if pd.isna(lab) else str(lab)]
            for c, s, lab in zip(caps["caption_id"], caps["sample_id"], caps["category"])
        ]

    def load(self, con, run, pops, images, texts) -> Any:
        """What `score` needs besides the block (e.g. a bank's normaliser), computed once per call."""
        return None

    def blocks(self, pop, state):
        """Row blocks of a population for a method that does not use raw scores."""
        n = len(pop.captions)
        return [np.arange(b, min(b + 512, n)) for b in range(0, n, 512)]

    def caption_columns(self, pop, state) -> dict:
        """improvement_ranks columns per caption besides the ranks: a caption scored alone is one prompt."""
        n = len(pop.captions)
        return {"n_prompts": np.ones(n, np.int32), "n_distinct_prompts": np.ones(n, np.int32)}

    def columns(self, run, pop, key) -> dict:
        """improvement_runs columns of one unit; those left out are NULL (see schema/tables.py)."""
        return {"method": self.name, "method_params": run.method_params}

    def run_config(self, run, state) -> dict:
        """Keys added to the runs row's configuration."""
        return {"score_device": "cpu", "retrieval_device": run.recorded_device}

    def notes(self, run) -> list[str]:
        if run.recorded_device and not str(run.recorded_device).startswith("cpu"):
            return [
                f"Retrieval run {run.rrid} ranked on {run.recorded_device}; {self.name} scores on the cpu, so its "
                "scores may differ from the retrieval run's in the last bit (~1e-7) and images scoring that close "
                "could swap."
            ]
        return []

    def must_run(self, con, run) -> bool:
        """True when the call writes even though every unit was done before (templates: --recompute-prompts)."""
        return False

    def write(self, con, run, state, run_id: int, started) -> None:
        """Inside the call's transaction, before the units: the method's own rows (templates: prompt shards)."""

    def non_finite_context(self, run) -> tuple:
        """(poolings, tau) that the message about scores that are not finite names (templates)."""
        return (None, None)

    def fill_result(self, result, state) -> None:
        """Counts the method adds to the ImproveResult (templates: prompts encoded and reused)."""


# ------------------------------------------------------------------------------ the registry


@dataclass
class Entry:
    """One registered name: where it comes from, and the loaded method or why it cannot be loaded."""

    name: str
    value: str  # "module:attribute"
    dist: str  # the distribution (or "clipfail (source checkout)")
    method: Method | None = None
    error: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.dist.split(" ")[0] == BUILTIN_DIST

    @property
    def origin(self) -> str:
        return f"entry point {self.name} = {self.value} in {self.dist}"


def _checkout_entry_points() -> dict[str, str] | None:
    """The clipfail.methods table of the source checkout's pyproject.toml beside the imported package, or None."""
    import tomllib

    path = Path(__file__).resolve().parents[3] / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    project = data.get("project", {})
    if project.get("name") != BUILTIN_DIST:
        return None
    return dict(project.get("entry-points", {}).get(GROUP, {}))


def _load(entry: Entry, reserved: set[str]) -> None:
    module, _, attr = entry.value.partition(":")
    try:
        obj = importlib.import_module(module.strip())
        for part in attr.strip().split(".") if attr.strip() else []:
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, Method):
            obj = obj()
    except Exception as exc:  # a plugin's import may raise anything: it becomes its one message
        entry.error = f"it cannot be loaded ({type(exc).__name__}: {exc})"
        return
    if not isinstance(obj, Method):
        entry.error = f"{entry.value} is a {type(obj).__name__}, not a toolkit.improve.methods.Method"
        return
    if obj.name != entry.name:
        entry.error = f"its Method is named {obj.name!r}, not {entry.name!r}"
        return
    try:
        flags = [f.metadata["flag"] for f in obj.Params.options()]
    except Exception as exc:
        entry.error = f"its Params is not a MethodParams dataclass ({type(exc).__name__}: {exc})"
        return
    clash = sorted(set(flags) & reserved)
    if clash:
        entry.error = f"its option {', '.join(clash)} is one of clipfail improve's own options"
        return
    entry.method = obj


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Entry]:
    """Every registered method by name (built-ins first, then by name); broken ones carry their error."""
    checkout = _checkout_entry_points()
    found: dict[str, list[Entry]] = {}
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "an unknown distribution"
        if checkout is not None and dist == BUILTIN_DIST:
            continue  # the checkout's own table describes the code that runs
        found.setdefault(ep.name, []).append(Entry(ep.name, ep.value, dist))
    for name, value in (checkout or {}).items():
        found.setdefault(name, []).append(Entry(name, value, f"{BUILTIN_DIST} (source checkout)"))
    out: dict[str, Entry] = {}
    for name, entries in found.items():
        distinct = {(e.value, e.dist) for e in entries}
        entry = entries[0]
        if len(distinct) > 1:
            entry = Entry(name, " / ".join(e.value for e in entries), " and ".join(e.dist for e in entries))
            entry.error = "two packages register this name"
        out[name] = entry
    ordered = sorted(out.values(), key=lambda e: (not e.is_builtin, "" if e.is_builtin else e.name))
    for e in ordered:
        if e.error is None:
            _load(e, RESERVED_FLAGS)
    return {e.name: e for e in ordered}


# improve's own options, which a method's Params may not declare
RESERVED_FLAGS = {
    "--categories", "--run", "--max-subset", "--seed", "--include-overlap", "--control", "--model", "--pretrained",
    "--checkpoint", "--device", "--batch-size", "--method", "--db", "--help",
}  # fmt: skip


def names() -> list[str]:
    return list(registry())


def get(name: str) -> tuple[Method, Entry]:
    """The method registered as `name`; a UserError naming the plugin when it is broken or unknown."""
    entry = registry().get(str(name).strip().lower()) or registry().get(str(name))
    if entry is None:
        raise UserError(f"Unknown --method {name!r}; use one of: {', '.join(names())}.")
    if entry.method is None:
        raise UserError(
            f"Improvement method {entry.name!r} ({entry.origin}) is broken: {entry.error}. Nothing was written. "
            "Fix or uninstall that package."
        )
    return entry.method, entry


def readers(field_name: str) -> list[str]:
    """The names of the (loaded) methods whose Params has this field."""
    loaded = [(n, e.method) for n, e in registry().items() if e.method is not None]
    return [n for n, m in loaded if field_name in {f.name for f in m.Params.options()}]


def make_params(method: Method, entry: Entry, given: dict) -> MethodParams:
    """The method's Params from the options `given` (field name -> value; None = the method's default). An option
    that the method does not read is refused, as on the command line; a plugin's own refusal names it."""
    fields = {f.name: f for f in method.Params.options()}
    for name in given:
        if name not in fields:
            who = readers(name)
            flag = _flag_of(name)
            raise UserError(
                f"{flag} does not apply to --method {method.name} (it is an option of "
                f"{' or '.join(who) if who else 'no method'}); leave it out."
            )
    values = {k: v for k, v in given.items() if v is not None}
    try:
        return method.Params(**values)
    except UserError as exc:
        if entry.is_builtin:
            raise
        raise UserError(f"Improvement method {method.name!r} ({entry.origin}) refused its parameters: {exc}") from None
    except Exception as exc:
        if entry.is_builtin:
            raise
        raise UserError(
            f"Improvement method {method.name!r} ({entry.origin}) refused its parameters: {type(exc).__name__}: {exc}. "
            "Nothing was written."
        ) from None


def _flag_of(name: str) -> str:
    for e in registry().values():
        if e.method is not None:
            for f in e.method.Params.options():
                if f.name == name:
                    return f.metadata["flag"]
    return "--" + name.replace("_", "-")


def option_table() -> dict[str, dict]:
    """field name -> {flag, kind, lo, hi, choices, help, defaults: {method: default}, methods: [...]}: one CLI
    option per field name, shared by every method that declares it (each applies its own default)."""
    table: dict[str, dict] = {}
    for name, e in registry().items():
        if e.method is None:
            continue
        for f in e.method.Params.options():
            row = table.setdefault(f.name, dict(f.metadata) | {"name": f.name, "defaults": {}, "methods": []})
            row["methods"].append(name)
            row["defaults"][name] = f.default
    return table
