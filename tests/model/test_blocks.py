"""Tests of instance_embed.model.blocks: the decoder merge under mixed precision."""

import keras
import numpy as np
import pytest

from instance_embed.model import blocks


def reduction_model(policy: str) -> keras.Model:
    """The decoder merge of a [4, 4, 8] and an [8, 8, 8] input up to its reduction's
    BatchNorm, built under the dtype policy `policy`."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        coarse = keras.Input((4, 4, 8), name="coarse")
        skip = keras.Input((8, 8, 8), name="skip")
        merged = blocks.decoder_merge(coarse, skip, 8, "dec", momentum=0.99)
        return keras.Model([coarse, skip], [merged, keras.Model(
            [coarse, skip], merged).get_layer("dec_reduce_bn").output])
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_reduction_resolves_a_large_offset_under_a_mixed_policy(policy):
    # Channel 0 of the skip features is a constant 1 that the reduction weighs by 300:
    # its output is 300 plus a signal of spread ~1, which a 16-bit float rounds to
    # steps of 2 (bfloat16) or 0.25 (float16). Computed in float32 the BatchNorm (in
    # training mode: batch statistics) recovers the signal as float32 does.
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(4, 4, 4, 8)).astype(np.float32)
    skip = rng.normal(size=(4, 8, 8, 8)).astype(np.float32)
    skip[..., 0] = 1.0
    kernel = rng.normal(size=(1, 1, 16, 8)).astype(np.float32) / 4
    kernel[0, 0, 8, :] = 300.0  # the concat puts the upsampled coarse first
    outputs = {}
    for name in ("float32", policy):
        model = reduction_model(name)
        model.get_layer("dec_reduce_conv").set_weights([kernel])
        outputs[name] = np.asarray(model([coarse, skip], training=True)[1], np.float32)
    reference = outputs["float32"]
    assert reference.std() > 0.5  # the signal is there to lose
    np.testing.assert_allclose(outputs[policy], reference, atol=0.05)


def test_only_the_reduction_is_float32_under_a_mixed_policy():
    model = reduction_model("mixed_bfloat16")
    dtypes = {layer.name: layer.dtype_policy.compute_dtype for layer in model.layers}
    assert dtypes["dec_reduce_conv"] == dtypes["dec_reduce_bn"] == "float32"
    assert dtypes["dec_fuse_conv"] == "bfloat16"
