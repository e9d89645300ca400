"""The DPO objective as PIVOT ran it: sigmoid loss on summed response log-probs, frozen reference.

Rafailov et al. (2023), eq. 7: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``; the
implicit rewards ``beta * (pi - ref)`` are what the logs report (TRL's naming). An optional SFT
term on the chosen answer is added with its own weight; the paper used none (weight 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, sft_loss: torch.Tensor | None = None,
             sft_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Mean sigmoid-DPO loss over pairs, with the rewards, reward accuracy and margin of the batch.

    All four log-prob tensors are (B,) sums over response tokens. ``sft_loss`` is only used (and
    only needed) when ``sft_weight`` is non-zero, so a pure DPO run carries no SFT term at all.
    """
    if sft_weight and sft_loss is None:
        raise ValueError("sft_weight > 0 needs sft_loss")
    chosen_rewards = beta * (policy_chosen - ref_chosen.detach())
    rejected_rewards = beta * (policy_rejected - ref_rejected.detach())
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    if sft_weight:
        loss = loss + sft_weight * sft_loss
    return {"loss": loss, "chosen_rewards": chosen_rewards.detach(), "rejected_rewards": rejected_rewards.detach(),
            "reward_accuracy": (margins > 0).float().mean().detach(), "margin": margins.mean().detach()}
