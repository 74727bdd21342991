"""Tests of instance_embed.inference against NumPy references written here, plainly.

The references follow the paper's definitions with loops and float64 arithmetic, and
share no code with the module. Masks are compared away from the threshold boundary,
where float32 and float64 distances may legitimately disagree.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from instance_embed import inference

BOUNDARY = 1e-4


# ----------------------------------------------------------------------------------
# NumPy references.


def np_softmax(logits):
    logits = logits.astype(np.float64)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def np_seediness(probs):
    """probs [h, w, T, C+1] -> [h, w]: best foreground probability, by loops."""
    h, w, num_taus, num_classes = probs.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = max(probs[i, j, t, c] for t in range(num_taus)
                            for c in range(1, num_classes))
    return out


def np_select_seeds(emb, seed_map, k, alpha, valid=None):
    """Greedy seeds of one image: emb [h, w, d], seed_map [h, w] -> list of k ints.

    `valid` [h, w] bool: the pixels that may be seeds (None: all).
    """
    points = emb.reshape(-1, emb.shape[-1]).astype(np.float64)
    s = seed_map.reshape(-1).astype(np.float64)
    n = len(s)
    valid = np.ones(n, bool) if valid is None else valid.reshape(-1)
    chosen = []
    nearest = [math.inf] * n
    for t in range(k):
        best, best_score = -1, None
        for p in range(n):
            if p in chosen or not valid[p]:
                continue
            score = math.log(s[p]) if s[p] > 0 else -math.inf
            if t > 0 and alpha > 0:
                score += alpha * math.log(nearest[p]) if nearest[p] > 0 else -math.inf
            if best < 0 or score > best_score:  # strict: ties keep the lower index
                best, best_score = p, score
        chosen.append(best)
        if best >= 0:
            for p in range(n):
                d2 = float(np.sum((points[p] - points[best]) ** 2))
                nearest[p] = min(nearest[p], d2)
    return chosen


def np_margins(emb, seeds, taus):
    """[K, h, w] margins log(2/tau - 1) - ||e_q - e_seed||^2 (float64); NaN for seed -1."""
    h, w, d = emb.shape
    points = emb.reshape(-1, d).astype(np.float64)
    out = np.full((len(seeds), h * w), np.nan)
    for k, (seed, tau) in enumerate(zip(seeds, taus)):
        if seed < 0:
            continue
        threshold = math.log(2.0 / tau - 1.0)
        for q in range(h * w):
            out[k, q] = threshold - np.sum((points[q] - points[seed]) ** 2)
    return out.reshape(len(seeds), h, w)


def np_classes_and_scores(probs, seeds):
    """probs [h, w, T, C+1], seeds [K] -> (tau_index, classes, scores) lists."""
    h, w, num_taus, num_classes = probs.shape
    flat = probs.reshape(h * w, num_taus, num_classes)
    taus, classes, scores = [], [], []
    for seed in seeds:
        if seed < 0:
            taus.append(0), classes.append(0), scores.append(0.0)
            continue
        best = (0, 1, flat[seed, 0, 1])
        for t in range(num_taus):
            for c in range(1, num_classes):
                if flat[seed, t, c] > best[2]:
                    best = (t, c, flat[seed, t, c])
        taus.append(best[0]), classes.append(best[1]), scores.append(best[2])
    return taus, classes, scores


def np_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


def np_select_detections(scores, seeds, low_masks, score_threshold, nms_iou_threshold):
    """Which seeds survive, in output order: list of positions into the seed list."""
    candidates = [k for k in range(len(seeds))
                  if seeds[k] >= 0 and scores[k] >= score_threshold]
    candidates.sort(key=lambda k: -scores[k])  # stable: ties keep seed order
    kept = []
    for k in candidates:
        if nms_iou_threshold is not None and any(
                np_iou(low_masks[k], low_masks[j]) > nms_iou_threshold for j in kept):
            continue
        kept.append(k)
    return kept


# ----------------------------------------------------------------------------------
# The previous implementation of `select_seeds`, one seed per step, kept as it was (but
# for the argument checks) as a reference: the batched version must pick the same seeds,
# in every execution mode.

OLD_SEED_STEPS_PER_LOOP = 10


def old_select_seeds(embeddings, seediness, num_seeds, alpha, valid_pixels=None):
    """`inference.select_seeds` before the batched passes (argument checks left out)."""
    embeddings = tf.cast(embeddings, tf.float32)
    points = inference._centred_points(embeddings)  # [B, N, d]
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

    first = inference._first_argmax(log_seediness, allowed)  # [1]
    chosen = tf.logical_or(pixel_ids == first, tf.logical_not(allowed))
    min_dist = distances_to(tf.maximum(first, 0))

    def step(chosen, min_dist):
        scores = log_seediness + tf.math.xlogy(alpha, min_dist)
        scores = tf.where(scores >= inference._LOWEST, scores, inference._LOWEST)
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


# ----------------------------------------------------------------------------------
# Inputs.


def random_inputs(rng, batch=2, h=10, w=12, d=6, num_taus=4, num_classes=3):
    embeddings = rng.normal(size=(batch, h, w, d)).astype(np.float32)
    logits = (2.0 * rng.normal(size=(batch, h, w, num_taus, num_classes + 1))).astype(np.float32)
    return embeddings, logits


def clustered_inputs(rng, batch=2, h=12, w=12, d=8, num_taus=4, num_classes=2, blobs=4):
    """Pixels in `blobs` rectangles-and-background regions with tight, distant embeddings.

    Masks grown from seeds of one region are (near) identical, which is what duplicate
    suppression is for, and no pixel lies near a threshold.
    """
    embeddings = np.zeros((batch, h, w, d), np.float32)
    for b in range(batch):
        labels = np.zeros((h, w), int)
        for blob in range(1, blobs):
            top, left = rng.integers(0, h - 4), rng.integers(0, w - 4)
            labels[top:top + rng.integers(3, 7), left:left + rng.integers(3, 7)] = blob
        centres = rng.normal(size=(blobs, d)) * 3.0
        embeddings[b] = centres[labels] + 0.02 * rng.normal(size=(h, w, d))
    logits = (2.0 * rng.normal(size=(batch, h, w, num_taus, num_classes + 1))).astype(np.float32)
    return embeddings, logits


def to_numpy(outputs):
    return {k: v.numpy() for k, v in outputs.items()}


# ----------------------------------------------------------------------------------
# Config.


def test_config_defaults_follow_the_paper():
    config = inference.InferenceConfig()
    assert config.num_seeds == 100
    assert config.alpha == 0.3
    assert config.taus == (0.25, 0.5, 0.75, 0.9)
    assert config.score_threshold == 0.0
    assert config.nms_iou_threshold is None
    assert config.jit_compile is False
    assert config.support_rescoring == 0.0
    with pytest.raises(ValueError, match="set nms_iou_threshold too"):
        inference.InferenceConfig(support_rescoring=5.0)
    assert inference.InferenceConfig(taus=[0.5, 1]).taus == (0.5, 1.0)


@pytest.mark.parametrize("field, value", [
    ("num_seeds", 0), ("num_seeds", 2.5), ("num_seeds", True),
    ("alpha", -0.1), ("alpha", float("inf")), ("alpha", "0.3"),
    ("taus", ()), ("taus", (0.0, 0.5)), ("taus", (0.5, 1.5)), ("taus", "0.5"),
    ("score_threshold", -0.5), ("score_threshold", 2.0), ("jit_compile", "yes"),
    ("support_rescoring", -1.0), ("support_rescoring", float("nan")),
    ("nms_iou_threshold", 1.5), ("nms_iou_threshold", -0.1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        inference.InferenceConfig(**{field: value})


# ----------------------------------------------------------------------------------
# The building blocks.


def test_seediness_matches_numpy():
    rng = np.random.default_rng(1)
    _, logits = random_inputs(rng, batch=2, h=5, w=6)
    probs = np_softmax(logits).astype(np.float32)
    got = inference.seediness(probs).numpy()
    assert got.shape == (2, 5, 6)
    for b in range(2):
        np.testing.assert_array_equal(got[b], np_seediness(probs[b]).astype(np.float32))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 2.0])
def test_select_seeds_matches_numpy(alpha):
    rng = np.random.default_rng(2)
    embeddings, logits = random_inputs(rng, batch=2, h=9, w=11, d=5)
    seed_map = np_seediness(np_softmax(logits[0]))[None].repeat(2, axis=0)
    seed_map[1] = np_seediness(np_softmax(logits[1]))
    seed_map = seed_map.astype(np.float32)
    seed_map[0, 2, 3] = 0.0  # log 0 = -inf must not break the argmax
    got = inference.select_seeds(embeddings, seed_map, 25, alpha).numpy()
    assert got.dtype == np.int32 and got.shape == (2, 25)
    for b in range(2):
        assert got[b].tolist() == np_select_seeds(embeddings[b], seed_map[b], 25, alpha)
    assert len(set(got[0].tolist())) == 25


@pytest.mark.parametrize("num_seeds", [1, 2, 10, 11, 12, 20, 21, 31])
def test_select_seeds_matches_numpy_for_every_seed_count_and_valid_pixels(num_seeds):
    # Seed counts on both sides of the loop's chunk size (10 steps per iteration) and
    # of the number of valid pixels (14 of 20), so exhaustion falls inside a chunk.
    rng = np.random.default_rng(num_seeds)
    embeddings, logits = random_inputs(rng, batch=2, h=4, w=5, d=3)
    seed_map = np.stack([np_seediness(np_softmax(logits[b])) for b in range(2)])
    seed_map = seed_map.astype(np.float32)
    valid = np.ones((2, 4, 5), bool)
    valid[0, :, 3:] = False  # 12 valid pixels
    valid[1, 3, :] = False  # 15
    valid[1, 0, 0] = False  # 14
    got = inference.select_seeds(embeddings, seed_map, num_seeds, 0.3,
                                 valid_pixels=tf.constant(valid)).numpy()
    assert got.shape == (2, num_seeds)
    for b in range(2):
        assert got[b].tolist() == np_select_seeds(
            embeddings[b], seed_map[b], num_seeds, 0.3, valid[b])


def test_select_seeds_hand_worked_ties_and_exhaustion():
    # 2 x 3 image, 1-d embeddings. Pixel 3 has the top seediness; then pixels 2 and 5
    # tie (same S, D = 4) -> 2; then 0 and 4 tie (S = .5, D = 1) -> 0; then 1, 4, 5 all
    # score -inf (D = 0) -> lowest unchosen first; then no pixel is left -> -1.
    embeddings = np.array([0.0, 1.0, -1.0, 1.0, 0.0, -1.0], np.float32).reshape(1, 2, 3, 1)
    seed_map = np.array([0.5, 0.5, 0.5, 0.9, 0.5, 0.5], np.float32).reshape(1, 2, 3)
    got = inference.select_seeds(embeddings, seed_map, 8, 0.3).numpy()
    assert got.tolist() == [[3, 2, 0, 1, 4, 5, -1, -1]]


def test_select_seeds_first_seed_tie_goes_to_lowest_index():
    embeddings = np.zeros((1, 3, 3, 2), np.float32)
    seed_map = np.full((1, 3, 3), 0.7, np.float32)
    seed_map[0, 2, 0] = seed_map[0, 1, 1] = 0.8
    got = inference.select_seeds(embeddings, seed_map, 3, 0.3).numpy()
    assert got[0, 0] == 4  # (1, 1) comes before (2, 0) in row-major order
    assert got[0, 1:].tolist() == [0, 1]  # all D = 0: lowest unchosen indices


def test_select_seeds_rejects_bad_arguments():
    embeddings = np.zeros((1, 3, 3, 2), np.float32)
    with pytest.raises(ValueError, match="embeddings"):
        inference.select_seeds(embeddings[0], np.zeros((1, 3, 3), np.float32), 2, 0.3)
    with pytest.raises(ValueError, match="num_seeds"):
        inference.select_seeds(embeddings, np.zeros((1, 3, 3), np.float32), 0, 0.3)
    with pytest.raises(ValueError, match="alpha"):
        inference.select_seeds(embeddings, np.zeros((1, 3, 3), np.float32), 2, -1.0)
    with pytest.raises(ValueError, match="seediness"):
        inference.select_seeds(embeddings, np.zeros((1, 3, 4), np.float32), 2, 0.3)


# ----------------------------------------------------------------------------------
# Batched seed selection against the one-seed-per-step version and NumPy.


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


def check_select_seeds_cases(rng, num_cases, xla_cases):
    """Seeds of `num_cases` random cases: NumPy = old = new, eagerly and in a tf.function,
    and with XLA for the first `xla_cases` cases.

    Old and NumPy disagree only where the old version breaks an exact tie by its
    kernels' last-bit difference (see test_select_seeds_exact_tie_at_the_last_pixels):
    eagerly or in a tf.function, when the pixel count is not a multiple of 16.
    """
    runners = {(name, mode): SeedSelectionRunner(fn, mode)
               for name, fn in (("old", old_select_seeds), ("new", inference.select_seeds))
               for mode in ("eager", "graph", "xla")}
    for case in range(num_cases):
        embeddings, seediness, valid, alpha, num_seeds = seed_selection_case(rng)
        want = [np_select_seeds(embeddings[b], seediness[b], num_seeds, alpha,
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


def set_pass_sizes(monkeypatch, candidates, seeds_per_pass, block):
    monkeypatch.setattr(inference, "_SEED_CANDIDATES", candidates)
    monkeypatch.setattr(inference, "_SEEDS_PER_PASS", seeds_per_pass)
    monkeypatch.setattr(inference, "_SEED_BLOCK", block)


# (candidates, most seeds per pass, first block of picks): the defaults, and small
# candidate pools, with which small images take many passes and the bound is often tied.
@pytest.mark.parametrize("pass_sizes", [None, (8, 1, 1), (8, 4, 2), (16, 15, 1)])
def test_select_seeds_equals_one_seed_per_step_version_and_numpy(pass_sizes, monkeypatch):
    if pass_sizes is not None:
        set_pass_sizes(monkeypatch, *pass_sizes)
    check_select_seeds_cases(np.random.default_rng(20 + (pass_sizes or (0,))[0]),
                             num_cases=10, xla_cases=2)


@pytest.mark.slow
@pytest.mark.parametrize("pass_sizes", [None, (8, 1, 1), (8, 2, 1), (8, 4, 2), (8, 7, 3),
                                        (16, 15, 4)])
def test_select_seeds_equals_one_seed_per_step_version_and_numpy_at_length(pass_sizes,
                                                                         monkeypatch):
    if pass_sizes is not None:
        set_pass_sizes(monkeypatch, *pass_sizes)
    check_select_seeds_cases(np.random.default_rng(40 + (pass_sizes or (0,))[0]),
                             num_cases=40, xla_cases=40)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_select_seeds_exact_tie_at_the_last_pixels(mode):
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
    assert np_select_seeds(embeddings[0], seediness[0], 2, 0.3) == [0, 12]
    got = SeedSelectionRunner(inference.select_seeds, mode)(embeddings, seediness, 2, 0.3, None)
    assert got.tolist() == [[0, 12]]


def test_select_seeds_certifies_many_seeds_per_pass():
    """The point of the passes: far fewer of them than seeds (here at most 8 for 99)."""
    rng = np.random.default_rng(13)
    embeddings = rng.normal(size=(24 * 24, 8)).astype(np.float32)
    seediness = rng.uniform(0.01, 1.0, 24 * 24).astype(np.float32)
    points, norms = (x[0] for x in inference._pixel_geometry(tf.constant(embeddings[None, None])))
    passes = inference._SeedPasses(points, norms, tf.constant(seediness),
                                   tf.ones([24 * 24], tf.bool), 100, tf.constant(0.3))
    state, counts = passes.initial_state(), []
    while passes.not_done(*state):
        new_state = passes.run(*state)
        counts.append(int(new_state[0] - state[0]))
        state = new_state
    assert sum(counts) >= 99 and min(counts) >= 1
    assert len(counts) <= 8, counts
    assert passes.seeds(state).numpy().tolist() == np_select_seeds(
        embeddings, seediness, 100, 0.3)


def test_grow_masks_matches_numpy():
    rng = np.random.default_rng(3)
    embeddings, _ = random_inputs(rng, batch=2, h=8, w=9, d=3)
    embeddings *= 0.6  # distances comparable with the thresholds: masks are non-trivial
    seeds = rng.integers(0, 72, size=(2, 12)).astype(np.int32)
    seeds[1, 4] = -1
    taus = rng.choice([0.25, 0.5, 0.75, 0.9, 1.0], size=(2, 12)).astype(np.float32)
    got = inference.grow_masks(embeddings, seeds, taus).numpy()
    assert got.dtype == bool and got.shape == (2, 12, 8, 9)
    checked = 0
    for b in range(2):
        margins = np_margins(embeddings[b], seeds[b], taus[b])
        for k in range(12):
            if seeds[b, k] < 0:
                assert not got[b, k].any()
                continue
            assert got[b, k].reshape(-1)[seeds[b, k]]  # a seed is always in its mask
            clear = np.abs(margins[k]) > BOUNDARY
            np.testing.assert_array_equal(got[b, k][clear], margins[k][clear] >= 0)
            checked += clear.sum()
    assert 0 < got.mean() < 1 and checked > 0.9 * got.size


def test_seed_classes_and_scores_matches_numpy():
    rng = np.random.default_rng(4)
    _, logits = random_inputs(rng, batch=2, h=4, w=5, num_taus=3, num_classes=4)
    probs = np_softmax(logits).astype(np.float32)
    # A tie across taus and classes at pixel 7 of image 0: lowest tau, then lowest class.
    probs[0, 1, 2] = [[0.1, 0.3, 0.6, 0.0, 0.0], [0.1, 0.0, 0.6, 0.0, 0.3], [0.4, 0.6, 0, 0, 0]]
    seeds = np.array([[7, 0, 19, -1], [3, 3, 12, 5]], np.int32)
    tau_index, classes, scores = (x.numpy() for x in
                                  inference.seed_classes_and_scores(probs, seeds))
    assert tau_index.dtype == classes.dtype == np.int32 and scores.dtype == np.float32
    assert (tau_index[0, 0], classes[0, 0]) == (0, 2)
    for b in range(2):
        want_taus, want_classes, want_scores = np_classes_and_scores(probs[b], seeds[b])
        assert tau_index[b].tolist() == want_taus
        assert classes[b].tolist() == want_classes
        np.testing.assert_array_equal(scores[b], np.float32(want_scores))


# ----------------------------------------------------------------------------------
# The full pipeline.


def reference_detections(embeddings, logits, config):
    """Per image: (seeds, classes, scores) of the kept detections, in output order."""
    results = []
    for b in range(embeddings.shape[0]):
        probs = np_softmax(logits[b])
        seeds = np_select_seeds(embeddings[b], np_seediness(probs), config.num_seeds,
                                config.alpha)
        tau_index, classes, scores = np_classes_and_scores(probs, seeds)
        taus = [config.taus[t] for t in tau_index]
        low_masks = np_margins(embeddings[b], seeds, taus) >= 0
        kept = np_select_detections(scores, seeds, low_masks, config.score_threshold,
                                    config.nms_iou_threshold)
        results.append(([seeds[k] for k in kept], [classes[k] for k in kept],
                        [scores[k] for k in kept], [taus[k] for k in kept]))
    return results


@pytest.mark.parametrize("num_seeds, with_valid", [(16, False), (20, True)])
def test_heads_resolution_detections_match_numpy(num_seeds, with_valid):
    """Steps 1-4 in one call: the NumPy greedy's seeds, classes, scores and masks,
    sorted by descending score (ties in seed order), missing seeds last."""
    rng = np.random.default_rng(8)
    embeddings, logits = clustered_inputs(rng, h=5, w=6)
    valid = None
    if with_valid:  # 16 and 14 pixels may seed, fewer than K: the rest are -1
        valid = np.zeros((2, 5, 6), bool)
        valid[0, :4, :4] = True
        valid[1, 1:3] = True
        valid[1, 4, :2] = True
    config = inference.InferenceConfig(num_seeds=num_seeds)
    probs = np_softmax(logits).astype(np.float32)
    out = to_numpy(inference.heads_resolution_detections(embeddings, probs, config, valid))
    assert out["masks"].shape == (2, num_seeds, 5, 6) and out["masks"].dtype == bool
    for b in range(2):
        seeds = np_select_seeds(embeddings[b], np_seediness(probs[b]), num_seeds,
                                config.alpha, None if valid is None else valid[b])
        tau_index, classes, scores = np_classes_and_scores(probs[b], seeds)
        keys = [score if seed >= 0 else -1.0 for seed, score in zip(seeds, scores)]
        order = sorted(range(num_seeds), key=lambda k: (-keys[k], k))
        assert out["seed_indices"][b].tolist() == [seeds[k] for k in order]
        assert out["classes"][b].tolist() == [classes[k] for k in order]
        np.testing.assert_allclose(out["scores"][b], [scores[k] for k in order],
                                   rtol=1e-5, atol=1e-6)
        taus = [config.taus[tau_index[k]] if seeds[k] >= 0 else config.taus[0]
                for k in order]
        np.testing.assert_allclose(out["taus"][b], taus)
        margins = np_margins(embeddings[b], out["seed_indices"][b], taus)
        for k, seed in enumerate(out["seed_indices"][b]):
            if seed < 0:
                assert not out["masks"][b, k].any()
            else:
                np.testing.assert_array_equal(out["masks"][b, k], margins[k] >= 0)
        missing = (out["seed_indices"][b] < 0).sum()
        assert missing == (max(0, num_seeds - valid[b].sum()) if with_valid else 0)
        assert (np.diff(out["scores"][b][:num_seeds - missing]) <= 0).all()


@pytest.mark.parametrize("score_threshold, nms_iou_threshold", [
    (0.0, None), (0.97, None), (0.0, 0.5), (0.96, 0.3)])
def test_predict_instances_matches_numpy(score_threshold, nms_iou_threshold):
    rng = np.random.default_rng(5)
    embeddings, logits = clustered_inputs(rng)
    config = inference.InferenceConfig(num_seeds=16, score_threshold=score_threshold,
                                       nms_iou_threshold=nms_iou_threshold)
    out = to_numpy(inference.predict_instances(embeddings, logits, (12, 12), config))
    reference = reference_detections(embeddings, logits, config)
    for b, (seeds, classes, scores, taus) in enumerate(reference):
        n = len(seeds)
        assert out["num_detections"][b] == n
        assert out["seed_indices"][b].tolist() == seeds + [-1] * (16 - n)
        assert out["detection_classes"][b].tolist() == classes + [0] * (16 - n)
        np.testing.assert_allclose(out["detection_scores"][b], scores + [0] * (16 - n),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["detection_taus"][b], taus + [0] * (16 - n))
        assert not out["detection_masks"][b, n:].any()
    counts = out["num_detections"]
    if score_threshold == 0 and nms_iou_threshold is None:
        assert counts.tolist() == [16, 16]
    else:
        assert counts.max() < 16  # the option did drop something
    if nms_iou_threshold is not None:
        assert counts.min() > 1


def test_suppression_of_partially_overlapping_masks_matches_numpy():
    rng = np.random.default_rng(12)
    embeddings, logits = random_inputs(rng, batch=2, h=10, w=12, d=3)
    embeddings *= 0.4  # masks of many sizes that overlap partially
    config = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=0.4)
    out = to_numpy(inference.predict_instances(embeddings, logits, (10, 12), config))
    reference = reference_detections(embeddings, logits, config)
    ious = []
    for b, (seeds, classes, _, _) in enumerate(reference):
        n = len(seeds)
        assert out["num_detections"][b] == n
        assert out["seed_indices"][b, :n].tolist() == seeds
        masks = out["detection_masks"][b]
        ious += [np_iou(masks[i], masks[j]) for i in range(n) for j in range(i)]
    # Suppression had real decisions to make: kept pairs overlap, below the threshold.
    assert max(ious) <= 0.4 and sum(0.1 < iou for iou in ious) >= 3
    assert out["num_detections"].max() < 20


def test_support_rescoring_matches_numpy():
    # All detections without suppression (image size = heads size: the masks are the
    # heads' masks), then greedy suppression, support counts and rescoring in NumPy.
    rng = np.random.default_rng(12)
    embeddings, logits = random_inputs(rng, batch=2, h=10, w=12, d=3)
    embeddings *= 0.4
    threshold, support_seeds = 0.4, 3.0
    config = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=threshold,
                                       support_rescoring=support_seeds)
    everything = to_numpy(inference.predict_instances(
        embeddings, logits, (10, 12), dataclasses.replace(
            config, nms_iou_threshold=None, support_rescoring=0.0)))
    out = to_numpy(inference.predict_instances(embeddings, logits, (10, 12), config))
    reordered = 0
    for b in range(2):
        masks, scores = everything["detection_masks"][b], everything["detection_scores"][b]
        seeds = everything["seed_indices"][b]
        kept, support = [], {}
        for j in range(20):
            owners = [i for i in kept if np_iou(masks[i], masks[j]) > threshold]
            if owners:
                support[owners[0]] += 1
            else:
                kept.append(j)
                support[j] = 1
        rescored = {i: scores[i] * min(1.0, support[i] / support_seeds) for i in kept}
        order = sorted(kept, key=lambda i: (-rescored[i], i))
        n = len(kept)
        assert out["num_detections"][b] == n
        assert out["seed_indices"][b, :n].tolist() == [seeds[i] for i in order]
        np.testing.assert_allclose(out["detection_scores"][b, :n],
                                   [rescored[i] for i in order], rtol=1e-5)
        np.testing.assert_array_equal(out["detection_masks"][b, :n], masks[order])
        reordered += order != kept
        assert 1 < max(support.values()) and min(support.values()) < support_seeds
    assert reordered  # the rescoring changed the ranking somewhere


def test_predict_instances_instance_map_is_the_best_covering_mask():
    rng = np.random.default_rng(6)
    embeddings, logits = random_inputs(rng, batch=2, h=8, w=8, d=3)
    embeddings *= 1.0
    config = inference.InferenceConfig(num_seeds=12, score_threshold=0.95)
    out = to_numpy(inference.predict_instances(embeddings, logits, (20, 28), config))
    masks, scores, counts = out["detection_masks"], out["detection_scores"], out["num_detections"]
    assert out["instance_map"].dtype == np.int32 and out["instance_map"].shape == (2, 20, 28)
    for b in range(2):
        n = counts[b]
        assert 0 < n < 12
        assert np.all(np.diff(scores[b, :n]) <= 0) and np.all(scores[b, n:] == 0)
        want = np.zeros((20, 28), np.int32)
        for i in range(20):
            for j in range(28):
                covering = [k for k in range(12) if masks[b, k, i, j]]
                if covering:
                    # Highest score; on equal scores the earlier detection.
                    best = max(covering, key=lambda k: (scores[b, k], -k))
                    want[i, j] = best + 1
        np.testing.assert_array_equal(out["instance_map"][b], want)
        assert (want > 0).any() and (want == 0).any()


def test_full_resolution_masks_agree_with_heads_resolution_masks():
    rng = np.random.default_rng(7)
    embeddings, logits = random_inputs(rng, batch=1, h=9, w=7, d=3)
    embeddings *= 0.35
    config = inference.InferenceConfig(num_seeds=10)
    factor = 4
    out = to_numpy(inference.predict_instances(
        embeddings, logits, (9 * factor, 7 * factor), config))
    low = to_numpy(inference.predict_instances(embeddings, logits, (9, 7), config))
    np.testing.assert_array_equal(out["seed_indices"], low["seed_indices"])

    margins = np_margins(embeddings[0], out["seed_indices"][0], out["detection_taus"][0])
    # Heads-resolution output equals the masks grown at that resolution.
    clear = np.abs(margins) > BOUNDARY
    np.testing.assert_array_equal(low["detection_masks"][0][clear], margins[clear] >= 0)

    # Away from boundaries (all 3x3 neighbours clearly on one side), every full-resolution
    # pixel of a heads pixel's block (nearest-neighbour downsampling) has its value.
    padded = np.pad(margins, ((0, 0), (1, 1), (1, 1)), mode="edge")
    windows = np.stack([padded[:, di:di + 9, dj:dj + 7] for di in range(3) for dj in range(3)])
    inside, outside = (windows > BOUNDARY).all(0), (windows < -BOUNDARY).all(0)
    blocks = out["detection_masks"][0].reshape(10, 9, factor, 7, factor)
    assert inside.sum() > 20 and outside.sum() > 20
    assert blocks.all(axis=(2, 4))[inside].all()
    assert not blocks.any(axis=(2, 4))[outside].any()
    # Near boundaries the two resolutions may differ, but not by much.
    downsampled = out["detection_masks"][0][:, factor // 2::factor, factor // 2::factor]
    assert (downsampled != low["detection_masks"][0]).mean() < 0.1


def test_more_seeds_than_pixels_gives_invalid_detections():
    rng = np.random.default_rng(8)
    embeddings, logits = random_inputs(rng, batch=1, h=2, w=3)
    out = to_numpy(inference.predict_instances(
        embeddings, logits, (4, 6), inference.InferenceConfig(num_seeds=10)))
    assert out["num_detections"].tolist() == [6]
    assert sorted(out["seed_indices"][0, :6].tolist()) == list(range(6))
    assert out["seed_indices"][0, 6:].tolist() == [-1] * 4
    assert not out["detection_masks"][0, 6:].any()
    assert out["detection_classes"][0, 6:].tolist() == [0] * 4


def test_jit_compiled_equals_plain():
    rng = np.random.default_rng(9)
    embeddings, logits = clustered_inputs(rng)
    embeddings[1] = 0.5 * rng.normal(size=embeddings.shape[1:])  # boundaries in image 1
    config = inference.InferenceConfig(num_seeds=16, nms_iou_threshold=0.5,
                                       support_rescoring=4.0)

    def run(e, l):
        return inference.predict_instances(e, l, (24, 36), config)

    plain = to_numpy(tf.function(run)(embeddings, logits))
    jitted = to_numpy(tf.function(run, jit_compile=True)(embeddings, logits))
    for key in plain:
        if plain[key].dtype == np.float32:
            np.testing.assert_allclose(jitted[key], plain[key], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(jitted[key], plain[key], err_msg=key)

    seed_map = inference.seediness(np_softmax(logits).astype(np.float32))
    plain_seeds = inference.select_seeds(embeddings, seed_map, 16, 0.3)
    jit_seeds = tf.function(inference.select_seeds, jit_compile=True)(
        embeddings, seed_map, 16, 0.3)
    np.testing.assert_array_equal(jit_seeds.numpy(), plain_seeds.numpy())


def test_batch_of_two_equals_two_batches_of_one():
    rng = np.random.default_rng(10)
    embeddings, logits = random_inputs(rng, batch=2, h=8, w=10, d=4)
    embeddings *= 0.5
    config = inference.InferenceConfig(num_seeds=12, nms_iou_threshold=0.6)
    both = to_numpy(inference.predict_instances(embeddings, logits, (16, 20), config))
    for b in range(2):
        one = to_numpy(inference.predict_instances(
            embeddings[b:b + 1], logits[b:b + 1], (16, 20), config))
        for key in both:
            np.testing.assert_array_equal(both[key][b:b + 1], one[key], err_msg=key)


def test_unknown_shapes_inside_tf_function():
    """The way export uses it: any batch and image size, the output size as a tensor,
    and AutoGraph off (as in a Keras ExportArchive endpoint)."""
    rng = np.random.default_rng(11)
    embeddings, logits = random_inputs(rng, batch=2, h=6, w=5, d=4, num_taus=4, num_classes=2)
    config = inference.InferenceConfig(num_seeds=8)
    fn = tf.function(
        lambda e, l: inference.predict_instances(e, l, tf.shape(e)[1:3] * 3, config),
        input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32),
                         tf.TensorSpec([None, None, None, 4, 3], tf.float32)],
        autograph=False)
    got = to_numpy(fn(embeddings, logits))
    want = to_numpy(inference.predict_instances(embeddings, logits, (18, 15), config))
    assert fn.get_concrete_function().structured_outputs["detection_masks"].shape.as_list() == [
        None, 8, None, None]
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_predict_instances_rejects_bad_arguments():
    embeddings = np.zeros((1, 4, 4, 3), np.float32)
    logits = np.zeros((1, 4, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="config.taus"):
        inference.predict_instances(embeddings, logits[..., :3, :], (8, 8))
    with pytest.raises(ValueError, match="class_logits"):
        inference.predict_instances(embeddings, logits[:, :3], (8, 8))
    with pytest.raises(ValueError, match="image_size"):
        inference.predict_instances(embeddings, logits, (8, 0))
    with pytest.raises(ValueError, match="num_classes"):
        inference.predict_instances(embeddings, logits[..., :1], (8, 8))
    with pytest.raises(TypeError, match="embeddings"):
        inference.predict_instances(embeddings.astype(np.int32), logits, (8, 8))


def test_heads_resolution_detections_rejects_bad_arguments():
    embeddings = np.zeros((1, 4, 4, 3), np.float32)
    probs = np.full((1, 4, 4, 4, 2), 0.5, np.float32)
    detect = inference.heads_resolution_detections
    with pytest.raises(ValueError, match="class_probs has 3 tau slices"):
        detect(embeddings, probs[..., :3, :])
    with pytest.raises(ValueError, match="class_probs .* disagree"):
        detect(embeddings, probs[:, :3])
    with pytest.raises(TypeError, match="InferenceConfig"):
        detect(embeddings, probs, config={"num_seeds": 3})
    with pytest.raises(TypeError, match="valid_pixels must be a bool"):
        detect(embeddings, probs, valid_pixels=np.ones((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match="valid_pixels .* disagree"):
        detect(embeddings, probs, valid_pixels=np.ones((1, 4, 3), bool))


def test_full_resolution_masks_follow_the_stride_cells():
    # One instance of 4x4 heads pixels, far from the background in embedding space: at
    # stride 4 its full-resolution mask is the 16x16 block of those cells (the labels
    # were sampled at cell centres), not a block shrunk towards the cell centres.
    labels = np.zeros((8, 8), int)
    labels[2:6, 3:7] = 1
    embeddings = np.zeros((1, 8, 8, 2), np.float32)
    embeddings[0, labels == 1, 1] = 3.0
    embeddings[0, labels == 0, 0] = 3.0
    logits = np.zeros((1, 8, 8, 1, 2), np.float32)
    logits[0, labels == 1, 0, 1] = 10.0
    for tau in (0.25, 0.5, 0.9):
        config = inference.InferenceConfig(num_seeds=1, taus=(tau,))
        out = to_numpy(inference.predict_instances(embeddings, logits, (32, 32), config))
        mask = out["detection_masks"][0, 0]
        block = np.kron(labels, np.ones((4, 4), int)).astype(bool)
        iou = (mask & block).sum() / (mask | block).sum()
        assert iou > 0.97, (tau, iou)
        # Only the block's corner pixels may differ.
        assert (mask != block).sum() <= 4
