"""A lower bound on the plain-graph time of any candidate-pass seed selection.

`ops.seeds.select_seeds` gets the paper's greedy seeds exactly in a few passes (see
`ops.seeds.SeedPasses`): each pass scores every pixel, takes the C best as candidates,
computes their [C, C] scores, picks seeds among them one after another, and updates the
nearest-seed distances of all pixels. In TF's plain graph executor (the way TF Serving
runs a model by default) each op costs 1-3 us of bookkeeping on a small CPU, whatever
its size, so the sequential picks and the per-pass ops set a floor under the time.

This times skeletons of that design with everything that makes it correct removed (no
certification against a bound, no chosen-pixel masking, no tie rules, no loop and no
gating): per pass one score over the N pixels, one top_k, the candidates' [C, C] scores,
an even share of the 99 picks (three ops each, the fewest a pick takes) and, except
after the last pass, one distance update of all pixels from 8 seeds (the fewest rows
`SeedPasses` updates with); plus the dense work every version does
(seediness, centring, classes and the masks of the 100 seeds). An exact version of the
same design does all of this and more (it picks at least 99 times), so the skeleton with
as many passes is a floor for it. All the functions are timed in turn, call by call, so
that they share the machine's changing load (alone, one after the other, the spread
between runs on a shared VM exceeds the differences). Only the plain graph is timed:
under XLA, which fuses the picks, these op counts do not set the time
(benchmarks/postprocess.py times ours under XLA).

It also prints the highest rank R (0 = best) the greedy's seeds have among the scores at
the start of the first pass: a single pass would need all of them among its candidates,
and as the last candidate bounds the others and is never kept, at least C = R + 2
candidates (a necessary condition, not a sufficient one). The skeletons
are timed with C = 128 for 1-3 passes, with C = 256 for two (what this scene's greedy
takes with C = 256: benchmarks/seed_selection.py) and with that C for one pass.

Scene, NumPy version and timing as in benchmarks/postprocess.py (the 64 x 64 heads of a
512 x 512 image, d = 64, K = 100), whose 10x target this bounds.

Usage: python benchmarks/postprocess_floor.py [--size 64] [--repeats 200]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from instance_embed import inference
from instance_embed.ops import geometry
from instance_embed.ops import masks as masks_lib
from instance_embed.ops import seeds as seeds_lib

import postprocess  # benchmarks/postprocess.py: scene, NumPy version, ours
import timing  # benchmarks/timing.py

NUM_PICKS = 99  # the first seed is the argmax of the seediness
CANDIDATES = 128
# The fewest rows of a distance update: `PassSizes.first_block`.
UPDATE_ROWS = seeds_lib.DEFAULT_PASS_SIZES.first_block


def first_pass_ranks(embeddings, probs, seeds, alpha):
    """Ranks (0 = best) of the greedy's seeds 2..K among the scores after the first seed."""
    points = embeddings[0].reshape(-1, embeddings.shape[-1]).astype(np.float64)
    num_pixels = points.shape[0]
    log_seediness = postprocess.numpy_log_seediness(probs[0])
    dist = ((points - points[seeds[0]]) ** 2).sum(axis=1)
    with np.errstate(divide="ignore"):
        scores = log_seediness + alpha * np.log(dist)
    scores[seeds[0]] = -np.inf
    ranks = np.empty(num_pixels, np.int64)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(num_pixels)
    return ranks[seeds[1:]]


def classes_and_masks(taus, embeddings, class_probs, pixels, seeds):
    """The dense work after seed selection: (seeds, classes, scores, masks) of `seeds`."""
    tau_index, classes, scores = masks_lib.seed_classes_and_scores(class_probs, seeds)
    masks = masks_lib.grow_masks_from_geometry(pixels, tf.shape(embeddings)[1:3], seeds,
                                               tf.gather(taus, tau_index))
    return seeds, classes, scores, masks


def make_skeleton(config, num_passes, num_candidates):
    """The skeleton described in the module docstring, as a `tf.function`."""
    taus = tf.constant(postprocess.TAUS, tf.float32)
    alpha = tf.constant(config.alpha, tf.float32)
    shares = [len(share) for share in np.array_split(np.arange(NUM_PICKS), num_passes)]

    def skeleton(embeddings, class_probs):
        seed_map = seeds_lib.seediness(class_probs)
        pixels = geometry.pixel_geometry(embeddings)
        points, norms = pixels[0][0], pixels[1][0]  # [N, d], [N]
        log_seediness = tf.math.log(tf.reshape(seed_map, [-1]))  # [N]
        first = tf.argmax(log_seediness, output_type=tf.int32)
        min_dist = tf.reduce_sum(tf.square(points - points[first]), axis=1)  # [N]
        picked = [first[tf.newaxis]]
        for index, share in enumerate(shares):
            scores = log_seediness + tf.math.xlogy(alpha, min_dist)
            top = tf.math.top_k(scores, k=num_candidates)
            candidate_points = tf.gather(points, top.indices)
            candidate_norms = tf.gather(norms, top.indices)
            candidate_dist = (tf.matmul(-2.0 * candidate_points, candidate_points,
                                        transpose_b=True)
                              + candidate_norms[:, tf.newaxis] + candidate_norms[tf.newaxis])
            if_chosen = (tf.gather(log_seediness, top.indices)[tf.newaxis]
                         + tf.math.xlogy(alpha, tf.maximum(candidate_dist, 0.0)))
            current = top.values[tf.newaxis]  # [1, C]
            positions = []
            for _ in range(share):
                best = tf.math.top_k(current, k=1)
                positions.append(best.indices)
                current = tf.minimum(current, tf.gather_nd(if_chosen, best.indices))
            new = tf.gather(top.indices, tf.reshape(tf.concat(positions, axis=0), [share]))
            picked.append(new)
            if index + 1 < num_passes:
                rows = new[:UPDATE_ROWS]
                cross = tf.matmul(points, -2.0 * tf.gather(points, rows), transpose_b=True)
                nearest = tf.reduce_min(cross + tf.gather(norms, rows)[tf.newaxis], axis=1)
                min_dist = tf.minimum(min_dist, nearest + norms)
        seeds = tf.concat(picked, axis=0)[tf.newaxis]  # [1, K]
        return classes_and_masks(taus, embeddings, class_probs, pixels, seeds)

    return tf.function(skeleton, autograph=False)


def make_dense_only(config, seeds):
    """The dense work alone: seediness, centring, classes and masks of given seeds."""
    taus = tf.constant(postprocess.TAUS, tf.float32)

    def dense(embeddings, class_probs):
        seed_map = seeds_lib.seediness(class_probs)
        pixels = geometry.pixel_geometry(embeddings)
        # Depends on the seediness so that it is not pruned.
        given = seeds + tf.cast(seed_map[0, 0, 0] > 2.0, tf.int32)
        return classes_and_masks(taus, embeddings, class_probs, pixels, given)

    return tf.function(dense, autograph=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="heads' resolution")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension d")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    config = inference.InferenceConfig(num_seeds=NUM_PICKS + 1)
    embeddings, probs, _ = postprocess.make_scene(np.random.default_rng(0), args.size,
                                                  args.dim)
    e_tf, p_tf = tf.constant(embeddings), tf.constant(probs)
    np_args = (embeddings[0], probs[0], config.num_seeds, config.alpha, postprocess.TAUS)
    np_seeds, _ = postprocess.numpy_postprocess(*np_args)
    ranks = first_pass_ranks(embeddings, probs, np_seeds, config.alpha)
    num_pixels = args.size * args.size
    one_pass_candidates = min(int(-(-(ranks.max() + 2) // 64) * 64), num_pixels)

    rows = [("call overhead (one scalar op)", tf.function(lambda e: e[0, 0, 0, 0] + 1.0),
             (e_tf,))]
    rows.append(("dense work only (no seed selection)",
                 make_dense_only(config, tf.constant(np_seeds[None], tf.int32)), (e_tf, p_tf)))
    for passes, candidates in ((1, one_pass_candidates), (1, CANDIDATES), (2, CANDIDATES),
                               (2, 2 * CANDIDATES), (3, CANDIDATES)):
        rows.append((f"skeleton, {passes} pass{'es' if passes > 1 else ''}, C = {candidates}",
                     make_skeleton(config, passes, candidates), (e_tf, p_tf)))
    rows.append(("ours (heads_resolution_detections)", postprocess.make_ours(config, False),
                 (e_tf, p_tf)))

    numpy_ms = 1e3 * min(timing.wall_times(lambda: postprocess.numpy_postprocess(*np_args),
                                           max(5, args.repeats // 10), warmup=1))
    print(f"Plain-graph floor of candidate-pass seed selection, {args.size}x{args.size} heads, "
          f"d={args.dim}, K={config.num_seeds}; TF {tf.__version__}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"Greedy seeds' ranks among the first pass's scores: median {int(np.median(ranks))}, "
          f"max {int(ranks.max())} (one pass needs C >= {int(ranks.max()) + 2})")
    header = f"{'plain tf.function':<44} {'min (ms)':>9} {'median':>9} {'NumPy / min':>12}"
    print(header)
    print("-" * len(header))
    calls = [lambda fn=fn, inputs=inputs: tf.nest.map_structure(lambda t: t.numpy(),
                                                                 fn(*inputs))
             for _, fn, inputs in rows]
    for call in calls:  # warm-up: tracing, then the executor's caches
        for _ in range(5):
            call()
    times = np.zeros((args.repeats, len(rows)))
    for repeat in range(args.repeats):
        for row, call in enumerate(calls):
            times[repeat, row] = timing.wall_times(call, 1, warmup=0)[0] * 1e3
    for (name, _, _), column in zip(rows, times.T):
        print(f"{name:<44} {column.min():>9.2f} {np.median(column):>9.2f} "
              f"{numpy_ms / column.min():>11.1f}x")
    print(f"NumPy, same algorithm: {numpy_ms:.2f} ms (min); the 10x target needs "
          f"<= {numpy_ms / 10:.2f} ms.")


if __name__ == "__main__":
    main()
