"""Data: offline MNIST digits, tfds through mock_data, a batch order that resumes exactly."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import input_pipeline


@pytest.fixture(scope="module")
def mnist_train():
    return input_pipeline.load("mnist_5k", "train")


def test_mnist_5k_is_real_labelled_digits(mnist_train):
    test = input_pipeline.load("mnist_5k", "test")
    assert (len(mnist_train), len(test)) == (4500, 500)
    assert mnist_train.images.shape[1:] == (28, 28, 1) and mnist_train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(mnist_train.labels), [450] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [50] * 10)
    # Real digits: dark background, a bright stroke covering roughly a fifth of the image.
    ink = (mnist_train.images > 127).mean()
    assert 0.08 < ink < 0.25, ink
    # The splits are disjoint.
    train_rows = {im.tobytes() for im in mnist_train.images}
    assert not any(im.tobytes() in train_rows for im in test.images)


def test_batch_order_is_a_function_of_seed_and_step(mnist_train):
    n = len(mnist_train)
    # One epoch of batches visits every example exactly once.
    bs = 500
    seen = np.concatenate([input_pipeline.global_batch_indices(0, s, bs, n) for s in range(9)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    # Same (seed, step) -> same batch; another seed or epoch -> another order.
    a = input_pipeline.global_batch_indices(0, 3, 64, n)
    np.testing.assert_array_equal(a, input_pipeline.global_batch_indices(0, 3, 64, n))
    assert not np.array_equal(a, input_pipeline.global_batch_indices(1, 3, 64, n))
    assert not np.array_equal(input_pipeline.global_batch_indices(0, 0, bs, n),
                              input_pipeline.global_batch_indices(0, 9, bs, n))


def test_process_shards_reassemble_the_global_batch(mnist_train):
    kw = dict(seed=3, step=11, batch_size=16, random_flip=True)
    whole = input_pipeline.get_batch(mnist_train, **kw)
    parts = [input_pipeline.get_batch(mnist_train, rows=input_pipeline.process_rows(16, p, 4),
                                      **kw) for p in range(4)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_preprocess_range_and_flip():
    images = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 3, 2) * 10
    images[0, 0, 0, 0], images[0, 1, 2, 1] = 255, 0
    x = input_pipeline.preprocess(images, None)
    assert x.dtype == np.float32 and x.max() == 1.0 and x.min() == -1.0
    flipped = input_pipeline.preprocess(images, np.array([True]))
    np.testing.assert_array_equal(flipped[0], x[0, :, ::-1])


def test_tfds_source_through_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        source = input_pipeline.load("cifar10", "train")
        batch = input_pipeline.get_batch(source, seed=0, step=0, batch_size=4, random_flip=True)
    assert len(source) == 12
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


@pytest.mark.parametrize("name,match", [
    ("cifar10", "not prepared"),
    ("no_such_dataset_xyz", "not a tensorflow-datasets dataset"),
])
def test_unavailable_tfds_dataset_fails_fast_with_the_fix(tmp_path, name, match):
    start = time.perf_counter()
    with pytest.raises(input_pipeline.DatasetNotAvailableError, match=match) as info:
        input_pipeline.load(name, "train", str(tmp_path))
    assert time.perf_counter() - start < 10.0
    assert "Fix:" in str(info.value)


def test_wrong_image_size_is_named(mnist_train):
    with pytest.raises(ValueError, match="data.image_size=28"):
        input_pipeline.check_shape(mnist_train, 32, 3, "mnist_5k")
