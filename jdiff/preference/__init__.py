"""Preference and reward fine-tuning: Diffusion-DPO (sigmoid, hinge, IPO), MaPO,
Diffusion-KTO, trajectory log-probabilities with D3PO / SPO / DDPO, reward
backpropagation (DRaFT-K / AlignProp, DRaFT-LV, Adjoint), LoRA and partial fine-tuning,
and preference data.

Every loss is a pure function of per-sample quantities computed with the policy and a
frozen reference (:mod:`jdiff.preference._losses`); :func:`make_preference_loss` makes a
``loss_fn(params, batch, keys, frozen=...)`` for :mod:`jdiff.train`, whose train step
holds the reference as frozen parameters, replicated on the mesh and never updated.
"""

from jdiff.preference._data import (
    LabelledSamples,
    PreferencePairs,
    check_labelled,
    check_pairs,
    generate_pairs,
    pairs_from_rewards,
    preference_loader,
)
from jdiff.preference._lora import (
    lora_init,
    lora_merge,
    lora_model,
    lora_targets,
    param_labels,
    partial_optimizer,
)
from jdiff.preference._losses import (
    DPO_KINDS,
    d3po_loss,
    ddpo_loss,
    diffusion_dpo_loss,
    kto_loss,
    mapo_loss,
    normalize_advantages,
    per_sample_error,
    spo_loss,
    stepwise_dpo_loss,
)
from jdiff.preference._objective import METHODS, denoising_errors, make_preference_loss
from jdiff.preference._reward import draft_lv_loss, reward_loss
from jdiff.preference._trajectory import gaussian_log_prob, trajectory_log_probs, transition_log_prob

__all__ = [
    "DPO_KINDS",
    "METHODS",
    "PreferencePairs",
    "LabelledSamples",
    "check_pairs",
    "check_labelled",
    "preference_loader",
    "pairs_from_rewards",
    "generate_pairs",
    "per_sample_error",
    "diffusion_dpo_loss",
    "mapo_loss",
    "kto_loss",
    "stepwise_dpo_loss",
    "d3po_loss",
    "spo_loss",
    "ddpo_loss",
    "normalize_advantages",
    "make_preference_loss",
    "denoising_errors",
    "gaussian_log_prob",
    "transition_log_prob",
    "trajectory_log_probs",
    "reward_loss",
    "draft_lv_loss",
    "lora_targets",
    "lora_init",
    "lora_merge",
    "lora_model",
    "param_labels",
    "partial_optimizer",
]
