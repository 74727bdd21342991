"""Training-step speed, peak memory and the share of the step spent in the two losses.

  .venv/bin/python benchmarks/train_step.py                 # light@256 and resnet50@512
  .venv/bin/python benchmarks/train_step.py --cases=light:256:8
  .venv/bin/python benchmarks/train_step.py --backbone=mobilenet_v2 --image_size=256 \
      --batch=8 --output_stride=8 --freeze_backbone_until=block_5_add

A case is `backbone:image_size:batch[:output_stride[:freeze_backbone_until]]`; the
`--backbone` group of options gives one case instead of `--cases`. With
`--mixed_precision=mixed_bfloat16` the step computes in bfloat16 (say so with the CPU
kind when quoting a figure: CPUs without bfloat16 units emulate it, slowly).

For each case (backbone, image size, batch) a fresh subprocess times `--steps` training
steps (after `--warmup` compiled ones) of the full step (model, embedding and
classification losses, gradients, Adam), of the same step with the losses replaced by a
trivial one (the mean of the outputs), and of the two losses alone (forward and backward
to the heads' outputs). The losses' share is the last over the first; the difference of
the first two says the same but is noisier on a busy machine. Peak memory is the subprocess' maximum resident set size. Inputs are random
images with random rectangles as instances (M = 32 slots, 12 used), K = 10 points.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD_FLAG = "--child"


def _child(backbone: str, size: int, batch: int, steps: int, warmup: int,
           output_stride: int | None, freeze_until: str | None,
           mixed_precision: str | None) -> dict:
    import resource

    import keras
    import numpy as np
    import tensorflow as tf

    from instance_embed import losses
    from instance_embed.model import ModelConfig
    from instance_embed.model import build_model

    rng = np.random.default_rng(0)
    max_instances, used = 32, 12
    instances = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        for i in range(1, used + 1):
            y, x = rng.integers(0, size - size // 6, 2)
            instances[b, y:y + size // 6, x:x + size // 6] = i
    batch_data = {
        "image": tf.constant(rng.uniform(0, 255, (batch, size, size, 3)), tf.float32),
        "instances": tf.constant(instances),
        "instance_classes": tf.constant(np.ones((batch, max_instances), np.int32)),
        "instance_valid": tf.constant(np.arange(max_instances)[None].repeat(batch, 0) < used),
    }
    model_kwargs = dict(backbone=backbone, num_classes=20, freeze_backbone_until=freeze_until,
                        mixed_precision=mixed_precision)
    if output_stride:
        model_kwargs["output_stride"] = output_stride
    # Random weights: the step costs the same with pretrained ones. With frozen layers
    # the backbone's BatchNorm is frozen too, as it is when fine-tuning.
    model_config = ModelConfig(**model_kwargs,
                               freeze_backbone_batchnorm=bool(freeze_until) or None)
    model = build_model(model_config)
    loss_fn = losses.InstanceLoss(losses.LossConfig(cls_warmup_steps=0, cls_ramp_steps=0),
                                  model_config.taus)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    def make_step(with_losses: bool):
        @tf.function
        def step(i):
            with tf.GradientTape() as tape:
                outputs = model(batch_data["image"], training=True)
                if with_losses:
                    total = loss_fn(outputs, batch_data, step=i,
                                    seed=tf.stack([tf.constant(0, tf.int64), i]))["total"]
                else:
                    total = (tf.reduce_mean(outputs["embeddings"])
                             + tf.reduce_mean(outputs["class_logits"]))
            grads = tape.gradient(total, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return total
        return step

    # The losses alone: forward and backward to the heads' outputs, on fixed outputs.
    outputs = {k: tf.Variable(v) for k, v in model(batch_data["image"], training=False).items()}

    @tf.function
    def losses_only(i):
        with tf.GradientTape() as tape:
            total = loss_fn(outputs, batch_data, step=i,
                            seed=tf.stack([tf.constant(0, tf.int64), i]))["total"]
        return tape.gradient(total, list(outputs.values()))

    timings = {}
    for i in range(warmup):
        losses_only(tf.constant(i, tf.int64))
    start = time.perf_counter()
    for i in range(steps):
        [g.numpy() for g in losses_only(tf.constant(i, tf.int64))]
    timings["losses_only"] = (time.perf_counter() - start) / steps
    for name, with_losses in (("full", True), ("no_losses", False)):
        step = make_step(with_losses)
        for i in range(warmup):
            step(tf.constant(i, tf.int64)).numpy()
        start = time.perf_counter()
        for i in range(steps):
            step(tf.constant(i, tf.int64)).numpy()
        timings[name] = (time.perf_counter() - start) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backbone": backbone, "size": size, "batch": batch,
            "stride": model_kwargs.get("output_stride", ModelConfig(backbone=backbone).output_stride),
            "frozen": freeze_until or "-", "precision": mixed_precision or "float32",
            "step_s": timings["full"], "no_loss_step_s": timings["no_losses"],
            "images_per_s": batch / timings["full"], "peak_mb": peak_mb,
            "loss_share": timings["losses_only"] / timings["full"],
            "loss_share_by_difference": max(0.0, 1 - timings["no_losses"] / timings["full"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="light:256:8,resnet50:512:2",
                        help="comma-separated backbone:image_size:batch")
    parser.add_argument("--backbone", default=None, help="one case: this backbone")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output_stride", type=int, default=0, help="0: the default")
    parser.add_argument("--freeze_backbone_until", default="")
    parser.add_argument("--mixed_precision", default=None,
                        choices=[None, "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(CHILD_FLAG, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backbone, size, batch, stride, freeze = (args.child.split(":") + ["", ""])[:5]
        print(json.dumps(_child(backbone, int(size), int(batch), args.steps, args.warmup,
                                int(stride) if stride else None, freeze or None,
                                args.mixed_precision)))
        return

    cases = args.cases.split(",")
    if args.backbone:
        cases = [f"{args.backbone}:{args.image_size}:{args.batch}:"
                 f"{args.output_stride or ''}:{args.freeze_backbone_until}"]
    rows = []
    for case in cases:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        precision = ["--mixed_precision", args.mixed_precision] if args.mixed_precision else []
        out = subprocess.run(
            [sys.executable, __file__, CHILD_FLAG, case, "--steps", str(args.steps),
             "--warmup", str(args.warmup), *precision], capture_output=True, text=True,
            env=env)
        if out.returncode:
            print(f"{case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = ("backbone", "stride", "frozen until", "precision", "image", "batch",
              "step (s)", "images/s", "peak RSS (MB)", "losses' share",
              "step without losses (s)")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(f"{r['backbone']} | {r['stride']} | {r['frozen']} | {r['precision']} | "
              f"{r['size']}x{r['size']} | {r['batch']} | "
              f"{r['step_s']:.3f} | {r['images_per_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{100 * r['loss_share']:.1f}% | {r['no_loss_step_s']:.3f}")


if __name__ == "__main__":
    main()
