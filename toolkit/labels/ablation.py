"""Caption variants for `clipfail explain`: one phrase of the caption removed or neutralised per variant.

The phrases are the ones `toolkit.labels.phrases` finds (its span functions, so a variant removes exactly the
tokens the extractor reported). One variant per phrase found, by role:

- ``attribute``: the phrase's adjectives (with the "and"/"or" between them) are dropped, its noun kept:
  "a red double decker bus" -> "a double decker bus".
- ``count``: the number expression is dropped, its noun phrase kept: "two dogs" -> "dogs",
  "a pair of skis" -> "skis".
- ``relation``: the whole relation phrase is dropped: "a cat on top of a car" -> "a cat". The relations
  are the extractor's: the strong ones, or the weak ("on", "in", "at", "by") ones when there is no strong one.
- ``action``: the whole action phrase is dropped: "a man riding a horse" -> "a man".
- ``object``: each COCO object mention is replaced by the neutral word ``thing`` (``things`` when the mention
  is a plural form that the lexicon generated, or "people"): "a dog on a couch" -> "a thing on a couch".

How the text is made: the caption is cut at the character offsets of the removed tokens (the tokens of
`phrases.tokenize`, found in ``caption.lower()``; a caption whose lower-casing changes its length is worked on
in lower case). The rest of the caption keeps its case and punctuation. Then: an article "a"/"an" right before
the edit is made to agree with the word that now follows it ("an" before a vowel letter, "a" otherwise, its
case kept); runs of white space become one space, a space before ``. , ; : ! ?`` or ``)`` is removed, and the
ends are stripped.

Skipped (counted, never encoded): a variant with no word token left (``empty``) and a variant whose
`phrases.prompt_key` equals the caption's (``identical``: the same input to CLIP). Two phrases may give the same
text; each keeps its own row (the text is encoded once).

The role -> taxonomy category mapping (attribute -> Attribute, ...) is data: ``toolkit/data/blame_roles.csv``
(`role_categories`).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass, field
from importlib import resources

from toolkit.labels import phrases

ROLES = ("attribute", "count", "relation", "action", "object")
NEUTRAL, NEUTRAL_PLURAL = "thing", "things"
VERSION = "ablation/v1"  # bump when a variant is made differently (it is part of explain's config)

_SINGULAR_FORMS = frozenset(tuple(f.split()) for forms in phrases.COCO_OBJECTS.values() for f in forms)
_PLURAL_WORDS = frozenset({"people"})
_SPACE_BEFORE = re.compile(r"\s+([.,;:!?)])")


@dataclass(frozen=True)
class Variant:
    role: str
    phrase: str  # the phrase as the extractor reports it (lower case, single spaces)
    text: str  # the ablated caption


@dataclass
class CaptionVariants:
    caption: str
    variants: list[Variant] = field(default_factory=list)  # kept variants, in role order then caption order
    n_found: dict[str, int] = field(default_factory=dict)  # phrases found per role
    n_identical: int = 0
    n_empty: int = 0


@functools.lru_cache(maxsize=1)
def role_categories() -> dict[str, str]:
    """role -> taxonomy category, from toolkit/data/blame_roles.csv (the mapping is data, not code)."""
    text = resources.files("toolkit").joinpath("data/blame_roles.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    out = {r["role"]: r["category"] for r in rows}
    if sorted(out) != sorted(ROLES):
        raise RuntimeError(f"toolkit/data/blame_roles.csv must map exactly the roles {ROLES}, has {sorted(out)}")
    return out


def _is_plural(mention: tuple[str, ...]) -> bool:
    return mention not in _SINGULAR_FORMS or mention[-1] in _PLURAL_WORDS


def _fix_article(before: str, after: str) -> str:
    """`before` with a final article "a"/"an" made to agree with the first word of `after`."""
    m = re.search(r"(?:^|\s)([Aa]n?)\s*$", before)
    word = re.match(r"\s*([A-Za-z0-9])", after)
    if m is None or word is None:
        return before
    art = m.group(1)
    want = "an" if word.group(1).lower() in "aeiou" else "a"
    want = want.capitalize() if art[0].isupper() else want
    return before[: m.start(1)] + want + before[m.end(1) :]


def _tidy(text: str) -> str:
    return _SPACE_BEFORE.sub(r"\1", " ".join(text.split())).strip()


def edit(caption: str, spans: list[tuple[int, int]], start_tok: int, end_tok: int, replacement: str = "") -> str:
    """The caption with tokens [start_tok, end_tok) replaced by `replacement` (removed when it is '')."""
    base = caption if len(caption.lower()) == len(caption) else caption.lower()
    a, b = spans[start_tok][0], spans[end_tok - 1][1]
    before, after = base[:a], base[b:]
    if replacement:
        after = " " + replacement + " " + after
    before = _fix_article(before, after)
    return _tidy(before + " " + after)


def _token_spans(caption: str) -> list[tuple[int, int]]:
    return [m.span() for m in phrases._TOKEN_RE.finditer(caption.lower())]


def caption_variants(caption: str, roles=ROLES) -> CaptionVariants:
    """The kept variants of `caption` for `roles`, and what was found and skipped (see the module docstring)."""
    tokens = phrases.tokenize(caption)
    spans = _token_spans(caption)
    out = CaptionVariants(caption)
    found: dict[str, list[tuple[str, int, int, str]]] = {}  # role -> (phrase, start, end, replacement)
    if "attribute" in roles:
        found["attribute"] = [(" ".join(tokens[s:e]), s, k, "") for s, k, e in phrases.attribute_spans(tokens)]
    if "count" in roles:
        found["count"] = [(" ".join(tokens[s:e]), s, k, "") for s, k, e in phrases.count_spans(tokens)]
    if "relation" in roles:
        found["relation"] = [(" ".join(tokens[s:e]), s, e, "") for s, e in phrases.relation_spans(tokens)]
    if "action" in roles:
        found["action"] = [(" ".join(tokens[s:e]), s, e, "") for s, e in phrases.action_spans(tokens)]
    if "object" in roles:
        found["object"] = [
            (" ".join(tokens[s:e]), s, e, NEUTRAL_PLURAL if _is_plural(tuple(tokens[s:e])) else NEUTRAL)
            for s, e in phrases.object_spans(tokens)
        ]
    key = phrases.prompt_key(caption)
    for role in ROLES:
        if role not in found:
            continue
        out.n_found[role] = len(found[role])
        for phrase, s, e, repl in found[role]:
            text = edit(caption, spans, s, e, repl)
            if not [t for t in phrases.tokenize(text) if t not in phrases._PUNCT]:
                out.n_empty += 1
            elif phrases.prompt_key(text) == key:
                out.n_identical += 1
            else:
                out.variants.append(Variant(role, phrase, text))
    return out
