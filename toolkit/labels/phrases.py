"""A small lexicon-based phrase extractor that fills prompt-template slots from a caption.

No tagger or parser: a caption is split into lower-case word tokens (punctuation marks are kept as
boundaries), and each slot is found by the rules below with the lexicons defined in this module.
The rules are deliberately simple and predictable, so a template's output can be explained.

Slots (`SLOTS`):

- ``{objects}``: mentions of the 80 COCO object categories, with common synonyms and plurals
  (``COCO_OBJECTS``; e.g. "man", "people", "bike", "sofa", "cell phone", "hot dog"). Multi-word
  names win over their parts ("teddy bear" is one mention, not "bear"). The singular "orange" is
  the fruit only when no word follows it, or a function word/punctuation does ("a red and orange
  kite" is a colour).
- ``{attributes}``: a run of colour/material/size adjectives (``ATTRIBUTE_WORDS``; "and"/"or" may
  join them: "black and white") followed by its noun phrase, e.g. "red double decker bus",
  "large purple squares", "wooden bench". Adjectives with no noun after them ("the bus is red")
  are not extracted.
- ``{actions}``: a verb (an ``-ing`` form, a 3rd-person ``-s`` form from ``VERBS_S`` or a
  participle from ``PARTICIPLES``), an optional particle or preposition (``PARTICLES``, multi-word
  ones such as "on top of" included) and the noun phrase after it: "riding a horse",
  "sitting on the couch", "walking", "parked on the street". An ``-ing`` word counts as a verb
  unless it is in ``NOT_VERBS`` ("building", "ceiling", "dining", ...) or follows an article or
  possessive ("a painting"); an ``-s`` form is not a verb after a determiner, number, preposition or
  adjective ("a pair of skis"). Base forms ("people ride horses") are not recognised.
- ``{count}``: a number expression (``COUNT_WORDS``: one..twelve, digits, "a pair of", "a couple
  of", "several", "a few", "a group of", ...) followed by its noun phrase: "two dogs",
  "a pair of skis", "three red apples".
- ``{relation}``: a spatial preposition (``RELATIONS``) with the noun phrase after it:
  "next to a red car", "on top of the table", "to the left of four orange circles". "on the
  left"/"on the right"/"in the background"... are complete on their own (``STANDALONE_RELATIONS``).
  The weak prepositions "on", "in", "at" and "by" are used only when the caption has no other
  (strong) relation.

A noun phrase (``_noun_phrase``) is: optional determiners/possessives/numbers, then up to three
content words, ending at the first COCO object mention if one starts among them; it stops before
a function word, punctuation, a verb or a participle. Phrases are reported in lower case with
single spaces, without punctuation.

Several phrases for one slot are joined in order of first appearance, duplicates dropped, as
"a", "a and b" or "a, b and c". A slot that finds nothing is the empty string.

`fill(template, caption)`: formats the template with ``{caption}`` = the caption exactly as given
(not stripped or lower-cased), ``{caption_lc}`` = the caption as a clause to embed in a sentence
(`caption_clause`: trimmed, trailing ``.``/``!``/``?`` removed, first letter lower-cased unless the
first word is an acronym such as "TV") and the other slots from `extract(caption)`. If ANY slot
other than ``{caption}``/``{caption_lc}`` that the template uses is empty for this caption, `fill`
returns the caption itself, unchanged (`try_fill` returns None instead: the template does not
apply). Templates are `str.format` strings: ``{{`` and ``}}`` are literal braces; a field other
than the seven names of `TEMPLATE_FIELDS`, a positional field, a conversion (``!r``) or a format
spec (``:>5``) is a `ValueError` (`template_slots` checks this).

`build_prompts(caption, templates, k)`: the prompt list of a caption, as the improve stage uses it.
The caption itself comes first, once; then the templates are taken in the given order, and a
template's prompt is added only if the template applies (`try_fill`) and its text differs from the
caption and from every prompt already taken (`prompt_key`: compared without case and with runs of
white space as one space, because CLIP's tokenizer lower-cases and collapses white space, so such
texts are the same input to the model). The identity template ``{caption}`` is the caption and adds
nothing. Taking stops at `k` prompts; a caption for which fewer apply gets fewer (its effective K).
"""

from __future__ import annotations

import functools
import re
import string

SLOTS = ("objects", "attributes", "actions", "count", "relation")
TEMPLATE_FIELDS = ("caption", "caption_lc", *SLOTS)
CAPTION_FIELDS = frozenset({"caption", "caption_lc"})  # always filled

# ---------------------------------------------------------------------------------------------
# Lexicons
# ---------------------------------------------------------------------------------------------

#: COCO category -> surface forms (singular, or already plural). Plurals are added by `_plural`.
COCO_OBJECTS: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "people", "man", "woman", "boy", "girl", "child", "kid", "guy", "lady", "baby",
        "toddler", "adult", "teenager", "gentleman", "player", "skier", "surfer", "skateboarder",
        "snowboarder", "rider", "tourist", "pedestrian", "chef", "cook", "catcher", "batter",
        "umpire", "worker", "officer", "policeman", "cowboy", "crowd", "family", "couple",
    ),
    "bicycle": ("bicycle", "bike", "cyclist"),
    "car": ("car", "automobile", "sedan", "taxi", "cab", "suv", "vehicle"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped", "motorcyclist"),
    "airplane": ("airplane", "aeroplane", "plane", "jet", "airliner", "aircraft", "jetliner"),
    "bus": ("bus", "double decker bus", "school bus"),
    "train": ("train", "locomotive", "tram", "subway train"),
    "truck": ("truck", "lorry", "pickup truck", "fire truck"),
    "boat": ("boat", "ship", "sailboat", "canoe", "kayak", "yacht", "ferry"),
    "traffic light": ("traffic light", "stoplight", "stop light", "traffic signal"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "park bench"),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "swan"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy"),
    "horse": ("horse", "pony", "foal"),
    "sheep": ("sheep", "lamb"),
    "cow": ("cow", "cattle", "bull", "calf"),
    "elephant": ("elephant",),
    "bear": ("bear", "polar bear", "grizzly bear"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "bag"),
    "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "soccer ball", "tennis ball", "football", "basketball", "sports ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup", "mug", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich",),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake"),
    "chair": ("chair", "stool"),
    "couch": ("couch", "sofa"),
    "potted plant": ("potted plant", "plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television", "monitor"),
    "laptop": ("laptop", "laptop computer", "computer"),
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "stuffed animal"),
    "hair drier": ("hair drier", "hair dryer", "blow dryer"),
    "toothbrush": ("toothbrush",),
}  # fmt: skip

_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "knife": "knives",
    "mouse": "mice", "sheep": "sheep", "cattle": "cattle", "people": "people", "skis": "skis",
    "scissors": "scissors", "luggage": "luggage", "broccoli": "broccoli", "goose": "geese",
    "policeman": "policemen", "gentleman": "gentlemen", "calf": "calves", "foal": "foals",
    "crowd": "crowds", "family": "families", "couple": "couples", "bus": "buses",
    "glass": "glasses", "taxi": "taxis", "cowboy": "cowboys",
}  # fmt: skip

#: Colour, material and size adjectives.
COLOURS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan "
    "maroon navy teal turquoise violet cyan magenta crimson dark bright colorful colourful multicolored "
    "multicoloured striped spotted plaid checkered".split()
)
MATERIALS = frozenset(
    "wooden wood metal metallic plastic glass stone brick leather ceramic concrete steel iron paper "
    "cardboard wicker marble granite tiled stainless cloth fabric rubber wool woolen denim porcelain".split()
)
SIZES = frozenset(
    "large big small little tiny huge giant enormous tall short long wide narrow thin thick fat skinny "
    "massive miniature oversized".split()
)
ATTRIBUTE_WORDS = COLOURS | MATERIALS | SIZES

#: -ing words that are (almost always) not verbs in captions.
NOT_VERBS = frozenset(
    "building buildings ceiling ceilings clothing something nothing anything everything thing things king "
    "ring rings wing wings string strings spring evening morning wedding pudding icing frosting stuffing "
    "topping toppings railing railings awning awnings lightning sibling during bring sing swing swings "
    "parking dining living seasoning dressing painting paintings landing ping sling ting ding wring "
    "ping-pong bedding bowling booking offering outing setting settings siding tubing wiring ".split()
)

#: Third-person present verb forms common in COCO captions.
VERBS_S = frozenset(
    "rides holds sits stands walks runs eats drinks plays flies throws catches swings carries looks "
    "watches waits lies lays crosses cuts surfs jumps talks uses reads wears pulls pushes drives grazes "
    "poses hangs rests sleeps swims kicks serves takes makes feeds leans climbs points sails floats bites "
    "chases grabs hugs laughs sells washes opens works dances prepares cooks smiles stares reaches "
    "travels heads moves passes hits carries kneels skates skateboards snowboards perches shows "
    "displays sits".split()
)

#: Past participles that head a verb phrase ("a car parked on the street").
PARTICIPLES = frozenset(
    "parked stacked covered filled topped loaded displayed painted lined surrounded decorated piled "
    "placed seated perched stuffed dressed tied attached mounted propped hung sliced cut cooked "
    "arranged gathered drawn shown made taken seen".split()
)

#: Spatial relations; multi-word ones win over their parts.
RELATIONS_STRONG = (
    "on top of", "in front of", "in back of", "next to", "to the left of", "to the right of",
    "on the left of", "on the right of", "on the left side of", "on the right side of", "left of",
    "right of", "in the middle of", "in the center of", "in the centre of", "close to", "across from",
    "on the side of", "on either side of", "at the end of", "at the edge of", "far from", "in between",
    "behind", "under", "underneath", "beneath", "below", "above", "over", "beside", "near", "inside",
    "outside", "between", "among", "atop", "alongside", "against", "around", "across", "along",
)  # fmt: skip
RELATIONS_WEAK = ("on", "in", "at", "by")
RELATIONS = RELATIONS_STRONG + RELATIONS_WEAK

#: Particles/prepositions that may follow a verb (every relation too); multi-word ones win.
VERB_PARTICLES = (
    "out of", "away from", "up", "down", "off", "out", "into", "onto", "through", "to", "toward",
    "towards", "from", "with", "for", "past", "away", "back", "together", "like",
)  # fmt: skip
PARTICLES: tuple[tuple[str, ...], ...] = tuple(
    sorted({tuple(p.split()) for p in VERB_PARTICLES + RELATIONS}, key=lambda t: (-len(t), t))
)

#: Relations that are complete without a noun phrase after them.
STANDALONE_RELATIONS = (
    "on the left", "on the right", "to the left", "to the right", "in the background",
    "in the foreground", "in the distance", "in the middle", "in the center", "on top", "nearby",
    "side by side", "upside down", "overhead",
)  # fmt: skip

NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "dozen": 12,
}  # fmt: skip

#: Count expressions (besides NUMBER_WORDS and digits).
COUNT_WORDS = (
    "a pair of", "pair of", "a couple of", "couple of", "a dozen", "a few", "several", "multiple",
    "many", "numerous", "both", "a group of", "a bunch of", "a herd of", "a flock of", "a team of",
    "a row of", "a pile of", "a stack of", "lots of", "a lot of", "a number of", "a set of",
)  # fmt: skip

DETERMINERS = frozenset("a an the this that these those his her their its our my your some each every another".split())
FUNCTION_WORDS = (
    DETERMINERS
    | frozenset(
        "and or but of on in at to with by for from into onto over under near next behind beside above below "
        "while as is are was were be been being it he she they them there here who which where what when "
        "has have had do does not no very than then so also just up down off out through across along "
        "around toward towards past inside outside between among against atop underneath beneath close "
        "front top left right side middle while".split()
    )
    | frozenset(NUMBER_WORDS)
)

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[.,;:!?()\"]")
_PUNCT = frozenset('.,;:!?()"')


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _build_object_index() -> dict[tuple[str, ...], str]:
    index: dict[tuple[str, ...], str] = {}
    for category, forms in COCO_OBJECTS.items():
        for form in forms:
            words = form.split()
            index.setdefault(tuple(words), category)
            plural = words[:-1] + [_plural(words[-1])]
            index.setdefault(tuple(plural), category)
    return index


OBJECT_INDEX = _build_object_index()
_MAX_OBJECT_WORDS = max(len(k) for k in OBJECT_INDEX)
_RELATIONS_SPLIT = sorted((tuple(r.split()) for r in RELATIONS), key=len, reverse=True)
_STANDALONE_SPLIT = sorted((tuple(r.split()) for r in STANDALONE_RELATIONS), key=len, reverse=True)
_COUNT_SPLIT = sorted((tuple(c.split()) for c in COUNT_WORDS), key=len, reverse=True)
_ATTR_LINKS = frozenset({"and", "or"})


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens; punctuation marks are separate tokens (they act as boundaries)."""
    return _TOKEN_RE.findall(caption.lower())


# ---------------------------------------------------------------------------------------------
# Matching helpers over a token list
# ---------------------------------------------------------------------------------------------


def _match_seq(tokens: list[str], i: int, seqs) -> tuple[str, ...] | None:
    """The longest sequence in `seqs` (sorted longest first) that starts at tokens[i]."""
    for seq in seqs:
        if tuple(tokens[i : i + len(seq)]) == seq:
            return seq
    return None


def _object_at(tokens: list[str], i: int) -> int:
    """Length (in tokens) of the COCO object mention starting at i, or 0."""
    for n in range(min(_MAX_OBJECT_WORDS, len(tokens) - i), 0, -1):
        key = tuple(tokens[i : i + n])
        if key in OBJECT_INDEX:
            if key == ("orange",):
                nxt = tokens[i + 1] if i + 1 < len(tokens) else None
                if nxt is not None and nxt not in FUNCTION_WORDS and nxt not in _PUNCT:
                    continue  # a colour ("an orange cat")
            return n
    return 0


def _is_number(tok: str) -> bool:
    return tok in NUMBER_WORDS or tok.isdigit()


def _is_verb(tokens: list[str], i: int) -> bool:
    tok = tokens[i]
    prev = tokens[i - 1] if i > 0 else ""
    if tok.endswith("ing") and len(tok) >= 5 and tok not in NOT_VERBS:
        return prev not in DETERMINERS
    if tok in VERBS_S:
        return not (
            prev in DETERMINERS
            or prev in ATTRIBUTE_WORDS
            or _is_number(prev)
            or prev in {"of", "on", "in", "at", "with", "for", "from", "and", "pair"}
        )
    return tok in PARTICIPLES


def _is_content(tokens: list[str], i: int) -> bool:
    tok = tokens[i]
    return tok not in FUNCTION_WORDS and tok not in _PUNCT and not _is_verb(tokens, i)


def _noun_phrase(tokens: list[str], j: int, max_words: int = 3) -> int | None:
    """End (exclusive) of the noun phrase starting at j, or None if there is none (see module doc)."""
    n = len(tokens)
    k = j
    while k < n and (tokens[k] in DETERMINERS or _is_number(tokens[k])):
        k += 1
    # a count expression inside the phrase ("a pair of skis")
    seq = _match_seq(tokens, k, _COUNT_SPLIT) if k < n else None
    if seq is not None:
        k += len(seq)
    start_content = k
    while k < n and k - start_content < max_words:
        length = _object_at(tokens, k)
        if length:
            return k + length
        if not _is_content(tokens, k):
            break
        k += 1
    return k if k > start_content else None


def _join(phrases: list[str]) -> str:
    seen: list[str] = []
    for p in phrases:
        if p and p not in seen:
            seen.append(p)
    if len(seen) <= 1:
        return "".join(seen)
    return ", ".join(seen[:-1]) + " and " + seen[-1]


# ---------------------------------------------------------------------------------------------
# Slot extractors
# ---------------------------------------------------------------------------------------------


def object_spans(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token spans of the COCO object mentions (`extract_objects` joins them)."""
    out, i = [], 0
    while i < len(tokens):
        length = _object_at(tokens, i)
        if length:
            out.append((i, i + length))
            i += length
        else:
            i += 1
    return out


def extract_objects(tokens: list[str]) -> list[str]:
    return [" ".join(tokens[s:e]) for s, e in object_spans(tokens)]


def attribute_spans(tokens: list[str]) -> list[tuple[int, int, int]]:
    """(start, adjectives_end, end) token spans of the attribute phrases: tokens[start:adjectives_end] are the
    adjectives (with their "and"/"or"), tokens[adjectives_end:end] the noun phrase."""
    out, i, n = [], 0, len(tokens)
    while i < n:
        if tokens[i] not in ATTRIBUTE_WORDS or _object_at(tokens, i) == 1 and tokens[i] == "orange":
            i += 1
            continue
        start = i
        k = i
        # a run of attribute adjectives, optionally joined by "and"/"or"
        while k < n:
            if tokens[k] in ATTRIBUTE_WORDS and not (tokens[k] == "orange" and _object_at(tokens, k)):
                k += 1
            elif tokens[k] in _ATTR_LINKS and k + 1 < n and tokens[k + 1] in ATTRIBUTE_WORDS and k > start:
                k += 1
            else:
                break
        end = _noun_phrase(tokens, k) if k < n and tokens[k] not in DETERMINERS else None
        if end is not None:
            out.append((start, k, end))
            i = end
        else:
            i = k
    return out


def extract_attributes(tokens: list[str]) -> list[str]:
    return [" ".join(tokens[s:e]) for s, _k, e in attribute_spans(tokens)]


def action_spans(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token spans of the action phrases (`extract_actions` joins them)."""
    out, i, n = [], 0, len(tokens)
    while i < n:
        if not _is_verb(tokens, i):
            i += 1
            continue
        start = i
        k = i + 1
        particle = _match_seq(tokens, k, PARTICLES) if k < n else None
        if particle is not None:
            k += len(particle)
        end = _noun_phrase(tokens, k) if k < n else None
        if end is not None:
            k = end
        elif particle is not None and particle[-1] in {"of", "to", "from", "with", "at", "into", "onto"}:
            k -= len(particle)  # a dangling preposition is not part of the phrase
        out.append((start, k))
        i = k
    return out


def extract_actions(tokens: list[str]) -> list[str]:
    return [" ".join(tokens[s:e]) for s, e in action_spans(tokens)]


def count_spans(tokens: list[str]) -> list[tuple[int, int, int]]:
    """(start, count_end, end) token spans of the count phrases: tokens[start:count_end] are the number
    expression, tokens[count_end:end] its noun phrase."""
    out, i, n = [], 0, len(tokens)
    while i < n:
        seq = _match_seq(tokens, i, _COUNT_SPLIT)
        length = len(seq) if seq else (1 if _is_number(tokens[i]) else 0)
        if not length:
            i += 1
            continue
        k = i + length
        # a noun phrase directly after the count (adjectives allowed, no determiner)
        end = _noun_phrase(tokens, k) if k < n and tokens[k] not in DETERMINERS else None
        if end is None:
            i += length
            continue
        out.append((i, k, end))
        i = end
    return out


def extract_count(tokens: list[str]) -> list[str]:
    return [" ".join(tokens[s:e]) for s, _k, e in count_spans(tokens)]


def relation_spans(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token spans of the relation phrases: the strong ones, or the weak ones if there is none."""
    strong, weak = [], []
    i, n = 0, len(tokens)
    while i < n:
        standalone = _match_seq(tokens, i, _STANDALONE_SPLIT)
        rel = _match_seq(tokens, i, _RELATIONS_SPLIT)
        if rel is not None:
            end = _noun_phrase(tokens, i + len(rel))
            if end is not None and (standalone is None or end > i + len(standalone)):
                (weak if " ".join(rel) in RELATIONS_WEAK else strong).append((i, end))
                i = end
                continue
        if standalone is not None:
            strong.append((i, i + len(standalone)))
            i += len(standalone)
            continue
        i += 1
    return strong or weak


def extract_relation(tokens: list[str]) -> list[str]:
    return [" ".join(tokens[s:e]) for s, e in relation_spans(tokens)]


_EXTRACTORS = {
    "objects": extract_objects,
    "attributes": extract_attributes,
    "actions": extract_actions,
    "count": extract_count,
    "relation": extract_relation,
}


def extract(caption: str) -> dict[str, str]:
    """Every slot of `SLOTS` for this caption (empty string where nothing was found)."""
    tokens = tokenize(caption)
    return {slot: _join(fn(tokens)) for slot, fn in _EXTRACTORS.items()}


def template_slots(template: str) -> set[str]:
    """The field names a template uses; ValueError for anything `fill` does not support."""
    fields = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template {template!r} is malformed: {exc} (write literal braces as {{{{ and }}}})") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            raise ValueError(
                f"template {template!r} uses {{{field}}}; allowed slots are "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            )
        if spec or conversion:
            raise ValueError(f"template {template!r}: slot {{{field}}} may not have a format spec or conversion")
        fields.add(field)
    return fields


@functools.lru_cache(maxsize=4096)
def _used_fields(template: str) -> frozenset[str]:
    return frozenset(template_slots(template))


def caption_clause(caption: str) -> str:
    """The caption as a clause for ``{caption_lc}``: trimmed, no final ``.``/``!``/``?``, first letter
    lower-cased unless the first word is an acronym ("TV", "USA") or has capitals after its first letter."""
    text = " ".join(caption.split()).rstrip(" .!?")
    first = text.split(" ", 1)[0] if text else ""
    if first and first[0].isupper() and not any(ch.isupper() for ch in first[1:]):
        text = text[0].lower() + text[1:]
    return text


def try_fill(template: str, caption: str, slots: dict[str, str] | None = None) -> str | None:
    """The prompt for `caption` from `template`, or None if a slot the template uses is empty.

    `slots` may be passed to reuse an `extract(caption)` result.
    """
    used = _used_fields(template)
    needed = used - CAPTION_FIELDS
    if needed:
        if slots is None:
            slots = extract(caption)
        if any(not slots.get(s) for s in needed):
            return None
    values = {s: (slots or {}).get(s, "") for s in needed}
    if "caption_lc" in used:
        values["caption_lc"] = caption_clause(caption)
    return template.format(caption=caption, **values)


def fill(template: str, caption: str, slots: dict[str, str] | None = None) -> str:
    """The prompt for `caption` from `template`; the caption itself if a used slot is empty."""
    out = try_fill(template, caption, slots)
    return caption if out is None else out


def prompt_key(text: str) -> str:
    """What two prompts must differ in to count as distinct: case and white-space runs ignored."""
    return " ".join(text.split()).lower()


def build_prompts(caption: str, templates, k: int, slots: dict[str, str] | None = None) -> list[str]:
    """The caption's prompts: the caption, then distinct applicable template prompts in order, at most k.

    See the module docstring. `slots` may be passed to reuse an `extract(caption)` result.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    out = [caption]
    seen = {prompt_key(caption)}
    for template in templates:
        if len(out) >= k:
            break
        if _used_fields(template) - CAPTION_FIELDS and slots is None:
            slots = extract(caption)
        prompt = try_fill(template, caption, slots)
        if prompt is None:
            continue
        key = prompt_key(prompt)
        if key in seen:
            continue
        seen.add(key)
        out.append(prompt)
    return out


def mentions(caption: str) -> dict[str, bool]:
    """Whether the caption mentions an attribute, a number and a spatial relation, by its words alone.

    attribute: a word of `ATTRIBUTE_WORDS`; number: a number word, a digit string or a `COUNT_WORDS`
    expression; relation: a strong relation (`RELATIONS_STRONG`) or a `STANDALONE_RELATIONS` phrase
    (the weak "on", "in", "at", "by" are in nearly every caption and do not count). Used to pick the
    captions that a category's coverage target is about (`benchmarks/prompt_coverage.py`).
    """
    tokens = tokenize(caption)
    strong = sorted((tuple(r.split()) for r in RELATIONS_STRONG), key=len, reverse=True)
    return {
        "attribute": any(t in ATTRIBUTE_WORDS for t in tokens),
        "number": any(_is_number(t) or _match_seq(tokens, i, _COUNT_SPLIT) for i, t in enumerate(tokens)),
        "relation": any(
            _match_seq(tokens, i, strong) or _match_seq(tokens, i, _STANDALONE_SPLIT) for i in range(len(tokens))
        ),
    }
