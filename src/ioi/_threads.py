"""Independent chunks of work on CPU worker threads, one torch thread each.

Used by the engines whose passes split into independent chunks (``ioi.edges.patching``'s chunks of
edge sets; ``ioi.ablation_engine``'s prompt parts and opt-in parallel chunks): ``T`` chunks at once on one torch
thread each instead of one chunk on ``T`` threads. Each chunk's arithmetic is single-threaded, so
results do not depend on which worker ran it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Callable, Sequence, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_on_workers(fn: Callable[[Item], Result], items: Sequence[Item], workers: int) -> list[Result]:
    """``[fn(item) for item in items]``, in order: here when ``workers <= 1`` or there is one item,
    else on ``workers`` threads with one torch thread each, under the caller's grad and inference
    modes (thread-local in torch); the caller's thread count is restored afterwards."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    inference, grad, threads = torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.get_num_threads()

    def run(item: Item) -> Result:
        torch.set_num_threads(1)  # this thread's own OpenMP setting
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    torch.set_num_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def one_torch_thread():
    """Run the block on one torch thread (the caller's count restored afterwards).

    For the main thread's small serial work between parallel passes (building masks, checking
    them, joining results): a tensor op above torch's grain size would otherwise open an OpenMP
    region on ``T`` threads, whose workers sleep after a pass (on the shared 2-core machine,
    cProfile of the completeness benchmark's main thread saw about 10 ms of wall time per
    full-size mask op there, against 0.2 ms for the same op in a loop; the main thread's CPU time
    did not change measurably with this, so the cost was waiting, not work). Results do not change
    (the ops in question are boolean or exact copies)."""
    threads = torch.get_num_threads()
    if threads <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
