r"""Exports the latest checkpoint of a run as a SavedModel for TF Serving.

  python -m instance_embed.export_main --model_dir=runs/demo
  # -> runs/demo/export/1/ (the next free version); serve it with
  tensorflow_model_server --rest_api_port=8501 --model_name=instance_embed \
      --model_base_path=$PWD/runs/demo/export

  python -m instance_embed.export_main --model_dir=runs/demo --export_dir=/models/ie \
      --version=3 --num_seeds=50 --score_threshold=0.3

The inference flags override the run's settings (`model_dir/config.json`) and are fixed
in the SavedModel. See `instance_embed/serving/signatures.py` for the signatures and
outputs.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from instance_embed.configs import flags as config_flags
from instance_embed.inference import InferenceConfig
from instance_embed.serving import export

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory written by train_main.")
flags.DEFINE_string("export_dir", None, "Parent of the version directories (TF Serving's "
                    "--model_base_path); default: <model_dir>/export.")
config_flags.define_flags(config_flags.EXPORT_FLAGS, export.ExportConfig)
# These change the run's inference settings, which are fixed in the SavedModel.
config_flags.define_flags(config_flags.INFERENCE_FLAGS, InferenceConfig, override=True)
flags.mark_flag_as_required("model_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        # Saving logs long INFO lines about captured variables: not for users.
        logging.set_verbosity(logging.WARNING)
    from instance_embed import serving
    from instance_embed.configs import ExperimentConfig

    specs = config_flags.EXPORT_FLAGS + config_flags.INFERENCE_FLAGS
    try:
        config = config_flags.apply_flags(export.ExportConfig(), config_flags.EXPORT_FLAGS)
        run_inference = ExperimentConfig.load(FLAGS.model_dir).inference
        inference_config = config_flags.apply_flags(
            run_inference, config_flags.INFERENCE_FLAGS, override=True)
        path = serving.export_from_model_dir(FLAGS.model_dir, FLAGS.export_dir, config,
                                             inference_config)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise app.UsageError(config_flags.flag_error(e, specs)) from None
    print(f"Wrote {path}")
    print(f"  signatures: {serving.SERVING_DEFAULT} ({serving.BYTES_INPUT}: string [B]), "
          f"{serving.SERVING_IMAGES} ({serving.IMAGES_INPUT}: uint8 [B,H,W,3]), "
          f"{serving.SERVING_COMPACT} ({serving.BYTES_INPUT}: string [B])")
    print(f"  class names: {serving.load_class_names(path)}")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
