"""Guidance: pure functions that steer a sampler toward a class y.

Classifier-free guidance (Ho & Salimans 2022), with ∅ the null label:

    ε̃(x_t, y) = (1 + w) ε(x_t, y) − w ε(x_t, ∅).

Classifier guidance (Dhariwal & Nichol 2021) with a noise-aware classifier p_φ(y | x_t, t), in
the two forms of their paper. Here g = s ∇ₓ log p_φ(y | x_t, t) is the *scaled* gradient (what
guided-diffusion's `cond_fn` returns):

    Algorithm 1 (ancestral):  μ̃ = μ_θ(x_t, t) + Σ_θ(x_t, t) g                  (`condition_mean`)
    Algorithm 2 (DDIM, any ε-based solver):  ε̃ = ε_θ(x_t, t) − √(1 − ᾱ_t) g   (`condition_eps`)

Algorithm 2 is exact score arithmetic: since ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t)
and ε = −√(1 − ᾱ_t) ∇ log p(x_t), the corrected ε̃ with s = 1 is the conditional ε. The same
identity shows that classifier-free guidance with weight w on exact networks equals classifier
guidance with scale w on the conditional model (or 1 + w on the unconditional one).
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion.gaussian import extract
from diffusion.schedules import Schedule


def classifier_free_guidance(
    cond: jnp.ndarray, uncond: jnp.ndarray, scale: float | jnp.ndarray
) -> jnp.ndarray:
    """(1 + w) cond − w uncond, elementwise. [B, ...]

    Linear in the network output, so it is the same combination for ε-, x0- and v-prediction
    (each is an affine function of ε given x_t).
    """
    return (1.0 + scale) * cond - scale * uncond


def condition_mean(
    mean: jnp.ndarray, variance: jnp.ndarray, cond_grad: jnp.ndarray
) -> jnp.ndarray:
    """Algorithm 1 of Dhariwal & Nichol: μ + Σ g with g = s ∇ₓ log p_φ(y | x_t). float32 [B, ...]"""
    return mean.astype(jnp.float32) + variance.astype(jnp.float32) * cond_grad.astype(jnp.float32)


def condition_eps(
    schedule: Schedule, eps: jnp.ndarray, t: jnp.ndarray, cond_grad: jnp.ndarray
) -> jnp.ndarray:
    """Algorithm 2 of Dhariwal & Nichol: ε − √(1 − ᾱ_t) g with g = s ∇ₓ log p_φ(y | x_t).

    t [B] indexes `schedule` (a respaced schedule keeps ᾱ of the original timestep).
    float32 [B, ...]
    """
    b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, eps.shape)
    return eps.astype(jnp.float32) - b * cond_grad.astype(jnp.float32)
