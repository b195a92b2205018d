"""Networks: the DDPM UNet eps_theta(x_t, t) and the noise-aware classifier p_phi(y | x_t, t)."""

from models.classifier import NoisyClassifier, classifier_log_prob_grad
from models.unet import UNet

__all__ = ["NoisyClassifier", "UNet", "classifier_log_prob_grad"]
