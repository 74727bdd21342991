"""The two training losses of the paper: embedding (eq. 1-2) and mask classification (3.4).

- `sampling`: labels at the heads' resolution, K points per instance;
- `embedding`: the pairwise embedding loss;
- `classification`: the seeds' targets, their cross-entropy, lambda's schedule;
- `instance_loss`: `InstanceLoss`, the total `L_e + lambda(step) * L_cls`.
"""

from instance_embed.losses.config import LossConfig
from instance_embed.losses.instance_loss import InstanceLoss, global_batch_mean, masked_mean

__all__ = ["InstanceLoss", "LossConfig", "global_batch_mean", "masked_mean"]
