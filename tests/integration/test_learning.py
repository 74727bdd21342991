"""The light model learns: the embedding loss falls and grown masks match the instances.

Issue 3's learning test: trained on a handful of synthetic images, the light model
drives L_e down by at least 5x, and masks grown from one ground-truth pixel per
instance at tau = 0.5 reach a mean IoU above 0.8 on those images. Training uses uniform
pair weights (`instance_size_weighting=False`): with the paper's inverse-size weights
the background's pairs weigh so little that the same budget leaves background pixels
inside the grown masks (docs/results.md has the measured ablation).
"""

import keras
import numpy as np
import tensorflow as tf

from instance_embed import data
from instance_embed import losses
from instance_embed.losses import sampling
from instance_embed.data import augment
from instance_embed.data import pipeline
from instance_embed.model import ModelConfig
from instance_embed.model import build_model

NUM_IMAGES = 8
STEPS = 150  # IoU 1.0 and L_e down ~100x here by step 150 (0.97 and ~50x at 100)


def _grown_mask_ious(embeddings, labels, tau=0.5):
    """IoU of the mask grown from each instance's middle pixel (NumPy, heads' resolution)."""
    threshold = np.log(2.0 / tau - 1.0)  # sigma >= tau  <=>  d2 <= log(2 / tau - 1)
    ious = []
    for emb, lab in zip(embeddings, labels):
        for instance in range(1, lab.max() + 1):
            rows, cols = np.nonzero(lab == instance)
            if rows.size == 0:
                continue
            seed = emb[rows[rows.size // 2], cols[rows.size // 2]]
            mask = ((emb - seed) ** 2).sum(-1) <= threshold
            mask &= lab >= 0
            truth = lab == instance
            ious.append((mask & truth).sum() / (mask | truth).sum())
    return np.array(ious)


def test_light_model_learns_a_handful_of_images(tmp_path):
    keras.utils.set_random_seed(0)
    examples = data.load("synthetic_shapes", "train", data_dir=str(tmp_path),
                         config="tiny").take(NUM_IMAGES)
    input_config = pipeline.InputConfig(
        image_size=64, max_instances=12, shuffle_buffer=1,
        augment=augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=False))
    batch = next(iter(pipeline.train_dataset(examples, input_config, NUM_IMAGES, seed=0)))
    model_config = ModelConfig(backbone="light", output_stride=4, num_classes=3,
                               embedding_dim=16)
    model = build_model(model_config)
    loss_fn = losses.InstanceLoss(losses.LossConfig(
        instance_size_weighting=False, cls_warmup_steps=STEPS // 3,
        cls_ramp_steps=STEPS // 3), model_config.taus)
    optimizer = keras.optimizers.Adam(3e-3)

    @tf.function
    def train_step(step):
        with tf.GradientTape() as tape:
            outputs = model(batch["image"], training=True)
            values = loss_fn(outputs, batch, step=step,
                             seed=tf.stack([tf.constant(0, tf.int64), step]))
        grads = tape.gradient(values["total"], model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return values["embedding"]

    history = [float(train_step(tf.constant(i, tf.int64))) for i in range(STEPS)]
    first, last = np.mean(history[:5]), np.mean(history[-20:])
    assert last < first / 5, (first, last)

    outputs = model(batch["image"], training=False)
    embeddings = outputs["embeddings"].numpy()
    labels = sampling.labels_at_resolution(batch["instances"], embeddings.shape[1:3]).numpy()
    ious = _grown_mask_ious(embeddings, labels)
    assert ious.size >= NUM_IMAGES
    assert ious.mean() > 0.8, ious
