"""TensorBoard pictures of training and the embedding projector.

Every `summary_every` steps the trainer shows the same few training images (fixed, so
pictures are comparable across steps):

* `input/image`, `input/ground_truth` (instances in colour, ignore in grey);
* `output/embeddings_rgb`: the embeddings through a fixed random projection to RGB (the
  paper's Figure 3);
* `output/seediness`: the seediness map (Figure 6);
* `output/predicted_instances`: the paper's inference (`inference.make_predict_fn`).

The projector (`tensorboard.plugins.projector`) gets pixel embeddings sampled from those
images, with a metadata TSV of image, instance id and class, in `model_dir/projector/`
(its own folder: the plugin reads the latest checkpoint of its log directory).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector

from instance_embed import data as datasets
from instance_embed import visualize
from instance_embed.data import pipeline
from instance_embed.inference import make_predict_fn
from instance_embed.losses.sampling import labels_at_resolution

NUM_SUMMARY_IMAGES = 4
PROJECTOR_POINTS_PER_IMAGE = 512
PROJECTOR_TENSOR = "embeddings"


class TrainingPictures:
    """Writes image summaries and the projector for a fixed batch of training images.

    Args:
      model: the Keras model being trained.
      config: the run's `ExperimentConfig`.
      num_images: how many training images to show.
    """

    def __init__(self, model, config, num_images: int = NUM_SUMMARY_IMAGES):
        examples = datasets.load(
            config.dataset.name, config.dataset.train_split, data_dir=config.dataset.data_dir,
            manual_dir=config.dataset.manual_dir, config=config.dataset.builder_config)
        batches = pipeline.train_dataset(examples.take(num_images), config.input,
                                         batch_size=1, seed=config.train.seed, repeat=False)
        batch = [b for b in batches.take(num_images)]
        self.images = tf.concat([b["image"] for b in batch], axis=0)
        self.instances = tf.concat([b["instances"] for b in batch], axis=0).numpy()
        self.instance_classes = tf.concat([b["instance_classes"] for b in batch], 0).numpy()
        self.predict = make_predict_fn(model, config.model.taus, config.inference)

    def write_images(self, writer, step: int) -> None:
        outputs = self.predict(self.images)
        probs = outputs["class_probs"].numpy()
        seediness = probs[..., 1:].max(axis=(-1, -2))
        count = len(self.images)
        with writer.as_default(step=step):
            tf.summary.image("input/image", tf.cast(self.images, tf.uint8), max_outputs=count)
            tf.summary.image("input/ground_truth",
                             visualize.colorize_instances(self.instances), max_outputs=count)
            tf.summary.image("output/embeddings_rgb",
                             visualize.project_embeddings(outputs["embeddings"].numpy()),
                             max_outputs=count)
            tf.summary.image("output/seediness", visualize.heatmap(seediness),
                             max_outputs=count)
            tf.summary.image("output/predicted_instances",
                             visualize.colorize_instances(outputs["instance_map"].numpy()),
                             max_outputs=count)
        writer.flush()

    def write_projector(self, log_dir: str, seed: int = 0) -> None:
        """Saves sampled pixel embeddings and their metadata for the projector plugin."""
        outputs = self.predict(self.images)
        embeddings = outputs["embeddings"].numpy()
        count, height, width, dim = embeddings.shape
        labels = labels_at_resolution(self.instances, (height, width)).numpy()
        rng = np.random.default_rng(seed)
        rows, metadata = [], ["image\tinstance\tclass"]
        for i in range(count):
            flat_labels = labels[i].reshape(-1)
            candidates = np.flatnonzero(flat_labels >= 0)
            take = rng.choice(candidates, min(PROJECTOR_POINTS_PER_IMAGE, candidates.size),
                              replace=False)
            rows.append(embeddings[i].reshape(-1, dim)[take])
            for index in take:
                instance = int(flat_labels[index])
                cls = int(self.instance_classes[i, instance - 1]) if instance > 0 else 0
                metadata.append(f"{i}\t{instance}\t{cls}")
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "metadata.tsv"), "w", encoding="utf-8") as f:
            f.write("\n".join(metadata) + "\n")
        variable = tf.Variable(np.concatenate(rows, axis=0), name=PROJECTOR_TENSOR)
        tf.train.Checkpoint(**{PROJECTOR_TENSOR: variable}).save(
            os.path.join(log_dir, "embeddings.ckpt"))
        projector_config = projector.ProjectorConfig()
        embedding = projector_config.embeddings.add()
        embedding.tensor_name = f"{PROJECTOR_TENSOR}/.ATTRIBUTES/VARIABLE_VALUE"
        embedding.metadata_path = "metadata.tsv"
        projector.visualize_embeddings(log_dir, projector_config)
