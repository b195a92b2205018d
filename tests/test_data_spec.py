"""The data spec: uint8 images <-> the model's space, and the shape of that space."""

import tracemalloc

import jax
import numpy as np
import pytest

import classifier_training
import config_lib
import data_spec
import input_pipeline
import train_lib
import training_loop
from configs import default, mnist, tiny
from images import ImageSpec

ALL_VALUES = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)


def test_encode_is_v_over_127_5_minus_1_in_float32():
    x = data_spec.encode_pixels(ALL_VALUES)
    assert x.dtype == np.float32 and x.shape == ALL_VALUES.shape
    v = ALL_VALUES.astype(np.float64)
    np.testing.assert_allclose(x, v / 127.5 - 1, rtol=0, atol=1.2e-7)  # float32 rounding
    assert (x.min(), x.max()) == (-1.0, 1.0)
    # Bit for bit the float32 arithmetic the trainer's batches were always computed with.
    np.testing.assert_array_equal(x, ALL_VALUES.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(input_pipeline.preprocess(ALL_VALUES, None), x)


def test_encode_then_decode_gives_every_value_back():
    spec = data_spec.DataSpec(ImageSpec(size=16, channels=1))
    assert spec.shape == ALL_VALUES.shape[1:]
    out = spec.decode(spec.encode(ALL_VALUES))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, ALL_VALUES)


def test_decode_rounds_and_clips():
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.001, 7.0, -np.inf, np.inf], np.float32)
    # (x + 1) · 127.5 = -255, 0, 63.75, 127.5, 191.25, 255, 255.1, 1020, -inf, inf
    np.testing.assert_array_equal(data_spec.decode_pixels(x),
                                  [0, 0, 64, 128, 191, 255, 255, 255, 0, 255])


def test_decode_is_the_formula_sample_files_were_written_with():
    x = np.random.default_rng(0).normal(0, 0.8, (4, 16, 16, 3))  # float64, beyond [-1, 1] too
    old = np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(data_spec.decode_pixels(x), old)


def test_encode_makes_one_float32_copy_and_no_batch_sized_temporaries():
    images = np.zeros((64, 64, 64, 4), np.uint8)  # 1 Mi values: 4 MiB as float32
    tracemalloc.start()
    x = data_spec.encode_pixels(images)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not np.shares_memory(x, images)
    # x / 127.5 - 1 written out would peak at two float32 copies (8 MiB).
    assert x.nbytes <= peak < 1.25 * x.nbytes, peak


@pytest.mark.parametrize("module, shape", [(default, (32, 32, 3)), (mnist, (28, 28, 1))])
def test_the_config_gives_the_spec(module, shape):
    data = config_lib.data_args(module.get_config())
    assert data.spec.shape == data.spec.image.shape == shape
    assert data.spec.image == ImageSpec(size=data.image_size, channels=data.num_channels)


def _scaled(images):
    """A stand-in for another model space (a latent autoencoder's): not the pixel map."""
    return np.asarray(images, np.float32) * 2.0 + 7.0


def test_the_trainers_batches_are_the_specs_encoding_of_the_flipped_pixels():
    source = input_pipeline.from_config(config_lib.data_args(mnist.get_config()), "train")
    sharding = jax.sharding.NamedSharding(training_loop.make_mesh(),
                                          jax.sharding.PartitionSpec(None, "data"))
    kw = dict(seed=3, batch_size=8, random_flip=True)
    got = training_loop.global_batches(source, 5, 2, sharding, encode=_scaled, **kw)
    pixels = training_loop.global_batches(source, 5, 2, sharding, **kw)
    for k, step in enumerate((5, 6)):
        indices = input_pipeline.global_batch_indices(3, step, 8, len(source))
        flip = np.random.default_rng([3, step, 1]).random(8) < 0.5
        assert flip.any() and not flip.all()
        images, _ = source.get(indices)
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        np.testing.assert_array_equal(np.asarray(got["image"])[k], _scaled(images))
        np.testing.assert_array_equal(np.asarray(pixels["image"])[k],
                                      data_spec.encode_pixels(images))


@pytest.mark.parametrize("trainer", ["diffusion", "classifier"])
def test_both_trainers_encode_with_the_configs_spec(trainer, tmp_path, monkeypatch):
    """train_lib and classifier_training hand the loop DataArgs.spec.encode (caught at
    training_loop.run, before anything compiles)."""
    seen = {}

    def run(task, *args, **kwargs):
        seen["encode"] = task.encode
        raise _Stop

    monkeypatch.setattr(training_loop, "run", run)
    config = tiny.get_config()
    with pytest.raises(_Stop):
        if trainer == "diffusion":
            train_lib.train(config, str(tmp_path))
        else:
            classifier_training.train_classifier(config, str(tmp_path))
    encode = seen["encode"]  # a bound method: compare its instance by value
    assert encode.__func__ is data_spec.DataSpec.encode
    assert encode.__self__ == config_lib.data_args(config).spec


class _Stop(Exception):
    pass
