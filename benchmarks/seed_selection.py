"""How many seeds each pass of `select_seeds` certifies, and what it costs.

`ops.seeds.select_seeds` runs the paper's greedy in passes (see `ops.seeds.SeedPasses`):
a pass rescores all pixels once, then picks seeds among its C best-scored candidates for
as long as they provably beat every other pixel. This prints, for K = 100 seeds, d = 64
and alpha = 0.3, the seeds certified by each pass and the time of `select_seeds` in a
`tf.function` and with `jit_compile=True`, on

- the scene of benchmarks/postprocess.py (10 instances, seediness highest inside them);
- adversarial inputs: all seediness equal; one big instance (tight embeddings); random
  embeddings and seediness; all embeddings equal (every D is 0); and "crowded", 5 x 5
  instances tiling the image, each a notch less seedy than the last, so that the best
  candidates of a pass tend to sit in one or two instances and a pass certifies few.

Timings are the best of several runs after warm-up (the machine may be shared).

Usage: python benchmarks/seed_selection.py [--sizes 64,128] [--repeats 10]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from instance_embed.ops import geometry
from instance_embed.ops import seeds as seeds_lib

import postprocess  # benchmarks/postprocess.py: make_scene
import timing  # benchmarks/timing.py

NUM_SEEDS = 100
ALPHA = 0.3


def scene(rng, size, dim):
    embeddings, probs, _ = postprocess.make_scene(rng, size, dim)
    return embeddings, probs[..., 1:].max(axis=(-2, -1))


def equal_seediness(rng, size, dim):
    return (rng.normal(size=(1, size, size, dim)).astype(np.float32),
            np.full((1, size, size), 0.5, np.float32))


def one_instance(rng, size, dim):
    embeddings = 1.0 + 0.05 * rng.normal(size=(1, size, size, dim))
    return embeddings.astype(np.float32), rng.uniform(0.5, 1.0, (1, size, size)).astype(np.float32)


def random_inputs(rng, size, dim):
    return (rng.normal(size=(1, size, size, dim)).astype(np.float32),
            rng.uniform(0.0, 1.0, (1, size, size)).astype(np.float32))


def all_equal(rng, size, dim):
    return np.zeros((1, size, size, dim), np.float32), np.full((1, size, size), 0.5, np.float32)


def crowded(rng, size, dim, block=5):
    labels = np.zeros((size, size), int)
    count = 0
    for top in range(0, size - block + 1, block):
        for left in range(0, size - block + 1, block):
            count += 1
            labels[top:top + block, left:left + block] = count
    centres = rng.normal(size=(count + 1, dim)) * (2.0 / np.sqrt(dim))
    embeddings = centres[labels] + 0.05 * rng.normal(size=(size, size, dim))
    rank = rng.permutation(count + 1)[labels]  # instance order of seediness
    seediness = 0.9 - 0.002 * rank + 0.0005 * rng.uniform(size=(size, size))
    seediness[labels == 0] = 0.1
    return embeddings[None].astype(np.float32), seediness[None].astype(np.float32)


INPUTS = {"scene": scene, "equal seediness": equal_seediness, "one instance": one_instance,
          "random": random_inputs, "all embeddings equal": all_equal, "crowded 5x5": crowded}


def certified_per_pass(embeddings, seediness):
    """Seeds certified by each pass, running `SeedPasses` step by step."""
    points, norms = (x[0] for x in geometry.pixel_geometry(tf.constant(embeddings)))
    seediness = tf.reshape(tf.constant(seediness), [-1])
    passes = seeds_lib.SeedPasses(points, norms, seediness, tf.ones_like(seediness, tf.bool),
                                   NUM_SEEDS, tf.constant(ALPHA))
    state, counts = passes.initial_state(), []
    while passes.not_done(*state):
        new_state = passes.run(*state)
        counts.append(int(new_state[0] - state[0]))
        state = new_state
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128", help="heads' resolutions to measure")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension d")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    sizes = seeds_lib.DEFAULT_PASS_SIZES
    print(f"select_seeds, K={NUM_SEEDS}, d={args.dim}, alpha={ALPHA}, "
          f"C={sizes.candidates} candidates, at most {sizes.seeds_per_pass} "
          f"seeds per pass; TF {tf.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'heads':>7}  {'input':<22} {'passes':>6} {'tf.function':>11} {'XLA':>8}  "
              "seeds certified per pass (the first seed is picked before them)")
    print(header)
    print("-" * len(header))
    functions = {jit: tf.function(
        lambda e, s: seeds_lib.select_seeds(e, s, NUM_SEEDS, ALPHA), jit_compile=jit,
        autograph=False) for jit in (False, True)}
    for size in (int(s) for s in args.sizes.split(",")):
        for name, make in INPUTS.items():
            embeddings, seediness = make(np.random.default_rng(0), size, args.dim)
            counts = certified_per_pass(embeddings, seediness)
            e, s = tf.constant(embeddings), tf.constant(seediness)
            ms = {jit: 1e3 * min(timing.wall_times(lambda: fn(e, s).numpy(), args.repeats))
                  for jit, fn in functions.items()}
            print(f"{size:>3}x{size:<3}  {name:<22} {len(counts):>6} {ms[False]:>8.1f} ms "
                  f"{ms[True]:>5.1f} ms  {counts}")


if __name__ == "__main__":
    main()
