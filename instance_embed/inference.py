"""From pixel embeddings and mask classes to instance masks (paper sections 3.3-3.4).

The network gives, at the heads' resolution `[h, w]`, an embedding `e_p` per pixel and,
for each similarity threshold tau, the probability `C[p, tau, c]` that the mask grown
from `p` at tau is an instance of class `c` (0 = a bad seed). Inference is:

1. seediness `S_p = max over tau, max over c >= 1 of C[p, tau, c]` (`seediness`);
2. greedy seeds, `p_t = argmax log S_p + alpha * log D(p)` with `D` the squared
   embedding distance to the nearest chosen seed (`select_seeds`);
3. per seed, `(tau, c) = argmax C[p, tau, c]` over foreground classes, score = that
   probability (`seed_classes_and_scores`);
4. per seed, the mask `{q : sigma(p, q) >= tau}` with `sigma = 2 / (1 + exp(d2))`,
   i.e. `d2 <= log(2 / tau - 1)`, for all seeds at once as one matrix product
   (`grow_masks`);
5. `heads_resolution_detections` runs steps 1-4 (sharing the centred embeddings between
   seed selection and mask growing) and sorts the detections by score;
   `predict_instances` builds on it: it optionally drops low scores and near-duplicate
   masks and brings the masks to the input resolution.

Everything is TensorFlow ops on batched tensors with a static number of seeds K, so it
runs eagerly, inside `tf.function` (unknown batch and image sizes included) and under
`jit_compile=True`. Seeds that do not exist (K larger than h * w, see `select_seeds`) are
carried as index -1 and produce empty, invalid detections rather than an error, so the
output shapes never depend on the image size.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import tensorflow as tf

from instance_embed import mask_upsampling

# The public functions are plain TensorFlow ops with Python-level structure only (no
# data-dependent Python control flow), so AutoGraph has nothing to convert. It is kept
# out: converting them once failed in a full test session and not when the same test
# ran alone ("tf__seediness() takes from 0 to 1 positional arguments but 5 were given",
# raised by the call to `_select_seeds` in a converted `select_seeds`).
_graph_ready = tf.autograph.experimental.do_not_convert

PAPER_TAUS = (0.25, 0.5, 0.75, 0.9)
MASK_UPSAMPLING = ("bilinear", "joint_bilateral")
# Greedy seed selection in passes (see `_SeedPasses`): candidates per pass (a multiple
# of 8), most seeds a pass may certify, and the first block of picks (blocks then double;
# a block runs only while every pick before it was certified, and distances are updated
# with as many rows as the blocks that held the certified seeds).
_SEED_CANDIDATES = 128
_SEEDS_PER_PASS = 64
_SEED_BLOCK = 8
_LOWEST = -3.4028234663852886e38  # the lowest finite float32


@dataclasses.dataclass
class InferenceConfig:
    """How detections are made from the network's outputs.

    Attributes:
      num_seeds: K, the number of seeds (and detections, valid or not) per image.
        The paper uses 100 (Table 3).
      alpha: weight of embedding diversity against seediness when picking seeds
        (paper Table 2: 0.3 is best). 0 picks seeds by seediness alone.
      taus: the similarity thresholds T, one per slice of the classification head;
        must match the model's `ModelConfig.taus`. Each in (0, 1].
      score_threshold: detections scoring below it are dropped. 0 keeps all (paper).
      nms_iou_threshold: when set, a mask whose IoU with a higher-scored kept mask
        exceeds it is dropped (near-duplicate suppression, IoU measured at the heads'
        resolution). None disables it (paper).
      support_rescoring: with suppression on, each kept detection's score is scaled by
        `min(1, n / support_rescoring)`, where n counts the detections it suppressed
        plus itself: an instance draws many seeds whose masks nearly coincide, a
        spurious or poor mask few. 0 (default, the paper's scoring) turns it off.
      mask_upsampling: how masks reach the input resolution (see `mask_upsampling`):
        "bilinear" (the 0/1 mask resized bilinearly, boundaries on the stride-cell
        grid) or "joint_bilateral" (boundaries inside a cell follow the image's colour
        edges; needs the images).
      bilateral_sigma: the colour distance (RGB in 0-255) of "joint_bilateral": a cell
        whose mean colour is this much farther from a pixel's colour than the closest
        cell's weighs exp(-1/2) as much.
      jit_compile: run everything after the network (`predict_instances`) as one XLA
        computation (`predictor.detect`): same results, 15-20% less end-to-end time
        for a 512 x 512 image with bilinear masks and half with joint bilateral ones
        on a CPU, but compiled again for every new input size (seconds). For fixed-size
        inputs; TF Serving runs it with `--xla_cpu_compilation_enabled=true`.
    """

    num_seeds: int = 100
    alpha: float = 0.3
    taus: tuple[float, ...] = PAPER_TAUS
    score_threshold: float = 0.0
    nms_iou_threshold: float | None = None
    support_rescoring: float = 0.0
    mask_upsampling: str = "bilinear"
    bilateral_sigma: float = 10.0
    jit_compile: bool = False

    def __post_init__(self):
        if (isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, numbers.Integral)
                or self.num_seeds < 1):
            _config_error("num_seeds", self.num_seeds, "must be a positive integer")
        self.num_seeds = int(self.num_seeds)
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha < 0:
            _config_error("alpha", self.alpha, "must be a finite number >= 0")
        if isinstance(self.taus, (str, bytes)) or not isinstance(self.taus, Sequence):
            _config_error("taus", self.taus, "must be a sequence of numbers in (0, 1]")
        if not self.taus or not all(_is_real(t) and 0 < t <= 1 for t in self.taus):
            _config_error("taus", self.taus, "must be a non-empty sequence of numbers in (0, 1]")
        self.taus = tuple(float(t) for t in self.taus)
        if not _is_real(self.score_threshold) or not 0 <= self.score_threshold <= 1:
            _config_error("score_threshold", self.score_threshold, "must be in [0, 1]")
        if self.mask_upsampling not in MASK_UPSAMPLING:
            _config_error("mask_upsampling", self.mask_upsampling,
                          f"must be one of {', '.join(MASK_UPSAMPLING)}")
        if (not _is_real(self.bilateral_sigma) or not math.isfinite(self.bilateral_sigma)
                or self.bilateral_sigma <= 0):
            _config_error("bilateral_sigma", self.bilateral_sigma, "must be a finite number > 0")
        self.bilateral_sigma = float(self.bilateral_sigma)
        if not isinstance(self.jit_compile, bool):
            _config_error("jit_compile", self.jit_compile, "must be True or False")
        if self.nms_iou_threshold is not None and (
                not _is_real(self.nms_iou_threshold) or not 0 <= self.nms_iou_threshold <= 1):
            _config_error("nms_iou_threshold", self.nms_iou_threshold,
                          "must be None (off) or in [0, 1]")
        if (not _is_real(self.support_rescoring) or not math.isfinite(self.support_rescoring)
                or self.support_rescoring < 0):
            _config_error("support_rescoring", self.support_rescoring,
                          "must be a finite number >= 0 (0: off)")
        self.support_rescoring = float(self.support_rescoring)
        if self.support_rescoring > 0 and self.nms_iou_threshold is None:
            _config_error("support_rescoring", self.support_rescoring,
                          "counts suppressed duplicates: set nms_iou_threshold too")


@_graph_ready
def seediness(class_probs: tf.Tensor) -> tf.Tensor:
    """Seediness, the best foreground probability over taus and classes (paper 3.4).

    Args:
      class_probs: float [batch, height, width, num_taus, num_classes + 1], softmax
        over the last axis; class 0 is background.

    Returns:
      float32 [batch, height, width].
    """
    class_probs = _as_float(class_probs, "class_probs", rank=5)
    _check_has_foreground(class_probs)
    return tf.reduce_max(class_probs[..., 1:], axis=[-2, -1])


@_graph_ready
def select_seeds(embeddings: tf.Tensor, seediness: tf.Tensor, num_seeds: int,
                 alpha: float | tf.Tensor, valid_pixels: tf.Tensor | None = None
                 ) -> tf.Tensor:
    """Greedy diverse seeds: `p_t = argmax_{p unchosen} log S_p + alpha log D(p)` (paper 3.3).

    The first seed is the argmax of S. `D(p)` is the squared embedding distance from p
    to the nearest chosen seed, kept as a running minimum. Ties go to the lowest
    flattened (row-major) index. The seeds are those of this plain greedy, computed in
    a few batched passes over the pixels (see `_SeedPasses`).

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

    Returns:
      int32 [batch, num_seeds]: flattened indices `row * width + col`, or -1.
    """
    embeddings = _as_float(embeddings, "embeddings", rank=4)
    seediness = _as_float(seediness, "seediness", rank=3)
    num_seeds = _check_num_seeds(num_seeds)
    if _is_real(alpha) and not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha={alpha!r}: must be a finite number >= 0")
    alpha = tf.cast(alpha, tf.float32)
    _check_same_spatial(embeddings, "embeddings", seediness, "seediness")
    valid_pixels = _check_valid_pixels(valid_pixels, seediness)
    return _select_seeds(_pixel_geometry(embeddings), seediness, num_seeds, alpha, valid_pixels)


def _select_seeds(geometry: tuple[tf.Tensor, tf.Tensor], seediness: tf.Tensor,
                  num_seeds: int, alpha: tf.Tensor, valid_pixels: tf.Tensor | None
                  ) -> tf.Tensor:
    """`select_seeds` after its checks, from `_pixel_geometry`'s (points, norms)."""
    points, norms = geometry  # [B, N, d], [B, N]
    pixel_seediness = tf.reshape(seediness, tf.shape(norms))  # [B, N]
    if valid_pixels is None:
        allowed = tf.ones_like(pixel_seediness, tf.bool)
    else:
        allowed = tf.reshape(valid_pixels, tf.shape(norms))
    # One image at a time: 2-D matmuls are several times faster on CPU than batched
    # ones (BatchMatMul), and serving batches are small. A batch of one (the usual
    # serving request) skips map_fn, whose loop and TensorList copies cost about as much
    # as a pass.
    def one_image(image):
        return _greedy_seeds(*image, num_seeds=num_seeds, alpha=alpha)

    images = (points, norms, pixel_seediness, allowed)
    return tf.cond(
        tf.shape(points)[0] == 1,
        lambda: one_image([x[0] for x in images])[tf.newaxis],
        lambda: tf.map_fn(one_image, images,
                          fn_output_signature=tf.TensorSpec([num_seeds], tf.int32)))


def _greedy_seeds(points: tf.Tensor, norms: tf.Tensor, seediness: tf.Tensor,
                  allowed: tf.Tensor, num_seeds: int, alpha: tf.Tensor) -> tf.Tensor:
    """`select_seeds` of one image: `points [N, d]` (centred), their squared norms
    `[N]`, `seediness [N]`, `allowed [N]`.

    Returns int32 [num_seeds]. See `_SeedPasses` for the method.
    """
    passes = _SeedPasses(points, norms, seediness, allowed, num_seeds, alpha)
    return passes.seeds(tf.while_loop(passes.not_done, passes.run, passes.initial_state()))


class _SeedPasses:
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
    and why C = 128: on benchmarks/postprocess.py's scene the 100 seeds take 3 passes
    instead of 5 with C = 64 (benchmarks/seed_selection.py prints the counts).

    Loop state (`initial_state`, `run`), with N' >= N the padded pixel count: `written`
    int32 (seeds known so far), `seeds` int32 [K + steps] (the first `written` are
    final), `chosen` bool [N'] (seeds, pixels that may not be seeds and padding),
    `min_dist` float32 [N'] (`D`).
    """

    def __init__(self, points: tf.Tensor, norms: tf.Tensor, seediness: tf.Tensor,
                 allowed: tf.Tensor, num_seeds: int, alpha: tf.Tensor):
        self.num_seeds = num_seeds
        self.num_candidates = _SEED_CANDIDATES
        # A pass can certify at most C - 1 seeds: the bounding candidate never qualifies.
        self.steps = max(1, min(_SEEDS_PER_PASS, _SEED_CANDIDATES - 1, num_seeds - 1))
        # Pick blocks b, b, 2b, 4b, ..., as sizes and as cumulative ends (the last is `steps`).
        self.blocks, self.block_ends = [], [0]
        while self.block_ends[-1] < self.steps:
            size = min(max(_SEED_BLOCK, self.block_ends[-1]), self.steps - self.block_ends[-1])
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
        self.first = _first_argmax(self.log_seediness[tf.newaxis],
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
                          _seed_scores(self.log_seediness, min_dist, self.alpha))  # [N']
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
        if_chosen = self.not_self + _seed_scores(
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


def _seed_scores(log_seediness: tf.Tensor, dist: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """`log S + alpha log D`, broadcast; non-decreasing in `dist`.

    xlogy gives 0 * log 0 = 0, so alpha = 0 ranks by seediness alone. -inf and NaN
    scores become the lowest finite float: they tie with each other, lose to every
    real score and still beat the chosen pixels (-inf).
    """
    scores = log_seediness + tf.math.xlogy(alpha, dist)
    return tf.where(scores >= _LOWEST, scores, _LOWEST)


@_graph_ready
def grow_masks(embeddings: tf.Tensor, seed_indices: tf.Tensor, taus: tf.Tensor) -> tf.Tensor:
    """Masks `{q : sigma(seed, q) >= tau}` of all seeds, from one matrix product (paper 3.3).

    `sigma >= tau` is `||e_q - e_seed||^2 <= log(2 / tau - 1)`, the distances expanded as
    in `mask_margins` (the same masks up to rounding at the threshold). A seed always
    belongs to its own mask (set explicitly: rounding in the expanded product would not
    guarantee it); a seed of -1 gives an empty mask.

    Args:
      embeddings: float [batch, height, width, dim].
      seed_indices: int [batch, K], flattened row-major indices or -1.
      taus: float [batch, K], each in (0, 1].

    Returns:
      bool [batch, K, height, width].
    """
    embeddings = _as_float(embeddings, "embeddings", rank=4)
    seed_indices = _as_int(seed_indices, "seed_indices", rank=2)
    taus = _as_float(taus, "taus", rank=2)
    return _grow_masks(_pixel_geometry(embeddings), tf.shape(embeddings)[1:3], seed_indices,
                       taus)


def _grow_masks(geometry: tuple[tf.Tensor, tf.Tensor], size: tf.Tensor,
                seed_indices: tf.Tensor, taus: tf.Tensor) -> tf.Tensor:
    """`grow_masks` after its checks, from `_pixel_geometry`'s (points, norms) and the
    heads' `size` (h, w)."""
    points, point_norms = geometry
    thresholds = tf.math.log(2.0 / taus - 1.0)
    safe_seeds, seeds, seed_norms = _seed_points(geometry, seed_indices)
    valid = seed_indices >= 0
    # `|q|^2 - 2 q.s <= log(2 / tau - 1) - |s|^2`: two [B, K, N] operations after the
    # product (-2 scales exactly), where the margins of `mask_margins` take six. An
    # invalid seed's limit is -inf: its mask is empty.
    cross = tf.matmul(-2.0 * seeds, points, transpose_b=True)  # [B, K, N]
    limit = tf.where(valid, thresholds - seed_norms, -math.inf)
    masks = cross + point_norms[:, None, :] <= limit[:, :, None]
    # The seed itself, whatever the rounding: one update per seed.
    shape = tf.shape(seed_indices)
    batch_index = tf.broadcast_to(tf.range(shape[0])[:, None], shape)
    seed_index = tf.broadcast_to(tf.range(shape[1])[None, :], shape)
    masks = tf.tensor_scatter_nd_update(
        masks, tf.stack([batch_index, seed_index, safe_seeds], axis=-1), valid)
    return tf.reshape(masks, [shape[0], shape[1], size[0], size[1]])


@_graph_ready
def mask_margins(embeddings: tf.Tensor, seed_indices: tf.Tensor, taus: tf.Tensor) -> tf.Tensor:
    """Signed mask margins `log(2 / tau_k - 1) - ||e_q - e_seed_k||^2`.

    A pixel is in seed k's mask iff its margin is >= 0. Distances come from
    `|A|^2 + |B|^2 - 2 A B^T` (one batched matmul) on embeddings centred on their image
    mean, clipped at 0, and exactly 0 at the seed itself. Seeds of -1 get the margins
    of pixel 0 and must be masked out by the caller.

    Args:
      embeddings: float [batch, height, width, dim].
      seed_indices: int [batch, K].
      taus: float [batch, K].

    Returns:
      float32 [batch, K, height, width].
    """
    embeddings, seed_indices, thresholds, points, seeds, point_norms, seed_norms = (
        _seed_geometry(embeddings, seed_indices, taus))
    cross = tf.matmul(seeds, points, transpose_b=True)  # [B, K, N]
    dist = tf.maximum(seed_norms[:, :, None] + point_norms[:, None, :] - 2.0 * cross, 0.0)
    at_seed = seed_indices[:, :, None] == tf.range(tf.shape(points)[1])[None, None, :]
    dist = tf.where(at_seed, 0.0, dist)
    margins = thresholds[:, :, None] - dist
    shape = tf.shape(embeddings)
    return tf.reshape(margins, [shape[0], tf.shape(seed_indices)[1], shape[1], shape[2]])


def _seed_geometry(embeddings, seed_indices, taus):
    """What `grow_masks` and `mask_margins` share, after checking their arguments.

    Returns float32 embeddings [B, h, w, d], int32 seed_indices [B, K], the distance
    thresholds `log(2 / tau - 1)` [B, K], the centred points [B, N, d], the seeds' points
    [B, K, d] (pixel 0's for a seed of -1) and the squared norms of both, [B, N] and
    [B, K].
    """
    embeddings = _as_float(embeddings, "embeddings", rank=4)
    seed_indices = _as_int(seed_indices, "seed_indices", rank=2)
    thresholds = tf.math.log(2.0 / _as_float(taus, "taus", rank=2) - 1.0)
    geometry = _pixel_geometry(embeddings)
    _, seeds, seed_norms = _seed_points(geometry, seed_indices)
    return (embeddings, seed_indices, thresholds, geometry[0], seeds, geometry[1],
            seed_norms)


def _seed_points(geometry: tuple[tf.Tensor, tf.Tensor], seed_indices: tf.Tensor):
    """The seeds' indices with -1 read as pixel 0 [B, K], their centred points
    [B, K, d] and squared norms [B, K], from `_pixel_geometry`'s (points, norms)."""
    points, norms = geometry
    safe_seeds = tf.maximum(seed_indices, 0)
    return (safe_seeds, tf.gather(points, safe_seeds, batch_dims=1),
            tf.gather(norms, safe_seeds, batch_dims=1))


@_graph_ready
def seed_classes_and_scores(class_probs: tf.Tensor, seed_indices: tf.Tensor
                            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per seed, `(tau, c) = argmax over taus and classes c >= 1 of C[p, tau, c]` (paper 3.4).

    Ties go to the lower tau index, then the lower class. A seed of -1 gets tau index 0,
    class 0 and score 0. The tau value is `taus[tau_index]`.

    Args:
      class_probs: float [batch, height, width, num_taus, num_classes + 1].
      seed_indices: int [batch, K], flattened row-major indices or -1.

    Returns:
      (tau_index int32 [batch, K], classes int32 [batch, K] in 1..num_classes,
       scores float32 [batch, K]).
    """
    class_probs = _as_float(class_probs, "class_probs", rank=5)
    seed_indices = _as_int(seed_indices, "seed_indices", rank=2)
    _check_has_foreground(class_probs)
    shape = tf.shape(class_probs)
    num_taus, num_foreground = shape[3], shape[4] - 1
    # Gathered before the background is sliced off: the slice then copies K pixels,
    # not all of them.
    flat = tf.reshape(class_probs, [shape[0], shape[1] * shape[2], num_taus, shape[4]])
    at_seeds = tf.gather(flat, tf.maximum(seed_indices, 0), batch_dims=1)  # [B, K, T, C+1]
    at_seeds = tf.reshape(at_seeds[..., 1:], [shape[0], tf.shape(seed_indices)[1],
                                              num_taus * num_foreground])  # [B, K, T*C]
    best = _first_argmax(at_seeds, tf.ones_like(at_seeds, tf.bool))
    scores = tf.gather(at_seeds, best, batch_dims=2)
    valid = seed_indices >= 0
    tau_index = tf.where(valid, best // num_foreground, 0)
    classes = tf.where(valid, best % num_foreground + 1, 0)
    scores = tf.where(valid, scores, 0.0)
    return tau_index, classes, scores


@_graph_ready
def heads_resolution_detections(embeddings: tf.Tensor, class_probs: tf.Tensor,
                                config: InferenceConfig | None = None,
                                valid_pixels: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """The paper's inference at the heads' resolution: steps 1-4 of this module.

    `seediness`, `select_seeds`, `seed_classes_and_scores` and `grow_masks` in one call
    (the centred embeddings and their norms are computed once for seed selection and
    mask growing), with the detections sorted by descending score (ties in seed order)
    and missing seeds (-1) last. `predict_instances` builds on it; this is also what
    benchmarks/postprocess.py times.

    Args:
      embeddings: float [batch, h, w, dim].
      class_probs: float [batch, h, w, num_taus, num_classes + 1], softmax over the last
        axis.
      config: an `InferenceConfig` (num_seeds, alpha and taus are used); the paper's
        defaults when None.
      valid_pixels: optional bool [batch, h, w], the pixels that may seed (see
        `select_seeds`).

    Returns:
      A dict of seed_indices int32 [batch, K] (-1: no seed), classes int32 [batch, K]
      (0 for no seed), scores float32 [batch, K], taus float32 [batch, K] (the tau each
      mask was grown with) and masks bool [batch, K, h, w].
    """
    config, embeddings, class_probs = _check_heads_outputs(config, embeddings, class_probs,
                                                           "class_probs")
    seed_map = seediness(class_probs)
    valid_pixels = _check_valid_pixels(valid_pixels, seed_map)

    geometry = _pixel_geometry(embeddings)
    seeds = _select_seeds(geometry, seed_map, config.num_seeds,
                          tf.constant(config.alpha, tf.float32), valid_pixels)
    tau_index, classes, scores = seed_classes_and_scores(class_probs, seeds)
    taus = tf.gather(tf.constant(config.taus, tf.float32), tau_index)
    # Score order first: the masks are then grown in it rather than gathered.
    order = _descending_order(tf.where(seeds >= 0, scores, -1.0))
    seeds, classes, scores, taus = (
        tf.gather(x, order, batch_dims=1) for x in (seeds, classes, scores, taus))
    masks = _grow_masks(geometry, tf.shape(embeddings)[1:3], seeds, taus)
    return {"seed_indices": seeds, "classes": classes, "scores": scores, "taus": taus,
            "masks": masks}


@_graph_ready
def predict_instances(embeddings: tf.Tensor, class_logits: tf.Tensor,
                      image_size: Sequence[int] | tf.Tensor,
                      config: InferenceConfig | None = None,
                      valid_pixels: tf.Tensor | None = None,
                      images: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Instance masks, classes and scores for a batch, at the input image's resolution.

    Seeds, classes, scores and masks are computed at the heads' resolution as in the
    paper (`heads_resolution_detections`). Masks reach `image_size` by bilinearly
    resizing each seed's heads-resolution 0/1 mask and thresholding at 0.5, rather than
    resizing the embeddings: this needs no distance computation at full resolution, a
    full-resolution pixel whose surrounding heads-resolution pixels agree on a mask gets
    that answer, and the boundary falls
    half-way between the centres of an inside and an outside heads pixel, i.e. on the
    edge of the stride cell, as the labels were sampled for training. (Resizing the
    signed margins instead shrinks every mask: the margin inside is at most
    log(2 / tau - 1) while outside it falls to minus the squared distance between
    instances, so the zero crossing sits next to the inside pixel.)
    Seeds are resized one at a time, so no float [K, H, W] tensor is made; the output
    masks are bool (26 MB per image for K = 100 at 512 x 512).

    Detections below `config.score_threshold`, suppressed as near-duplicates, or coming
    from a missing seed (-1, when K exceeds the pixels that may seed) are invalid: they
    are sorted after the valid ones, their masks are empty, their class, score and tau
    are 0 and their seed index is -1. Valid detections are sorted by descending score
    (ties keep seed order).

    Args:
      embeddings: float [batch, h, w, dim].
      class_logits: float [batch, h, w, num_taus, num_classes + 1]; softmax is applied
        here (contract 5 works on class_probs = softmax(class_logits)).
      image_size: (H, W), Python ints or an int tensor [2].
      config: an `InferenceConfig`; the paper's defaults when None.
      valid_pixels: optional bool [batch, h, w], the heads pixels that may seed a
        detection (see `select_seeds`); None: all.
      images: [batch, H, W, 3] RGB in [0, 255] at `image_size`, a multiple of (h, w);
        needed only by `config.mask_upsampling="joint_bilateral"`.

    Returns:
      A dict of
        num_detections: int32 [batch], the number of valid detections;
        detection_masks: bool [batch, K, H, W];
        detection_classes: int32 [batch, K], 1..num_classes (0 when invalid);
        detection_scores: float32 [batch, K], descending;
        detection_taus: float32 [batch, K], the tau each mask was grown with;
        seed_indices: int32 [batch, K], flattened heads-resolution index of each seed;
        instance_map: int32 [batch, H, W], for each pixel the 1-based index of the
          highest-scored mask covering it (the first in detection order), 0 elsewhere.
    """
    config, embeddings, class_logits = _check_heads_outputs(config, embeddings, class_logits,
                                                            "class_logits")
    image_size = _check_image_size(image_size)

    # In score order, so that suppression lets higher scores win; the detections below
    # the threshold then follow those above it.
    detections = heads_resolution_detections(
        embeddings, tf.nn.softmax(class_logits, axis=-1), config, valid_pixels)
    seeds, scores, classes, taus, low_res_masks = (
        detections[key] for key in ("seed_indices", "scores", "classes", "taus", "masks"))
    candidate = tf.logical_and(seeds >= 0, scores >= config.score_threshold)
    keep = candidate
    if config.nms_iou_threshold is not None:
        keep, support = _suppress_duplicates(low_res_masks, candidate,
                                             config.nms_iou_threshold)
        if config.support_rescoring > 0:
            scores *= tf.minimum(1.0, tf.cast(support, tf.float32) / config.support_rescoring)
        order = _descending_order(tf.where(keep, scores, -1.0))
        seeds, scores, classes, taus, keep, low_res_masks = (
            tf.gather(x, order, batch_dims=1)
            for x in (seeds, scores, classes, taus, keep, low_res_masks))

    draw = None
    if config.mask_upsampling == "joint_bilateral":
        if images is None:
            raise ValueError('InferenceConfig.mask_upsampling="joint_bilateral" needs the '
                             "images: pass images= to predict_instances")
        images = _as_float(images, "images", rank=4)
        heads_size = tf.shape(low_res_masks)[2:4]
        tables, cells = mask_upsampling.bilateral_tables(images, heads_size,
                                                         config.bilateral_sigma)

        def draw(mask):
            return mask_upsampling.draw_mask(mask, tables, cells, image_size)

    masks, instance_map = _full_resolution_masks(low_res_masks, keep, image_size, draw)

    return {
        "num_detections": tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1),
        "detection_masks": masks,
        "detection_classes": tf.where(keep, classes, 0),
        "detection_scores": tf.where(keep, scores, 0.0),
        "detection_taus": tf.where(keep, taus, 0.0),
        "seed_indices": tf.where(keep, seeds, -1),
        "instance_map": instance_map,
    }


def _full_resolution_masks(low_res_masks: tf.Tensor, keep: tf.Tensor, size, draw=None
                           ) -> tuple[tf.Tensor, tf.Tensor]:
    """Masks at `size = (H, W)` from heads-resolution masks, and the instance map.

    Each seed's 0/1 mask is resized bilinearly (`tf.image.resize`'s grid:
    half-pixel centres, edges clamped) and thresholded at 0.5. Every output is a convex
    combination of two inputs per axis, so where the inputs agree it keeps their value
    exactly.
    Rows are interpolated by gathering, columns by a matmul with the [W, w]
    interpolation matrix. One seed at a time, last to first, in a loop: the float
    intermediate stays [batch, H, W], and the instance map is the mask index written
    last, i.e. the first (highest-scored) covering mask; this measured faster than
    resizing all K maps at once, with and without XLA. tf.image.resize is not used
    because XLA's ResizeBilinear disagrees with the TF kernel by a whole source pixel at
    some scale factors (measured on TF 2.21 at 12 -> 36), and jit-compiled inference
    must give the masks the plain one gives.

    Args:
      low_res_masks: bool [batch, K, h, w], see `grow_masks`.
      keep: bool [batch, K], True before False in every image; masks of other
        detections are empty.
      size: (H, W), ints or int32 tensors.
      draw: optional `bool [batch, h, w] -> bool [batch, H, W]` that draws one mask at
        the input resolution instead (the joint bilateral one of `mask_upsampling`).

    Returns:
      (bool [batch, K, H, W], int32 [batch, H, W] with 1-based detection indices).
    """
    shape = tf.shape(low_res_masks)
    num_seeds = low_res_masks.shape[1]
    instance_map = tf.zeros(tf.stack([shape[0], size[0], size[1]]), tf.int32)
    if draw is None:
        row_low, row_high, row_frac = mask_upsampling.interpolation(shape[2], size[0])
        row_frac = row_frac[:, None]
        col_low, col_high, col_frac = mask_upsampling.interpolation(shape[3], size[1])
        columns = (tf.one_hot(col_low, shape[3]) * (1.0 - col_frac)[:, None]
                   + tf.one_hot(col_high, shape[3]) * col_frac[:, None])  # [W, w]

        def draw(seed_mask):  # bool [B, h, w] -> bool [B, H, W]
            seed_mask = tf.cast(seed_mask, tf.float32)
            rows = ((1.0 - row_frac) * tf.gather(seed_mask, row_low, axis=1)
                    + row_frac * tf.gather(seed_mask, row_high, axis=1))  # [B, H, w]
            full = tf.matmul(tf.reshape(rows, [-1, shape[3]]), columns, transpose_b=True)
            return tf.reshape(full, tf.shape(instance_map)) >= 0.5

    def step(k, masks, instance_map):
        mask = tf.logical_and(draw(tf.gather(low_res_masks, k, axis=1)),
                              tf.gather(keep, k, axis=1)[:, None, None])
        return k - 1, masks.write(k, mask), tf.where(mask, k + 1, instance_map)

    # Kept detections come first (the caller sorts them so): only the first
    # `num_resized` masks of any image in the batch are resized, the rest are written
    # empty. With duplicate suppression this skips most of the work. (The array keeps
    # its static size K so that XLA compiles it.)
    num_resized = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)), 0)
    masks = tf.TensorArray(tf.bool, size=num_seeds, element_shape=instance_map.shape)
    empty = tf.zeros_like(instance_map, tf.bool)
    _, masks = tf.while_loop(
        lambda k, _: k >= num_resized, lambda k, masks: (k - 1, masks.write(k, empty)),
        (tf.constant(num_seeds - 1), masks))
    _, masks, instance_map = tf.while_loop(
        lambda k, *_: k >= 0, step, (num_resized - 1, masks, instance_map))
    masks = masks.stack()  # [K, B, H, W]
    return tf.transpose(masks, [1, 0, 2, 3]), instance_map


def _suppress_duplicates(masks: tf.Tensor, candidate: tf.Tensor,
                         iou_threshold: float) -> tf.Tensor:
    """Greedy mask suppression in the given (score-descending) order.

    Args:
      masks: bool [batch, K, h, w].
      candidate: bool [batch, K]; only candidates are kept, and only kept masks suppress.
      iou_threshold: a mask is dropped when its IoU with a kept earlier one exceeds it.

    Returns:
      (bool [batch, K], the kept detections; int32 [batch, K], the support of each kept
      detection: 1 plus the candidates it suppressed, a suppressed candidate counting
      for the first kept mask that overlaps it; 0 for the others).
    """
    shape = tf.shape(masks)
    num_seeds = masks.shape[1]
    flat = tf.cast(tf.reshape(masks, [shape[0], shape[1], shape[2] * shape[3]]), tf.float32)
    # Integer pixel counts are exact in float32 below 2^24 pixels.
    intersection = tf.matmul(flat, flat, transpose_b=True)  # [B, K, K]
    area = tf.reduce_sum(flat, axis=2)
    union = area[:, :, None] + area[:, None, :] - intersection
    iou = tf.where(union > 0, intersection / tf.maximum(union, 1.0), 0.0)
    overlapping = iou > iou_threshold
    slots = tf.range(num_seeds)

    def step(i, keep):
        # `keep` only holds detections before i, the higher-scored ones.
        suppressed = tf.reduce_any(
            tf.logical_and(tf.gather(overlapping, i, axis=1), keep), axis=-1)
        kept = tf.logical_and(tf.gather(candidate, i, axis=1), tf.logical_not(suppressed))
        return i + 1, tf.logical_or(keep, tf.logical_and(slots == i, kept[:, None]))

    _, keep = tf.while_loop(lambda i, _: i < num_seeds, step,
                            (tf.constant(0), tf.zeros_like(candidate)))
    # owns[i, j]: kept i overlaps suppressed candidate j; j counts for its first owner.
    owns = tf.logical_and(
        tf.logical_and(overlapping, keep[:, :, None]),
        tf.logical_and(candidate, tf.logical_not(keep))[:, None, :])  # [B, K, K]
    owns = tf.cast(owns, tf.int32)
    first_owner = owns * tf.cast(tf.math.cumsum(owns, axis=1) == 1, tf.int32)
    support = tf.where(keep, 1 + tf.reduce_sum(first_owner, axis=2), 0)
    return keep, support


def _descending_order(keys: tf.Tensor) -> tf.Tensor:
    """Permutation sorting `keys [batch, K]` descending, ties in index order.

    Ranks come from all K x K comparisons, which is exact and identical eagerly and
    under XLA (K is small), where sort stability is not a documented guarantee.
    """
    keys = tf.where(tf.math.is_nan(keys), -math.inf, keys)
    num = keys.shape[-1]
    slots = tf.range(num)
    mine, other = keys[:, :, None], keys[:, None, :]
    ahead = tf.logical_or(
        other > mine, tf.logical_and(other == mine, slots[None, None, :] < slots[None, :, None]))
    rank = tf.reduce_sum(tf.cast(ahead, tf.int32), axis=2)  # [B, K]: where item i goes
    placed = rank[:, None, :] == slots[None, :, None]  # [B, rank r, item i]
    return tf.reduce_sum(tf.where(placed, slots[None, None, :], 0), axis=2)


def _first_argmax(values: tf.Tensor, allowed: tf.Tensor) -> tf.Tensor:
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


def _centred_points(embeddings: tf.Tensor) -> tf.Tensor:
    """`embeddings [B, h, w, d]` -> `[B, h * w, d]` minus each image's mean embedding.

    Distances do not change; centring shrinks the norms in `|a|^2 + |b|^2 - 2ab`,
    and with them its rounding error.
    """
    shape = tf.shape(embeddings)
    points = tf.reshape(embeddings, [shape[0], shape[1] * shape[2], shape[3]])
    return points - tf.reduce_mean(points, axis=1, keepdims=True)


def _pixel_geometry(embeddings: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The centred points `[B, N, d]` and their squared norms `[B, N]`, computed once
    for both seed selection and mask growing."""
    points = _centred_points(embeddings)
    return points, tf.reduce_sum(tf.square(points), axis=-1)


def _as_float(x, name: str, rank: int) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if not (x.dtype.is_floating):
        raise TypeError(f"{name} must be a float tensor, got {x.dtype.name}")
    _check_rank(x, name, rank)
    return tf.cast(x, tf.float32)


def _as_int(x, name: str, rank: int) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype.name}")
    _check_rank(x, name, rank)
    return tf.cast(x, tf.int32)


def _check_rank(x: tf.Tensor, name: str, rank: int) -> None:
    if x.shape.rank is not None and x.shape.rank != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")


def _check_has_foreground(class_probs: tf.Tensor) -> None:
    if class_probs.shape[-1] is not None and class_probs.shape[-1] < 2:
        raise ValueError(
            f"class_probs/class_logits needs num_classes + 1 >= 2 entries on its last axis "
            f"(background + at least one class), got shape {class_probs.shape}")


def _check_same_spatial(a: tf.Tensor, a_name: str, b: tf.Tensor, b_name: str) -> None:
    for axis in range(3):
        da, db = a.shape[axis], b.shape[axis]
        if da is not None and db is not None and da != db:
            raise ValueError(f"{a_name} {a.shape} and {b_name} {b.shape} disagree on the "
                             "batch and heads-resolution dimensions")


def _check_heads_outputs(config, embeddings, per_tau, per_tau_name: str):
    """(config, embeddings, per_tau) checked: the paper's config when None; float
    embeddings [B, h, w, d] and class probabilities or logits [B, h, w, T, C+1] on the same
    grid, with as many tau slices as `config.taus`."""
    config = config if config is not None else InferenceConfig()
    if not isinstance(config, InferenceConfig):
        raise TypeError(f"config must be an InferenceConfig, got {type(config).__name__}")
    embeddings = _as_float(embeddings, "embeddings", rank=4)
    per_tau = _as_float(per_tau, per_tau_name, rank=5)
    _check_same_spatial(embeddings, "embeddings", per_tau, per_tau_name)
    num_taus = per_tau.shape[3]
    if num_taus is not None and num_taus != len(config.taus):
        raise ValueError(
            f"{per_tau_name} has {num_taus} tau slices but config.taus has {len(config.taus)} "
            f"values {config.taus}: they must match the model's ModelConfig.taus")
    return config, embeddings, per_tau


def _check_valid_pixels(valid_pixels, seediness: tf.Tensor):
    """None, or `valid_pixels` as a bool tensor on seediness's [B, h, w] grid."""
    if valid_pixels is None:
        return None
    valid_pixels = tf.convert_to_tensor(valid_pixels)
    if valid_pixels.dtype != tf.bool:
        raise TypeError(f"valid_pixels must be a bool tensor, got {valid_pixels.dtype.name}")
    _check_rank(valid_pixels, "valid_pixels", 3)
    _check_same_spatial(seediness, "seediness", valid_pixels, "valid_pixels")
    return valid_pixels


def _check_num_seeds(num_seeds) -> int:
    if (isinstance(num_seeds, bool) or not isinstance(num_seeds, numbers.Integral)
            or num_seeds < 1):
        raise ValueError(f"num_seeds={num_seeds!r}: must be a positive Python integer")
    return int(num_seeds)


def _check_image_size(image_size):
    if isinstance(image_size, tf.TensorShape):
        image_size = tuple(image_size.as_list())
    if isinstance(image_size, (tf.Tensor, tf.Variable)):
        if image_size.shape.rank is not None and image_size.shape != (2,):
            raise ValueError(f"image_size must hold (height, width), got shape {image_size.shape}")
        return tf.cast(image_size, tf.int32)
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(s, numbers.Integral) and s > 0 for s in image_size)):
        raise ValueError(f"image_size={image_size!r}: must be (height, width), two positive ints")
    return [int(s) for s in image_size]


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _config_error(field: str, value, why: str) -> None:
    raise ValueError(f"InferenceConfig.{field}={value!r}: {why}")
