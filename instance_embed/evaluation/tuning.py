"""Inference settings tuned on a split, with the network run once per image.

    cached = CachedNetwork(inference.network_function(model), examples)
    best, trials = tune_inference(cached, examples, class_names, taus, config.inference)

The post-processing (seeds, masks, suppression, scores) is re-run for every setting on
the stored network outputs, so a search costs post-processing only. `tune_inference`
is a coordinate search: one setting at a time over its candidate values, keeping the
best mAP^r@0.5 (ties broken by mAP^r@0.7, then by the earlier setting), until a whole
round changes nothing. Tune on a validation split and report on another.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import tensorflow as tf

from instance_embed.evaluation.evaluator import InstanceEvaluator
from instance_embed.evaluation.runner import evaluate
from instance_embed.inference import InferenceConfig
from instance_embed.inference import pad_images
from instance_embed.inference import predict_from_outputs
from instance_embed.inference import run_network

# Candidate values of each tuned InferenceConfig field, searched in this order.
SEARCH_SPACE: Mapping[str, tuple] = {
    "alpha": (0.1, 0.2, 0.3, 0.5),
    "nms_iou_threshold": (None, 0.3, 0.5, 0.7),
    "support_rescoring": (0.0, 4.0, 8.0, 16.0),
    "score_threshold": (0.0, 0.05, 0.1, 0.2),
}


class CachedNetwork:
    """The network's outputs for every example of a split, and inference on them.

    Args:
      network: float32 `[B, Hp, Wp, 3]` -> dict with `embeddings` and `class_logits`
        (e.g. `inference.network_function(model)`).
      examples: contract examples.
      flip_tta: store the flip-averaged class maps (`InferenceConfig.flip_tta`); the
        settings evaluated later must agree.
    """

    def __init__(self, network, examples: tf.data.Dataset, flip_tta: bool = False):
        self.flip_tta = flip_tta
        self._outputs = {}
        for example in examples:
            image = example["image"][tf.newaxis]
            padded = pad_images(tf.cast(image, tf.float32))
            self._outputs[_key(image)] = (run_network(network, padded, flip_tta),
                                          tf.shape(image)[1:3], tf.shape(padded)[1:3], padded)

    def __len__(self) -> int:
        return len(self._outputs)

    def evaluate(self, examples: tf.data.Dataset, class_names: Sequence[str],
                 taus: Sequence[float], config: InferenceConfig) -> InstanceEvaluator:
        """The split evaluated with inference settings `config`."""
        if config.flip_tta != self.flip_tta:
            raise ValueError(f"InferenceConfig.flip_tta={config.flip_tta}, but the network "
                             f"outputs were stored with flip_tta={self.flip_tta}")

        @tf.function(reduce_retracing=True)
        def detect(outputs, image_size, padded_size, padded):
            return predict_from_outputs(outputs, image_size, padded_size, taus, config,
                                        padded)

        return evaluate(lambda images: detect(*self._outputs[_key(images)]), examples,
                        class_names, progress=False)


def _key(image: tf.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def tune_inference(cached: CachedNetwork, examples: tf.data.Dataset,
                   class_names: Sequence[str], taus: Sequence[float], base: InferenceConfig,
                   space: Mapping[str, Sequence] = SEARCH_SPACE, max_rounds: int = 3
                   ) -> tuple[InferenceConfig, list[dict]]:
    """Coordinate search of `space` from `base` (see the module docstring).

    Settings that are invalid together (support rescoring without suppression) are
    skipped.

    Returns:
      (the best settings, every setting tried in order: its `space` fields and its
      "mAP_r@0.5", "mAP_r@0.7", "coco_mask_AP", as fractions).
    """
    trials: dict[tuple, dict] = {}

    def score(config: InferenceConfig) -> tuple[float, float]:
        key = dataclasses.astuple(config)
        if key not in trials:
            result = cached.evaluate(examples, class_names, taus, config).result()
            trials[key] = {**{field: getattr(config, field) for field in space},
                           **{m: result[m] for m in ("mAP_r@0.5", "mAP_r@0.7",
                                                     "coco_mask_AP")}}
        row = trials[key]
        return row["mAP_r@0.5"], row["mAP_r@0.7"]

    best, best_score = base, score(base)
    for _ in range(max_rounds):
        changed = False
        for field, values in space.items():
            for value in values:
                try:
                    candidate = dataclasses.replace(best, **{field: value})
                except ValueError:
                    continue
                candidate_score = score(candidate)
                if candidate_score > best_score:
                    best, best_score, changed = candidate, candidate_score, True
        if not changed:
            break
    return best, list(trials.values())


def trials_table(trials: Sequence[dict], best: InferenceConfig,
                 space: Mapping[str, Sequence] = SEARCH_SPACE) -> str:
    """The settings tried, as a Markdown table (percent), the chosen one in bold."""
    chosen = {field: getattr(best, field) for field in space}
    lines = ["| " + " | ".join(space) + " | mAP^r@0.5 | mAP^r@0.7 | COCO AP |",
             "|---" * (len(space) + 3) + "|"]
    for row in trials:
        cells = [str(row[field]) for field in space] + [
            f"{100 * row[m]:.1f}" for m in ("mAP_r@0.5", "mAP_r@0.7", "coco_mask_AP")]
        if all(row[field] == value for field, value in chosen.items()):
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
