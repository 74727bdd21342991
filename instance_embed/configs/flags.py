"""Command-line flags generated from the configuration dataclasses' fields.

Every setting is declared once, as a dataclass field with its default and its
documentation (the class docstring's `Attributes:` entry). A `Flag` names the flag and
the field it sets; `define_flags` declares absl flags from a list of them, taking type,
default and help text from the field, and `apply_flags` writes the parsed values back
into a configuration. The same list serves two modes:

- settings (`train_main`): a flag's default is the field's default, and every flag is
  applied;
- overrides (`eval_main`, `export_main` on a trained run's inference settings): every
  default is None, "not given", and only the flags given change the run's value.

Flag names are those of the flagfiles in `experiments/` (e.g. `--lr_decay` sets
`train.decay`, `--augment_flip` sets `input.augment.flip`).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from typing import Any, Callable, Sequence

from absl import flags

from instance_embed.configs.experiment import STRATEGIES
from instance_embed.inference.config import MASK_UPSAMPLING


@dataclasses.dataclass(frozen=True)
class Flag:
    """A flag and the configuration field it sets.

    Attributes:
      name: the flag's name, without dashes.
      field: dotted path of the field from the root dataclass, e.g. "train.decay".
      choices: the allowed values of a string field (an enum flag).
      to_field: converts the parsed flag value to the field's value (after lists of
        numbers are parsed); None: as parsed.
    """

    name: str
    field: str
    choices: tuple[str, ...] | None = None
    to_field: Callable[[Any], Any] | None = None


def _suppression_off_when_negative(value):
    return None if value is None or value < 0 else value


# The inference settings: train_main sets them, eval_main and export_main override them.
INFERENCE_FLAGS = (
    Flag("num_seeds", "num_seeds"),
    Flag("alpha", "alpha"),
    Flag("score_threshold", "score_threshold"),
    # Negative turns suppression off (None cannot be given on a command line).
    Flag("nms_iou_threshold", "nms_iou_threshold", to_field=_suppression_off_when_negative),
    Flag("support_rescoring", "support_rescoring"),
    Flag("mask_upsampling", "mask_upsampling", choices=MASK_UPSAMPLING),
    Flag("bilateral_sigma", "bilateral_sigma"),
    Flag("flip_tta", "flip_tta"),
    Flag("jit_compile", "jit_compile"),
)

# train_main's settings, relative to `ExperimentConfig`.
DATASET_FLAGS = (
    Flag("dataset", "dataset.name"),
    Flag("data_dir", "dataset.data_dir"),
    Flag("manual_dir", "dataset.manual_dir"),
    Flag("builder_config", "dataset.builder_config"),
    Flag("train_split", "dataset.train_split"),
    Flag("eval_split", "dataset.eval_split"),
)
MODEL_FLAGS = (
    Flag("backbone", "model.backbone"),
    Flag("backbone_weights", "model.backbone_weights"),
    Flag("freeze_backbone_until", "model.freeze_backbone_until"),
    Flag("output_stride", "model.output_stride"),
    Flag("embedding_dim", "model.embedding_dim"),
    Flag("taus", "model.taus"),
    Flag("pyramid_scales", "model.pyramid_scales"),
    Flag("head_channels", "model.head_channels"),
    Flag("head_depth", "model.head_depth"),
)
INPUT_FLAGS = (
    Flag("image_size", "input.image_size"),
    Flag("max_instances", "input.max_instances"),
    Flag("cache", "input.cache"),
    Flag("augment_rotate", "input.augment.rotate"),
    Flag("max_rotation_degrees", "input.augment.max_rotation_degrees"),
    Flag("augment_resize", "input.augment.resize"),
    Flag("min_scale", "input.augment.min_scale"),
    Flag("max_scale", "input.augment.max_scale"),
    Flag("augment_crop", "input.augment.crop"),
    Flag("num_crop_candidates", "input.augment.num_crop_candidates"),
    Flag("augment_flip", "input.augment.flip"),
)
LOSS_FLAGS = (
    Flag("points_per_instance", "loss.points_per_instance"),
    Flag("instance_size_weighting", "loss.instance_size_weighting"),
    Flag("cls_iou_threshold", "loss.cls_iou_threshold"),
    Flag("cls_warmup_steps", "loss.cls_warmup_steps"),
    Flag("cls_ramp_steps", "loss.cls_ramp_steps"),
    Flag("cls_weight_max", "loss.cls_weight_max"),
    Flag("cls_semantic_warmup", "loss.cls_semantic_warmup"),
)
TRAIN_FLAGS = (
    Flag("batch_size", "train.batch_size"),
    Flag("train_steps", "train.train_steps"),
    Flag("time_budget_minutes", "train.time_budget_minutes"),
    Flag("learning_rate", "train.learning_rate"),
    Flag("warmup_steps", "train.warmup_steps"),
    Flag("lr_decay", "train.decay", choices=("cosine", "constant")),
    Flag("backbone_lr_multiplier", "train.backbone_lr_multiplier"),
    Flag("weight_decay", "train.weight_decay"),
    Flag("seed", "train.seed"),
    Flag("strategy", "train.strategy", choices=STRATEGIES),
    Flag("tpu", "train.tpu"),
    Flag("checkpoint_every", "train.checkpoint_every"),
    Flag("log_every", "train.log_every"),
    Flag("summary_every", "train.summary_every"),
    Flag("eval_every", "train.eval_every"),
    Flag("eval_at_end", "train.eval_at_end"),
    Flag("eval_max_examples", "train.eval_max_examples"),
)
EXPERIMENT_FLAGS = (DATASET_FLAGS + MODEL_FLAGS + INPUT_FLAGS + LOSS_FLAGS + TRAIN_FLAGS
                    + tuple(dataclasses.replace(f, field=f"inference.{f.field}")
                            for f in INFERENCE_FLAGS if f.name != "jit_compile"))

# export_main's settings, relative to `serving.ExportConfig`.
EXPORT_FLAGS = (
    Flag("version", "version"),
    Flag("overwrite", "overwrite"),
    Flag("max_image_pixels", "max_image_pixels"),
    Flag("class_names", "class_names"),
)


class FlagValueError(ValueError):
    """A flag value that cannot be turned into its field's value; names the flag."""


def define_flags(specs: Sequence[Flag], root: type, defaults: Any = None,
                 override: bool = False, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Declares an absl flag for each spec.

    Args:
      specs: the flags.
      root: the dataclass the specs' fields are relative to.
      defaults: an instance of `root` whose values are the flags' defaults (settings
        mode); None takes `root()`.
      override: overrides mode: every default is None and the help says "Override:".
      flag_values: where to declare them.
    """
    # The flags belong to the program that declares them (its --help lists them).
    module_name = sys._getframe(1).f_globals.get("__name__")
    declare = dict(flag_values=flag_values, module_name=module_name)
    defaults = root() if defaults is None and not override else defaults
    for spec in specs:
        owner, attribute, hint = field_hint(root, spec.field)
        kind, _ = _kind(hint)
        default = None if override else _get(defaults, spec.field)
        help_text = field_help(owner, attribute)
        if override:
            help_text = f"Override (default: the run's value): {help_text}"
        if kind is bool:
            flags.DEFINE_boolean(spec.name, default, help_text, **declare)
        elif kind is int:
            flags.DEFINE_integer(spec.name, default, help_text, **declare)
        elif kind is float:
            flags.DEFINE_float(spec.name, default, help_text, **declare)
        elif kind is tuple:
            flags.DEFINE_list(spec.name, None if default is None else [str(v) for v in default],
                              help_text, **declare)
        elif spec.choices is not None:
            flags.DEFINE_enum(spec.name, default, list(spec.choices), help_text, **declare)
        else:
            flags.DEFINE_string(spec.name, default, help_text, **declare)


def apply_flags(config: Any, specs: Sequence[Flag], override: bool = False,
                flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """`config` with the flags' values written into their fields.

    Args:
      config: an instance of the dataclass the specs are relative to.
      specs: the flags (declared by `define_flags`).
      override: only flags whose value is not None change `config`.
      flag_values: the parsed flags.

    Returns:
      A new configuration (nested dataclasses are replaced, never mutated). Each
      dataclass is rebuilt once with all its new values, so its validation sees them
      together (e.g. `min_scale` and `max_scale`).

    Raises:
      FlagValueError: naming the flag, for a list item that is not a number where the
        field holds numbers.
    """
    updates: dict = {}
    for spec in specs:
        value = flag_values[spec.name].value
        if override and value is None:
            continue
        _, _, hint = field_hint(type(config), spec.field)
        kind, _ = _kind(hint)
        if kind is tuple and value is not None:
            item_type = _tuple_item_type(hint)
            try:
                value = tuple(item_type(v) for v in value)
            except ValueError:
                raise FlagValueError(
                    f"--{spec.name}={','.join(value)}: must be a comma-separated list of "
                    f"{'numbers' if item_type is float else 'values'}") from None
        if spec.to_field is not None:
            value = spec.to_field(value)
        *parents, attribute = spec.field.split(".")
        node = updates
        for parent in parents:
            node = node.setdefault(parent, {})
        node[attribute] = value
    return _with_updates(config, updates)


def flag_error(error: Exception, specs: Sequence[Flag],
               flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """A configuration error as a flag error, `--name=value: why`, when its message
    starts with a field that one of `specs` sets (`Config.field=value: why`,
    `Config.field why` or `field=value: why`); otherwise the message unchanged."""
    message = str(error)
    match = re.match(r"^(?:\w+Config\.)?(\w+)(?:=[^:]*:)?\s*(.*)$", message, re.DOTALL)
    if match:
        attribute, why = match.groups()
        for spec in specs:
            if spec.field.split(".")[-1] == attribute:
                value = flag_values[spec.name].value
                shown = ",".join(value) if isinstance(value, list) else value
                return f"--{spec.name}={shown}: {why}"
    return message


def field_hint(root: type, path: str) -> tuple[type, str, Any]:
    """(the dataclass owning the field, its name, its type hint) of a dotted path."""
    owner = root
    *parents, attribute = path.split(".")
    for parent in parents:
        owner = typing.get_type_hints(owner)[parent]
    hints = typing.get_type_hints(owner)
    if attribute not in hints:
        raise KeyError(f"{owner.__name__} has no field {attribute!r} (flag path {path!r})")
    return owner, attribute, hints[attribute]


def field_help(owner: type, attribute: str) -> str:
    """The field's entry in `owner`'s docstring `Attributes:` section, on one line."""
    doc = owner.__doc__ or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return ""
    entry, indent = [], None
    for line in lines[start + 1:]:
        if not line.strip():
            if entry:
                break
            continue
        current = len(line) - len(line.lstrip())
        if indent is None:
            indent = current
        if current < indent:
            break
        if current == indent:
            if entry:
                break
            match = re.match(rf"\s*{re.escape(attribute)}\s*:\s*(.*)", line)
            if match:
                entry.append(match.group(1))
        elif entry:
            entry.append(line.strip())
    return " ".join(entry)


def _kind(hint) -> tuple[type, bool]:
    """(bool, int, float, tuple or str, whether None is allowed) of a field's type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if hint is tuple or origin is tuple:
        return tuple, optional
    if hint in (bool, int, float):
        return hint, optional
    return str, optional


def _tuple_item_type(hint) -> type:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    args = typing.get_args(hint)
    return args[0] if args and args[0] in (float, int, str) else str


def _get(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _with_updates(config: Any, updates: dict) -> Any:
    """`config` with `updates` (field -> value, or -> a dict for a nested dataclass)."""
    if not updates:
        return config
    values = {name: _with_updates(getattr(config, name), value) if isinstance(value, dict)
              else value for name, value in updates.items()}
    return dataclasses.replace(config, **values)
