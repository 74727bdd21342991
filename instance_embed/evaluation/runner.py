"""Evaluation of a model (or any predict function) over a dataset split.

`evaluate(predict_fn, examples, class_names)` streams a split through a predict function
(`inference.make_predict_fn`, or a loaded SavedModel's `serving_images` signature: both
take `uint8 [1, H, W, 3]` and return the `detection_*` outputs at the input resolution)
into an `InstanceEvaluator`; `write_outputs` writes `metrics.json`, the paper's Table 1
style table and the plots.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from instance_embed import data as datasets
from instance_embed.evaluation import report
from instance_embed.evaluation.evaluator import InstanceEvaluator
from instance_embed.inference import make_predict_fn

PredictFn = Callable[[tf.Tensor], Mapping[str, tf.Tensor]]


def evaluate(predict_fn: PredictFn, examples: tf.data.Dataset, class_names: Sequence[str],
             max_examples: int = 0, progress: bool = True,
             evaluator: InstanceEvaluator | None = None
             ) -> InstanceEvaluator:
    """Runs `predict_fn` on every example and feeds the evaluator.

    Args:
      predict_fn: `uint8 [1, H, W, 3]` -> dict with `num_detections [1]`,
        `detection_masks [1, K, H, W]`, `detection_classes [1, K]`, `detection_scores [1, K]`.
      examples: contract examples (`image`, `instances`, `instance_classes`, `image_id`).
      class_names: the C foreground class names.
      max_examples: evaluate at most this many (0 = all).
      progress: show a progress bar.
      evaluator: an evaluator to add to (default: a new one with the paper's settings).

    Returns:
      The evaluator, holding every example.
    """
    if evaluator is None:
        evaluator = InstanceEvaluator(len(class_names), class_names=class_names)
    if max_examples:
        examples = examples.take(max_examples)
    total = int(examples.cardinality())
    bar = tqdm.tqdm(total=total if total >= 0 else None, desc="evaluating", unit="img",
                    disable=not progress, mininterval=2.0)
    start = time.perf_counter()
    for example in examples.prefetch(2):
        outputs = predict_fn(example["image"][tf.newaxis])
        count = int(outputs["num_detections"][0])
        evaluator.add(
            example["instances"].numpy(), example["instance_classes"].numpy(),
            np.asarray(outputs["detection_masks"][0, :count], bool),
            np.asarray(outputs["detection_classes"][0, :count]),
            np.asarray(outputs["detection_scores"][0, :count]))
        bar.update(1)
    bar.close()
    logging.info("Evaluated %d images in %.1f s.", evaluator.num_images,
                 time.perf_counter() - start)
    return evaluator


def evaluate_model(model, config, split: str | None = None, max_examples: int = 0,
                   progress: bool = True) -> InstanceEvaluator:
    """Evaluates a Keras model built from `config` (an `ExperimentConfig`) on a split."""
    examples = datasets.load(
        config.dataset.name, split or config.dataset.eval_split,
        data_dir=config.dataset.data_dir, manual_dir=config.dataset.manual_dir,
        config=config.dataset.builder_config)
    class_names = datasets.class_names(config.dataset.name, config.dataset.builder_config)
    predict_fn = make_predict_fn(model, config.model.taus, config.inference)
    return evaluate(predict_fn, examples, class_names, max_examples=max_examples,
                    progress=progress)


def write_outputs(evaluator: InstanceEvaluator, out_dir: str) -> dict:
    """Writes `metrics.json` and `plots/` under `out_dir`, logs the table; returns metrics."""
    result = evaluator.result()
    os.makedirs(out_dir, exist_ok=True)
    report.write_metrics_json(result, os.path.join(out_dir, report.METRICS_FILENAME))
    report.save_plots(evaluator, os.path.join(out_dir, "plots"))
    logging.info("\n%s", report.format_table(result))
    return result
