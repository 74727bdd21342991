"""The paper's inference: from the network's two heads to instance masks, as tensor ops.

    from instance_embed.inference import InferenceConfig, make_predict_fn
    predict = make_predict_fn(model, model_config.taus, InferenceConfig(num_seeds=50))
    detections = predict(images)  # detection_masks [B, K, H, W], instance_map [B, H, W], ...

- `config`: `InferenceConfig`;
- `detections`: `heads_resolution_detections` and `predict_instances` (paper 3.3-3.4);
- `predictor`: padding, the network and the inference as one function.
"""

from instance_embed.inference.config import MASK_UPSAMPLING, InferenceConfig
from instance_embed.inference.detections import heads_resolution_detections, predict_instances
from instance_embed.inference.predictor import (
    make_predict_fn,
    network_function,
    pad_images,
    predict_from_outputs,
    predict_images,
    run_network,
)

__all__ = [
    "MASK_UPSAMPLING",
    "InferenceConfig",
    "heads_resolution_detections",
    "make_predict_fn",
    "network_function",
    "pad_images",
    "predict_from_outputs",
    "predict_images",
    "predict_instances",
    "run_network",
]
