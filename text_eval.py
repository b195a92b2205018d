"""`--mode=text_eval`: prompt adherence on held-out phrasings, per guidance scale.

Prompts come from text/digit_captions.py's "heldout" split: phrasings and synonyms never used in
training ("a sketch of a chunky left-inclined two"), cycling through all 90 meanings (10 digits
x thickness {unnamed, thin, thick} x slant {unnamed, left, right}). For each guidance scale w of
config.sample.sweep_scales, eval.text_num_prompts samples (one per prompt) are judged on what is
written to disk (uint8):

* digit accuracy and confidence by the offline MNIST classifier, background cleanliness, and
  MNIST-FID against the training digits (evaluation/digit_quality.py);
* thickness and slant agreement measured from the pixels, relative to the requested digit's
  class median (text/digit_captions.py), over the prompts that name the attribute: chance 50%;
  also split by the attribute's wording: a word no training caption has, or a training synonym.

A class-conditional model (no text) is evaluated on the same prompts through their labels: it
cannot express the attributes, and its agreement shows chance. Results go to
<workdir>/text_eval.json (a later sweep of the same checkpoint, sampler and prompts adds its scales
to the file) and TensorBoard (text_eval/...).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

import config_lib
import metric_logging
import sampling_lib
import text_conditioning
import train_lib
from diffusion import schedules
from evaluation import digit_quality, evaluator
from models import conditioning
from text import digit_captions


def text_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the latest checkpoint in workdir; returns what it writes to text_eval.json."""
    config_lib.validate(config, num_devices=jax.device_count())
    if config.data.name != "mnist_5k" or config.eval.feature_net != "mnist_classifier":
        raise config_lib.ConfigError(
            f"--mode=text_eval judges digits with the MNIST classifier; the config has "
            f"data.name={config.data.name!r}, eval.feature_net={config.eval.feature_net!r}. "
            f"Fix: use it on a model of configs/mnist_text.py or configs/mnist.py.")
    s, e = config.sample, config.eval
    if e.text_num_prompts < 2:
        raise config_lib.ConfigError(f"eval.text_num_prompts={e.text_num_prompts} must be >= 2 "
                                     f"(90 covers every meaning once). Fix: e.g. 450.")
    model, params, step = train_lib.restore_params(config, workdir, use_ema=s.use_ema)
    if not (text_conditioning.text_fields(model) or model.num_classes):
        raise config_lib.ConfigError(
            "--mode=text_eval needs a text- or class-conditional model; this one is "
            "unconditional. Fix: train configs/mnist_text.py.")
    prompts = digit_captions.eval_prompts(e.text_num_prompts, seed=e.seed, split="heldout")
    labels = prompts["label"]
    if text_conditioning.text_fields(model):
        cond, text_null = text_conditioning.prompt_cond(config, model, prompts["text"])
        cond = {**cond, **({"label": labels} if model.num_classes else {})}
        null = conditioning.null_cond(model.num_classes, text_null)
        conditioned_on = "text"
    else:
        cond, null, conditioned_on = {"label": labels}, None, "label (attributes unused)"

    schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    mesh = train_lib.make_mesh()
    eval_args, data = config_lib.eval_args(config), config_lib.data_args(config)
    net = evaluator.feature_net(eval_args, mesh)
    real = evaluator.reference_stats(eval_args, data, net, workdir)
    reference = digit_captions.mnist_5k_reference()
    requested = {a: prompts[a] for a in digit_captions.ATTRIBUTES}
    meaning = digit_captions.caption_meaning("heldout")
    novel = {a: meaning[f"novel_{a}"][prompts["caption"]] for a in digit_captions.ATTRIBUTES}
    result = {"step": step, "conditioned_on": conditioned_on, "prompts": "heldout",
              "num_prompts": len(labels), "sampler": s.sampler,
              "num_steps": s.num_steps or config.diffusion.num_timesteps, "seed": s.seed,
              "scales": {}}
    scalars = {}
    sampler = sampling_lib.make_sampler(config_lib.sample_args(config), model, schedule, mesh,
                                        image_shape=data.spec.shape, batch_size=s.batch_size,
                                        num_steps=s.num_steps, null=null)  # every w, one program
    for scale in s.sweep_scales:
        if scale > 0 and config.diffusion.p_uncond == 0:
            logging.warning("Skipping guidance scale %g: the model has no null condition.", scale)
            continue
        images = sampling_lib.sample_many(sampler, params, num_samples=len(labels), cond=cond,
                                          seed=s.seed, guidance_scale=scale)
        uint8 = data.spec.decode(images)
        row = digit_quality.judge(net, uint8, labels, real=real)
        row.update(digit_captions.attribute_agreement(uint8, labels, requested, reference))
        row.update(_by_wording(uint8, labels, requested, novel, reference))
        result["scales"][f"{scale:g}"] = row
        scalars.update({f"text_eval/{k}_w{scale:g}": v for k, v in row.items()})
        logging.info("text_eval w=%g: %s", scale, ", ".join(f"{k} {v:.3f}" for k, v in
                                                           row.items()))
    path = os.path.join(workdir, "text_eval.json")
    result = merge_scales(_read_json(path), result)
    metric_logging.write_json(path, result)
    writer = metric_logging.Writer(workdir, enabled=metric_logging.writes_files())
    writer.scalars(step, scalars)
    writer.close()
    return result


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def merge_scales(previous: dict | None, result: dict) -> dict:
    """result, keeping the scales of `previous` (an earlier text_eval.json) that it did not
    evaluate when both judged the same checkpoint the same way: a second sweep with other
    sample.sweep_scales adds to the file instead of replacing it. Otherwise result alone."""
    same = ("step", "conditioned_on", "prompts", "num_prompts", "sampler", "num_steps", "seed")
    if not previous or any(previous.get(k) != result[k] for k in same):
        return result
    scales = {**previous.get("scales", {}), **result["scales"]}
    return {**result, "scales": dict(sorted(scales.items(), key=lambda kv: float(kv[0])))}


def _by_wording(images, labels, requested: dict, novel: dict, reference) -> dict[str, float]:
    """Attribute agreement split by the attribute's wording: a word never seen in training
    ("chunky", "tipped") or one of the training synonyms in a held-out phrasing."""
    out = {}
    for a in digit_captions.ATTRIBUTES:
        for name, subset in (("new_word", novel[a]), ("train_word", ~novel[a])):
            masked = {b: np.where(subset, requested[b], digit_captions.NONE) if b == a
                      else np.full_like(requested[b], digit_captions.NONE) for b in requested}
            out[f"{a}_{name}"] = digit_captions.attribute_agreement(
                images, labels, masked, reference)[a]
    return out
