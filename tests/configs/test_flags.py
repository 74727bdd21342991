"""Tests of `instance_embed.configs.flags`: flags generated from the configuration fields."""

import pytest
from absl import flags

from instance_embed import configs
from instance_embed.configs import flags as config_flags
from instance_embed.inference import InferenceConfig
from instance_embed.serving import ExportConfig


def _parsed(specs, root, argv, override=False):
    flag_values = flags.FlagValues()
    config_flags.define_flags(specs, root, override=override, flag_values=flag_values)
    flag_values(["program", *argv])
    return flag_values


def _override(base, *argv):
    flag_values = _parsed(config_flags.INFERENCE_FLAGS, InferenceConfig, argv, override=True)
    return config_flags.apply_flags(base, config_flags.INFERENCE_FLAGS, override=True,
                                    flag_values=flag_values)


def test_inference_overrides_change_only_what_is_given():
    base = InferenceConfig(num_seeds=100, alpha=0.3, nms_iou_threshold=0.5)
    merged = _override(base, "--num_seeds=7", "--alpha=0", "--score_threshold=0.2",
                       "--nms_iou_threshold=-1")
    assert (merged.num_seeds, merged.alpha, merged.score_threshold) == (7, 0.0, 0.2)
    assert merged.nms_iou_threshold is None
    assert _override(base) == base
    merged = _override(base, "--mask_upsampling=joint_bilateral", "--bilateral_sigma=5")
    assert (merged.mask_upsampling, merged.bilateral_sigma) == ("joint_bilateral", 5.0)
    assert _override(base, "--jit_compile").jit_compile is True
    assert _override(base, "--support_rescoring=8").support_rescoring == 8
    with pytest.raises(ValueError, match="support_rescoring"):  # needs suppression
        _override(base, "--support_rescoring=8", "--nms_iou_threshold=-1")


def test_settings_have_the_fields_defaults_types_and_help():
    flag_values = _parsed(config_flags.EXPERIMENT_FLAGS, configs.ExperimentConfig, [])
    defaults = configs.ExperimentConfig()
    assert flag_values["batch_size"].value == defaults.train.batch_size
    assert flag_values["lr_decay"].value == "cosine"
    assert flag_values["taus"].value == ["0.25", "0.5", "0.75", "0.9"]
    assert flag_values["nms_iou_threshold"].value is None
    assert flag_values["augment_flip"].value is True
    # Help comes from the field's documentation.
    assert "global batch size" in flag_values["batch_size"].help
    export_values = _parsed(config_flags.EXPORT_FLAGS, ExportConfig, [])
    assert all(export_values[spec.name].help for spec in config_flags.EXPORT_FLAGS)
    assert all(flag_values[spec.name].help for spec in config_flags.EXPERIMENT_FLAGS)
    # The default configuration is unchanged by applying the defaults.
    applied = config_flags.apply_flags(defaults, config_flags.EXPERIMENT_FLAGS,
                                       flag_values=flag_values)
    assert applied == defaults


def test_a_dataclass_sees_its_new_values_together():
    # min_scale above the default max_scale is valid with the new max_scale: applying
    # one field at a time would reject it.
    flag_values = _parsed(config_flags.EXPERIMENT_FLAGS, configs.ExperimentConfig,
                          ["--min_scale=1.6", "--max_scale=2.0", "--taus=0.3,0.6",
                           "--lr_decay=constant", "--backbone=mobilenet_v2",
                           "--output_stride=16"])
    config = config_flags.apply_flags(configs.ExperimentConfig(),
                                      config_flags.EXPERIMENT_FLAGS, flag_values=flag_values)
    assert (config.input.augment.min_scale, config.input.augment.max_scale) == (1.6, 2.0)
    assert config.model.taus == (0.3, 0.6) and config.train.decay == "constant"
    assert (config.model.backbone, config.model.output_stride) == ("mobilenet_v2", 16)


@pytest.mark.parametrize("argv, message", [
    (["--taus=0.5,x"], "--taus=0.5,x: must be a comma-separated list of numbers"),
    (["--image_size=100"], "--image_size=100: must be a positive multiple of 32"),
    (["--train_steps=-1"], "--train_steps=-1: must be >= 0"),
    (["--pyramid_scales=1,0"], "--pyramid_scales=1,0: must be positive and finite"),
])
def test_bad_values_are_reported_as_flags(argv, message):
    flag_values = _parsed(config_flags.EXPERIMENT_FLAGS, configs.ExperimentConfig, argv)
    with pytest.raises(ValueError) as error:
        config_flags.apply_flags(configs.ExperimentConfig(), config_flags.EXPERIMENT_FLAGS,
                                 flag_values=flag_values)
    reported = (str(error.value) if isinstance(error.value, config_flags.FlagValueError)
                else config_flags.flag_error(error.value, config_flags.EXPERIMENT_FLAGS,
                                             flag_values))
    assert message in reported


def test_field_help_reads_multi_line_entries():
    help_text = config_flags.field_help(configs.TrainConfig, "time_budget_minutes")
    assert help_text.startswith("fit the run into this much wall-clock time")
    assert "  " not in help_text and "compresses everything" in help_text
    assert config_flags.field_help(configs.TrainConfig, "no_such_field") == ""
