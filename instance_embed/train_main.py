r"""Trains an instance embedding model.

  python -m instance_embed.train_main --flagfile=experiments/shapes_demo.flags \
      --model_dir=runs/demo

Started again with the same flags, a run resumes from the last checkpoint in
`--model_dir/ckpt/` and stops at `--train_steps`. Every flag maps onto a field of
`configs.ExperimentConfig`; the resolved configuration is written to
`--model_dir/config.json`, which `eval_main` and `export_main` read back.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

from instance_embed import configs
from instance_embed import inference
from instance_embed import losses
from instance_embed.data import augment
from instance_embed.data import pipeline
from instance_embed.model import backbones
from instance_embed.model import config as model_config

# Defaults come from the config dataclasses, so the library and the flags never disagree.
_MODEL = model_config.ModelConfig()
_LOSS = losses.LossConfig()
_INFER = inference.InferenceConfig()
_AUG = augment.AugmentConfig()
_INPUT = pipeline.InputConfig()
_TRAIN = configs.TrainConfig()
_DATA = configs.DatasetConfig()


def _float_list(values) -> list[float]:
    return [float(v) for v in values]


FLAGS = flags.FLAGS
# Where.
flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, logs, config.json.")
flags.DEFINE_string("dataset", _DATA.name, "Dataset name (see instance_embed.data.DATASETS).")
flags.DEFINE_string("data_dir", _DATA.data_dir, "TFDS data directory.")
flags.DEFINE_string("manual_dir", None, "Raw files of datasets read from disk "
                    "(penn_fudan_ped, voc2012_instance, instance_folder).")
flags.DEFINE_string("builder_config", None, "TFDS builder config name (default: the "
                    "builder's default).")
flags.DEFINE_string("train_split", _DATA.train_split, "Split to train on.")
flags.DEFINE_string("eval_split", _DATA.eval_split, "Split to evaluate on.")
# Model.
flags.DEFINE_string("backbone", _MODEL.backbone, "Backbone name.")
flags.DEFINE_string("backbone_weights", None, "Pretrained initialisation of the backbone: "
                    "'torchvision' (mobilenet_v2) or 'hed_bsds500' (vgg16), both offline "
                    "from packages `make venv` installs; 'imagenet' (downloads; needs "
                    "internet); or a weights file (.weights.h5, .h5, torchvision .pth).")
flags.DEFINE_string("freeze_backbone_until", None, "Keep this backbone layer and every "
                    "layer before it fixed (e.g. block_5_add for mobilenet_v2).")
flags.DEFINE_integer("output_stride", _MODEL.output_stride, "Output stride of the backbone.")
flags.DEFINE_integer("embedding_dim", _MODEL.embedding_dim, "Embedding dimension d.")
flags.DEFINE_list("taus", [str(t) for t in _MODEL.taus], "Similarity thresholds T.")
flags.DEFINE_list("pyramid_scales", [str(s) for s in _MODEL.pyramid_scales],
                  "Image pyramid scales (paper: 0.25,0.5,1.0,2.0).")
flags.DEFINE_integer("head_channels", _MODEL.head_channels, "Width of the heads.")
flags.DEFINE_integer("head_depth", _MODEL.head_depth, "3x3 conv layers per head.")
flags.DEFINE_integer("detail_stride", None, "Refine the embeddings at this finer stride "
                     "with a shallow branch on the image (e.g. 2 with --output_stride=4).")
flags.DEFINE_enum("mixed_precision", None,
                  [model_config.AUTO_MIXED_PRECISION, model_config.FLOAT32,
                   *model_config.MIXED_PRECISION_POLICIES],
                  "Mixed precision policy for training (losses stay float32; evaluation "
                  "and export run in float32). 'auto': mixed_bfloat16 on a TPU or a CPU "
                  "with bfloat16 units (AMX/AVX512-BF16), else float32. 'float32': as when "
                  "unset, and overrides a flagfile's choice.")
# Input.
flags.DEFINE_integer("image_size", _INPUT.image_size, "Training crop size S.")
flags.DEFINE_integer("max_instances", _INPUT.max_instances, "Instances kept per image M.")
flags.DEFINE_boolean("cache", _INPUT.cache, "Cache decoded examples in memory.")
flags.DEFINE_boolean("augment_rotate", _AUG.rotate, "Random rotation (paper 4.2).")
flags.DEFINE_float("max_rotation_degrees", _AUG.max_rotation_degrees, "Rotation bound.")
flags.DEFINE_boolean("augment_resize", _AUG.resize, "Random resize (paper 4.2).")
flags.DEFINE_float("min_scale", _AUG.min_scale, "Lower resize ratio.")
flags.DEFINE_float("max_scale", _AUG.max_scale, "Upper resize ratio.")
flags.DEFINE_boolean("augment_crop", _AUG.crop, "Random crop among candidates (paper 4.2).")
flags.DEFINE_integer("num_crop_candidates", _AUG.num_crop_candidates, "Crop candidates.")
flags.DEFINE_boolean("augment_flip", _AUG.flip, "Random horizontal flip (paper 4.2).")
# Loss.
flags.DEFINE_integer("points_per_instance", _LOSS.points_per_instance, "K points sampled "
                     "per instance.")
flags.DEFINE_integer("cls_points_per_instance", None, "Of the K points per instance, how "
                     "many also seed the classification loss (default: all K).")
flags.DEFINE_boolean("instance_size_weighting", _LOSS.instance_size_weighting,
                     "Weight pairs inversely to instance size (paper); else uniform.")
flags.DEFINE_float("cls_iou_threshold", _LOSS.cls_iou_threshold, "IoU for a good seed.")
flags.DEFINE_integer("cls_warmup_steps", _LOSS.cls_warmup_steps, "Steps with lambda = 0.")
flags.DEFINE_integer("cls_ramp_steps", _LOSS.cls_ramp_steps, "Steps of the lambda ramp.")
flags.DEFINE_float("cls_weight_max", _LOSS.cls_weight_max, "Final lambda (paper: 0.2).")
flags.DEFINE_boolean(
    "cls_semantic_warmup", _LOSS.cls_semantic_warmup,
    "Not in the paper: the classification head learns each point's semantic class "
    "during lambda's warm-up, handed over to the paper's targets as lambda ramps up.")
# Inference.
flags.DEFINE_integer("num_seeds", _INFER.num_seeds, "Seeds (detections) per image.")
flags.DEFINE_float("alpha", _INFER.alpha, "Seed diversity weight (paper: 0.3).")
flags.DEFINE_float("nms_iou_threshold", None, "Suppress a mask whose IoU with a "
                   "higher-scored one exceeds this (off, as in the paper, when unset).")
flags.DEFINE_float("support_rescoring", _INFER.support_rescoring,
                   "With --nms_iou_threshold: scale each kept detection's score by "
                   "min(1, n / this), n = the detections it suppressed plus itself "
                   "(0: off, the paper's scores).")
flags.DEFINE_enum("mask_upsampling", _INFER.mask_upsampling, list(inference.MASK_UPSAMPLING),
                  "How masks reach the image's resolution: bilinear, or joint_bilateral "
                  "(boundaries follow the image's colour edges).")
flags.DEFINE_float("bilateral_sigma", _INFER.bilateral_sigma,
                   "Colour scale (RGB 0-255) of joint_bilateral mask upsampling.")
flags.DEFINE_float("score_threshold", _INFER.score_threshold,
                   "Drop detections scoring below this (0 keeps all, as in the paper).")
# Optimisation.
flags.DEFINE_integer("batch_size", _TRAIN.batch_size, "Global batch size.")
flags.DEFINE_integer("train_steps", _TRAIN.train_steps, "Total training steps.")
flags.DEFINE_float(
    "time_budget_minutes", None,
    "Fit training into this many minutes on this machine: after timing the first steps, "
    "plan fewer than --train_steps if they would not fit, with every step-counted "
    "schedule (learning rate, lambda) compressed to match. Unset: no budget.")
flags.DEFINE_float("learning_rate", _TRAIN.learning_rate, "Peak learning rate of the heads.")
flags.DEFINE_integer("warmup_steps", _TRAIN.warmup_steps, "Learning-rate warm-up steps.")
flags.DEFINE_enum("lr_decay", _TRAIN.decay, ["cosine", "constant"], "Learning-rate decay.")
flags.DEFINE_float("backbone_lr_multiplier", _TRAIN.backbone_lr_multiplier,
                   "Backbone learning rate / heads' learning rate (paper: smaller).")
flags.DEFINE_float("weight_decay", _TRAIN.weight_decay, "AdamW weight decay (0 = Adam).")
flags.DEFINE_integer("seed", _TRAIN.seed, "Random seed.")
flags.DEFINE_boolean("deterministic", False, "Enable TF op determinism (slower).")
# Distribution and bookkeeping.
flags.DEFINE_enum("strategy", _TRAIN.strategy, list(configs.STRATEGIES),
                  "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu.")
flags.DEFINE_integer("checkpoint_every", _TRAIN.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", _TRAIN.log_every, "Steps between console/scalar logs.")
flags.DEFINE_integer("summary_every", _TRAIN.summary_every, "Steps between image summaries.")
flags.DEFINE_integer("eval_every", _TRAIN.eval_every, "Steps between evaluations (0 = end).")
flags.DEFINE_boolean("eval_at_end", _TRAIN.eval_at_end, "Evaluate when training ends.")
flags.DEFINE_integer("eval_max_examples", _TRAIN.eval_max_examples,
                     "Evaluate on at most this many examples (0 = all).")
flags.DEFINE_integer("debug_nan_at_step", -1, "Testing only: make the loss NaN at this step.")


class FlagError(ValueError):
    """A flag value that cannot work; the message names the flag."""


def _check(ok: bool, flag: str, why: str) -> None:
    if not ok:
        raise FlagError(f"--{flag}={FLAGS[flag].value!r}: {why}")


def validate_flags() -> None:
    """Refuses flag values that cannot work, naming the flag and the reason."""
    from instance_embed import data as datasets  # Registering builders imports TFDS.

    _check(bool(FLAGS.model_dir), "model_dir", "is required")
    _check(FLAGS.dataset in datasets.DATASETS, "dataset",
           f"unknown dataset; choose one of {', '.join(sorted(datasets.DATASETS))}")
    _check(FLAGS.backbone in backbones.available_backbones(), "backbone",
           f"unknown backbone; choose one of {', '.join(backbones.available_backbones())}")
    _check(FLAGS.train_steps >= 0, "train_steps", "must be >= 0")
    _check(FLAGS.time_budget_minutes is None or FLAGS.time_budget_minutes > 0,
           "time_budget_minutes", "must be positive")
    _check(FLAGS.batch_size > 0, "batch_size", "must be positive")
    for name in ("pyramid_scales", "taus"):
        try:
            values = _float_list(FLAGS[name].value)
        except ValueError:
            _check(False, name, "must be a comma-separated list of numbers")
        _check(bool(values), name, "must not be empty")
        if name == "pyramid_scales":
            _check(all(v > 0 for v in values), name, "every scale must be > 0")
        else:
            _check(all(0 < v < 1 for v in values), name, "every tau must be in (0, 1)")
    _check(FLAGS.image_size > 0 and FLAGS.image_size % 32 == 0, "image_size",
           "must be a positive multiple of 32")
    for name in ("checkpoint_every", "log_every", "summary_every", "embedding_dim",
                 "points_per_instance", "num_seeds", "max_instances"):
        _check(FLAGS[name].value > 0, name, "must be positive")
    _check(FLAGS.learning_rate > 0, "learning_rate", "must be > 0")
    _check(FLAGS.strategy != "tpu" or FLAGS.tpu is not None, "tpu",
           "is required with --strategy=tpu ('' or 'local' for a TPU VM)")


def config_from_flags() -> configs.ExperimentConfig:
    """The `ExperimentConfig` the flags describe (also validated by the dataclasses)."""
    from instance_embed import data as datasets

    taus = tuple(_float_list(FLAGS.taus))
    num_classes = len(datasets.class_names(FLAGS.dataset, FLAGS.builder_config))
    return configs.ExperimentConfig(
        dataset=configs.DatasetConfig(
            name=FLAGS.dataset, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
            builder_config=FLAGS.builder_config, train_split=FLAGS.train_split,
            eval_split=FLAGS.eval_split),
        input=pipeline.InputConfig(
            image_size=FLAGS.image_size, max_instances=FLAGS.max_instances,
            cache=FLAGS.cache, seed=FLAGS.seed,
            augment=augment.AugmentConfig(
                rotate=FLAGS.augment_rotate, max_rotation_degrees=FLAGS.max_rotation_degrees,
                resize=FLAGS.augment_resize, min_scale=FLAGS.min_scale,
                max_scale=FLAGS.max_scale, crop=FLAGS.augment_crop,
                num_crop_candidates=FLAGS.num_crop_candidates, flip=FLAGS.augment_flip)),
        model=model_config.ModelConfig(
            backbone=FLAGS.backbone, backbone_weights=FLAGS.backbone_weights,
            freeze_backbone_until=FLAGS.freeze_backbone_until,
            output_stride=FLAGS.output_stride, embedding_dim=FLAGS.embedding_dim,
            num_classes=num_classes, taus=taus,
            pyramid_scales=tuple(_float_list(FLAGS.pyramid_scales)),
            mixed_precision=model_config.resolve_mixed_precision(
                FLAGS.mixed_precision, FLAGS.strategy), head_channels=FLAGS.head_channels,
            head_depth=FLAGS.head_depth, detail_stride=FLAGS.detail_stride),
        loss=losses.LossConfig(
            points_per_instance=FLAGS.points_per_instance,
            cls_points_per_instance=FLAGS.cls_points_per_instance,
            instance_size_weighting=FLAGS.instance_size_weighting,
            cls_iou_threshold=FLAGS.cls_iou_threshold,
            cls_warmup_steps=FLAGS.cls_warmup_steps, cls_ramp_steps=FLAGS.cls_ramp_steps,
            cls_weight_max=FLAGS.cls_weight_max,
            cls_semantic_warmup=FLAGS.cls_semantic_warmup, taus=taus),
        inference=inference.InferenceConfig(
            num_seeds=FLAGS.num_seeds, alpha=FLAGS.alpha, taus=taus,
            nms_iou_threshold=FLAGS.nms_iou_threshold, score_threshold=FLAGS.score_threshold,
            support_rescoring=FLAGS.support_rescoring, mask_upsampling=FLAGS.mask_upsampling,
            bilateral_sigma=FLAGS.bilateral_sigma),
        train=configs.TrainConfig(
            batch_size=FLAGS.batch_size, train_steps=FLAGS.train_steps,
            learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
            decay=FLAGS.lr_decay, backbone_lr_multiplier=FLAGS.backbone_lr_multiplier,
            weight_decay=FLAGS.weight_decay, seed=FLAGS.seed, strategy=FLAGS.strategy,
            tpu=FLAGS.tpu, checkpoint_every=FLAGS.checkpoint_every,
            log_every=FLAGS.log_every, summary_every=FLAGS.summary_every,
            eval_every=FLAGS.eval_every, eval_at_end=FLAGS.eval_at_end,
            eval_max_examples=FLAGS.eval_max_examples,
            debug_nan_at_step=FLAGS.debug_nan_at_step,
            time_budget_minutes=FLAGS.time_budget_minutes))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        validate_flags()
        config = config_from_flags()
    except (FlagError, ValueError, TypeError) as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.mixed_precision == model_config.AUTO_MIXED_PRECISION:
        logging.info("--mixed_precision=auto: training in %s on this machine.",
                     config.model.mixed_precision or "float32")
    if FLAGS.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()

    from instance_embed import data as datasets
    from instance_embed import train_lib

    # Prepare (and so validate) the dataset before anything is trained or written: a bad
    # source file is reported by name, without a traceback.
    dataset = config.dataset
    try:
        for split in (dataset.train_split, dataset.eval_split):
            datasets.load(dataset.name, split, data_dir=dataset.data_dir,
                          manual_dir=dataset.manual_dir, config=dataset.builder_config)
    except (FileNotFoundError, ValueError) as e:
        logging.error("Cannot read dataset %r: %s", dataset.name, e)
        sys.exit(2)

    try:
        result = train_lib.train(config, FLAGS.model_dir)
    except train_lib.IncompatibleConfigError as e:
        # Found once the strategy exists, before anything is written: a flag problem.
        raise app.UsageError(f"--{e}") from None
    except train_lib.TrainingDivergedError as e:
        logging.error("%s", e)
        sys.exit(3)
    logging.info("Final losses: %s", result["losses"])


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
