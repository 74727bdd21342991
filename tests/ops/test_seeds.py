"""Tests of `instance_embed.ops.seeds`: seediness and the greedy, diverse seed
selection, against the NumPy reference (`numpy_inference` in conftest.py) and against
the earlier one-seed-per-step implementation kept here, in every execution mode."""

import functools
import math

import numpy as np
import pytest
import tensorflow as tf

from instance_embed.ops import geometry
from instance_embed.ops import seeds as seed_ops


# ----------------------------------------------------------------------------------
# The previous implementation of `select_seeds`, one seed per step, kept as it was (but
# for the argument checks) as a reference: the batched version must pick the same seeds,
# in every execution mode.


OLD_SEED_STEPS_PER_LOOP = 10


def old_select_seeds(embeddings, seediness, num_seeds, alpha, valid_pixels=None):
    """`seed_ops.select_seeds` before the batched passes (argument checks left out)."""
    embeddings = tf.cast(embeddings, tf.float32)
    points = geometry.centred_points(embeddings)  # [B, N, d]
    log_seediness = tf.math.log(tf.reshape(tf.cast(seediness, tf.float32),
                                           tf.shape(points)[:2]))  # [B, N]
    if valid_pixels is None:
        allowed = tf.ones_like(log_seediness, tf.bool)
    else:
        allowed = tf.reshape(valid_pixels, tf.shape(log_seediness))
    alpha = tf.cast(alpha, tf.float32)
    return tf.map_fn(
        lambda image: old_greedy_seeds(*image, num_seeds=num_seeds, alpha=alpha),
        (points, log_seediness, allowed),
        fn_output_signature=tf.TensorSpec([num_seeds], tf.int32))


def old_greedy_seeds(points, log_seediness, allowed, num_seeds, alpha):
    norms = tf.reduce_sum(tf.square(points), axis=-1, keepdims=True)  # [N, 1]
    ones = tf.ones_like(norms)
    columns = tf.transpose(tf.concat([points, norms, ones], axis=-1))  # [d + 2, N]
    seed_rows = tf.concat([-2.0 * points, ones, norms], axis=-1)  # [N, d + 2]
    log_seediness = log_seediness[tf.newaxis]  # [1, N]
    allowed = allowed[tf.newaxis]
    pixel_ids = tf.range(tf.shape(points)[0])[tf.newaxis]

    def distances_to(index):  # int32 [1] -> [1, N]
        return tf.matmul(tf.gather(seed_rows, index), columns)

    first = seed_ops.first_argmax(log_seediness, allowed)  # [1]
    chosen = tf.logical_or(pixel_ids == first, tf.logical_not(allowed))
    min_dist = distances_to(tf.maximum(first, 0))

    def step(chosen, min_dist):
        scores = log_seediness + tf.math.xlogy(alpha, min_dist)
        scores = tf.where(scores >= seed_ops.LOWEST_SCORE, scores, seed_ops.LOWEST_SCORE)
        scores = tf.where(chosen, -math.inf, scores)
        new = tf.math.top_k(scores, k=1, sorted=False).indices[0]  # [1]
        chosen = tf.logical_or(chosen, pixel_ids == new)
        return new, chosen, tf.minimum(min_dist, distances_to(new))

    def steps(count, chosen, min_dist):
        new_seeds = []
        for _ in range(count):
            new, chosen, min_dist = step(chosen, min_dist)
            new_seeds.append(new)
        return tf.concat(new_seeds, axis=0), chosen, min_dist

    num_loops, remainder = divmod(num_seeds - 1, OLD_SEED_STEPS_PER_LOOP)
    parts = [first]
    if num_loops:
        def body(i, written, chosen, min_dist):
            new_seeds, chosen, min_dist = steps(OLD_SEED_STEPS_PER_LOOP, chosen, min_dist)
            return i + 1, written.write(i, new_seeds), chosen, min_dist

        written = tf.TensorArray(tf.int32, size=num_loops,
                                 element_shape=tf.TensorShape([OLD_SEED_STEPS_PER_LOOP]))
        _, written, chosen, min_dist = tf.while_loop(
            lambda i, *_: i < num_loops, body, (tf.constant(0), written, chosen, min_dist))
        parts.append(tf.reshape(written.stack(), [num_loops * OLD_SEED_STEPS_PER_LOOP]))
    if remainder:
        parts.append(steps(remainder, chosen, min_dist)[0])
    seeds = tf.concat(parts, axis=0)
    num_allowed = tf.reduce_sum(tf.cast(allowed, tf.int32))
    return tf.where(tf.range(num_seeds) < num_allowed, seeds, -1)


def test_seediness_matches_numpy(numpy_inference):
    rng = np.random.default_rng(1)
    _, logits = numpy_inference.random_inputs(rng, batch=2, h=5, w=6)
    probs = numpy_inference.softmax(logits).astype(np.float32)
    got = seed_ops.seediness(probs).numpy()
    assert got.shape == (2, 5, 6)
    for b in range(2):
        np.testing.assert_array_equal(got[b],
                                      numpy_inference.seediness(probs[b]).astype(np.float32))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 2.0])
def test_select_seeds_matches_numpy(alpha, numpy_inference):
    rng = np.random.default_rng(2)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=9, w=11, d=5)
    seed_map = np.stack([numpy_inference.seediness(numpy_inference.softmax(logits[b]))
                         for b in (0, 1)])
    seed_map = seed_map.astype(np.float32)
    seed_map[0, 2, 3] = 0.0  # log 0 = -inf must not break the argmax
    got = seed_ops.select_seeds(embeddings, seed_map, 25, alpha).numpy()
    assert got.dtype == np.int32 and got.shape == (2, 25)
    for b in range(2):
        assert got[b].tolist() == numpy_inference.select_seeds(embeddings[b], seed_map[b], 25,
                                                               alpha)
    assert len(set(got[0].tolist())) == 25


@pytest.mark.parametrize("num_seeds", [1, 2, 10, 11, 12, 20, 21, 31])
def test_select_seeds_matches_numpy_for_every_seed_count_and_valid_pixels(num_seeds,
                                                                         numpy_inference):
    # Seed counts on both sides of the loop's chunk size (10 steps per iteration) and
    # of the number of valid pixels (14 of 20), so exhaustion falls inside a chunk.
    rng = np.random.default_rng(num_seeds)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=4, w=5, d=3)
    seed_map = np.stack([numpy_inference.seediness(numpy_inference.softmax(logits[b]))
                         for b in range(2)])
    seed_map = seed_map.astype(np.float32)
    valid = np.ones((2, 4, 5), bool)
    valid[0, :, 3:] = False  # 12 valid pixels
    valid[1, 3, :] = False  # 15
    valid[1, 0, 0] = False  # 14
    got = seed_ops.select_seeds(embeddings, seed_map, num_seeds, 0.3,
                                 valid_pixels=tf.constant(valid)).numpy()
    assert got.shape == (2, num_seeds)
    for b in range(2):
        assert got[b].tolist() == numpy_inference.select_seeds(
            embeddings[b], seed_map[b], num_seeds, 0.3, valid[b])


def test_select_seeds_hand_worked_ties_and_exhaustion():
    # 2 x 3 image, 1-d embeddings. Pixel 3 has the top seediness; then pixels 2 and 5
    # tie (same S, D = 4) -> 2; then 0 and 4 tie (S = .5, D = 1) -> 0; then 1, 4, 5 all
    # score -inf (D = 0) -> lowest unchosen first; then no pixel is left -> -1.
    embeddings = np.array([0.0, 1.0, -1.0, 1.0, 0.0, -1.0], np.float32).reshape(1, 2, 3, 1)
    seed_map = np.array([0.5, 0.5, 0.5, 0.9, 0.5, 0.5], np.float32).reshape(1, 2, 3)
    got = seed_ops.select_seeds(embeddings, seed_map, 8, 0.3).numpy()
    assert got.tolist() == [[3, 2, 0, 1, 4, 5, -1, -1]]


def test_select_seeds_first_seed_tie_goes_to_lowest_index():
    embeddings = np.zeros((1, 3, 3, 2), np.float32)
    seed_map = np.full((1, 3, 3), 0.7, np.float32)
    seed_map[0, 2, 0] = seed_map[0, 1, 1] = 0.8
    got = seed_ops.select_seeds(embeddings, seed_map, 3, 0.3).numpy()
    assert got[0, 0] == 4  # (1, 1) comes before (2, 0) in row-major order
    assert got[0, 1:].tolist() == [0, 1]  # all D = 0: lowest unchosen indices


def test_select_seeds_rejects_bad_arguments():
    embeddings = np.zeros((1, 3, 3, 2), np.float32)
    with pytest.raises(ValueError, match="embeddings"):
        seed_ops.select_seeds(embeddings[0], np.zeros((1, 3, 3), np.float32), 2, 0.3)
    with pytest.raises(ValueError, match="num_seeds"):
        seed_ops.select_seeds(embeddings, np.zeros((1, 3, 3), np.float32), 0, 0.3)
    with pytest.raises(ValueError, match="alpha"):
        seed_ops.select_seeds(embeddings, np.zeros((1, 3, 3), np.float32), 2, -1.0)
    with pytest.raises(ValueError, match="seediness"):
        seed_ops.select_seeds(embeddings, np.zeros((1, 3, 4), np.float32), 2, 0.3)


def exact_embeddings(rng, batch, h, w, d, clustered):
    """Embeddings whose squared distances are exact in float32 in any summation order.

    Multiples of 1/8 below 4 in magnitude, each image mirrored (every vector also
    appears negated, plus zeros) so that its mean, and hence centring, is exactly 0.
    Equal distances are then equal to the last bit in every kernel, and the ties they
    make are decided by index alone.
    """
    n = h * w
    images = []
    for _ in range(batch):
        if clustered:
            centres = rng.integers(-3, 4, size=(3, d))
            half = centres[rng.integers(0, 3, n // 2)] + rng.integers(-1, 2, (n // 2, d)) / 8
        else:
            half = rng.integers(-2, 3, size=(n // 2, d)) / 2
        points = np.concatenate([half, -half, np.zeros((n % 2, d))])
        images.append(points[rng.permutation(n)].reshape(h, w, d))
    return np.stack(images).astype(np.float32)


def seed_selection_case(rng):
    """A random `select_seeds` input: (embeddings, seediness, valid or None, alpha, K).

    Covers more seeds than pixels, fewer pixels than candidates and many more, ties
    (equal seediness, repeated embeddings, all embeddings equal), zeros and NaN in the
    seediness, masks of valid pixels (none valid included), alpha = 0 and large alpha.
    Seeds must match exactly, so rounding must decide nothing: either the values are
    continuous, or the distances are exact and no two different scores come within
    rounding of each other (`exact_scores_are_apart`).
    """
    while True:
        batch, d = int(rng.integers(1, 3)), int(rng.integers(1, 6))
        h, w = (int(x) for x in rng.integers(1, 15, size=2))
        kind = rng.choice(["continuous", "exact", "exact clusters", "all equal"])
        if kind == "continuous":
            embeddings = rng.normal(size=(batch, h, w, d)).astype(np.float32)
        elif kind == "all equal":  # 0: centring is exact, every distance is 0
            embeddings = np.zeros((batch, h, w, d), np.float32)
        else:
            embeddings = exact_embeddings(rng, batch, h, w, d, kind == "exact clusters")
        seediness = rng.choice([
            rng.uniform(0.0, 1.0, (batch, h, w)),
            rng.integers(0, 5, (batch, h, w)) / 4,  # many ties, some zeros
            np.full((batch, h, w), 0.5)]).astype(np.float32)
        if rng.random() < 0.3:
            seediness[rng.random(seediness.shape) < 0.2] = np.nan
        valid = None
        if rng.random() < 0.4:
            valid = rng.random((batch, h, w)) < rng.choice([0.0, 0.3, 0.9])
        alpha = float(rng.choice([0.0, 0.3, 0.7, 3.3, 50.0]))
        num_seeds = int(rng.choice([1, 2, 9, 33, 120]))
        if kind == "continuous" or exact_scores_are_apart(embeddings, seediness, alpha):
            return embeddings, seediness, valid, alpha, num_seeds


def exact_scores_are_apart(embeddings, seediness, alpha):
    """Whether every two different values `log S + alpha log D` that pixels of an image
    can take, over its seediness values and exact squared distances, differ by more
    than float32 rounding could blur (relative 1e-5)."""
    for points, values in zip(embeddings, seediness):
        points = points.reshape(-1, points.shape[-1]).astype(np.float64)
        dist = np.unique(((points[:, None] - points[None]) ** 2).sum(-1))
        logs = np.log(np.unique(values[values > 0]))
        scores = [logs]
        if alpha:
            scores.append((logs[:, None] + alpha * np.log(dist[dist > 0])[None]).ravel())
        scores = np.unique(np.concatenate(scores))
        gaps = np.diff(scores) / np.maximum(1.0, np.abs(scores[1:]))
        if len(gaps) and gaps.min() < 1e-5:
            return False
    return True


class SeedSelectionRunner:
    """Runs a `select_seeds` implementation eagerly, in a tf.function or with XLA.

    The tf.functions take any image size and alpha as a tensor, so that they are traced
    once per (K, with valid_pixels or not); XLA still compiles once per shape.
    """

    def __init__(self, fn, mode):
        self.fn, self.mode, self.cache = fn, mode, {}

    def __call__(self, embeddings, seediness, num_seeds, alpha, valid):
        args = [tf.constant(embeddings), tf.constant(seediness), tf.constant(alpha, tf.float32)]
        if valid is not None:
            args.append(tf.constant(valid))
        if self.mode == "eager":
            return self.fn(args[0], args[1], num_seeds, *args[2:]).numpy()
        key = (num_seeds, valid is not None)
        if key not in self.cache:
            signature = [tf.TensorSpec([None] * 4, tf.float32),
                         tf.TensorSpec([None] * 3, tf.float32), tf.TensorSpec([], tf.float32)]
            if valid is not None:
                signature.append(tf.TensorSpec([None] * 3, tf.bool))
            self.cache[key] = tf.function(
                lambda e, s, a, *v: self.fn(e, s, num_seeds, a, *v), input_signature=signature,
                jit_compile=self.mode == "xla", autograph=False)
        return self.cache[key](*args).numpy()


def check_select_seeds_cases(rng, num_cases, xla_cases, numpy_inference,
                             pass_sizes=seed_ops.DEFAULT_PASS_SIZES):
    """Seeds of `num_cases` random cases: NumPy = old = new (with `pass_sizes`), eagerly
    and in a tf.function, and with XLA for the first `xla_cases` cases.

    Old and NumPy disagree only where the old version breaks an exact tie by its
    kernels' last-bit difference (see test_select_seeds_exact_tie_at_the_last_pixels):
    eagerly or in a tf.function, when the pixel count is not a multiple of 16.
    """
    runners = {(name, mode): SeedSelectionRunner(fn, mode)
               for name, fn in (("old", old_select_seeds),
                                ("new", functools.partial(seed_ops.select_seeds,
                                                          pass_sizes=pass_sizes)))
               for mode in ("eager", "graph", "xla")}
    for case in range(num_cases):
        embeddings, seediness, valid, alpha, num_seeds = seed_selection_case(rng)
        want = [numpy_inference.select_seeds(embeddings[b], seediness[b], num_seeds, alpha,
                                None if valid is None else valid[b])
                for b in range(len(embeddings))]
        for (name, mode), run in runners.items():
            if mode == "xla" and case >= xla_cases:
                continue
            got = run(embeddings, seediness, num_seeds, alpha, valid)
            context = (name, mode, case, embeddings.shape, alpha, num_seeds,
                       valid is not None)
            if name == "old" and got.tolist() != want:
                assert mode != "xla" and embeddings.shape[1] * embeddings.shape[2] % 16, context
                continue
            assert got.tolist() == want, context


# (candidates, most seeds per pass, first block of picks): the defaults, and small
# candidate pools, with which small images take many passes and the bound is often tied.
@pytest.mark.parametrize("pass_sizes", [None, (8, 1, 1), (8, 4, 2), (16, 15, 1)])
def test_select_seeds_equals_one_seed_per_step_version_and_numpy(pass_sizes, numpy_inference):
    check_select_seeds_cases(np.random.default_rng(20 + (pass_sizes or (0,))[0]),
                             num_cases=10, xla_cases=2, numpy_inference=numpy_inference,
                             pass_sizes=seed_ops.PassSizes(*(pass_sizes or ())))


@pytest.mark.slow
@pytest.mark.parametrize("pass_sizes", [None, (8, 1, 1), (8, 2, 1), (8, 4, 2), (8, 7, 3),
                                        (16, 15, 4)])
def test_select_seeds_equals_one_seed_per_step_version_and_numpy_at_length(pass_sizes,
                                                                         numpy_inference):
    check_select_seeds_cases(np.random.default_rng(40 + (pass_sizes or (0,))[0]),
                             num_cases=40, xla_cases=40, numpy_inference=numpy_inference,
                             pass_sizes=seed_ops.PassSizes(*(pass_sizes or ())))


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_select_seeds_exact_tie_at_the_last_pixels(mode, numpy_inference):
    """An exact tie goes to the lower index even when the other pixel is among the last
    N mod 16, which TF's CPU kernels compute with scalar code (whose log differs from
    the vectorised one in the last bit for D = 1.265625). The one-seed-per-step version
    gave this tie, eagerly and in a tf.function, to pixel 27."""
    # 10 x 3 pixels, 1-d: pixel 0 is the most seedy; pixels 12 and 27 (e = +-1.125,
    # D = 1.265625, equal seediness) tie for the second seed; the others have D = 0.
    embeddings = np.zeros((1, 10, 3, 1), np.float32)
    embeddings.flat[12], embeddings.flat[27] = 1.125, -1.125
    seediness = np.full((1, 10, 3), 0.5, np.float32)
    seediness.flat[0], seediness.flat[12], seediness.flat[27] = 1.0, 0.75, 0.75
    assert numpy_inference.select_seeds(embeddings[0], seediness[0], 2, 0.3) == [0, 12]
    got = SeedSelectionRunner(seed_ops.select_seeds, mode)(embeddings, seediness, 2, 0.3, None)
    assert got.tolist() == [[0, 12]]


def test_select_seeds_certifies_many_seeds_per_pass(numpy_inference):
    """The point of the passes: far fewer of them than seeds (here at most 8 for 99)."""
    rng = np.random.default_rng(13)
    embeddings = rng.normal(size=(24 * 24, 8)).astype(np.float32)
    seediness = rng.uniform(0.01, 1.0, 24 * 24).astype(np.float32)
    points, norms = (x[0] for x in geometry.pixel_geometry(tf.constant(embeddings[None, None])))
    passes = seed_ops.SeedPasses(points, norms, tf.constant(seediness),
                                   tf.ones([24 * 24], tf.bool), 100, tf.constant(0.3))
    state, counts = passes.initial_state(), []
    while passes.not_done(*state):
        new_state = passes.run(*state)
        counts.append(int(new_state[0] - state[0]))
        state = new_state
    assert sum(counts) >= 99 and min(counts) >= 1
    assert len(counts) <= 8, counts
    assert passes.seeds(state).numpy().tolist() == numpy_inference.select_seeds(
        embeddings, seediness, 100, 0.3)
