"""Digit captions: attributes measured from pixels, caption vocabularies, a resumable draw."""

import re

import numpy as np
import pytest
from scipy import ndimage

import input_pipeline
import metric_logging
from text import digit_captions as dc


@pytest.fixture(scope="module")
def train():
    return input_pipeline.load_mnist_5k("train")


@pytest.fixture(scope="module")
def ref(train):
    return dc.fit_reference(train.images, train.labels)


# --- Measurement ---------------------------------------------------------------------------


def test_thickness_of_a_bar_is_its_closed_form():
    # An axis-aligned w x L bar of full ink: mass w L; forward-difference perimeter
    # (w + L) + (w - 1 + L - 1) + sqrt(2) (the far corner has both differences).
    for w, length in ((1, 12), (2, 15), (4, 18)):
        x = np.zeros((1, 28, 28), np.uint8)
        x[0, 5:5 + w, 4:4 + length] = 255
        want = 2 * w * length / (2 * (w + length) - 2 + np.sqrt(2))
        got = dc.measure(x)
        np.testing.assert_allclose(got["thickness"], [want], rtol=1e-12)
        np.testing.assert_allclose(got["slant"], [0.0], atol=1e-12)
        # Transposing swaps the two differences: same thickness.
        np.testing.assert_allclose(dc.measure(x.transpose(0, 2, 1))["thickness"], [want])


def test_thickness_grows_under_dilation_and_shrinks_under_erosion(train):
    x = train.images[::15, :, :, 0]  # 300 real digits, all classes
    base = dc.measure(x)["thickness"]
    dilated = dc.measure(ndimage.grey_dilation(x, size=(1, 2, 2)))["thickness"]
    eroded = dc.measure(ndimage.grey_erosion(x, size=(1, 2, 2)))["thickness"]
    assert np.all(dilated > base) and np.all(eroded < base)
    # One pixel more or less width: a real change, not a rounding effect.
    assert np.median(dilated / base) > 1.3 and np.median(eroded / base) < 0.8


def _shear(image: np.ndarray, k: float) -> np.ndarray:
    """out[r, c] = in[r, c + k (r - centre)]: the top moves right by k per row when k > 0."""
    centre = (image.shape[0] - 1) / 2
    out = ndimage.affine_transform(image.astype(np.float64), np.array([[1.0, 0.0], [k, 1.0]]),
                                   offset=[0.0, -k * centre], order=1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_slant_follows_a_shear_and_flips_with_a_mirror(train, ref):
    x = train.images[::45, :, :, 0]  # 100 real digits
    labels = train.labels[::45]
    base = dc.measure(x)["slant"]
    for k in (-0.2, 0.2):
        sheared = dc.measure(np.stack([_shear(im, k) for im in x]))["slant"]
        # The moments' shear is linear in an applied shear: slant' = slant + k.
        assert np.all(np.sign(sheared - base) == np.sign(k))
        assert abs(np.median(sheared - base) - k) < 0.02
    # A shear about the width of a class's middle third moves most digits across the median.
    right = {k: dc.classify_attributes(dc.measure(np.stack([_shear(im, k) for im in x])),
                                       labels, ref)["slant"].mean() for k in (-0.3, 0.0, 0.3)}
    assert right[-0.3] < 0.2 and 0.3 < right[0.0] < 0.7 and right[0.3] > 0.8, right
    # Mirroring the columns negates mu11 exactly.
    np.testing.assert_allclose(dc.measure(x[:, :, ::-1])["slant"], -base, atol=1e-12)


def test_measurement_is_shift_invariant(train):
    x = train.images[:400, :, :, 0]
    inside = ~(x[:, [0, -1], :].any((1, 2)) | x[:, :, [0, -1]].any((1, 2)))
    x = x[inside]
    base = dc.measure(x)
    for shifted in (np.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1],  # down
                    np.pad(x, ((0, 0), (0, 1), (0, 0)))[:, 1:],  # up
                    np.pad(x, ((0, 0), (0, 0), (1, 0)))[:, :, :-1],  # right
                    np.pad(x, ((0, 0), (0, 0), (0, 1)))[:, :, 1:]):  # left
        got = dc.measure(shifted)
        for a in dc.ATTRIBUTES:
            np.testing.assert_allclose(got[a], base[a], rtol=1e-9, atol=1e-12)


def test_background_noise_of_a_sample_does_not_flip_thickness(train, ref):
    # What a generated digit looks like on disk: [-1, 1] floats with some noise, then uint8.
    x = input_pipeline.preprocess(train.images[:900], None)
    noisy = np.random.default_rng(0).normal(0.0, 0.04, x.shape).astype(np.float32)
    written = metric_logging.to_uint8(np.clip(x + noisy, -1, 1))
    labels = train.labels[:900]
    clean = dc.classify_attributes(dc.measure(train.images[:900]), labels, ref)
    got = dc.classify_attributes(dc.measure(written), labels, ref)
    for a in dc.ATTRIBUTES:
        assert np.mean(got[a] == clean[a]) > 0.97, a


def test_class_relative_split_is_half_and_half_on_train(train, ref):
    m = dc.measure(train.images)
    binary = dc.classify_attributes(m, train.labels, ref)
    banded = dc.classify_attributes(m, train.labels, ref, use_band=True)
    for a in dc.ATTRIBUTES:
        for c in range(10):
            in_class = train.labels == c  # 450 each: continuous values, no ties at the median
            assert np.sum(binary[a][in_class] == 1) == 225, (a, c)
            assert abs(np.sum(banded[a][in_class] == dc.NONE) - 150) <= 2, (a, c)
        named = banded[a] != dc.NONE  # outside the band the codes agree with the binary split
        np.testing.assert_array_equal(banded[a][named], binary[a][named])
        assert all(lo < md < hi for lo, md, hi in zip(ref.lower[a], ref.median[a], ref.upper[a],
                                                      strict=True))
    # The reference is per class: 1s are drawn thinner than 0s.
    assert ref.median["thickness"][1] < ref.median["thickness"][0]


def test_attribute_agreement_counts_only_named_attributes(train, ref):
    images, labels = train.images[:500], train.labels[:500]
    own = dc.classify_attributes(dc.measure(images), labels, ref)
    assert dc.attribute_agreement(images, labels, own, ref) == {"thickness": 1.0, "slant": 1.0}
    flipped = {a: 1 - v for a, v in own.items()}
    assert dc.attribute_agreement(images, labels, flipped, ref) == {"thickness": 0.0,
                                                                     "slant": 0.0}
    half = {"thickness": np.where(np.arange(500) % 2 == 0, own["thickness"], dc.NONE),
            "slant": np.full(500, dc.NONE)}
    got = dc.attribute_agreement(images, labels, half, ref)
    assert got["thickness"] == 1.0 and np.isnan(got["slant"])
    # What a label-only model gets: attributes independent of the request -> about chance.
    rand = {a: np.random.default_rng(i).integers(0, 2, 500) for i, a in enumerate(dc.ATTRIBUTES)}
    for a, frac in dc.attribute_agreement(images, labels, rand, ref).items():
        assert 0.4 < frac < 0.6, (a, frac)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="uint8"):
        dc.measure(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="shape"):
        dc.measure(np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="digits are 0..9"):
        dc.fit_reference(np.zeros((2, 28, 28, 1), np.uint8), np.array([3, 10]))
    with pytest.raises(ValueError, match="no digits"):
        dc.fit_reference(np.zeros((2, 28, 28, 1), np.uint8), np.array([3, 4]))
    with pytest.raises(ValueError, match="not one of"):
        dc.caption_vocabulary("test")


# --- Captions ------------------------------------------------------------------------------

_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())}
_THIN = {"thin", "thinly", "light", "lightly", "fine", "skinny", "pale", "narrow", "slender",
         "slim", "faint"}
_THICK = {"thick", "thickly", "bold", "heavy", "heavily", "fat", "black", "broad", "strong",
          "chunky", "dark"}
# The held-out vocabulary, written out independently of the module.
_HELDOUT_FRAME_WORDS = {"sketch", "numeral", "image", "showing"}
_HELDOUT_THICKNESS_WORDS = {"slim", "faint", "chunky", "dark", "ink"}
_HELDOUT_SLANT_WORDS = {"inclined", "tipped"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text)


def _parse(text: str) -> tuple[int, int, int]:
    """(label, thickness, slant) named by a caption, read from its words alone."""
    words = _words(text)
    digits = [int(w) if w.isdigit() else _NUMBERS[w] for w in words
              if w.isdigit() or w in _NUMBERS]
    assert len(digits) == 1, text
    thin, thick = bool(_THIN & set(words)), bool(_THICK & set(words))
    left, right = "left" in words, "right" in words
    assert not (thin and thick) and not (left and right), text
    thickness = dc.THIN if thin else dc.THICK if thick else dc.NONE
    slant = dc.LEFT if left else dc.RIGHT if right else dc.NONE
    return digits[0], thickness, slant


@pytest.mark.parametrize("split", dc.SPLITS)
def test_every_caption_means_what_the_table_says(split):
    vocab = dc.caption_vocabulary(split)
    meaning = dc.caption_meaning(split)
    assert len(set(vocab)) == len(vocab)
    parsed = np.array([_parse(t) for t in vocab])
    for j, field in enumerate(("label", "thickness", "slant")):
        np.testing.assert_array_equal(parsed[:, j], meaning[field], err_msg=field)
    # Every (digit, thickness, slant) combination has captions; articles agree with the word.
    ids = dc.meaning_id(meaning["label"], meaning["thickness"], meaning["slant"])
    np.testing.assert_array_equal(np.unique(ids), np.arange(dc.NUM_MEANINGS))
    assert not any(re.search(r"\ba (?!one\b)(8|[aeiou])", t) or re.search(r"\ban (?!8|eight|i)", t)
                   for t in vocab)


def test_vocabulary_sizes_and_variety():
    train, heldout = dc.caption_vocabulary("train"), dc.caption_vocabulary("heldout")
    assert (len(train), len(heldout)) == (2120, 1020)
    train_words = {w for t in train for w in _words(t)}
    # Numerals and words, every train synonym and both kinds of placement are used.
    assert set(map(str, range(10))) | set(_NUMBERS) <= train_words
    assert (_THIN | _THICK) - _HELDOUT_THICKNESS_WORDS <= train_words
    # Digit-only, one-attribute and two-attribute captions all exist, in sizeable numbers.
    m = dc.caption_meaning("train")
    named = (m["thickness"] != dc.NONE).astype(int) + (m["slant"] != dc.NONE)
    assert np.bincount(named).tolist() == [200, 960, 960]
    assert dc.vocabulary_fingerprint("train") != dc.vocabulary_fingerprint("heldout")


def test_heldout_phrasings_never_appear_in_training():
    train, heldout = dc.caption_vocabulary("train"), dc.caption_vocabulary("heldout")
    assert not set(train) & set(heldout)
    train_words = {w for t in train for w in _words(t)}
    assert not train_words & (_HELDOUT_FRAME_WORDS | _HELDOUT_THICKNESS_WORDS |
                              _HELDOUT_SLANT_WORDS)
    m = dc.caption_meaning("heldout")
    for i, text in enumerate(heldout):
        words = set(_words(text))
        assert words - train_words, text  # every held-out caption has an unseen word
        assert m["novel_frame"][i] == bool(words & _HELDOUT_FRAME_WORDS), text
        assert m["novel_thickness"][i] == bool(words & _HELDOUT_THICKNESS_WORDS), text
        assert m["novel_slant"][i] == bool(words & _HELDOUT_SLANT_WORDS), text
    assert not any(dc.caption_meaning("train")[k].any()
                   for k in ("novel_frame", "novel_thickness", "novel_slant"))


@pytest.fixture(scope="module")
def table(train, ref):
    return dc.caption_table_from_images(train.images, train.labels, ref)


def test_pick_captions_is_a_function_of_seed_and_step(table):
    n, bs = len(table.label), 64
    idx = input_pipeline.global_batch_indices(0, 5, bs, n)
    a = dc.pick_captions(table, idx, seed=0, step=5)
    np.testing.assert_array_equal(a, dc.pick_captions(table, idx, seed=0, step=5))
    assert not np.array_equal(a, dc.pick_captions(table, idx, seed=0, step=6))
    assert not np.array_equal(a, dc.pick_captions(table, idx, seed=1, step=5))
    # Process shards reassemble the global batch's captions.
    parts = [dc.pick_captions(table, idx, seed=0, step=5,
                              rows=input_pipeline.process_rows(bs, p, 4)) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), a)


def test_picked_captions_are_consistent_with_the_digit(table):
    meaning = dc.caption_meaning("train")
    n, bs, steps = len(table.label), 64, 60
    named = {a: [] for a in dc.ATTRIBUTES}
    for step in range(steps):
        idx = input_pipeline.global_batch_indices(3, step, bs, n)
        caps = dc.pick_captions(table, idx, seed=3, step=step)
        for i, c in zip(idx, caps, strict=True):
            assert c in dc.consistent_captions(table, i)
        np.testing.assert_array_equal(meaning["label"][caps], table.label[idx])
        for a in dc.ATTRIBUTES:
            has, said = getattr(table, a)[idx], meaning[a][caps]
            assert np.all((said == dc.NONE) | (said == has))  # never a wrong or in-band name
            named[a].append(said[has != dc.NONE] != dc.NONE)
    for a in dc.ATTRIBUTES:  # ~2,560 digits that have the attribute: named at rate P_NAME
        assert abs(np.concatenate(named[a]).mean() - dc.P_NAME) < 0.03, a
    # Every caption a digit may get names nothing it lacks.
    i = int(np.flatnonzero((table.thickness == dc.THICK) & (table.slant == dc.NONE))[0])
    ok = dc.consistent_captions(table, i)
    assert set(meaning["slant"][ok]) == {dc.NONE}
    assert set(meaning["thickness"][ok]) == {dc.NONE, dc.THICK}


def test_eval_prompts_cover_every_meaning():
    p = dc.eval_prompts(180, seed=0)
    vocab, meaning = dc.caption_vocabulary("heldout"), dc.caption_meaning("heldout")
    assert p["text"] == [vocab[c] for c in p["caption"]]
    for k in ("label", "thickness", "slant"):
        np.testing.assert_array_equal(p[k], meaning[k][p["caption"]])
    ids = dc.meaning_id(p["label"], p["thickness"], p["slant"])
    np.testing.assert_array_equal(np.bincount(ids, minlength=dc.NUM_MEANINGS), 2)
    assert dc.eval_prompts(180, seed=0)["text"] == p["text"]
    assert dc.eval_prompts(180, seed=1)["text"] != p["text"]
