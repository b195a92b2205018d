"""Captions for the offline digits, from attributes measured on each digit's own pixels.

Two attributes are measured (numpy, vectorised over [N, H, W]) and judged relative to the
digit's class, so a thick 1 and a thick 8 are both "thick":

* stroke thickness w = 2 * mass / TV: for a stroke of width w and length L >> w the ink mass is
  ~ w L and its total variation (the perimeter, in units of intensity) is ~ 2 L.
* slant = -mu11 / mu02: the shear of the ink, the x-shift per unit of height, from central
  moments of the intensity-weighted pixel coordinates. Positive = leaning right (the top of the
  digit is to the right of its bottom).

`fit_reference` fits per-class medians (the binary split: chance is 50% in evaluation) and a
middle band (the 1/3 and 2/3 quantiles) on the training digits. A caption names an attribute
only when the digit lies outside the band, so training captions never call a near-median digit
"thick"; evaluation is binary by the median (`attribute_agreement`).

Captions are rendered through many phrasings: the digit as numeral or word, synonyms and
adjective/postfix placements for each attribute, attributes sometimes omitted. Some frames and
synonyms are never used in training: the "heldout" split holds every caption that uses at
least one of them, for evaluation on unseen phrasings. Each split's vocabulary is a fixed list
of distinct strings (a pure function of this file), so a frozen text encoder encodes each string
once and a batch gathers by caption index; `pick_captions` draws those indices as a pure
function of (seed, step), like the data order in `input_pipeline`.
"""

import dataclasses
import functools
import hashlib
import itertools
import re

import numpy as np

NUM_CLASSES = 10
ATTRIBUTES = ("thickness", "slant")
# Attribute codes: 0/1 as below; NONE = not named (in a caption) or inside the middle band.
NONE, THIN, THICK, LEFT, RIGHT = -1, 0, 1, 0, 1
VALUE_NAMES = {"thickness": ("thin", "thick"), "slant": ("left", "right")}
SPLITS = ("train", "heldout")
NUM_MEANINGS = NUM_CLASSES * 3 * 3  # label x thickness {none, thin, thick} x slant {none, l, r}

# Pixels up to this ink level count as background. A sample's background noise then adds no
# perimeter (with no floor, noise of std 0.04 in [-1, 1] units flips 15% of the thick/thin calls
# on train digits; with it, 1%), and the floor cancels most of what a half-pixel blur does to
# thin strokes (no floor: +10% thickness; 0.3: -1%).
_INK_FLOOR = 0.3
CAPTION_BAND = (1 / 3, 2 / 3)  # class quantiles between which an attribute is never named
P_NAME = 0.8  # chance that pick_captions names an attribute the digit has (outside the band)
_CAPTION_STREAM = 7001  # default_rng([seed, step, _CAPTION_STREAM]); input_pipeline's flip uses 1
_CAPTIONS_PER_MEANING = {"train": 24, "heldout": 12}


# ---------------------------------------------------------------------------------------------
# Attributes measured from pixels.


def _ink(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 1] or [N, H, W] -> ink float64 [N, H, W] in [0, 1], background floored."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images have dtype {images.dtype}; measure uint8 images (write float "
                         f"samples through their DataSpec.decode first).")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"images have shape {images.shape}; expected [N, H, W, 1] or [N, H, W].")
    x = images.astype(np.float64) / 255.0
    return np.maximum(x - _INK_FLOOR, 0.0) / (1.0 - _INK_FLOOR)


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Stroke thickness (pixels) and slant (x-shift per unit height) of each digit: [N] float64.

    thickness = 2 sum(I) / sum |grad I|, with forward differences on the zero-padded image. Grey
    level and sub-pixel, insensitive to blur (the variation across a blurred edge still sums to
    its height) and exactly invariant to shifts that keep the ink inside the image. Stroke ends
    and loops add perimeter, roughly equally within a class: hence class-relative thresholds.
    On the training digits it ranks digits within each class like Morpho-MNIST's skeleton
    thickness (2 x mean distance to the boundary along the skeleton) at Spearman 0.994, without
    a per-image skeleton; an erosion count would be discrete and saturate at MNIST's 2-3 px.

    slant = -mu11 / mu02, mu_pq = sum I (x - x_mean)^p (y - y_mean)^q with x the column and y
    the row (downwards): the least-squares shear x ~ x0 - slant * y, so slant > 0 leans right.
    An empty image measures 0 for both.
    """
    ink = _ink(images)
    _, h, w = ink.shape
    mass = ink.sum((1, 2))
    p = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    dx = p[:, :-1, 1:] - p[:, :-1, :-1]
    dy = p[:, 1:, :-1] - p[:, :-1, :-1]
    variation = np.sqrt(dx**2 + dy**2).sum((1, 2))
    thickness = 2.0 * mass / np.where(variation > 0, variation, 1.0)

    rows = np.arange(h, dtype=np.float64)[None, :, None]
    cols = np.arange(w, dtype=np.float64)[None, None, :]
    safe_mass = np.where(mass > 0, mass, 1.0)[:, None, None]
    dr = rows - (ink * rows).sum((1, 2), keepdims=True) / safe_mass
    dc = cols - (ink * cols).sum((1, 2), keepdims=True) / safe_mass
    mu11 = (ink * dr * dc).sum((1, 2))
    mu02 = (ink * dr**2).sum((1, 2))
    slant = -mu11 / np.where(mu02 > 0, mu02, 1.0)
    return {"thickness": thickness, "slant": slant}


@dataclasses.dataclass(frozen=True)
class AttributeReference:
    """Per-class thresholds of each attribute, fitted on training digits (`fit_reference`)."""

    median: dict[str, tuple[float, ...]]  # attribute -> [NUM_CLASSES]: the binary split
    lower: dict[str, tuple[float, ...]]  # attribute -> [NUM_CLASSES]: band's lower edge
    upper: dict[str, tuple[float, ...]]  # attribute -> [NUM_CLASSES]: band's upper edge
    band: tuple[float, float]  # quantile levels of lower and upper


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels have shape {labels.shape} and dtype {labels.dtype}; expected "
                         f"[{n}] integers.")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}]; digits are 0..9.")
    return labels


def fit_reference(images: np.ndarray, labels: np.ndarray,
                  band: tuple[float, float] = CAPTION_BAND) -> AttributeReference:
    """Medians and band quantiles of each attribute per class, over `images` [N, 28, 28, 1]."""
    measured = measure(images)
    labels = _check_labels(labels, len(measured["thickness"]))
    missing = sorted(set(range(NUM_CLASSES)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no digits; the reference needs every class.")
    levels = (0.5, band[0], band[1])
    q = {a: np.stack([np.quantile(v[labels == c], levels) for c in range(NUM_CLASSES)])
         for a, v in measured.items()}  # attribute -> [NUM_CLASSES, 3]
    as_tuples = lambda i: {a: tuple(float(x) for x in q[a][:, i]) for a in ATTRIBUTES}
    return AttributeReference(as_tuples(0), as_tuples(1), as_tuples(2),
                              (float(band[0]), float(band[1])))


@functools.lru_cache(maxsize=1)
def mnist_5k_reference() -> AttributeReference:
    """The reference fitted on mnist_5k's 4,500 training digits (what captions and evals use)."""
    import input_pipeline  # here: measuring generated samples needs no dataset

    train = input_pipeline.load_mnist_5k("train")
    return fit_reference(train.images, train.labels)


def classify_attributes(measured: dict[str, np.ndarray], labels: np.ndarray,
                        ref: AttributeReference, *, use_band: bool = False
                        ) -> dict[str, np.ndarray]:
    """Class-relative codes [N] int8: THICK/RIGHT above the class median, else THIN/LEFT.

    With `use_band` (captions), values inside the class's middle band are NONE instead.
    """
    out = {}
    for a in ATTRIBUTES:
        v = np.asarray(measured[a])
        lab = _check_labels(labels, len(v))
        code = (v > np.asarray(ref.median[a])[lab]).astype(np.int8)
        if use_band:
            inside = (v >= np.asarray(ref.lower[a])[lab]) & (v <= np.asarray(ref.upper[a])[lab])
            code[inside] = NONE
        out[a] = code
    return out


def attribute_agreement(images: np.ndarray, requested_labels: np.ndarray,
                        requested_attributes: dict[str, np.ndarray],
                        ref: AttributeReference) -> dict[str, float]:
    """Fraction of samples whose measured attribute matches the prompt's, per attribute.

    Computed only over samples whose prompt names the attribute (code != NONE), judged against
    the median of the *requested* digit's class; NaN when no prompt names it. Chance is 0.5.
    """
    got = classify_attributes(measure(images), requested_labels, ref)
    out = {}
    for a in ATTRIBUTES:
        want = np.asarray(requested_attributes[a])
        named = want != NONE
        out[a] = float(np.mean(got[a][named] == want[named])) if named.any() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# The caption grammar. Train phrasings first; the held-out ones use words no train caption has.

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Noun-phrase frames: {A} = adjectives with a trailing space (or nothing), {D} = the digit.
_FRAMES = {
    "train": ("{A}{D}", "a {A}{D}", "{A}digit {D}", "the {A}digit {D}", "{A}handwritten {D}",
              "a {A}handwritten {D}", "{A}number {D}", "the {A}number {D}",
              "a picture of a {A}{D}", "a drawing of the {A}digit {D}"),
    "heldout": ("a sketch of a {A}{D}", "the {A}numeral {D}", "an image showing a {A}{D}"),
}
# Per attribute and value: adjectives (before the digit) and postfix phrases (after it; a
# leading comma attaches without a space). The train words cover each way of saying it (width,
# weight, ink): MiniLM's token state for "dark" lies nearer "light" than "bold", so a model that
# only saw "light" = thin reads a held-out "dark" as thin unless "black" = thick is trained too.
_WORDS = {
    "thickness": {
        "train": {
            THIN: (("thin", "light", "fine", "skinny", "pale", "narrow", "slender"),
                   ("with thin strokes", "written thinly", "drawn lightly", "with a fine pen",
                    ", thin pen", "in light strokes", "in pale strokes", "with narrow strokes")),
            THICK: (("thick", "bold", "heavy", "fat", "black", "broad", "strong"),
                    ("with thick strokes", "written thickly", "drawn heavily", "with a heavy pen",
                     ", thick pen", "in bold strokes", "in black strokes",
                     "with broad strokes")),
        },
        "heldout": {
            THIN: (("slim", "faint"), ("with slim strokes", "in faint ink")),
            THICK: (("chunky", "dark"), ("with chunky strokes", "in dark ink")),
        },
    },
    "slant": {
        "train": {
            LEFT: (("left-leaning", "left-slanted"),
                   ("leaning left", "leaning to the left", "slanted left", "slanted to the left",
                    "tilted to the left", "slanting left")),
            RIGHT: (("right-leaning", "right-slanted"),
                    ("leaning right", "leaning to the right", "slanted right",
                     "slanted to the right", "tilted to the right", "slanting right")),
        },
        "heldout": {
            LEFT: (("left-inclined",), ("inclined to the left", "tipped to the left")),
            RIGHT: (("right-inclined",), ("inclined to the right", "tipped to the right")),
        },
    },
}


def meaning_id(label, thickness, slant):
    """Index of (label, thickness code, slant code) in [0, NUM_MEANINGS); works on arrays."""
    return np.asarray(label) * 9 + (np.asarray(thickness) + 1) * 3 + (np.asarray(slant) + 1)


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=(?!one\b)[aeiou8])", "an ", text)


def _attach(phrase: str) -> str:
    return phrase if phrase.startswith(",") else " " + phrase


def _placements(attribute: str, value: int):
    """(kind, phrase, novel) for each way to say the attribute: kind is adj, post or None."""
    if value == NONE:
        return [(None, "", False)]
    return [(kind, phrase, part == "heldout")
            for part in SPLITS
            for kind, phrases in zip(("adj", "post"), _WORDS[attribute][part][value], strict=True)
            for phrase in phrases]


def _joins(adjs: list[str], posts: list[str]):
    """(adjective chain, postfix chain) pairs: both orders and joiners for two postfixes."""
    chains = {0: [""], 1: [a + " " for a in adjs], 2: [" ".join(adjs) + " ", ", ".join(adjs) + " "]}
    if len(posts) < 2:
        tails = ["".join(_attach(p) for p in posts)]
    else:
        tails = []
        for p, q in (posts, posts[::-1]):
            tails += [_attach(p) + q] if q.startswith(",") else [
                _attach(p) + " and " + q, _attach(p) + ", " + q]
    return [(c, t) for c in chains[len(adjs)] for t in tails]


def _renderings(label: int, thickness: int, slant: int, split: str):
    """One meaning's captions in `split` (held-out: using a held-out part):
    {text: (novel_frame, novel_thickness, novel_slant, kinds)}."""
    out = {}
    frames = [(f, part == "heldout") for part in SPLITS for f in _FRAMES[part]]
    for (frame, nf), digit, (tk, tp, nt), (sk, sp, ns) in itertools.product(
            frames, (str(label), _DIGIT_WORDS[label]),
            _placements("thickness", thickness), _placements("slant", slant)):
        if (nf or nt or ns) != (split == "heldout"):
            continue
        adjs = [p for k, p in ((tk, tp), (sk, sp)) if k == "adj"]
        posts = [p for k, p in ((tk, tp), (sk, sp)) if k == "post"]
        for chain, tail in _joins(adjs, posts):
            text = _fix_articles(frame.format(A=chain, D=digit) + tail)
            out.setdefault(text, (nf, nt, ns, (tk, sk)))
    return out


def _stable_key(*parts) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def _pick(renderings: dict, split: str, m: int) -> list:
    """A fixed, balanced subset of one meaning's `split` captions `renderings`.

    Train captions group by placement (adjective/postfix of each attribute), held-out ones by
    which parts are novel; groups take turns, each in a hash order. Hashes rather than an rng
    keep the vocabulary (which cached embeddings index) independent of numpy's versions.
    """
    groups = {}
    for text, (nf, nt, ns, kinds) in renderings.items():
        key = (nf, nt, ns) if split == "heldout" else kinds
        groups.setdefault(key, []).append(text)
    queues = [sorted(g, key=lambda t: _stable_key(m, t)) for _, g in
              sorted(groups.items(), key=lambda kv: _stable_key(m, kv[0]))]
    picked = [t for row in itertools.zip_longest(*queues) for t in row if t is not None]
    return picked[:_CAPTIONS_PER_MEANING[split]]


@dataclasses.dataclass(frozen=True)
class _Vocabulary:
    texts: tuple[str, ...]
    meaning: dict[str, np.ndarray]  # field -> [V], read-only
    start: np.ndarray  # [NUM_MEANINGS] index of each meaning's first caption
    count: np.ndarray  # [NUM_MEANINGS]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"caption split {split!r} is not one of {SPLITS}.")


@functools.cache
def _vocabulary(split: str) -> _Vocabulary:
    _check_split(split)
    texts, rows = [], []
    for label, t, s in itertools.product(range(NUM_CLASSES), (NONE, THIN, THICK),
                                         (NONE, LEFT, RIGHT)):
        renderings = _renderings(label, t, s, split)
        for text in _pick(renderings, split, int(meaning_id(label, t, s))):
            texts.append(text)
            rows.append((label, t, s) + renderings[text][:3])
    cols = np.array(rows, np.int64).T
    names = ("label", "thickness", "slant", "novel_frame", "novel_thickness", "novel_slant")
    meaning = {n: c.astype(bool if n.startswith("novel") else np.int32) for n, c in
               zip(names, cols, strict=True)}
    m = meaning_id(meaning["label"], meaning["thickness"], meaning["slant"])
    count = np.bincount(m, minlength=NUM_MEANINGS)
    assert np.all(np.diff(m) >= 0) and count.min() > 0, "every meaning needs a caption"
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    for a in (*meaning.values(), start, count):
        a.flags.writeable = False
    return _Vocabulary(tuple(texts), meaning, start, count)


def caption_vocabulary(split: str) -> list[str]:
    """Every distinct caption of `split` ("train" or "heldout"), ordered by meaning_id."""
    return list(_vocabulary(split).texts)


def caption_meaning(split: str) -> dict[str, np.ndarray]:
    """What each caption names, [V] each (read-only): label int32; thickness, slant int32
    codes (NONE when not named); novel_frame/_thickness/_slant bool (held-out parts used)."""
    return dict(_vocabulary(split).meaning)


def vocabulary_fingerprint(split: str) -> str:
    """SHA-256 of the split's vocabulary: a cache key for embeddings gathered by caption index."""
    return hashlib.sha256("\n".join(_vocabulary(split).texts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Captions for a dataset, and a caption draw that is a pure function of (seed, step).


@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """What each digit of a dataset may be called: its label and its band codes."""

    split: str
    label: np.ndarray  # [N] int32
    thickness: np.ndarray  # [N] int8: THIN, THICK, or NONE (inside the band: never named)
    slant: np.ndarray  # [N] int8: LEFT, RIGHT or NONE


def caption_table(labels: np.ndarray, attribute_classes: dict[str, np.ndarray],
                  split: str = "train") -> CaptionTable:
    """Table from labels [N] and `classify_attributes(..., use_band=True)` codes."""
    _check_split(split)
    t, s = (np.asarray(attribute_classes[a], np.int8) for a in ATTRIBUTES)
    labels = _check_labels(labels, len(t)).astype(np.int32)
    return CaptionTable(split, labels, t, s)


def caption_table_from_images(images: np.ndarray, labels: np.ndarray, ref: AttributeReference,
                              split: str = "train") -> CaptionTable:
    """Measure `images` [N, 28, 28, 1] uint8 and tabulate what each may be called."""
    classes = classify_attributes(measure(images), labels, ref, use_band=True)
    return caption_table(labels, classes, split)


def consistent_captions(table: CaptionTable, i: int) -> np.ndarray:
    """All caption indices digit `i` can be given: each attribute named as measured, or not."""
    vocab = _vocabulary(table.split)
    t, s = int(table.thickness[i]), int(table.slant[i])
    ms = [int(meaning_id(table.label[i], tt, ss)) for tt in {NONE, t} for ss in {NONE, s}]
    return np.sort(np.concatenate([vocab.start[m] + np.arange(vocab.count[m]) for m in ms]))


def pick_captions(table: CaptionTable, indices: np.ndarray, *, seed: int, step: int,
                  rows: slice = slice(None), p_name: float = P_NAME) -> np.ndarray:
    """Caption indices [n] for this process's `rows` of the global batch `indices` [B].

    Each attribute the digit has (outside the band) is named with probability `p_name`; then
    one caption of that meaning is drawn uniformly. The draws are made for the whole global
    batch from default_rng([seed, step, _CAPTION_STREAM]) and then sliced, so the captions
    depend on (seed, step) alone and not on how the batch is split over processes.
    """
    indices = np.asarray(indices)
    u = np.random.default_rng([seed, step, _CAPTION_STREAM]).random((3, len(indices)))[:, rows]
    i = indices[rows]
    t = np.where(u[0] < p_name, table.thickness[i], NONE)
    s = np.where(u[1] < p_name, table.slant[i], NONE)
    vocab = _vocabulary(table.split)
    m = meaning_id(table.label[i], t, s)
    offset = np.minimum((u[2] * vocab.count[m]).astype(np.int64), vocab.count[m] - 1)
    return (vocab.start[m] + offset).astype(np.int32)


def eval_prompts(num: int, seed: int, split: str = "heldout") -> dict:
    """`num` prompts cycling through all NUM_MEANINGS (10 digits x 3 x 3 attribute codes) in a
    seeded order, each a random caption of `split` with that meaning.

    num >= 90 covers every meaning; a multiple of 90 covers them equally. Returns text
    list[str], caption [num] int32 (index into caption_vocabulary(split)), and label,
    thickness, slant [num] int32 codes (NONE = not named).
    """
    vocab = _vocabulary(split)
    rng = np.random.default_rng([seed, _CAPTION_STREAM])
    cycles = -(-num // NUM_MEANINGS)
    m = np.concatenate([rng.permutation(NUM_MEANINGS) for _ in range(cycles)])[:num]
    caption = (vocab.start[m] + rng.integers(0, vocab.count[m])).astype(np.int32)
    out = {"text": [vocab.texts[c] for c in caption], "caption": caption}
    out.update({k: vocab.meaning[k][caption] for k in ("label", *ATTRIBUTES)})
    return out
