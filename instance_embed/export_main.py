r"""Exports the latest checkpoint of a run as a SavedModel for TF Serving.

  python -m instance_embed.export_main --model_dir=runs/demo
  # -> runs/demo/export/1/ (the next free version); serve it with
  tensorflow_model_server --rest_api_port=8501 --model_name=instance_embed \
      --model_base_path=$PWD/runs/demo/export

  python -m instance_embed.export_main --model_dir=runs/demo --export_dir=/models/ie \
      --version=3 --num_seeds=50 --score_threshold=0.3

The inference flags override the run's settings (`model_dir/config.json`) and are fixed
in the SavedModel. See `instance_embed/export.py` for the signatures and outputs.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from instance_embed import export
from instance_embed import inference

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory written by train_main.")
flags.DEFINE_string("export_dir", None, "Parent of the version directories (TF Serving's "
                    "--model_base_path); default: <model_dir>/export.")
flags.DEFINE_integer("version", None, "Version directory to write (default: next free).")
flags.DEFINE_boolean("overwrite", False, "Replace the version directory if it exists.")
flags.DEFINE_integer("num_seeds", None, "Override: detections (seeds) per image, K.")
flags.DEFINE_float("alpha", None, "Override: seed diversity weight.")
flags.DEFINE_list("taus", None, "Override: similarity thresholds, one per tau slice of "
                  "the classification head.")
flags.DEFINE_float("score_threshold", None, "Override: detections scoring below are "
                   "invalid.")
flags.DEFINE_float("nms_iou_threshold", None, "Override: near-duplicate suppression IoU; "
                   "<0 turns suppression off.")
flags.DEFINE_float("support_rescoring", None,
                   "Override: scale kept scores by min(1, suppressed duplicates + 1 / this); "
                   "0 turns it off.")
flags.DEFINE_enum("mask_upsampling", None, list(inference.MASK_UPSAMPLING),
                  "Override: how masks reach the image's resolution.")
flags.DEFINE_float("bilateral_sigma", None, "Override: colour scale of joint_bilateral.")
flags.DEFINE_boolean("jit_compile", None,
                     "Override: run the post-processing after the network as one XLA "
                     "computation (faster on CPU, compiled again for each new input size; "
                     "TF Serving needs --xla_cpu_compilation_enabled=true).")
flags.DEFINE_integer("max_image_pixels", export.DEFAULT_MAX_IMAGE_PIXELS,
                     "Requests with an image of more pixels (height x width) are rejected.")
flags.DEFINE_list("class_names", None, "Class names (default: the run's dataset's).")
flags.mark_flag_as_required("model_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        # Saving logs long INFO lines about captured variables: not for users.
        logging.set_verbosity(logging.WARNING)
    try:
        config = export.ExportConfig(
            version=FLAGS.version, overwrite=FLAGS.overwrite, num_seeds=FLAGS.num_seeds,
            alpha=FLAGS.alpha,
            taus=None if FLAGS.taus is None else tuple(float(t) for t in FLAGS.taus),
            score_threshold=FLAGS.score_threshold, nms_iou_threshold=FLAGS.nms_iou_threshold,
            support_rescoring=FLAGS.support_rescoring,
            mask_upsampling=FLAGS.mask_upsampling, bilateral_sigma=FLAGS.bilateral_sigma,
            jit_compile=FLAGS.jit_compile, max_image_pixels=FLAGS.max_image_pixels,
            class_names=None if FLAGS.class_names is None else tuple(FLAGS.class_names))
        path = export.export_from_model_dir(FLAGS.model_dir, FLAGS.export_dir, config)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    print(f"Wrote {path}")
    print(f"  signatures: {export.SERVING_DEFAULT} ({export.BYTES_INPUT}: string [B]), "
          f"{export.SERVING_IMAGES} ({export.IMAGES_INPUT}: uint8 [B,H,W,3]), "
          f"{export.SERVING_COMPACT} ({export.BYTES_INPUT}: string [B])")
    print(f"  class names: {export.load_class_names(path)}")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
