"""Wall-clock timing shared by the benchmarks (imported as `timing` from this folder)."""

import time


def wall_times(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `repeats` calls of `fn()`, after `warmup` untimed calls.

    Report the minimum: on a shared machine the extra time of a slower run is other
    processes', not the code's (the median shows how much that was).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
