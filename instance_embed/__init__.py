"""instance_embed: semantic instance segmentation via deep metric learning.

A TensorFlow 2 / Keras 3 implementation of Fathi et al., 2017. Every pixel gets an
embedding and, for each similarity threshold tau, a prediction of the class of the mask
that would grow from it; masks are grown from diverse, high-"seediness" seeds.
"""

__version__ = "0.1.0"
