"""`--mode=sample`: images from the latest checkpoint, as a PNG grid and an .npz of uint8."""

import jax
import ml_collections
from absl import logging

import sampling_lib
import train_lib
from diffusion import schedules


def generate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples config.sample.num_samples images; one grid row per class when conditional."""
    s = config.sample
    model, params, step = train_lib.restore_params(config, workdir, use_ema=s.use_ema)
    schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    sampler = sampling_lib.sampler_from_config(
        config, model, schedule, train_lib.make_mesh(), batch_size=s.batch_size,
        num_steps=s.num_steps)
    labels = sampling_lib.grid_labels(s.num_samples, model.num_classes)
    logging.info("Sampling %d images from step %d: %s, %s steps, guidance %.2f.",
                 s.num_samples, step, s.sampler, s.num_steps or config.diffusion.num_timesteps,
                 s.guidance_scale)
    images = sampling_lib.sample_many(sampler, params, num_samples=s.num_samples, labels=labels,
                                      seed=s.seed)
    paths = sampling_lib.write_samples(
        workdir, images, labels, sampling_lib.grid_columns(s.num_samples, model.num_classes),
        name=f"samples_step{step}_{s.sampler}{s.num_steps or ''}_w{s.guidance_scale:g}")
    if jax.process_index() == 0:
        logging.info("Wrote %s and %s", paths["png"], paths["npz"])
    return paths
