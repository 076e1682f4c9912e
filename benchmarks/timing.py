"""Wall-clock timing of a call that blocks until its result is ready (the caller blocks:
`block_until_ready`, `torch.cuda.synchronize`), compilation excluded by warm-up calls."""

from __future__ import annotations

import time

import numpy as np


def timings(fn, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed(fn, warmup: int, iters: int) -> float:
    """Median seconds per call of `fn`."""
    return float(np.median(timings(fn, warmup, iters)))
