"""Own images: image folders (labels, captions, bad files), the one preprocessing (images.fit),
any-size tfds datasets, the prefetching loader, and the CLI and exact resume on a folder.

Every folder is generated in tmp_path: PNG, JPEG, WebP and BMP files of odd sizes, grey and
RGBA ones, nested class folders, sidecar captions and one truncated JPEG.
"""

import io
import json
import logging
import os
import pathlib
import signal
import subprocess

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import test_train
from PIL import Image

import config_lib
import figures
import image_folder
import images
import input_pipeline
import text_conditioning
import training_loop
from configs import default, tiny

RNG = np.random.default_rng(0)
SPEC = images.ImageSpec(size=16, channels=3)


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _photo(h: int, w: int, channels: int = 3) -> np.ndarray:
    """A smooth random image (compresses like a photo): uint8 [h, w, channels] or [h, w]."""
    small = RNG.integers(0, 256, (4, 4, channels), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small[..., 0] if channels == 1 else small).resize(
        (w, h), Image.Resampling.BILINEAR))
    return big


def make_folder(root: pathlib.Path, *, corrupt: bool = True) -> pathlib.Path:
    """Two classes; nested folders; PNG/JPEG/WebP/BMP; grey, RGBA; odd sizes; sidecar captions;
    one truncated JPEG (dog/2019/c_broken.jpg) between two good files."""
    files = {
        "cat/a.png": _photo(40, 30),
        "cat/b_grey.png": _photo(17, 23, 1),
        "cat/c_rgba.png": np.dstack([_photo(20, 20), np.full((20, 20), 255, np.uint8)]),
        "dog/2019/a.jpg": _photo(48, 64),
        "dog/2019/b.webp": _photo(33, 19),
        "dog/2019/d.bmp": _photo(16, 16),
        "dog/e.jpeg": _photo(21, 37),
    }
    for rel, array in files.items():
        _save(root / rel, array)
    if corrupt:
        buffer = io.BytesIO()
        Image.fromarray(_photo(64, 64)).save(buffer, "JPEG")
        (root / "dog/2019/c_broken.jpg").write_bytes(buffer.getvalue()[:300])  # truncated
    for path in root.rglob("*"):
        if path.suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            path.with_suffix(".txt").write_text(f"a photo of {path.stem}\n")
    (root / "notes.md").write_text("not an image")  # skipped: not an image extension
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


# ---------------------------------------------------------------------------- images.fit


def test_fit_crops_the_shorter_side_square_at_the_position():
    array = RNG.integers(0, 256, (16, 40, 3), dtype=np.uint8)  # shorter side already 16
    np.testing.assert_array_equal(images.fit(array, SPEC), array[:, 12:28])  # centre
    np.testing.assert_array_equal(images.fit(array, SPEC, 0.0), array[:, :16])
    np.testing.assert_array_equal(images.fit(array, SPEC, 1.0), array[:, 24:])
    tall = np.ascontiguousarray(array.transpose(1, 0, 2))  # [40, 16]: crops rows
    np.testing.assert_array_equal(images.fit(tall, SPEC, 0.25), tall[6:22])
    same = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert images.fit(same, SPEC, 0.9) is same  # already S x S x C: returned untouched


def test_fit_resizes_the_shorter_side():
    half = np.zeros((64, 128), np.uint8)
    half[:, 64:] = 255  # left half black, right half white
    out = images.fit(half, images.ImageSpec(32, 1))  # -> 32 x 64, centre 32 x 32
    assert out.shape == (32, 32, 1)
    assert out[:, :14].max() == 0 and out[:, 18:].min() == 255  # the edge stays mid-window
    const = np.full((37, 91, 3), (10, 200, 30), np.uint8)
    np.testing.assert_array_equal(images.fit(const, SPEC), np.full((16, 16, 3), (10, 200, 30)))


def test_fit_converts_channels():
    grey = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    rgb = images.fit(grey, images.ImageSpec(16, 3))  # grey -> RGB: three equal channels
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3] = 200, 255  # red; top half opaque, bottom transparent
    out = images.fit(rgba, SPEC)
    np.testing.assert_array_equal(out[:8], np.broadcast_to([200, 0, 0], (8, 16, 3)))
    np.testing.assert_array_equal(out[8:], np.full((8, 16, 3), 255))  # over white
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    luma = images.fit(red, images.ImageSpec(16, 1))  # ITU-R 601: L = 0.299 R + ...
    assert luma.shape == (16, 16, 1) and int(luma[0, 0, 0]) == round(0.299 * 255)
    deep = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 16-bit grey PNG
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, "PNG")
    np.testing.assert_array_equal(images.fit(buffer.getvalue(), images.ImageSpec(16, 1))[..., 0],
                                  np.arange(256).reshape(16, 16))


def test_fit_decodes_a_large_jpeg_at_a_reduced_scale_without_losing_quality():
    big = _photo(512, 640)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "JPEG", quality=95)
    fast = images.fit(buffer.getvalue(), images.ImageSpec(32, 3))  # decoded at 1/4 scale
    full = images.fit(big, images.ImageSpec(32, 3))
    assert fast.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - full).mean() < 2.0


def test_fit_applies_jpeg_exif_orientation():
    wide = _photo(16, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "JPEG", quality=100, subsampling=0, exif=exif)
    out = images.fit(buffer.getvalue(), images.ImageSpec(16, 3), 0.0).astype(int)
    upright = np.rot90(wide, -1)  # [32, 16]: the window at position 0 is its top
    assert np.abs(out - upright[:16]).mean() < 2.0  # JPEG round-off only
    assert np.abs(out - wide[:, :16]).mean() > 10.0  # not the stored orientation


# -------------------------------------------------------------------------- FolderSource


def test_folder_source_shapes_labels_and_captions(folder):
    source = image_folder.FolderSource(str(folder), SPEC, labels="subdirs", captions=True,
                                       on_bad_image="skip")
    assert source.files == sorted(source.files) and len(source) == 8  # notes.md is not read
    assert source.class_names == ["cat", "dog"]
    assert source.label_map() == {"cat": 0, "dog": 1}
    expected = [0 if f.startswith("cat") else 1 for f in source.files]
    np.testing.assert_array_equal(source.labels, expected)
    assert source.captions[0] == f"a photo of {pathlib.Path(source.files[0]).stem}"
    good = [i for i, f in enumerate(source.files) if "broken" not in f]
    examples = source.read(np.asarray(good))
    assert examples.images.shape == (7, 16, 16, 3) and examples.images.dtype == np.uint8
    np.testing.assert_array_equal(examples.indices, good)
    np.testing.assert_array_equal(examples.labels, np.asarray(expected)[good])
    # The RGBA PNG (opaque) and the grey PNG decode to what their pixels say.
    grey = source.files.index("cat/b_grey.png")
    img = examples.images[good.index(grey)]
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    unlabelled = image_folder.FolderSource(str(folder), SPEC, labels="none")
    assert unlabelled.class_names == [] and not unlabelled.labels.any()
    assert unlabelled.captions is None


def test_unreadable_image_is_skipped_counted_and_logged(folder, caplog):
    source = image_folder.FolderSource(str(folder), SPEC, labels="subdirs", captions=True)
    broken = source.files.index(os.path.join("dog", "2019", "c_broken.jpg"))
    assert source.num_bad_images == 0
    with caplog.at_level(logging.WARNING):
        examples = source.read(np.asarray([broken, broken, 0]))
    # Replaced by the next readable example in index order, label and all.
    np.testing.assert_array_equal(examples.indices, [broken + 1, broken + 1, 0])
    np.testing.assert_array_equal(examples.images[0], source.read([broken + 1]).images[0])
    assert examples.labels[0] == source.labels[broken + 1]
    assert source.num_bad_images == 1
    assert sum("c_broken.jpg" in r.getMessage() for r in caplog.records) == 1  # logged once
    # The last file wraps around to the first.
    source.files.append(source.files[broken])
    source.labels = np.append(source.labels, 1).astype(np.int32)
    np.testing.assert_array_equal(source.read([len(source) - 1]).indices, [0])


def test_unreadable_image_stops_the_run_naming_the_file(folder):
    source = image_folder.FolderSource(str(folder), SPEC, on_bad_image="stop")  # 1st file: ok
    with pytest.raises(images.BadImageError, match=r"c_broken\.jpg cannot be read as an image "
                       r"\(OSError: .*\)\. Fix: .*--config\.data\.on_bad_image=skip"):
        source.read(np.arange(len(source)))
    # A broken first file stops the run when the folder is opened, before any compile.
    (folder / "cat/a.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(images.BadImageError, match=r"a\.png cannot be read"):
        image_folder.FolderSource(str(folder), SPEC, on_bad_image="stop")


def test_decoded_cache_serves_exactly_what_decoding_gives(folder):
    cached = image_folder.FolderSource(str(folder), SPEC, labels="subdirs", cache_mb=64)
    plain = image_folder.FolderSource(str(folder), SPEC, labels="subdirs")
    good = np.asarray([i for i, f in enumerate(plain.files) if "broken" not in f])
    crop = RNG.random(len(good))
    first = cached.read(good, crop)
    np.testing.assert_array_equal(first.images, plain.read(good, crop).images)
    for path in folder.rglob("*"):  # from now on only the cache can answer
        if path.suffix != ".txt" and path.is_file():
            path.unlink()
    again = cached.read(good, crop)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert cached.num_bad_images == 0
    # A square image is the same at any crop position; a 40x30 one is not, and is decoded anew
    # (here: its file is gone, so it is skipped, as is the 17x23 one after it; the square
    # RGBA image after those comes from the cache).
    square = plain.files.index("dog/2019/d.bmp")
    np.testing.assert_array_equal(cached.read([square], [0.0]).images,
                                  first.images[list(good).index(square)][None])
    wide = plain.files.index("cat/a.png")
    assert cached.read([wide], [0.0]).indices[0] == plain.files.index("cat/c_rgba.png")
    assert cached.num_bad_images == 2


def test_an_example_twice_in_a_batch_at_two_crops_reads_the_same_warm_or_cold(folder):
    """A batch larger than the dataset holds each example twice, at two crop positions: the
    second store of an example must not change the copy the cache already handed out (it did:
    a resumed run read the re-read batch differently from an uninterrupted one)."""
    cached = image_folder.FolderSource(str(folder), SPEC, labels="subdirs", cache_mb=64,
                                       threads=1)
    n = len(cached)
    indices = np.concatenate([np.arange(n), np.arange(n)])
    crop = RNG.random(2 * n)
    first = cached.read(indices, crop)
    again = cached.read(indices, crop)   # the same batch again (as on resume: compile, step)
    plain = image_folder.FolderSource(str(folder), SPEC, labels="subdirs", threads=1)
    np.testing.assert_array_equal(first.images, plain.read(indices, crop).images)
    np.testing.assert_array_equal(again.images, first.images)


@pytest.mark.parametrize("make, match", [
    (lambda d: d.mkdir(), "holds no images"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("x"), (d / "b.csv").write_text("y")),
     r"holds no images .*2 other files, e\.g\. a\.txt"),
    (lambda d: (d.mkdir(), *[(d / f"{i}.png").write_bytes(b"not a png") for i in range(3)]),
     "none of the first 3 files .* can be read as an image"),
    (lambda d: None, "is not a folder"),
])
def test_empty_or_non_image_folders_fail_with_the_fix(tmp_path, make, match):
    make(tmp_path / "d")
    with pytest.raises(image_folder.ImageFolderError, match=match) as info:
        image_folder.FolderSource(str(tmp_path / "d"), SPEC)
    assert "Fix:" in str(info.value)


def test_loose_files_and_missing_captions_fail_with_the_fix(folder):
    _save(folder / "loose.png", _photo(8, 8))
    with pytest.raises(image_folder.ImageFolderError, match="lie directly in it, e.g. loose.png"):
        image_folder.FolderSource(str(folder), SPEC, labels="subdirs")
    with pytest.raises(image_folder.ImageFolderError,
                       match=r"1 of the 9 images .* no caption .* e\.g\. loose\.png"):
        image_folder.FolderSource(str(folder), SPEC, captions=True)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_caption_file(tmp_path, kind):
    root = tmp_path / "flat"
    for i in range(3):
        _save(root / f"sub/{i}.png", _photo(8, 12))
    if kind == "jsonl":
        (root / "captions.jsonl").write_text("".join(
            json.dumps({"file_name": f"sub/{i}.png", "caption": f"cap, {i}"}) + "\n"
            for i in range(3)))
    else:
        (root / "captions.csv").write_text(
            "file_name,text\n" + "".join(f'sub/{i}.png,"cap, {i}"\n' for i in range(3)))
    source = image_folder.FolderSource(str(root), SPEC, captions=True)
    assert source.captions == ["cap, 0", "cap, 1", "cap, 2"]


def test_label_map_is_saved_and_checked_on_resume(folder, tmp_path):
    workdir = tmp_path / "workdir"
    source = image_folder.FolderSource(str(folder), SPEC, labels="subdirs")
    image_folder.check_label_map(source, str(workdir), 2)
    saved = json.loads((workdir / image_folder.LABEL_MAP_FILE).read_text())
    assert saved["classes"] == {"cat": 0, "dog": 1}
    image_folder.check_label_map(source, str(workdir), 2)  # unchanged: passes
    _save(folder / "bird/a.png", _photo(9, 9))
    changed = image_folder.FolderSource(str(folder), SPEC, labels="subdirs")
    with pytest.raises(image_folder.LabelMapChangedError,
                       match=r"added \['bird'\], removed \[\].*Fix: restore the class folders"):
        image_folder.check_label_map(changed, str(workdir), 0)
    with pytest.raises(image_folder.ImageFolderError,
                       match=r"model.num_classes=2, but .* 3 classes .*num_classes=3"):
        image_folder.check_label_map(changed, str(tmp_path / "other"), 2)


def test_folder_config_errors():
    def check(match, **data):
        config = tiny.get_config()
        config.data.name, config.data.image_size, config.data.num_channels = "cifar10", 16, 3
        config.eval.feature_net = "inception_v3"
        for key, value in data.items():
            config.data[key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(config, num_devices=8)

    check("data.path, which is empty", name="folder")
    check("data.path='/x' is read only with data.name='folder'", path="/x")
    check(r"model.num_classes=10, but data.folder_labels='none'", name="folder", path="/x")
    check("data.crop='middle' is not supported", crop="middle")
    check("data.on_bad_image='ignore' is not supported", on_bad_image="ignore")
    check("data.num_channels=4 is not supported", num_channels=4)
    check("data.captions='dataset' reads a folder's captions", name="cifar10", captions="dataset")
    check("data.caption_key='text' is read only with", caption_key="text")


# --------------------------------------------------------------- batches, tfds, prefetch


def test_random_crop_is_a_function_of_seed_step_and_position(folder):
    source = image_folder.FolderSource(str(folder), images.ImageSpec(8, 3), labels="subdirs")
    kw = dict(seed=1, step=5, batch_size=8, random_flip=True, random_crop=True)
    whole = input_pipeline.get_batch(source, **kw)
    np.testing.assert_array_equal(whole["image"], input_pipeline.get_batch(source, **kw)["image"])
    parts = [input_pipeline.get_batch(source, rows=input_pipeline.process_rows(8, p, 2), **kw)
             for p in range(2)]
    for key in ("image", "label", "index"):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    centre = input_pipeline.get_batch(source, **dict(kw, random_crop=False, random_flip=False))
    assert not np.array_equal(whole["image"], centre["image"])
    assert not np.array_equal(whole["image"],
                              input_pipeline.get_batch(source, **dict(kw, step=6))["image"])


def test_tfds_dataset_of_another_size_is_resized():
    config = default.get_config()
    config.data.name, config.data.image_size = "celeb_a", 64  # tfds celeb_a: 218 x 178
    with tfds.testing.mock_data(num_examples=8):
        assert input_pipeline.open_raw_records("celeb_a", "train", None) is None  # needs TF
        source = input_pipeline.from_config(config.data, "train")
        batch = input_pipeline.get_batch(source, seed=0, step=0, batch_size=4, random_flip=True,
                                         random_crop=True)
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32


def test_unprepared_tfds_dataset_fails_with_the_fix_through_from_config(tmp_path):
    """The trainer's path (from_config, then the raw records) still stops at tfds' first open:
    test_input_pipeline times it."""
    config = default.get_config()
    config.data.update(name="celeb_a", data_dir=str(tmp_path), image_size=64)
    with pytest.raises(input_pipeline.DatasetNotAvailableError,
                       match=r"not prepared .* Fix: .*tfds build celeb_a"):
        input_pipeline.from_config(config.data, "train")


class OddSizedImages(tfds.core.GeneratorBasedBuilder):
    """A real ArrayRecord tfds dataset (PIL images: written without TensorFlow), 12 photos of
    three sizes, one of them grey."""

    VERSION = tfds.core.Version("1.0.0")
    SIZES = [(40, 30), (17, 23), (32, 32)]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            yield i, {"image": Image.fromarray(odd_sized_image(i)).convert("RGB"),
                      "label": i % 3, "caption": f"photo {i}"}


def odd_sized_image(i: int) -> np.ndarray:
    h, w = OddSizedImages.SIZES[i % 3]
    return np.random.default_rng(i).integers(0, 256, (h, w) if i == 4 else (h, w, 3), np.uint8)


def test_tfds_array_record_dataset_of_any_size_goes_through_fit(tmp_path):
    OddSizedImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = default.get_config()
    config.data.update(name="odd_sized_images", data_dir=str(tmp_path), image_size=16,
                       captions="dataset", caption_key="caption")
    # Read as serialized records, the encoded image straight into images.fit (the fast path).
    assert input_pipeline.open_raw_records("odd_sized_images", "train", str(tmp_path))
    source = input_pipeline.from_config(config.data, "train")
    assert len(source) == 12
    crop = np.linspace(0, 1, 12)
    examples = source.read(np.arange(12), crop)
    # tfds shuffles the records when it writes them: the caption says which example each is.
    captions = text_conditioning.caption_source(config, source)
    texts = [captions.vocabulary[c]
             for c in captions.choose(np.arange(12), seed=0, step=0, rows=slice(None))]
    written = [int(t.split()[1]) for t in texts]
    assert sorted(written) == list(range(12))
    # PNG is lossless: each record is exactly images.fit of the array that was written.
    for j, i in enumerate(written):
        want = images.fit(np.asarray(Image.fromarray(odd_sized_image(i)).convert("RGB")), SPEC,
                          crop[j])
        np.testing.assert_array_equal(examples.images[j], want)
    np.testing.assert_array_equal(examples.labels, np.asarray(written) % 3)


def test_prefetcher_returns_each_steps_value_and_raises_its_error():
    made = []

    def make(step):
        made.append(step)
        if step == 6:
            raise images.BadImageError("step 6")
        return {"x": np.full(2, step)}

    for depth in (0, 2):
        loader = input_pipeline.Prefetcher(make, range(0, 10, 2), depth)
        for step in (0, 2, 4):
            np.testing.assert_array_equal(loader.get(step)["x"], [step, step])
        with pytest.raises(images.BadImageError, match="step 6"):
            loader.get(6)
        loader.close()
    with pytest.raises(RuntimeError, match="asked for step 4, but the next is 0"):
        input_pipeline.Prefetcher(make, range(0, 10, 2), 1).get(4)


def test_skipped_image_brings_its_own_label_and_caption(folder):
    """The trainer's batch: a skipped file's replacement comes with its label and caption."""
    config = tiny.get_config()
    config.data.update(name="folder", path=str(folder), image_size=16, num_channels=3,
                       folder_labels="subdirs", captions="dataset", random_flip=False)
    config.train.batch_size = 8
    source = input_pipeline.from_config(config.data, "train")
    captions = text_conditioning.caption_source(config, source)
    seen = {}

    def transform(batch, *, step, indices, rows):
        seen["indices"], seen["label"] = indices[rows], batch["label"]
        return {"image": batch["image"], "caption": captions.choose(indices, seed=0, step=step,
                                                                    rows=rows)}

    mesh = training_loop.make_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    out = training_loop.global_batches(source, 0, 1, sharding, seed=config.seed, batch_size=8,
                                       random_flip=False, transform=transform)
    broken = source.files.index(os.path.join("dog", "2019", "c_broken.jpg"))
    planned = input_pipeline.global_batch_indices(config.seed, 0, 8, len(source))
    assert broken in planned and broken not in seen["indices"]  # 8 of 8: the batch holds it
    np.testing.assert_array_equal(seen["label"], source.labels[seen["indices"]])
    vocabulary = np.asarray(captions.vocabulary)
    got = vocabulary[np.asarray(jax.device_get(out["caption"]))[0]]
    assert list(got) == [source.captions[i] for i in seen["indices"]]


# -------------------------------------------------------------------------- CLI, resume

# configs/tiny.py on a generated folder: 16x16 RGB, random crops and flips, two classes.
FOLDER_DATA = dict(name="folder", folder_labels="subdirs", image_size=16, num_channels=3,
                   crop="random", random_flip=True)


def _folder_flags(folder) -> tuple[str, ...]:
    return (*(f"--config.data.{k}={v}" for k, v in FOLDER_DATA.items()),
            f"--config.data.path={folder}", "--config.model.num_classes=2",
            "--config.eval.feature_net=inception_v3")


def _folder_config(folder, num_steps: int):
    """The config of `_folder_flags(folder)` and train.num_steps=num_steps."""
    config = tiny.get_config()
    config.data.update(path=str(folder), **FOLDER_DATA)
    config.model.num_classes = 2
    config.eval.feature_net = "inception_v3"
    config.train.num_steps = num_steps
    return config


NUM_STEPS = 12


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """configs/tiny.py trained NUM_STEPS steps on a generated folder, uninterrupted, in 8
    devices: the CLI test reads its log and the resume test compares against it."""
    folder = make_folder(tmp_path_factory.mktemp("images") / "images")
    workdir = tmp_path_factory.mktemp("folder_run") / "run"
    proc = test_train._run(workdir, *_folder_flags(folder), f"--config.train.num_steps={NUM_STEPS}")
    return folder, workdir, proc.stderr


@pytest.mark.slow
def test_cli_trains_then_samples_on_a_folder(folder_run):
    folder, workdir, log = folder_run
    assert "c_broken.jpg" in log  # the skipped file is logged with its path
    steps, counts = figures.read_scalars(str(workdir / "tensorboard"))["train/bad_images"]
    assert list(steps) == list(range(2, NUM_STEPS + 1, 2))  # ... and counted in TensorBoard:
    assert list(counts) == [1] * len(steps)  # every batch of 8 holds it; counted once
    assert json.loads((workdir / "label_map.json").read_text())["classes"] == {"cat": 0, "dog": 1}
    test_train._run(workdir, *_folder_flags(folder), mode="sample")
    data = np.load(next(workdir.glob("samples_*.npz")))
    assert data["images"].shape == (16, 16, 16, 3) and data["images"].dtype == np.uint8
    # Another class folder in place of one (same count, so the config still fits): the
    # label -> class map of the checkpoint no longer holds, and resuming must refuse.
    (folder / "cat").rename(folder / "bird")
    try:
        failed = subprocess.run(
            test_train._cli(workdir, *_folder_flags(folder),
                            f"--config.train.num_steps={NUM_STEPS + 2}"),
            env=test_train._env(8), cwd=test_train.REPO, capture_output=True, text=True,
            timeout=240)
    finally:
        (folder / "bird").rename(folder / "cat")
    assert failed.returncode == 1
    assert "added ['bird'], removed ['cat']" in failed.stderr and "Fix:" in failed.stderr


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_on_a_folder(folder_run, tmp_path):
    folder, reference, _ = folder_run
    flags = (*_folder_flags(folder), f"--config.train.num_steps={NUM_STEPS}")
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(test_train._cli(workdir, *flags), env=test_train._env(8),
                            cwd=test_train.REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_after = test_train._wait_for_checkpoint(workdir, proc, min_step=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_after < NUM_STEPS
    resumed = test_train._run(workdir, *flags)
    assert "Resumed from step" in resumed.stderr
    config = _folder_config(folder, NUM_STEPS)
    for use_ema in (False, True):
        step, params = test_train._params(workdir, config, use_ema=use_ema)
        _, ref = test_train._params(reference, config, use_ema=use_ema)
        assert step == NUM_STEPS
        test_train._assert_trees_equal(params, ref)
