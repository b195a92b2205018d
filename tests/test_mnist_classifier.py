"""The committed MNIST classifier (evaluation/mnist_classifier.py): accuracy, API, training."""

import jax.numpy as jnp
import numpy as np
import pytest

import input_pipeline
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
