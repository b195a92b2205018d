"""The committed MNIST classifier (evaluation/mnist_classifier.py): accuracy, API, training."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import input_pipeline
from errors import UserError
from evaluation import mnist_classifier


def test_committed_weights_reach_97_percent_on_the_held_out_digits():
    """Measured 98.0% on the 500 test digits the training never sees."""
    _, params = mnist_classifier.load_classifier()
    test = input_pipeline.load_mnist_5k("test")
    assert mnist_classifier.accuracy(params, test.images, test.labels) >= 0.97
    assert mnist_classifier.WEIGHTS_PATH.stat().st_size < 400 * 1024


def test_interface_shapes():
    apply_fn, params = mnist_classifier.load_classifier()
    images = jnp.zeros((3, 28, 28, 1))
    assert apply_fn(params, images).shape == (3, 10)
    features, logits = mnist_classifier.features_fn(params, images)
    assert features.shape == (3, mnist_classifier.FEATURE_DIM) and logits.shape == (3, 10)
    np.testing.assert_allclose(logits, apply_fn(params, images), rtol=1e-6)


def test_the_training_command_writes_loadable_weights(tmp_path, capsys):
    out = tmp_path / "clf.msgpack"
    accuracy = mnist_classifier.main(["--train", "--steps=3", f"--out={out}"])
    assert 0.0 <= accuracy <= 1.0 and "held-out accuracy" in capsys.readouterr().out
    _, params = mnist_classifier.load_classifier(out)
    _, committed = mnist_classifier.load_classifier()
    assert not np.allclose(params["logits"]["kernel"], committed["logits"]["kernel"])


def test_missing_weights_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m evaluation.mnist_classifier --train"):
        mnist_classifier.load_classifier(tmp_path / "absent.msgpack")


def test_shift_images_moves_each_image_by_its_own_offset():
    images = np.full((2, 5, 5, 1), -1.0, np.float32)
    images[:, 2, 2, 0] = 1.0  # one bright pixel in the middle of each
    shifted = mnist_classifier.shift_images(images, dy=np.array([1, 4]), dx=np.array([4, 2]),
                                            max_shift=2)
    # Image i moves by (max_shift - dy, max_shift - dx): image 0 by (+1, -2), so the pixel
    # lands at (3, 0); image 1 by (-2, 0): at (0, 2). Everything else is background.
    want = np.full_like(images, -1.0)
    want[0, 3, 0, 0] = want[1, 0, 2, 0] = 1.0
    np.testing.assert_array_equal(shifted, want)


def test_shifted_batches_of_two_processes_are_the_global_batch():
    """The data transform draws the shifts for the global batch from (seed, step): the rows of
    two processes together are what one process computes."""
    images = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    batch = {"image": images, "label": np.arange(8)}
    kwargs = dict(seed=3, max_shift=2, step=5, indices=np.arange(8))
    whole = mnist_classifier._shifted_batch(batch, rows=slice(0, 8), **kwargs)
    halves = [mnist_classifier._shifted_batch(
        {k: v[rows] for k, v in batch.items()}, rows=rows, **kwargs)
        for rows in (slice(0, 4), slice(4, 8))]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
    assert not np.array_equal(whole["image"], images)


def test_training_in_a_workdir_resumes_and_refuses_other_settings(tmp_path, caplog):
    """Through the training loop: checkpoints change nothing, a finished run resumes without
    training again, and other settings in the same workdir are refused before any work."""
    params, stopped = mnist_classifier.train(num_steps=4, batch_size=16, workdir=str(tmp_path))
    assert not stopped and (tmp_path / "checkpoints" / "4").is_dir()
    plain, _ = mnist_classifier.train(num_steps=4, batch_size=16)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    with caplog.at_level(logging.INFO):
        again, _ = mnist_classifier.train(num_steps=4, batch_size=16, workdir=str(tmp_path))
    assert "Resumed the MNIST classifier from step 4" in caplog.text
    assert "Compiling the train step" not in caplog.text
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="Fix: resume with those flags, or use a new --workdir"):
        mnist_classifier.train(num_steps=8, batch_size=16, workdir=str(tmp_path))
