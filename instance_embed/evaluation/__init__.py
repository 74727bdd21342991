"""Evaluation: mAP^r (the paper's Table 1), recall against proposals (Table 3), COCO AP.

- `matching`: mask overlaps, SDS and COCO matching, average precision;
- `evaluator`: `InstanceEvaluator` and the exact protocol;
- `report`: `metrics.json`, the Table 1 style table, plots;
- `runner`: a model or predict function over a dataset split.
"""

from instance_embed.evaluation.evaluator import (
    EvaluationCurves,
    InstanceEvaluator,
    PrecisionRecallCurve,
)
from instance_embed.evaluation.matching import (
    COCO_IOU_THRESHOLDS,
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_PROPOSAL_COUNTS,
)
from instance_embed.evaluation.report import (
    METRICS_FILENAME,
    format_table,
    save_plots,
    write_metrics_json,
)
from instance_embed.evaluation.runner import evaluate, evaluate_model, write_outputs

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_IOU_THRESHOLDS",
    "DEFAULT_PROPOSAL_COUNTS",
    "EvaluationCurves",
    "InstanceEvaluator",
    "METRICS_FILENAME",
    "PrecisionRecallCurve",
    "evaluate",
    "evaluate_model",
    "format_table",
    "save_plots",
    "write_metrics_json",
    "write_outputs",
]
