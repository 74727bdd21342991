"""instance_embed: semantic instance segmentation via deep metric learning.

A TensorFlow 2 / Keras 3 implementation of Fathi et al., 2017. Every pixel gets an
embedding and, for each similarity threshold tau, a prediction of the class of the mask
that would grow from it; masks are grown from diverse, high-"seediness" seeds.

    segmenter = instance_embed.Segmenter.from_saved_model("runs/demo/export")
    instances = segmenter("photo.jpg")   # masks, boxes, classes, scores (segmenter.py)
"""

__version__ = "0.1.0"

__all__ = ["Instances", "Segmenter"]


def __getattr__(name: str):
    # `instance_embed.Segmenter` without importing TensorFlow on `import instance_embed`
    # (the programs' flag definitions import the package first).
    if name in __all__:
        from instance_embed import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'instance_embed' has no attribute {name!r}")
