"""Speed of the paper's post-processing against a NumPy version and clustering baselines.

For a 512 x 512 input image, the heads' resolution is 64 x 64 at output stride 8 (the
default model) and 128 x 128 at stride 4. On each, with d = 64 embeddings and K = 100
seeds, this times:

- ours: `inference.heads_resolution_detections` (`seediness`, `select_seeds`,
  `seed_classes_and_scores` and `grow_masks` sharing the centred embeddings, and the
  detections sorted by score) in one `tf.function`, plain and with `jit_compile=True`;
- ours, the whole `predict_instances` (softmax, sorting, masks drawn at 512 x 512, boxes
  and the instance map), the part the exported model runs after the network, with
  bilinear masks (the default; also with `InferenceConfig.jit_compile`) and with joint
  bilateral masks (on a synthetic image whose colours follow the instances);
- the same algorithm written straightforwardly in NumPy (per-step vectorised greedy
  loop, masks from one matmul), checked to pick the same seeds;
- the grouping used by the discriminative-loss family of methods on the same
  embeddings: scikit-learn's MeanShift (bandwidth estimated on a 1000-pixel sample, and
  started from a random 1/16 of the pixels rather than every pixel, which bounds its
  running time; `bin_seeding` does not work in 64-d) and HDBSCAN.

Embeddings are a realistic synthetic scene: 10 elliptical, partly occluding instances
and the background, each a tight Gaussian blob around its own centre in 64-d, and class
probabilities that make instance interiors good seeds. The "GT found" column counts the
visible ground-truth instances that some mask or cluster covers with IoU >= 0.5, to
show the groupings being timed are meaningful.

Timings are the best of several back-to-back runs after warm-up (the machine may be
shared). Each method is timed in its own run of calls: a call right after other work
finds TF's worker threads asleep and the caches cold (our plain graph took 1.3-2x as
long right after a NumPy call, or when the two were timed in turns). The clustering
baselines run once per resolution (they take seconds). scikit-learn is a
benchmark-only dependency (`pip install scikit-learn`); without it those rows are
skipped.

Usage: python benchmarks/postprocess.py [--sizes 64,128] [--repeats 20] [--no_sklearn]
"""

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from scipy import ndimage

from instance_embed import inference
from instance_embed.model.config import PAPER_TAUS as TAUS

import timing  # benchmarks/timing.py

IMAGE_SIZE = 512
NUM_TAUS = len(TAUS)
NUM_CLASSES = 20
NUM_INSTANCES = 10
MEANSHIFT_SEED_STRIDE = 16  # MeanShift starts from 1 pixel in 16
OURS_PLAIN = "ours, tf.function"
OURS_XLA = "ours, XLA (jit_compile)"


def make_scene(rng, size, dim):
    """A synthetic heads-resolution output: (embeddings, class_probs, labels).

    Returns float32 [1, size, size, dim], float32 [1, size, size, T, C+1] and the int
    [size, size] instance labels (0 = background) the embeddings were drawn from.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    labels = np.zeros((size, size), np.int32)
    for instance in range(1, NUM_INSTANCES + 1):
        cy, cx = rng.uniform(0.12, 0.88, 2)
        ry, rx = rng.uniform(0.07, 0.2, 2)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = instance
    # Centres ~2.8 apart (squared distance ~8) and within-instance squared distances
    # ~0.3: well separated at every tau, as a trained embedding should be.
    centres = rng.normal(size=(NUM_INSTANCES + 1, dim)) * (2.0 / np.sqrt(dim))
    embeddings = centres[labels] + rng.normal(size=(size, size, dim)) * 0.05

    classes = rng.integers(1, NUM_CLASSES + 1, size=NUM_INSTANCES + 1)
    logits = 0.5 * rng.normal(size=(size, size, NUM_TAUS, NUM_CLASSES + 1))
    logits[..., 0] += 3.0 * (labels == 0)[..., None]
    for instance in range(1, NUM_INSTANCES + 1):
        region = labels == instance
        if region.any():
            depth = ndimage.distance_transform_edt(region)
            interior = depth / depth.max()  # pixels deep inside make the best seeds
            logits[..., classes[instance]] += (region * (1.0 + 4.0 * interior))[..., None]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (embeddings[None].astype(np.float32), probs[None].astype(np.float32), labels)


def numpy_foreground(class_probs):
    """[h, w, T, C+1] class probabilities -> [h * w, T, C], the foreground classes'."""
    return class_probs.reshape(-1, *class_probs.shape[-2:])[:, :, 1:]


def numpy_log_seediness(class_probs):
    """[h, w, T, C+1] class probabilities -> [h * w], log of the seediness (-inf at 0)."""
    with np.errstate(divide="ignore"):
        return np.log(numpy_foreground(class_probs).max(axis=(1, 2)))


def numpy_postprocess(embeddings, class_probs, num_seeds, alpha, taus):
    """The same algorithm in plain NumPy, one image: (seeds [K], masks bool [K, h, w])."""
    h, w, dim = embeddings.shape
    points = embeddings.reshape(-1, dim)
    foreground = numpy_foreground(class_probs)
    log_seediness = numpy_log_seediness(class_probs)
    with np.errstate(divide="ignore"):
        chosen = np.zeros(h * w, bool)
        nearest = np.full(h * w, np.inf)
        seeds = []
        for t in range(num_seeds):
            score = log_seediness if t == 0 else log_seediness + alpha * np.log(nearest)
            score = np.where(chosen, -np.inf, score)
            seed = int(np.argmax(score))
            seeds.append(seed)
            chosen[seed] = True
            nearest = np.minimum(nearest, ((points - points[seed]) ** 2).sum(axis=1))
    seeds = np.array(seeds)
    per_seed = foreground[seeds].reshape(num_seeds, -1)
    best = per_seed.argmax(axis=1)
    tau_index = best // foreground.shape[-1]
    thresholds = np.log(2.0 / np.asarray(taus)[tau_index] - 1.0)
    seed_points = points[seeds]
    dist = ((points ** 2).sum(1)[:, None] + (seed_points ** 2).sum(1)[None, :]
            - 2.0 * points @ seed_points.T)
    masks = (dist <= thresholds[None, :]).T.reshape(num_seeds, h, w)
    return seeds, masks


def make_ours(config, jit):
    def postprocess(embeddings, class_probs):
        detections = inference.heads_resolution_detections(embeddings, class_probs, TAUS,
                                                           config)
        return tuple(detections[key] for key in ("seed_indices", "classes", "scores", "masks"))

    # AutoGraph off, as in the exported signatures: the module needs none.
    return tf.function(postprocess, jit_compile=jit, autograph=False)


def make_full(config, jit):
    """`predict_instances` as the exported model runs it (`jit`: with
    `InferenceConfig.jit_compile`, the heads-resolution part under XLA)."""
    config = dataclasses.replace(config, jit_compile=jit)
    size = tf.constant([IMAGE_SIZE, IMAGE_SIZE])

    def predict(embeddings, class_logits, images=None):
        return inference.predict_from_outputs(
            {"embeddings": embeddings, "class_logits": class_logits}, size, size, TAUS,
            config, images)

    return tf.function(predict, autograph=False)


def make_image(rng, labels):
    """float32 [1, 512, 512, 3]: a colour per instance, upsampled, plus noise."""
    colours = rng.uniform(0, 255, (NUM_INSTANCES + 1, 3))
    factor = IMAGE_SIZE // labels.shape[0]
    image = colours[np.kron(labels, np.ones((factor, factor), np.int32))]
    image += rng.normal(scale=8.0, size=image.shape)
    return np.clip(image, 0, 255)[None].astype(np.float32)


def time_it(fn, repeats, warmup=2):
    """Best of `repeats` wall times after `warmup` calls."""
    return min(timing.wall_times(fn, repeats, warmup))


def instances_found(labels, masks):
    """(instances some mask matches with IoU >= 0.5, visible instances); no background."""
    found = 0
    flat_masks = masks.reshape(len(masks), -1)
    instances = [value for value in np.unique(labels) if value > 0]
    for value in instances:
        region = (labels == value).reshape(-1)
        inter = (flat_masks & region).sum(1)
        union = (flat_masks | region).sum(1)
        found += bool((inter / np.maximum(union, 1) >= 0.5).any())
    return found, len(instances)


def cluster_masks(cluster_labels, shape):
    ids = [c for c in np.unique(cluster_labels) if c >= 0]  # HDBSCAN's -1 is noise
    return np.stack([(cluster_labels == c).reshape(shape) for c in ids]), len(ids)


def run(size, dim, config, repeats, with_sklearn, rng):
    embeddings, probs, labels = make_scene(rng, size, dim)
    logits = np.log(probs)
    e_tf, p_tf, l_tf = tf.constant(embeddings), tf.constant(probs), tf.constant(logits)
    rows = []

    ours = {jit: make_ours(config, jit) for jit in (False, True)}
    results = {jit: fn(e_tf, p_tf) for jit, fn in ours.items()}
    # Detections come sorted by score: seeds are compared as sets.
    ours_seeds = np.sort(results[True][0].numpy()[0])
    if not np.array_equal(ours_seeds, np.sort(results[False][0].numpy()[0])):
        raise AssertionError("jit and plain tf.function picked different seeds")
    for jit, fn in ours.items():
        seconds = time_it(lambda: [t.numpy() for t in fn(e_tf, p_tf)], repeats)
        found = instances_found(labels, results[jit][3].numpy()[0])
        rows.append((OURS_XLA if jit else OURS_PLAIN, seconds, f"{found[0]}/{found[1]}",
                     config.num_seeds))

    for jit in (False, True):
        fn = make_full(config, jit)
        seconds = time_it(lambda: {k: v.numpy() for k, v in fn(e_tf, l_tf).items()}, repeats)
        name = (f"ours, predict_instances to {IMAGE_SIZE}x{IMAGE_SIZE}"
                + (", jit_compile" if jit else ""))
        rows.append((name, seconds, "", config.num_seeds))
    # Joint bilateral drawing of the full-resolution masks (plain graph, as exported).
    bilateral = make_full(dataclasses.replace(config, mask_upsampling="joint_bilateral"), False)
    i_tf = tf.constant(make_image(rng, labels))
    seconds = time_it(
        lambda: {k: v.numpy() for k, v in bilateral(e_tf, l_tf, i_tf).items()}, repeats)
    rows.append(("ours, predict_instances, joint bilateral masks", seconds, "",
                 config.num_seeds))

    np_args = (embeddings[0], probs[0], config.num_seeds, config.alpha, TAUS)
    np_seeds, np_masks = numpy_postprocess(*np_args)
    agree = len(np.intersect1d(np_seeds, ours_seeds)) / len(np_seeds)
    seconds = time_it(lambda: numpy_postprocess(*np_args), max(3, repeats // 2), warmup=1)
    found = instances_found(labels, np_masks)
    rows.append((f"NumPy, same algorithm (seeds agree: {agree:.0%})", seconds,
                 f"{found[0]}/{found[1]}", config.num_seeds))

    if with_sklearn:
        from sklearn import cluster

        points = embeddings[0].reshape(-1, embeddings.shape[-1])
        bandwidth = cluster.estimate_bandwidth(points, quantile=0.2, n_samples=1000,
                                               random_state=0)
        # bin_seeding's grid bins lie too far from every point in 64-d (sklearn then
        # fails with "No point was within bandwidth"), so MeanShift starts from a random
        # sample of pixels instead, which also bounds its running time.
        num_seeds = len(points) // MEANSHIFT_SEED_STRIDE
        seeds = points[rng.choice(len(points), num_seeds, replace=False)]
        for name, model in (
                (f"scikit-learn MeanShift ({num_seeds} seed pixels)",
                 cluster.MeanShift(bandwidth=bandwidth, seeds=seeds, n_jobs=-1)),
                ("scikit-learn HDBSCAN (min_cluster_size=20)",
                 cluster.HDBSCAN(min_cluster_size=20, n_jobs=-1, copy=True))):
            start = time.perf_counter()
            assignment = model.fit_predict(points)
            seconds = time.perf_counter() - start
            masks, count = cluster_masks(assignment, labels.shape)
            found = instances_found(labels, masks)
            rows.append((name, seconds, f"{found[0]}/{found[1]}", count))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128",
                        help="heads' resolutions to measure (64 = stride 8, 128 = stride 4)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension d")
    parser.add_argument("--num_seeds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no_sklearn", action="store_true",
                        help="skip the MeanShift and HDBSCAN rows")
    args = parser.parse_args()

    with_sklearn = not args.no_sklearn
    if with_sklearn:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("scikit-learn is not installed (pip install scikit-learn): "
                  "MeanShift and HDBSCAN rows skipped")
            with_sklearn = False

    config = inference.InferenceConfig(num_seeds=args.num_seeds)
    print(f"Post-processing of a {IMAGE_SIZE}x{IMAGE_SIZE} image, d={args.dim}, "
          f"K={config.num_seeds}, alpha={config.alpha}, T={TAUS}, C={NUM_CLASSES}; "
          f"TF {tf.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = f"{'heads':>7}  {'method':<52} {'time (ms)':>10} {'x ours XLA':>10} " \
             f"{'GT found':>9} {'masks':>6}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    verdicts = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows = run(size, args.dim, config, args.repeats, with_sklearn, rng)
        times = {name: seconds for name, seconds, _, _ in rows}
        reference = times[OURS_XLA]
        for name, seconds, found, count in rows:
            print(f"{size:>3}x{size:<3}  {name:<52} {seconds * 1e3:>10.1f} "
                  f"{seconds / reference:>10.1f} {found:>9} {count:>6}")
        for ours in (OURS_XLA, OURS_PLAIN):
            for prefix, target in (("NumPy", 10), ("scikit-learn MeanShift", 100)):
                other = next((t for n, t in times.items() if n.startswith(prefix)), None)
                if other is not None:
                    ratio = other / times[ours]
                    verdict = "met" if ratio >= target else "NOT met"
                    verdicts.append(f"{size}x{size}, {ours}: {prefix} / ours = {ratio:.1f} "
                                    f"(target >= {target}: {verdict})")
    print("'x ours XLA' = time / time of ours under XLA on the same resolution; "
          "'masks' = seeds (ours, NumPy) or clusters (scikit-learn).")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
