"""Text conditioning built from a config: the frozen encoder, the training captions, prompts.

The boundary between config.model.text_* / config.data.captions and the typed pieces in text/
(encoders, caption sources, cached embeddings); the trainer, the samplers and the evaluators get
only arrays: the cond text fields {"tokens", "mask", "pooled"} and the null condition ∅ (the
empty caption's encoding).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import logging

import config_lib
import image_folder
import input_pipeline
from errors import UserError
from models import UNet, conditioning
from text import captions


def text_fields(model: UNet) -> tuple[str, ...]:
    """The text fields of cond that `model` reads ("tokens", "mask", "pooled")."""
    return tuple(f for f in model.cond_fields if f in conditioning.TEXT_FIELDS)


def cache_dir(workdir: str) -> str:
    return os.path.join(workdir, "text_cache")


def load_encoder(config: ml_collections.ConfigDict):
    """The frozen encoder of config.model.text_encoder (UserError when its files are absent)."""
    from text import encoders  # jax + flax + the weights: only for text models

    m = config.model
    return encoders.load_encoder(m.text_encoder, max_length=m.text_max_length,
                                 weights=m.text_weights)


def caption_source(config: ml_collections.ConfigDict,
                   source: input_pipeline.Source) -> captions.CaptionSource:
    """The captions of the training data (config.data.captions)."""
    if config.data.captions == "digits":
        if not isinstance(source, input_pipeline.ArraySource):
            raise UserError("data.captions='digits' needs the in-memory mnist_5k digits. Fix: "
                            "--config.data.name=mnist_5k.")
        return captions.DigitCaptionSource(source.images, source.labels)
    if config.data.captions == "dataset":  # one caption per example, the dataset's own
        if isinstance(source, image_folder.FolderSource) and source.captions is not None:
            return captions.FixedCaptionSource(source.captions)
        if isinstance(source, input_pipeline.TfdsSource) and config.data.caption_key:
            return captions.FixedCaptionSource(source.texts(config.data.caption_key))
    raise UserError(f"data.captions={config.data.captions!r} is not a caption source of "
                    f"data.name={config.data.name!r}. Fix: --config.data.captions=digits with "
                    f"data.name=mnist_5k, or dataset with a folder or a tfds "
                    f"data.caption_key.")


def training_batcher(config: ml_collections.ConfigDict, source: input_pipeline.Source,
                     model: UNet, workdir: str) -> captions.TextBatcher | None:
    """The text fields of each training batch (None for a model without text)."""
    fields = text_fields(model)
    if not config.model.text_encoder or not fields:
        return None
    encoder = load_encoder(config)
    batcher = captions.TextBatcher(caption_source(config, source), encoder, fields,
                                   cache_dir=cache_dir(workdir), log=logging.info)
    logging.info("Text: %s encoder, %d distinct captions (cached in %s), fields %s.",
                 encoder.name, len(batcher.source.vocabulary), cache_dir(workdir), fields)
    return batcher


def for_split(config: ml_collections.ConfigDict, text: captions.TextBatcher,
              split: str) -> captions.TextBatcher:
    """`text` (the training captions' batcher) for the examples of another split."""
    source = input_pipeline.from_config(config_lib.data_args(config), split)
    return text.with_source(caption_source(config, source))


def null_cond(config: ml_collections.ConfigDict, model: UNet) -> dict:
    """∅ of `model`: the null label and/or the empty caption's encoding."""
    text = None
    if text_fields(model):
        _, text = captions.prompt_cond(load_encoder(config), [], text_fields(model))
    return conditioning.null_cond(model.num_classes, text)


def shape_null(config: ml_collections.ConfigDict, model: UNet) -> dict:
    """A ∅ with the right shapes and zeros for values: enough to build the parameter tree."""
    from config_lib import text_widths

    width, pooled_width = text_widths(config)
    length = config.model.text_max_length
    text = {"tokens": np.zeros((length, width), np.float32), "mask": np.ones(length, bool),
            "pooled": np.zeros(pooled_width, np.float32)}
    return conditioning.null_cond(model.num_classes,
                                  {k: v for k, v in text.items() if k in model.cond_fields})


def prompt_cond(config: ml_collections.ConfigDict, model: UNet,
                prompts: list[str]) -> tuple[dict, dict]:
    """(cond text fields [N, ...] of the prompts, ∅) for a text model. Long prompts are cut to
    model.text_max_length tokens by the encoder, with a warning. Not cached: a few prompts
    encode in well under a second."""
    return captions.prompt_cond(load_encoder(config), prompts, text_fields(model))
