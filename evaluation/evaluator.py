"""Evaluation pieces built from typed arguments, and the periodic estimates of training.

The modes (evaluate.py, text_eval.py, train_lib.py) build the typed arguments (run_args: eval,
data, diffusion, sample) from the config and call these. `PeriodicEvaluator` is what the trainer
calls: every eval.bpd_every steps a cheap, unbiased estimate of the bound
(eval.bpd_estimate_batches fixed eval batches, t = 0 plus one timestep per stratum) and every
eval.fid_every steps a small-sample FID (eval.fid_every_num_samples samples, respaced to
train.sample_num_steps steps; biased upwards compared with 50k samples). Their TensorBoard names
say so: eval/bpd_estimate, eval/<FID name>_<N>samples.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

import input_pipeline
import metric_logging
import sampling_lib
from diffusion.schedules import Schedule
from evaluation import fid, likelihood, sample_quality
from models import UNet, conditioning
from run_args import DataArgs, DiffusionArgs, EvalArgs, SampleArgs


def bound_model_fn(model: UNet, condition: str, null: dict | None = None) -> likelihood.ModelFn:
    """The UNet as model_fn(params, x_t, t, cond); conditional models see the data's condition
    (condition "label": the bound on −log p(x | c)) or the null condition ∅ ("null": −log p(x)).
    null: ∅ (`conditioning.null_cond`), default the null label."""
    null = conditioning.null_cond(model.num_classes) if null is None else null

    def model_fn(params, x_t, t, cond):
        cond = conditioning.select(cond, model.cond_fields)
        if cond and condition == "null":
            cond = conditioning.uncond_like(cond, null)
        return model.apply({"params": params}, x_t, t, cond, train=False)

    return model_fn


def bound_evaluator(e: EvalArgs, diffusion: DiffusionArgs, model: UNet, schedule: Schedule,
                    mesh: jax.sharding.Mesh, null: dict | None = None
                    ) -> likelihood.BoundEvaluator:
    return likelihood.BoundEvaluator(
        bound_model_fn(model, e.bpd_condition, null), schedule, mesh,
        prediction=diffusion.prediction, var_type=diffusion.var_type)


def text_cond_fns(model: UNet, text, eval_text, train_source: input_pipeline.Source, seed: int):
    """(bound cond_fn, FID cond_fn) of a text model (None, None without text): the bound sees
    each eval example's caption (`eval_text`: the TextBatcher of the eval split), chosen per
    (seed, batch); FID samples are drawn for the captions (and labels) of training examples
    (`text`, `train_source`) in a seeded random order, so they follow the data's distribution
    of captions."""
    if text is None:
        return None, None
    order = np.random.default_rng(seed).permutation(len(text.source))

    def bound_cond(indices, labels, batch):
        return {"label": labels, **eval_text(indices, seed=seed, step=batch)}

    def fid_cond(start, n):
        indices = order[(start + np.arange(n)) % len(order)]
        cond = text(indices, seed=seed, step=start)
        if model.num_classes:
            cond["label"] = train_source.get(indices)[1].astype(np.int32)
        return cond

    return bound_cond, fid_cond


def eval_source(data: DataArgs) -> input_pipeline.Source:
    return input_pipeline.from_config(data, data.eval_split)


def feature_net(e: EvalArgs, mesh: jax.sharding.Mesh) -> sample_quality.FeatureNet:
    return sample_quality.make_feature_net(e.feature_net, batch_size=e.batch_size, mesh=mesh,
                                           inception_weights=e.inception_weights)


def reference_stats(e: EvalArgs, data: DataArgs, net: sample_quality.FeatureNet,
                    workdir: str) -> fid.Stats:
    """Cached statistics of the real eval.fid_ref_split images, in workdir/eval."""
    source = input_pipeline.from_config(data, e.fid_ref_split)
    return sample_quality.reference_stats(
        net, source, cache_dir=os.path.join(workdir, "eval"), dataset=data.name,
        split=e.fid_ref_split, num_examples=e.fid_ref_num_examples, num_splits=e.is_splits,
        kid_max_features=e.kid_max_features)


def compare(e: EvalArgs, net: sample_quality.FeatureNet, real: fid.Stats,
            fake: fid.Stats) -> dict[str, float]:
    """{"FID": .., "KID": .., "KID_std": .., "IS": .., "IS_std": ..}, MNIST- prefixed for the
    MNIST classifier."""
    metrics = fid.compare(real, fake, kid_num_subsets=e.kid_num_subsets,
                          kid_subset_size=e.kid_subset_size, seed=e.seed)
    return sample_quality.named_metrics(net, metrics)


class PeriodicEvaluator:
    """Called by the trainer after every update; returns the scalars due at this step."""

    def __init__(self, e: EvalArgs, data: DataArgs, diffusion: DiffusionArgs, model: UNet,
                 schedule: Schedule, mesh: jax.sharding.Mesh, workdir: str, *,
                 sample: SampleArgs, sample_num_steps: int, train_source: input_pipeline.Source,
                 text=None, eval_text=None, null: dict | None = None):
        """FID samples: `sample`'s sampler respaced to sample_num_steps. text, eval_text: the
        trainer's TextBatchers of a text model (training and eval split); null: its ∅."""
        self._e, self._data, self._model, self._mesh, self._workdir = (
            e, data, model, mesh, workdir)
        self.bpd_every, self.fid_every = e.bpd_every, e.fid_every
        self._bound = self._batches = None
        bound_cond, self._fid_cond = text_cond_fns(model, text, eval_text, train_source, e.seed)
        if self.bpd_every:
            self._bound = bound_evaluator(e, diffusion, model, schedule, mesh, null)
            source = eval_source(data)
            self._batches = list(likelihood.dataset_batches(
                source, batch_size=e.batch_size,
                num_examples=min(len(source), e.bpd_estimate_batches * e.batch_size),
                cond_fn=bound_cond))
        self._sampler = self._net = self._real = None
        if self.fid_every:
            self._sampler = sampling_lib.make_sampler(
                sample, model, schedule, mesh, image_shape=data.spec.shape,
                batch_size=sample.batch_size, num_steps=sample_num_steps, null=null)

    def due(self, step: int) -> bool:
        return bool((self.bpd_every and step % self.bpd_every == 0)
                    or (self.fid_every and step % self.fid_every == 0))

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        """eval/ scalars for this step ({} when nothing is due)."""
        out = {}
        e = self._e
        if self.bpd_every and step % self.bpd_every == 0:
            result = likelihood.bound_on_dataset(
                self._bound, params, self._batches, num_batches=len(self._batches),
                seed=int(np.uint32(step)), estimate_timesteps=e.bpd_estimate_timesteps)
            out["eval/bpd_estimate"] = result.total
            out["eval/bpd_estimate_stderr"] = result.total_stderr
            metric_logging.log_line(f"step {step}: bound estimate {result.total:.4f} ± "
                                    f"{result.total_stderr:.4f} bits/dim")
        if self.fid_every and step % self.fid_every == 0:
            if self._net is None:  # loaded on first use: the weights and the reference data
                self._net = feature_net(e, self._mesh)
                self._real = reference_stats(e, self._data, self._net, self._workdir)
            fake = sample_quality.sample_stats(
                self._net, self._sampler, params, decode=self._data.spec.decode,
                num_samples=e.fid_every_num_samples,
                num_classes=self._model.num_classes, seed=step, num_splits=e.is_splits,
                kid_max_features=e.kid_max_features, cond_fn=self._fid_cond)
            metrics = compare(e, self._net, self._real, fake)
            n = e.fid_every_num_samples
            out.update({f"eval/{k}_{n}samples": v for k, v in metrics.items()})
            metric_logging.log_line(f"step {step}: {self._net.metric('FID')} from {n} samples "
                                    f"{metrics[self._net.metric('FID')]:.3f}")
        return out
