"""`--mode=sample` and `--mode=guidance_sweep`: images from the latest checkpoint.

sample: config.sample.num_samples images (labels from config.sample.labels), with classifier-free
guidance (sample.guidance_scale) and/or classifier guidance (sample.classifier_scale, classifier
from --mode=train_classifier), written as a PNG grid and an .npz of uint8 images in the workdir.

guidance_sweep: sample.sweep_per_class samples of every class at each CFG scale of
sample.sweep_scales, classified by the offline MNIST classifier (evaluation.mnist_classifier);
the accuracy per scale goes to <workdir>/guidance_sweep.json.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import classifier_training
import config_compat
import config_lib
import metric_logging
import sampling_lib
import text_conditioning
import train_lib
from data_spec import encode_pixels
from diffusion import schedules
from models import conditioning
from text import captions


def _setup(config: ml_collections.ConfigDict, workdir: str):
    """(model, params, step, schedule, mesh) of the latest checkpoint."""
    model, params, step = train_lib.restore_params(config, workdir, use_ema=config.sample.use_ema)
    schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    return model, params, step, schedule, train_lib.make_mesh()


def _prompt_rows(prompts: list[str], num_samples: int) -> list[str]:
    """The prompt of each of num_samples images: one block (a grid row when it divides evenly)
    per prompt, in order."""
    return [prompts[i * len(prompts) // num_samples] for i in range(num_samples)]


def generate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples config.sample.num_samples images; one grid row per class (or prompt) by default.
    The model and diffusion settings are those the checkpoint was trained with (config_compat).

    Text models take sample.prompt or the lines of sample.prompts; sample.unconditional=True
    samples every image with the null condition ∅ (the null label, the empty caption)."""
    config = config_compat.trained_config(config, workdir)
    s = config.sample
    model, params, step, schedule, mesh = _setup(config, workdir)
    text = text_conditioning.text_fields(model)
    if text and not (s.prompt or s.prompts or s.unconditional):
        raise config_lib.ConfigError(
            "This model is conditioned on text: say what to draw. Fix: "
            "--config.sample.prompt='a thick seven', --config.sample.prompts=FILE (one prompt "
            "per line), or --config.sample.unconditional=True.")
    classifier = classifier_params = None
    num_classes = model.num_classes
    if s.classifier_scale > 0:
        classifier, classifier_params, classifier_step = classifier_training.restore_classifier(
            config, workdir)
        num_classes = classifier.num_classes
        logging.info("Classifier guidance: scale %g, classifier step %d.", s.classifier_scale,
                     classifier_step)
    labels = sampling_lib.parse_labels(s.labels, s.num_samples, num_classes)
    if s.unconditional and model.num_classes:
        labels = np.full(s.num_samples, model.num_classes, np.int32)  # the null label
    cond = {} if labels is None else {"label": labels}
    prompts = null = None
    if text:
        prompts = [""] if s.unconditional else captions.read_prompts(s.prompt, s.prompts)
        prompts = _prompt_rows(prompts, s.num_samples)
        text_cond, text_null = text_conditioning.prompt_cond(config, model, prompts)
        cond.update(text_cond)
        null = conditioning.null_cond(model.num_classes, text_null)
    data = config_lib.data_args(config)
    sampler = sampling_lib.make_sampler(config_lib.sample_args(config), model, schedule, mesh,
                                        image_shape=data.spec.shape,
                                        batch_size=s.batch_size, num_steps=s.num_steps,
                                        classifier=classifier, null=null)
    logging.info("Sampling %d images from step %d: %s, %d steps (%d network evaluations), "
                 "guidance %g%s.", s.num_samples, step, s.sampler, sampler.num_steps,
                 sampler.spec.model_evaluations(schedule.num_timesteps), s.guidance_scale,
                 ", unconditional (∅)" if s.unconditional else "")
    images = sampling_lib.sample_many(sampler, params, num_samples=s.num_samples,
                                      cond=cond or None, seed=s.seed,
                                      classifier_params=classifier_params)
    name = f"samples_step{step}_{s.sampler}{sampler.num_steps}_w{s.guidance_scale:g}"
    if s.classifier_scale > 0:
        name += f"_s{s.classifier_scale:g}"
    if s.unconditional:
        name += "_uncond"
    if prompts:  # a row per prompt; one prompt: a square grid
        groups = len(set(prompts)) if len(set(prompts)) > 1 else 0
    else:
        groups = 0 if s.labels.strip() or s.unconditional else num_classes
    ncols = sampling_lib.grid_columns(s.num_samples, groups)
    paths = sampling_lib.write_samples(workdir, images, labels, ncols, name=name,
                                       prompts=prompts, decode=data.spec.decode)
    if metric_logging.writes_files():
        logging.info("Wrote %s and %s", paths["png"], paths["npz"])
    return paths


def guidance_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """CFG accuracy on MNIST: per scale w, the fraction of samples of class y that the offline
    MNIST classifier labels y. Writes and returns <workdir>/guidance_sweep.json's content."""
    # Imported here: only this mode needs the evaluation package and its weights.
    from evaluation import mnist_classifier

    config = config_compat.trained_config(config, workdir)  # the settings it was trained with
    s = config.sample
    if not (config.model.num_classes and config.diffusion.p_uncond > 0):
        raise config_lib.ConfigError(
            f"--mode=guidance_sweep compares classifier-free guidance scales, which needs a model "
            f"trained with the null label, but the model in {workdir} was trained with "
            f"model.num_classes={config.model.num_classes}, diffusion.p_uncond="
            f"{config.diffusion.p_uncond}. Fix: train one with model.num_classes > 0 and "
            f"--config.diffusion.p_uncond=0.1 (configs/mnist.py), in a new --workdir.")
    data = config_lib.data_args(config)
    shape, num_classes = data.spec.image.shape, mnist_classifier.NUM_CLASSES
    if shape != mnist_classifier.IMAGE_SHAPE or config.model.num_classes != num_classes:
        raise config_lib.ConfigError(
            f"--mode=guidance_sweep judges samples with the MNIST digit classifier, which needs "
            f"28x28x1 images of {num_classes} classes; the config has {shape} and "
            f"model.num_classes={config.model.num_classes}.")
    model, params, step, schedule, mesh = _setup(config, workdir)
    apply_fn, classifier_params = mnist_classifier.load_classifier()
    classify = jax.jit(lambda images: jnp.argmax(apply_fn(classifier_params, images), -1))

    labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), s.sweep_per_class)
    result = {"step": step, "sampler": s.sampler, "num_steps": s.num_steps or
              config.diffusion.num_timesteps, "per_class": s.sweep_per_class, "seed": s.seed,
              "accuracy": {}, "accuracy_per_class": {}}
    sampler = sampling_lib.make_sampler(config_lib.sample_args(config), model, schedule, mesh,
                                        image_shape=data.spec.shape, batch_size=s.batch_size,
                                        num_steps=s.num_steps)  # one program for every w != 0
    for scale in s.sweep_scales:
        images = sampling_lib.sample_many(sampler, params, num_samples=len(labels),
                                          cond={"label": labels}, seed=s.seed,
                                          guidance_scale=scale)
        # Judge what is written to disk: the uint8 images, encoded as the classifier takes them.
        quantised = encode_pixels(data.spec.decode(images))
        predicted = np.concatenate([np.asarray(classify(quantised[i:i + s.batch_size]))
                                    for i in range(0, len(quantised), s.batch_size)])
        correct = predicted == labels
        result["accuracy"][f"{scale:g}"] = float(correct.mean())
        result["accuracy_per_class"][f"{scale:g}"] = [
            float(correct[labels == c].mean()) for c in range(model.num_classes)]
        logging.info("guidance scale %g: MNIST-classifier accuracy %.4f", scale,
                     correct.mean())
    metric_logging.write_json(os.path.join(workdir, "guidance_sweep.json"), result)
    return result
