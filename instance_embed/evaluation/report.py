"""Reports of an evaluation: `metrics.json`, a table shaped like the paper's Table 1,
and plots (precision-recall per class, recall against proposals; matplotlib is
imported only when plotting).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from instance_embed.evaluation.evaluator import EvaluationCurves
from instance_embed.evaluation.evaluator import InstanceEvaluator

METRICS_FILENAME = "metrics.json"


PRECISION_RECALL_PLOT = "precision_recall_iou{threshold:g}.png"


RECALL_PLOT = "recall_vs_proposals.png"


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_metrics_json(result: Mapping[str, Any], path: str) -> str:
    """Writes a result as strict JSON (NaN becomes null); returns the path.

    Args:
      result: a dict from `InstanceEvaluator.result()`.
      path: a file path, or a directory in which `metrics.json` is written.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({key: _json_value(value) for key, value in result.items()}, f,
                  indent=2, allow_nan=False)
        f.write("\n")
    return path


def _thresholds_of(result: Mapping[str, Any]) -> list[str]:
    return [key[len("mAP_r@"):] for key in result if key.startswith("mAP_r@")]


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100.0 * value:.1f}"


def format_table(result: Mapping[str, Any], class_names: Sequence[str] | None = None
                 ) -> str:
    """The paper's Table 1 for one method: rows IoU thresholds, columns classes + average.

    Values are in %; "-" marks classes without ground truth. Recall against proposals and
    COCO AP follow on their own lines, and the header names the protocol.

    Args:
      result: a dict from `InstanceEvaluator.result()` (or read back from metrics.json).
      class_names: column order; default: the classes found in `result`, in its order.
    """
    thresholds = _thresholds_of(result)
    if not thresholds:
        raise ValueError("result has no 'mAP_r@<threshold>' entries")
    if class_names is None:
        prefix = f"AP_r@{thresholds[0]}/"
        class_names = [key[len(prefix):] for key in result if key.startswith(prefix)]
    missing = [f"AP_r@{t}/{name}" for t in thresholds for name in class_names
               if f"AP_r@{t}/{name}" not in result]
    if missing:
        raise ValueError(f"result lacks {missing[:3]} (class_names do not match it)")
    header = ["IoU"] + list(class_names) + ["average"]
    rows = [[t] + [_percent(result[f"AP_r@{t}/{name}"]) for name in class_names]
            + [_percent(result[f"mAP_r@{t}"])] for t in thresholds]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [
        f"AP^r (%) over {result.get('num_images', '?')} images, "
        f"{result.get('num_instances', '?')} instances",
        f"protocol: {result.get('protocol', 'unknown')}",
    ]
    for row in [header] + rows:
        lines.append("  ".join([row[0].ljust(widths[0])] +
                               [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]))
    recall = [(key, value) for key, value in result.items() if key.startswith("AR@")]
    if recall:
        threshold = recall[0][0].split("@")[1]
        lines.append(f"recall (%) at IoU {threshold} by proposals per image: " + "  ".join(
            f"{key.split('@')[2]}: {_percent(value)}" for key, value in recall))
    if "coco_mask_AP" in result:
        lines.append(
            f"COCO mask AP (%): AP {_percent(result['coco_mask_AP'])}  "
            f"AP50 {_percent(result.get('coco_mask_AP50'))}  "
            f"AP75 {_percent(result.get('coco_mask_AP75'))}")
    return "\n".join(lines)


def save_plots(evaluator_or_curves: InstanceEvaluator | EvaluationCurves, out_dir: str
               ) -> list[str]:
    """Writes PNG plots: precision-recall per class, and recall against proposals.

    Args:
      evaluator_or_curves: an `InstanceEvaluator` (its curves at IoU 0.5) or the
        `EvaluationCurves` from `InstanceEvaluator.curves()`.
      out_dir: directory, created if missing.

    Returns:
      The paths written.
    """
    # Imported here so that evaluating never needs matplotlib; the Agg canvas is used
    # directly so that no global pyplot backend is switched in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(evaluator_or_curves, InstanceEvaluator):
        curves = evaluator_or_curves.curves()
    elif isinstance(evaluator_or_curves, EvaluationCurves):
        curves = evaluator_or_curves
    else:
        raise TypeError("evaluator_or_curves must be an InstanceEvaluator or "
                        f"EvaluationCurves, got {type(evaluator_or_curves).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    names = list(curves.precision_recall)
    cols = max(1, min(5, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    figure = Figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for i, name in enumerate(names):
        curve = curves.precision_recall[name]
        axes = figure.add_subplot(rows, cols, i + 1)
        if curve.recall.size:
            envelope = np.maximum.accumulate(curve.precision[::-1])[::-1]
            axes.plot(curve.recall, curve.precision, lw=0.8, alpha=0.5, label="raw")
            axes.step(np.concatenate([[0.0], curve.recall]),
                      np.concatenate([envelope[:1], envelope]), where="pre", lw=1.5,
                      label="monotone")
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
                 title=f"{name}: AP {100 * curve.average_precision:.1f} "
                       f"({curve.num_instances} inst.)")
        axes.title.set_fontsize(9)
        axes.grid(alpha=0.3)
        if i == 0 and curve.recall.size:
            axes.legend(loc="lower left", fontsize=7)
    if not names:
        figure.add_subplot(1, 1, 1).text(0.5, 0.5, "no ground truth", ha="center")
    figure.suptitle(f"precision-recall at IoU {curves.iou_threshold:g} (SDS protocol)")
    path = os.path.join(out_dir, PRECISION_RECALL_PLOT.format(threshold=curves.iou_threshold))
    figure.savefig(path, dpi=100)
    paths.append(path)

    figure = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(curves.num_proposals, curves.recall, lw=1.5)
    marks = [n for n in curves.proposal_counts if n <= curves.num_proposals.size]
    axes.plot(marks, [curves.recall[n - 1] for n in marks], "o")
    axes.set_xscale("log")
    axes.set(ylim=(0, 1.02), xlabel="proposals per image",
             ylabel=f"recall at IoU {curves.recall_iou_threshold:g}",
             title="class-agnostic recall against the number of proposals")
    axes.grid(alpha=0.3, which="both")
    path = os.path.join(out_dir, RECALL_PLOT)
    figure.savefig(path, dpi=100)
    paths.append(path)
    return paths
