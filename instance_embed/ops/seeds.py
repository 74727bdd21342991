"""Seediness and the paper's greedy, diverse seed selection (paper 3.3-3.4).

`seediness` is the best foreground probability of a pixel over taus and classes;
`select_seeds` picks `p_t = argmax log S_p + alpha log D(p)`, D the squared embedding
distance to the nearest chosen seed, exactly as the one-seed-at-a-time greedy does but
in a few batched passes (`SeedPasses`). Everything is TensorFlow ops on batched tensors
with a static number of seeds, so it runs eagerly, in `tf.function` and under XLA.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from instance_embed.ops import checks
from instance_embed.ops import geometry

# The public functions are plain TensorFlow ops with Python-level structure only (no
# data-dependent Python control flow), so AutoGraph has nothing to convert. It is kept
# out: converting them once failed in a full test session and not when the same test
# ran alone ("tf__seediness() takes from 0 to 1 positional arguments but 5 were given").
graph_ready = tf.autograph.experimental.do_not_convert

LOWEST_SCORE = -3.4028234663852886e38  # the lowest finite float32


@dataclasses.dataclass(frozen=True)
class PassSizes:
    """How `SeedPasses` splits the greedy into passes (the seeds do not depend on it).

    Attributes:
      candidates: C, pixels rescored as candidates per pass; a multiple of 8 (the
        [C, C] candidate scores are then whole SIMD packets, see `SeedPasses`).
      seeds_per_pass: most seeds one pass may certify.
      first_block: picks in the first block; blocks then double (8, 8, 16, 32, ...), and
        a block runs only while every pick before it was certified.
    """

    candidates: int = 128
    seeds_per_pass: int = 64
    first_block: int = 8

    def __post_init__(self):
        if self.candidates < 8 or self.candidates % 8:
            raise ValueError(f"PassSizes.candidates={self.candidates}: must be a positive "
                             "multiple of 8")
        if self.seeds_per_pass < 1 or self.first_block < 1:
            raise ValueError(f"PassSizes {self}: seeds_per_pass and first_block must be >= 1")


DEFAULT_PASS_SIZES = PassSizes()


@graph_ready
def seediness(class_probs: tf.Tensor) -> tf.Tensor:
    """Seediness, the best foreground probability over taus and classes (paper 3.4).

    Args:
      class_probs: float [batch, height, width, num_taus, num_classes + 1], softmax
        over the last axis; class 0 is background.

    Returns:
      float32 [batch, height, width].
    """
    class_probs = checks.as_float(class_probs, "class_probs", rank=5)
    checks.check_has_foreground(class_probs)
    return tf.reduce_max(class_probs[..., 1:], axis=[-2, -1])


@graph_ready
def select_seeds(embeddings: tf.Tensor, seediness: tf.Tensor, num_seeds: int,
                 alpha: float | tf.Tensor, valid_pixels: tf.Tensor | None = None,
                 pass_sizes: PassSizes = DEFAULT_PASS_SIZES) -> tf.Tensor:
    """Greedy diverse seeds: `p_t = argmax_{p unchosen} log S_p + alpha log D(p)` (paper 3.3).

    The first seed is the argmax of S. `D(p)` is the squared embedding distance from p
    to the nearest chosen seed, kept as a running minimum. Ties go to the lowest
    flattened (row-major) index. The seeds are those of this plain greedy, computed in
    a few batched passes over the pixels (see `SeedPasses`).

    Zeros are allowed: `log 0 = -inf` (a pixel with S = 0, or at distance 0 from a
    chosen seed, scores -inf); with `alpha = 0` the diversity term is 0 even where
    D = 0. NaN scores count as -inf. When every unchosen pixel scores -inf, the lowest
    unchosen index is taken, so seeds never repeat while unchosen pixels remain. When
    `num_seeds > height * width`, the seeds after the last pixel are -1 ("no seed"): the
    output shape stays `[batch, num_seeds]` whatever the image size, and the other
    functions of this module treat -1 as an empty, invalid seed. `valid_pixels` limits
    the candidates (e.g. to the heads pixels that see the image rather than its
    padding); the seeds after the last valid pixel are -1 in the same way.

    Distances are `|e_p|^2 + |e_q|^2 - 2 e_p . e_q` (matrix products, several times
    faster than differences, most of all under XLA) on embeddings centred on their
    image mean to limit cancellation; so a pixel whose embedding repeats a chosen
    seed's may get a tiny positive D instead of exactly 0.

    Args:
      embeddings: float [batch, height, width, dim].
      seediness: float [batch, height, width], values in [0, 1].
      num_seeds: K, a positive Python int (static, so output shapes are static).
      alpha: diversity weight >= 0 (float or scalar tensor).
      valid_pixels: optional bool [batch, height, width], the pixels that may be seeds
        (None: all).
      pass_sizes: how the greedy is split into passes (`PassSizes`); the seeds are the
        same for every choice, only the cost differs.

    Returns:
      int32 [batch, num_seeds]: flattened indices `row * width + col`, or -1.
    """
    embeddings = checks.as_float(embeddings, "embeddings", rank=4)
    seediness = checks.as_float(seediness, "seediness", rank=3)
    num_seeds = checks.check_num_seeds(num_seeds)
    if checks.is_real(alpha) and not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha={alpha!r}: must be a finite number >= 0")
    alpha = tf.cast(alpha, tf.float32)
    checks.check_same_spatial(embeddings, "embeddings", seediness, "seediness")
    valid_pixels = checks.check_valid_pixels(valid_pixels, seediness)
    return select_seeds_from_geometry(geometry.pixel_geometry(embeddings), seediness,
                                      num_seeds, alpha, valid_pixels, pass_sizes)


def select_seeds_from_geometry(pixels: tuple[tf.Tensor, tf.Tensor], seediness: tf.Tensor,
                               num_seeds: int, alpha: tf.Tensor, valid_pixels: tf.Tensor | None,
                               pass_sizes: PassSizes = DEFAULT_PASS_SIZES) -> tf.Tensor:
    """`select_seeds` after its checks, from `geometry.pixel_geometry`'s (points, norms)."""
    points, norms = pixels  # [B, N, d], [B, N]
    pixel_seediness = tf.reshape(seediness, tf.shape(norms))  # [B, N]
    if valid_pixels is None:
        allowed = tf.ones_like(pixel_seediness, tf.bool)
    else:
        allowed = tf.reshape(valid_pixels, tf.shape(norms))
    # One image at a time: 2-D matmuls are several times faster on CPU than batched
    # ones (BatchMatMul), and serving batches are small. The loop over images writes
    # into a [B, K] tensor rather than map_fn's TensorList, whose copies cost about as
    # much as a pass. (A tf.cond that skipped the loop for a batch of one, with map_fn
    # in its other branch, made grappler's dependency optimizer fail to sort the graph
    # and log an error each time the graph was optimised.)
    batch = tf.shape(points)[0]

    def one_image(i, seeds):
        image_seeds = greedy_seeds(points[i], norms[i], pixel_seediness[i], allowed[i],
                                   num_seeds=num_seeds, alpha=alpha, pass_sizes=pass_sizes)
        return i + 1, tf.tensor_scatter_nd_update(seeds, [[i]], image_seeds[tf.newaxis])

    _, seeds = tf.while_loop(lambda i, _: i < batch, one_image,
                             (tf.constant(0), tf.zeros(tf.stack([batch, num_seeds]), tf.int32)))
    return seeds


def greedy_seeds(points: tf.Tensor, norms: tf.Tensor, seediness: tf.Tensor,
                 allowed: tf.Tensor, num_seeds: int, alpha: tf.Tensor,
                 pass_sizes: PassSizes = DEFAULT_PASS_SIZES) -> tf.Tensor:
    """`select_seeds` of one image: `points [N, d]` (centred), their squared norms
    `[N]`, `seediness [N]`, `allowed [N]`.

    Returns int32 [num_seeds]. See `SeedPasses` for the method.
    """
    passes = SeedPasses(points, norms, seediness, allowed, num_seeds, alpha, pass_sizes)
    return passes.seeds(tf.while_loop(passes.not_done, passes.run, passes.initial_state()))


class SeedPasses:
    """The greedy of `select_seeds` for one image, in passes that each certify many seeds.

    The plain greedy rescores all N pixels, `f_p = log S_p + alpha log D(p)`, for every
    seed. Here each pass

    1. scores every pixel with `D` up to date, and takes the C best, the candidates
       (`top_k`: ties to the lower index). The last of them, `(B, i_B)`, bounds all the
       others: a non-candidate scores at most B, and if exactly B, its index is above
       `i_B`;
    2. runs the greedy among the candidates only, from their `[C, C]` distances, and
       keeps its picks for as long as each one beats `(B, i_B)`: a higher score, or B
       with a lower index. The picks run in blocks (8, 8, 16, 32, ...): a block runs
       only if every pick before it was kept, so a pass that keeps few seeds (the first
       one typically keeps about one per object) costs few picks;
    3. brings `D` up to date with those seeds, in one `[N, d] x [d, r]` product, r the
       size of the blocks that held them.

    Why this is exact: `D` is a running minimum and `f` is non-decreasing in `D`, so no
    pixel's score ever rises. Until the next pass, a non-candidate therefore still
    scores at most B (with the index condition on a tie), while the candidates' scores
    are kept exactly. A candidate that beats `(B, i_B)` thus beats every unchosen pixel:
    it is what the plain greedy picks, ties included. The first pick of a pass is the
    best candidate, which always qualifies, so every pass makes progress; on the
    benchmark scene a pass certifies dozens of seeds (benchmarks/seed_selection.py).
    Step 2 updates a candidate with `f(min(D, x)) = min(f(D), f(x))` (f non-decreasing):
    its score after picking candidate i is the minimum of its score so far and the
    precomputed `f` of its distance to i, a gather and a minimum per pick.

    The distances are the expanded `|e_p|^2 + |e_q|^2 - 2 e_p . e_q` of `select_seeds`,
    from matrix products whose rounding depends on the kernel (eager or graph, one row
    or many, XLA or not). Two pixels whose scores differ by less than that rounding
    (about `1e-7 |e|^2` in D) may come out in either order, as they already could
    between the eager, graph and XLA runs of the one-seed-per-step version (2 of 100
    scenes like benchmarks/postprocess.py's at 64 x 64, K = 100). Exact ties (equal
    seediness and distances) are decided by index in every mode: scores are computed on
    whole SIMD packets only (see `__init__`). (`f` is non-decreasing in floating point
    too, except that TF's CPU `log` kernel steps one ulp back at a couple of dozen
    float32 inputs, checked exhaustively; that too only matters for scores equal to the
    last bit.)

    Cost: a pass is a handful of ops over N pixels, an `[N, d] x [d, r]`
    product, a `[C, C]` one and three tiny ops per pick, instead of about ten ops over
    N and a `[1, d] x [d, N]` product per seed. In the plain (non-XLA) graph every op
    also costs a few microseconds of executor time, which is why picks run in blocks
    and why `DEFAULT_PASS_SIZES` has C = 128 (benchmarks/seed_selection.py prints the
    passes each choice takes).

    Loop state (`initial_state`, `run`), with N' >= N the padded pixel count: `written`
    int32 (seeds known so far), `seeds` int32 [K + steps] (the first `written` are
    final), `chosen` bool [N'] (seeds, pixels that may not be seeds and padding),
    `min_dist` float32 [N'] (`D`).
    """

    def __init__(self, points: tf.Tensor, norms: tf.Tensor, seediness: tf.Tensor,
                 allowed: tf.Tensor, num_seeds: int, alpha: tf.Tensor,
                 sizes: PassSizes = DEFAULT_PASS_SIZES):
        self.num_seeds = num_seeds
        self.num_candidates = sizes.candidates
        # A pass can certify at most C - 1 seeds: the bounding candidate never qualifies.
        self.steps = max(1, min(sizes.seeds_per_pass, sizes.candidates - 1, num_seeds - 1))
        # Pick blocks b, b, 2b, 4b, ..., as sizes and as cumulative ends (the last is `steps`).
        self.blocks, self.block_ends = [], [0]
        while self.block_ends[-1] < self.steps:
            size = min(max(sizes.first_block, self.block_ends[-1]),
                       self.steps - self.block_ends[-1])
            self.blocks.append(size)
            self.block_ends.append(self.block_ends[-1] + size)
        self.block_ends = self.block_ends[1:]
        self.alpha = alpha
        self.num_pixels = tf.shape(points)[0]
        # Per-pixel vectors are padded to N', a multiple of 64 and at least C, with
        # pixels that may not be seeds: top_k then has C values whatever N is, and every
        # score is computed by the vectorised kernels. (TF's CPU kernels do the last
        # N mod 16 entries of a tensor with scalar code, whose log can differ in the
        # last bit: two pixels with equal seediness and distance could then score
        # differently and an exact tie go to the higher index.) The C x C candidate
        # scores are whole packets as C is a multiple of 8.
        padded = (tf.maximum(self.num_pixels, self.num_candidates) + 63) // 64 * 64
        self.pad = padded - self.num_pixels
        self.log_seediness = tf.math.log(tf.pad(seediness, [[0, self.pad]]))  # [N']
        self.allowed = tf.pad(allowed, [[0, self.pad]])  # [N']
        self.points = points  # [N, d]
        self.norms = norms  # [N]
        self.first = first_argmax(self.log_seediness[tf.newaxis],
                                   self.allowed[tf.newaxis])  # [1]
        self.num_allowed = tf.reduce_sum(tf.cast(allowed, tf.int32))
        self.limit = tf.minimum(self.num_allowed, num_seeds)
        self.not_self = tf.where(tf.eye(self.num_candidates, dtype=tf.bool),
                                 -math.inf, 0.0)  # [C, C]

    def nearest(self, pixels: tf.Tensor) -> tf.Tensor:
        """int32 [r] -> float32 [N'], the squared distance to the nearest of `pixels`.

        (Possibly slightly negative: see `select_seeds`.)
        """
        # min_q |p - q|^2 = |p|^2 + min_q (|q|^2 - 2 p.q): the [N, r] product has the N
        # rows on the left (about twice as fast on CPU as the other way round for a
        # pass's few rows) and the -2 scales the r rows (exactly).
        cross = tf.matmul(self.points, -2.0 * tf.gather(self.points, pixels),
                          transpose_b=True)  # [N, r]
        dist = tf.reduce_min(cross + tf.gather(self.norms, pixels)[tf.newaxis], axis=1)
        return tf.pad(dist + self.norms, [[0, self.pad]], constant_values=math.inf)

    def initial_state(self):
        start = tf.maximum(self.first, 0)  # [1]
        # Pixels that may not be seeds count as chosen from the start.
        chosen = tf.tensor_scatter_nd_update(tf.logical_not(self.allowed),
                                             start[:, tf.newaxis], [True])
        seeds = tf.concat([self.first, tf.fill([self.num_seeds - 1 + self.steps], -1)], axis=0)
        return tf.constant(1), seeds, chosen, self.nearest(start)

    def not_done(self, written, *_):
        return written < self.limit

    def run(self, written, seeds, chosen, min_dist):
        """One pass: the loop state after it (see the class docstring)."""
        num_candidates, steps = self.num_candidates, self.steps
        scores = tf.where(chosen, -math.inf,
                          seed_scores(self.log_seediness, min_dist, self.alpha))  # [N']
        # (1) Reducing all C values (rather than slicing out the last) keeps XLA's
        # top_k a partial sort; a full sort is many times slower.
        top = tf.math.top_k(scores, k=num_candidates)
        bound = tf.reduce_min(top.values)
        bound_index = tf.reduce_max(tf.where(top.values == bound, top.indices, -1))
        # Candidates in index order: top_k's lowest-position tie rule in (2) is then
        # the lowest-index rule. (Indices are >= 0: negating cannot overflow.)
        candidates = -tf.math.top_k(-top.indices, k=num_candidates).values  # [C]
        # A padding candidate reads pixel N - 1; scoring -inf, it is only picked once
        # every allowed pixel is a seed (`seeds` drops those picks).
        pixels = tf.minimum(candidates, self.num_pixels - 1)
        candidate_points = tf.gather(self.points, pixels)  # [C, d]
        candidate_norms = tf.gather(self.norms, pixels)  # [C]
        candidate_dist = (
            tf.matmul(-2.0 * candidate_points, candidate_points, transpose_b=True)
            + candidate_norms[:, tf.newaxis] + candidate_norms[tf.newaxis])  # [C, C]
        # if_chosen[i, j]: candidate j's score were candidate i its nearest seed; -inf
        # on the diagonal makes a picked candidate chosen.
        if_chosen = self.not_self + seed_scores(
            tf.gather(self.log_seediness, pixels)[tf.newaxis], candidate_dist, self.alpha)
        # (2) Up to `steps` picks, in blocks; a block that does not run yields picks
        # that are not certified.
        def beats_bound(values, picks):
            return tf.logical_or(values > bound,
                                 tf.logical_and(values == bound, picks < bound_index))

        current = tf.gather(scores, candidates)[tf.newaxis]  # [1, C]
        picks, certified = [], []
        for block, size in enumerate(self.blocks):
            if block == 0:
                current, block_values, block_picks = self._pick(current, if_chosen,
                                                                candidates, size)
                certified.append(beats_bound(block_values, block_picks))
            else:
                go = tf.logical_and(tf.reduce_all(certified[-1]),
                                    written + self.block_ends[block - 1] < self.limit)
                current, block_values, block_picks = tf.cond(
                    go,
                    lambda size=size, current=current: self._pick(current, if_chosen,
                                                                  candidates, size),
                    lambda size=size, current=current: (
                        current, tf.fill([size], -math.inf), tf.fill([size], 0)))
                certified.append(tf.logical_and(go, beats_bound(block_values, block_picks)))
            picks.append(block_picks)
        picks = tf.concat(picks, axis=0)  # [steps]
        certified = tf.math.cumprod(tf.cast(tf.concat(certified, axis=0), tf.int32))
        count = tf.maximum(tf.reduce_sum(certified), 1)  # (the first pick always beats it)
        # The uncertified picks are written too; the next pass overwrites them.
        seeds = tf.tensor_scatter_nd_update(
            seeds, (written + tf.range(steps))[:, tf.newaxis], picks)
        written += count
        # (3) The new seeds, padded with repeats of the first (a repeat changes no
        # minimum). The product has as many rows as the blocks that hold the new seeds,
        # and is skipped after the last pass.
        new = tf.minimum(tf.where(certified > 0, picks, picks[0]), self.num_pixels - 1)
        chosen = tf.tensor_scatter_nd_update(chosen, new[:, tf.newaxis],
                                             tf.ones_like(new, tf.bool))
        rows = 1 + tf.reduce_sum(tf.cast(count > tf.constant(self.block_ends), tf.int32))
        update = tf.where(written >= self.limit, 0, rows)
        min_dist = tf.switch_case(update, [lambda: min_dist] + [
            lambda end=end: tf.minimum(min_dist, self.nearest(new[:end]))
            for end in self.block_ends])
        return written, seeds, chosen, min_dist

    def _pick(self, current, if_chosen, candidates, size):
        """`size` greedy picks among the candidates, unrolled: three small ops each.

        Returns the scores `[1, C]` after them, and their scores and pixels, `[size]`.
        """
        one = tf.constant(1)
        values, positions = [], []
        for _ in range(size):
            best = tf.math.top_k(current, k=one)  # [1, 1] values and positions
            values.append(best.values)
            positions.append(best.indices)
            current = tf.minimum(current, tf.gather_nd(if_chosen, best.indices))
        positions = tf.reshape(tf.concat(positions, axis=0), [size])
        return (current, tf.reshape(tf.concat(values, axis=0), [size]),
                tf.gather(candidates, positions))

    def seeds(self, state) -> tf.Tensor:
        """int32 [K] from the final loop state: -1 once every allowed pixel is a seed."""
        seeds = state[1][:self.num_seeds]
        return tf.where(tf.range(self.num_seeds) < self.num_allowed, seeds, -1)


def seed_scores(log_seediness: tf.Tensor, dist: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """`log S + alpha log D`, broadcast; non-decreasing in `dist`.

    xlogy gives 0 * log 0 = 0, so alpha = 0 ranks by seediness alone. -inf and NaN
    scores become the lowest finite float: they tie with each other, lose to every
    real score and still beat the chosen pixels (-inf).
    """
    scores = log_seediness + tf.math.xlogy(alpha, dist)
    return tf.where(scores >= LOWEST_SCORE, scores, LOWEST_SCORE)


def first_argmax(values: tf.Tensor, allowed: tf.Tensor) -> tf.Tensor:
    """Index of the largest allowed value along the last axis, lowest index on ties.

    NaN counts as -inf; when every allowed value is -inf the lowest allowed index wins;
    with nothing allowed the result is -1. tf.argmax's tie order is not documented,
    hence the explicit min-index reduction.

    Args:
      values: float [..., n].
      allowed: bool [..., n].

    Returns:
      int32 [...].
    """
    n = tf.shape(values)[-1]
    values = tf.where(tf.logical_and(allowed, tf.logical_not(tf.math.is_nan(values))),
                      values, -math.inf)
    best = tf.reduce_max(values, axis=-1, keepdims=True)
    hits = tf.logical_and(allowed, values >= best)
    index = tf.reduce_min(tf.where(hits, tf.range(n), n), axis=-1)
    return tf.where(index == n, -1, index)
