"""Tensor ops of the paper's method, shared by training and inference.

- `geometry`: embedding distances and similarity thresholds (paper 3.3);
- `seeds`: seediness and the greedy, diverse seed selection (paper 3.3-3.4);
- `masks`: masks grown from seeds, their classes and scores, duplicate suppression,
  boxes around masks;
- `upsampling`: heads-resolution masks drawn at the image's resolution (bilinear), their
  boxes and the instance map;
- `bilateral`: the same drawn along the image's colour edges (joint bilateral);
- `checks`: argument checks that name the argument.
"""

from instance_embed.ops.masks import grow_masks, mask_boxes, seed_classes_and_scores
from instance_embed.ops.masks import suppress_duplicates
from instance_embed.ops.seeds import PassSizes, seediness, select_seeds

__all__ = [
    "PassSizes",
    "grow_masks",
    "mask_boxes",
    "seed_classes_and_scores",
    "seediness",
    "select_seeds",
    "suppress_duplicates",
]
