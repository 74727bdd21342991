"""Validation metrics against wall-clock minutes, from the runs' TensorBoard events.

  .venv/bin/python experiments/learning_curves.py \
      --runs=MobileNetV2=runs/pennfudan_mobilenet,light=runs/pennfudan \
      --output=experiments/figures/pennfudan_learning_curves.png

Reads the `metrics/*` scalars that `train_main --eval_every` writes to `<run>/eval/`
(or, for a run whose events are gone, a JSON file of the same rows, e.g.
`experiments/figures/pennfudan_light_curve.json` transcribed from docs/results.md),
places each evaluation at the minutes since the run's first training event (so the
time of the evaluations themselves is included, as a user waiting for the run sees it),
prints one markdown table per run and plots mAP^r@0.5 and @0.7 against minutes.
"""

from __future__ import annotations

import glob
import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
METRICS = ("mAP_r@0.5", "mAP_r@0.7", "coco_mask_AP")


def define_flags():
    flags.DEFINE_list("runs", None, "label=run_dir pairs.")
    flags.DEFINE_string("output", None, "PNG to write (none: tables only).")


def scalar_events(directory: str) -> dict[str, list[tuple[float, int, float]]]:
    """{tag: [(wall_time, step, value)]} of every event file under `directory`."""
    import tensorflow as tf

    events: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                    if array.ndim:  # images, histograms
                        continue
                    number = float(array)
                else:
                    number = value.simple_value
                events.setdefault(value.tag, []).append((event.wall_time, event.step, number))
    return events


def learning_curve(run_dir: str) -> list[dict]:
    """[{"step", "minutes", metric: value...}] of a run's evaluations, by step."""
    train = scalar_events(os.path.join(run_dir, "train"))
    evals = scalar_events(os.path.join(run_dir, "eval"))
    if not evals:
        raise FileNotFoundError(f"{run_dir}/eval: no evaluation events (train with "
                                "--eval_every)")
    start = min(t for values in train.values() for t, _, _ in values) if train else min(
        t for values in evals.values() for t, _, _ in values)
    rows: dict[int, dict] = {}
    for metric in METRICS:
        for wall_time, step, value in evals.get(f"metrics/{metric}", []):
            row = rows.setdefault(step, {"step": step})
            row["minutes"] = max(row.get("minutes", 0.0), (wall_time - start) / 60)
            row[metric] = 100 * value
    return [rows[step] for step in sorted(rows)]


def main(argv):
    del argv
    curves = {}
    for pair in FLAGS.runs:
        label, _, run_dir = pair.partition("=")
        if not run_dir:
            raise app.UsageError(f"--runs: {pair!r} is not label=run_dir")
        if run_dir.endswith(".json"):
            with open(run_dir, encoding="utf-8") as f:
                curves[label] = json.load(f)["rows"]
        else:
            curves[label] = learning_curve(run_dir)
    for label, rows in curves.items():
        print(f"\n{label}\n\n| step | minutes | " + " | ".join(METRICS) + " |")
        print("|---" * (2 + len(METRICS)) + "|")
        for row in rows:
            print(f"| {row['step']} | {row['minutes']:.1f} | "
                  + " | ".join(f"{row.get(m, float('nan')):.1f}" for m in METRICS) + " |")
    if FLAGS.output:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for axis, metric in zip(axes, METRICS[:2]):
            for label, rows in curves.items():
                axis.plot([r["minutes"] for r in rows], [r.get(metric) for r in rows],
                          marker="o", label=label)
            axis.set_title(metric.replace("_r", "^r"))
            axis.set_xlabel("minutes of training (evaluations included)")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("validation, %")
        axes[0].legend()
        figure.tight_layout()
        figure.savefig(FLAGS.output, dpi=100)
        print(f"\nWrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("runs")
    app.run(main)
