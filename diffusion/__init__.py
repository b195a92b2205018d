"""DDPM mathematics as pure, jit-able JAX functions over a frozen `Schedule` pytree.

Modules: `schedules` (β schedules, `Schedule`, respacing), `gaussian` (forward process,
posterior, reverse-process parameters), `losses` (training losses, variational bound in bits/dim),
`samplers` (ancestral and DDIM steps, the sampling loop). Use them as
`from diffusion import schedules, gaussian, losses, samplers`; the most used names are also
re-exported here.
"""

from diffusion import gaussian, losses, samplers, schedules
from diffusion.gaussian import (
    PREDICTIONS,
    VAR_TYPES,
    PMeanVar,
    extract,
    get_v,
    p_mean_variance,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_and_eps,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from diffusion.losses import (
    LOSS_TYPES,
    WEIGHTINGS,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    snr,
    training_losses,
    vlb_terms,
)
from diffusion.samplers import SAMPLERS, ddim_step, p_sample, sample
from diffusion.schedules import (
    SCHEDULES,
    Schedule,
    get_betas,
    make_schedule,
    respace_betas,
    respace_schedule,
    schedule_from_name,
    space_timesteps,
)

__all__ = [
    "LOSS_TYPES",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "VAR_TYPES",
    "WEIGHTINGS",
    "PMeanVar",
    "Schedule",
    "approx_standard_normal_cdf",
    "ddim_step",
    "discretized_gaussian_log_likelihood",
    "extract",
    "gaussian",
    "get_betas",
    "get_v",
    "losses",
    "make_schedule",
    "normal_kl",
    "p_mean_variance",
    "p_sample",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_and_eps",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respace_betas",
    "respace_schedule",
    "sample",
    "samplers",
    "schedule_from_name",
    "schedules",
    "snr",
    "space_timesteps",
    "training_losses",
    "vlb_terms",
]
