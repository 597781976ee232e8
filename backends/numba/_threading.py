"""Choose numba's threading layer before the first parallel kernel runs.

The default (OpenMP, where available) leaves its worker threads spinning after each kernel; in a
model those spinning threads hold the cores torch's own ops need, and a VMamba-T forward on 2
cores took 2.9 s instead of 0.21 s (docs/performance.md). ``workqueue`` sleeps between calls; its
one limitation, no concurrent launches from several Python threads, is covered by the lock in
``_run``. An explicit ``NUMBA_THREADING_LAYER`` in the environment still wins.
"""

from __future__ import annotations

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
