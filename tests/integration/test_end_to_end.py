"""A perfect network through the real post-processing and evaluator scores (almost) 1.

The "network" here reads the answer from the image: each pixel's colour encodes its
instance id and class. It returns, at output stride 4, one-hot embeddings per instance
and certain class logits, exactly what a perfectly trained model would. Everything after
the network is the library's own code: padding to a multiple of 32, seed selection, mask
growing and full-resolution masks (`inference`), and mAP^r (`evaluation`).
So a bug anywhere downstream of the network (misplaced masks, wrong scale, padding that
seeds, a broken matcher) shows up as lost AP.
"""

import dataclasses
import functools
import sys

import numpy as np
import pytest
import tensorflow as tf

from instance_embed import evaluation
from instance_embed import inference
from instance_embed.data import synthetic_shapes

STRIDE = 4
NUM_CLASSES = 3
TAUS = (0.25, 0.5, 0.75, 0.9)
MAX_IDS = 16


def oracle_network(images, jitter=0.0):
    """`[B, Hp, Wp, 3]` float images whose red channel is 10 * instance id and green
    channel 50 * class -> the outputs of a perfect model at stride 4.

    `jitter` adds fixed per-cell noise of that standard deviation to the embeddings, as
    a trained model's have. Without it, pixels of one instance have equal embeddings, so
    once every instance holds a seed the remaining seeds are decided by the rounding of
    D ~ 0, which may differ between eager and graph runs (see `ops.seeds.SeedPasses`).
    """
    cells = images[:, STRIDE // 2::STRIDE, STRIDE // 2::STRIDE]  # centre pixel of each cell
    ids = tf.cast(tf.round(cells[..., 0] / 10.0), tf.int32)
    classes = tf.cast(tf.round(cells[..., 1] / 50.0), tf.int32)
    embeddings = 3.0 * tf.one_hot(ids, MAX_IDS)
    if jitter:
        embeddings += jitter * tf.random.stateless_normal(
            tf.concat([tf.shape(ids)[1:], [MAX_IDS]], 0), seed=[7, 11])  # [h, w, MAX_IDS]
    per_pixel = tf.one_hot(tf.where(ids > 0, classes, 0), NUM_CLASSES + 1,
                           on_value=10.0, off_value=0.0)
    logits = tf.tile(per_pixel[:, :, :, None, :], [1, 1, 1, len(TAUS), 1])
    return {"embeddings": embeddings, "class_logits": logits}


def encode(instances, classes):
    """The image a perfect network decodes: red = 10 * id, green = 50 * class."""
    image = np.zeros(instances.shape + (3,), np.uint8)
    image[..., 0] = 10 * np.maximum(instances, 0)
    class_map = np.concatenate([[0], classes])[np.maximum(instances, 0)]
    image[..., 1] = 50 * class_map
    return image


def oracle_examples(num_images=24):
    """Synthetic validation examples (cropped to 120 x 100) and their encoded images.

    A stride-4 model sees one label per 4x4 cell, so thin shapes (bars, ring walls,
    slivers at the crop) lose IoU whatever the embeddings: instances whose cell-block
    approximation stays under IoU 0.55 become ignore (-1).

    Returns:
      A list of contract examples whose `image` is what `oracle_network` decodes.
    """
    shapes_config = synthetic_shapes.SyntheticShapesConfig(
        name="e2e", image_size=128, num_train=0, num_validation=num_images, num_test=0,
        max_instances=6)
    examples = []
    for index in range(num_images):
        example = synthetic_shapes.generate_example(shapes_config, "validation", index)
        # Sizes that are not multiples of 32 exercise the padding and the crop.
        instances = example["instances"][:120, :100]
        present = np.unique(instances[instances > 0])
        relabel = np.zeros(instances.max() + 1, np.int32)
        relabel[present] = np.arange(1, len(present) + 1)
        instances = relabel[instances]
        classes = example["instance_classes"][present - 1]
        padded = np.pad(instances, ((0, 8), (0, 28)), constant_values=-1)  # to 128 x 128
        cells = padded[STRIDE // 2::STRIDE, STRIDE // 2::STRIDE]
        blocks = np.repeat(np.repeat(cells, STRIDE, 0), STRIDE, 1)[:120, :100]
        for instance in range(1, len(present) + 1):
            truth, block = instances == instance, blocks == instance
            if (truth & block).sum() < 0.55 * (truth | block).sum():
                instances[truth] = -1
        examples.append({"image": encode(instances, classes), "instances": instances,
                         "instance_classes": classes.astype(np.int32),
                         "image_id": f"e2e{index}"})
    return examples


def as_dataset(examples):
    """`oracle_examples` as the `tf.data.Dataset` the evaluation runner reads."""
    return tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={
            "image": tf.TensorSpec([120, 100, 3], tf.uint8),
            "instances": tf.TensorSpec([120, 100], tf.int32),
            "instance_classes": tf.TensorSpec([None], tf.int32),
            "image_id": tf.TensorSpec([], tf.string)})


def evaluate_oracle(examples, config, network=oracle_network):
    evaluator = evaluation.InstanceEvaluator(NUM_CLASSES)
    for example in examples:
        out = inference.predict_images(network, tf.constant(example["image"][None]), TAUS,
                                       config)
        count = int(out["num_detections"][0])
        masks = out["detection_masks"][0, :count].numpy().astype(bool)
        assert masks.shape[1:] == example["instances"].shape
        evaluator.add(example["instances"], example["instance_classes"], masks,
                      out["detection_classes"][0, :count].numpy(),
                      out["detection_scores"][0, :count].numpy())
    return evaluator.result()


@pytest.mark.parametrize("nms, min_map", [(0.5, 0.95), (None, 0.3)])
def test_perfect_network_scores_near_one(nms, min_map):
    config = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=nms)
    result = evaluate_oracle(oracle_examples(), config)
    assert result["num_instances"] > 50
    assert result["AR@0.5@20"] > 0.95
    # With near-duplicate suppression every recalled instance is a true positive; without
    # it, duplicates of equal score (the perfect network is equally sure everywhere)
    # interleave with them (see README: --nms_iou_threshold).
    assert result["mAP_r@0.5"] > min_map


def test_inference_ablations_match_direct_evaluation(repo_root):
    # experiments/inference_ablations.py re-runs inference on stored network outputs;
    # each of its cells must equal a direct run of the network and inference.
    sys.path.insert(0, str(repo_root / "experiments"))
    import inference_ablations

    examples = oracle_examples(num_images=8)
    dataset = as_dataset(examples)
    # Jitter 0.05: D within an instance ~0.08, far above the rounding of D and far below
    # every tau's radius, so seeds are well defined and the masks unchanged.
    network = functools.partial(oracle_network, jitter=0.05)
    cache = evaluation.CachedNetwork(network, dataset)
    base = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=None)
    by_alpha, by_seeds = inference_ablations.ablation_tables(
        cache, dataset, ["a", "b", "c"], TAUS, base, alphas=[0.0, 0.6], seed_counts=[3, 20],
        nms=0.5)
    assert sorted(by_alpha) == [0.0, 0.6] and sorted(by_seeds) == [3, 20]
    for alpha, (with_nms, without) in by_alpha.items():
        direct = evaluate_oracle(examples, dataclasses.replace(base, alpha=alpha,
                                                              nms_iou_threshold=0.5), network)
        assert with_nms == direct["mAP_r@0.5"]
        direct = evaluate_oracle(examples, dataclasses.replace(base, alpha=alpha), network)
        assert without == direct["mAP_r@0.5"]
    for seeds, row in by_seeds.items():
        with_nms = evaluate_oracle(examples, dataclasses.replace(
            base, num_seeds=seeds, nms_iou_threshold=0.5), network)
        without = evaluate_oracle(examples, dataclasses.replace(base, num_seeds=seeds),
                                  network)
        assert row == (with_nms["mAP_r@0.5"], with_nms["AR@0.5@1000"],
                       without["mAP_r@0.5"], without["AR@0.5@1000"])
    # The settings really differ (suppression matters for a perfect network).
    assert by_seeds[20][0] > by_seeds[20][2] + 0.2


def test_tuning_finds_the_best_setting_it_tries_and_reports_true_metrics():
    examples = oracle_examples(num_images=6)
    dataset = as_dataset(examples)
    network = functools.partial(oracle_network, jitter=0.05)
    cache = evaluation.CachedNetwork(network, dataset)
    base = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=None)
    space = {"nms_iou_threshold": (None, 0.5), "alpha": (0.0, 0.3)}
    best, trials = evaluation.tune_inference(cache, dataset, ["a", "b", "c"], TAUS, base,
                                             space=space)
    # Duplicates of a perfect network's masks only cost precision: suppression wins.
    assert best.nms_iou_threshold == 0.5
    keys = [(t["mAP_r@0.5"], t["mAP_r@0.7"]) for t in trials]
    chosen = [t for t in trials if t["nms_iou_threshold"] == best.nms_iou_threshold
              and t["alpha"] == best.alpha]
    assert len(chosen) == 1 and (chosen[0]["mAP_r@0.5"], chosen[0]["mAP_r@0.7"]) == max(keys)
    for trial in trials[:3]:  # the reported numbers are those of a direct evaluation
        direct = evaluate_oracle(examples, dataclasses.replace(
            base, nms_iou_threshold=trial["nms_iou_threshold"], alpha=trial["alpha"]), network)
        assert trial["mAP_r@0.5"] == direct["mAP_r@0.5"]
    table = evaluation.trials_table(trials, best, space)
    assert table.count("\n") == len(trials) + 1 and "**0.5**" in table
