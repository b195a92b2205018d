"""`--mode=eval`: the variational bound in bits/dim and FID/KID/IS of the latest checkpoint.

    python main.py --config=configs/cifar.py --workdir=DIR --mode=eval
    python main.py --config=configs/mnist.py --workdir=DIR --mode=eval \
        --config.eval.feature_net=mnist_classifier --config.eval.fid_num_samples=5000

1. The bound (eval.bpd): L_T + Σ_t L_t + L_0 over all T timesteps on data.eval_split, EMA
   parameters by default (evaluation/likelihood.py), with the per-term and per-range breakdown.
2. Sample quality (eval.fid_num_samples > 0): that many samples from config.sample's sampler,
   streamed through the feature network (eval.feature_net) against cached statistics of the real
   eval.fid_ref_split images (evaluation/sample_quality.py).

Results go to workdir/eval/eval_step<step>.json and to TensorBoard under eval/ (process 0).
"""

import os

import jax
import ml_collections
from absl import logging

import config_compat
import config_lib
import input_pipeline
import metric_logging
import sampling_lib
import text_conditioning
import train_lib
from diffusion import schedules
from evaluation import evaluator, likelihood, sample_quality
from models import conditioning


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the latest checkpoint in workdir; returns what it writes to the JSON file.
    The model and diffusion settings are those it was trained with (config_compat)."""
    config = config_compat.trained_config(config, workdir)
    config_lib.validate(config, num_devices=jax.device_count(), evaluating=True)
    e, data = config_lib.eval_args(config), config_lib.data_args(config)
    diffusion, s = config_lib.diffusion_args(config), config_lib.sample_args(config)
    mesh = train_lib.make_mesh()
    net = None
    if e.fid_num_samples:  # fail on missing feature weights before restoring anything
        net = evaluator.feature_net(e, mesh)
    model, params, step = train_lib.restore_params(config, workdir, use_ema=e.use_ema)
    schedule = schedules.schedule_from_name(diffusion.schedule, diffusion.num_timesteps)
    results: dict = {"step": step, "params": "ema" if e.use_ema else "raw",
                     "dataset": data.name}
    # Text models: the training captions' embeddings (cached by the trainer) and ∅.
    train_source = input_pipeline.from_config(data, data.split)
    text = text_conditioning.training_batcher(config, train_source, model, workdir)
    null = conditioning.null_cond(model.num_classes, text.null if text else None)
    eval_text = text_conditioning.for_split(config, text, data.eval_split) if text else None
    bound_cond, fid_cond = evaluator.text_cond_fns(model, text, eval_text, train_source, e.seed)

    if e.bpd:
        source = evaluator.eval_source(data)
        n = len(source) if not e.bpd_num_examples else min(e.bpd_num_examples, len(source))
        logging.info("Bound on %d %s/%s examples, %d timesteps, %s params.", n,
                     data.name, data.eval_split, schedule.num_timesteps, results["params"])
        bound = likelihood.bound_on_dataset(
            evaluator.bound_evaluator(e, diffusion, model, schedule, mesh, null), params,
            likelihood.dataset_batches(source, batch_size=e.batch_size, num_examples=n,
                                       cond_fn=bound_cond),
            num_batches=-(-n // e.batch_size), seed=e.seed, t_chunk=e.bpd_t_chunk,
            log=logging.info)
        results["bpd"] = {"split": data.eval_split, "condition": e.bpd_condition,
                          "dequantization": "uint8 v -> v/127.5 - 1; discretized Gaussian L_0",
                          **bound.to_json()}
        logging.info("Bound: %.4f ± %.4f bits/dim (L_T %.5f, L_0 %.4f, Σ L_t %.4f)",
                     bound.total, bound.total_stderr, bound.prior, bound.decoder, bound.kl_sum)
        scalars = bound.scalars("eval/")
    else:
        scalars = {}

    if e.fid_num_samples:
        real = evaluator.reference_stats(e, data, net, workdir)
        num_steps = s.spec.num_steps or diffusion.num_timesteps
        sampler = sampling_lib.make_sampler(s, model, schedule, mesh,
                                            image_shape=data.spec.shape,
                                            batch_size=s.batch_size,
                                            num_steps=s.spec.num_steps or 0, null=null)
        logging.info("%s of %d samples (%s, %s steps, guidance %g) vs %d %s/%s images.",
                     net.metric("FID"), e.fid_num_samples, s.spec.sampler, num_steps,
                     s.guidance_scale, real.count, data.name, e.fid_ref_split)
        fake = sample_quality.sample_stats(
            net, sampler, params, decode=data.spec.decode, num_samples=e.fid_num_samples,
            num_classes=model.num_classes, seed=e.seed, num_splits=e.is_splits,
            kid_max_features=e.kid_max_features, log=logging.info, cond_fn=fid_cond)
        metrics = evaluator.compare(e, net, real, fake)
        results["sample_quality"] = {
            "feature_net": net.name, "note": net.note, "num_samples": e.fid_num_samples,
            "reference": {"split": e.fid_ref_split, "count": real.count,
                          net.metric("IS"): real.is_mean},
            "sampler": s.spec.sampler, "num_steps": num_steps,
            "guidance_scale": s.guidance_scale, **metrics}
        logging.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        scalars.update({f"eval/{k}": v for k, v in metrics.items()})

    path = metric_logging.write_json(os.path.join(workdir, "eval", f"eval_step{step}.json"),
                                     results)
    if metric_logging.writes_files():
        logging.info("Wrote %s", path)
    writer = metric_logging.Writer(workdir, enabled=metric_logging.writes_files())
    writer.scalars(step, scalars)
    writer.close()
    return results
