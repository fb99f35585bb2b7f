"""Batch parallelism on CPU: one slice of the batch per core, each slice single-threaded.

Why: on CPU, torch spreads each operator over all cores (intra-op threads), and for
this UNet's small operators that scales poorly. Splitting the batch instead, one slice
per worker thread, each worker with one intra-op thread, keeps every core busy on work
of its own; benchmarks/README.md ("Levers") has the measured gains.

What stays the same: every image is computed as it would be in a batch of its own
(the UNet has no operator that mixes images: GroupNorm is per image), so split
forwards equal unsplit ones up to the kernels' rounding. Training gradients are
summed over the slices in slice order, not in whatever order the threads finish, so a
run is reproducible for a given number of workers.

When it does not apply (``resolve_cpu_workers``): on a GPU; with several processes,
where each process is already one worker; under torch.compile, whose first call
compiles and is not made for concurrent callers; with dropout, whose masks would be
drawn from the one global generator in the threads' racing order.

Thread-local torch state (grad mode, inference mode, autocast) does not cross into a
worker thread by itself; the workers re-enter the caller's.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import ConfigError

Result = TypeVar("Result")


def resolve_cpu_workers(requested: int, *, on_cpu: bool, processes: int = 1, compile: bool = False, dropout: float = 0.0) -> int:
    """The number of worker threads to split batches over: ``requested``, or for 0 (auto)
    one per intra-op thread (torch's default: one per core) where splitting applies and
    1 (no splitting) where it does not. An explicit count > 1 where it cannot apply is
    a ConfigError, not silently ignored."""
    if requested < 0:
        raise ConfigError(f"cpu_workers must be >= 0 (0: one per core, 1: off), got {requested}")
    reasons = [
        reason
        for applies, reason in (
            (not on_cpu, "it is for CPU runs"),
            (processes > 1, "with several processes each process is one worker"),
            (compile, "torch.compile does not take concurrent callers"),
            (dropout > 0, "dropout masks would come from threads racing for one generator"),
        )
        if applies
    ]
    if requested == 0:
        return 1 if reasons else torch.get_num_threads()
    if requested > 1 and reasons:
        raise ConfigError(f"cpu_workers={requested} cannot be used here: {'; '.join(reasons)} (use 0 or 1)")
    return requested


def _single_threaded() -> None:
    torch.set_num_threads(1)  # this thread's OpenMP/MKL count, and the process-wide default
    torch.get_num_threads()  # fixes this thread's count now, before _pool restores the default


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ddpmkit-batch", initializer=_single_threaded)
    # Start every worker now (each task waits for all), so that none initialises later...
    started = threading.Barrier(workers)
    list(pool.map(lambda _: started.wait(), range(workers)))
    # ...and put back the process-wide default that set_num_threads(1) changed, which
    # threads started later (a server's handler threads, say) would otherwise inherit.
    torch.set_num_threads(caller_threads)
    return pool


def _caller_state() -> Callable[[], ExitStack]:
    """A factory of contexts that re-enter the calling thread's grad, inference and CPU
    autocast modes (all thread-local in torch) in another thread."""
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def enter() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        stack.enter_context(torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast))
        return stack

    return enter


def map_slices(function: Callable[[slice], Result], batch: int, workers: int, max_rows: int | None = None) -> list[Result]:
    """[function(rows) for rows in near-equal slices of range(batch)], in slice order: one
    slice per worker, or more if a slice would exceed ``max_rows``. The calls run on the
    worker threads (each takes the next slice when it is done), in the caller's torch
    modes. With one worker they are plain calls in this thread."""
    count = max(1, min(workers, batch), -(-batch // max_rows) if max_rows else 1)
    bounds = [batch * k // count for k in range(count + 1)]
    slices = [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]
    if workers == 1 or count == 1:
        return [function(rows) for rows in slices]
    enter = _caller_state()

    def run(rows: slice) -> Result:
        with enter():
            return function(rows)

    return list(_pool(min(workers, count)).map(run, slices))


def backward_in_slices(slice_loss: Callable[[slice], torch.Tensor], batch: int, parameters: Sequence[torch.Tensor], workers: int) -> torch.Tensor:
    """Backpropagates sum(slice_loss(rows) over the slices) into the parameters' .grad,
    one slice per worker thread (forward and backward both in the worker), and returns
    that sum, detached.

    Gradients are added in slice order (not completion order) and onto any .grad already
    there (gradient accumulation), so the result does not depend on thread timing.
    """
    parameters = list(parameters)

    def forward_backward(rows: slice) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        loss = slice_loss(rows)
        return loss.detach(), torch.autograd.grad(loss, parameters, allow_unused=True)

    results = map_slices(forward_backward, batch, workers)
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            gradients = [grads[index] for _, grads in results if grads[index] is not None]
            if not gradients:
                continue
            total = functools.reduce(torch.add, gradients)
            parameter.grad = total if parameter.grad is None else parameter.grad.add_(total)
    return functools.reduce(torch.add, [loss for loss, _ in results])


# Rows per model call in BatchThreads: smaller slices keep more of a layer's activations in
# the shared cache; 64 was the fastest size measured (benchmarks/README.md, "Levers").
ROWS_PER_CALL = 64


class BatchThreads(nn.Module):
    """``model(x, *rest, **named)`` with the batch split across ``workers`` CPU threads
    (map_slices, slices of at most ROWS_PER_CALL) and the outputs concatenated: a drop-in
    for the model in samplers, validation and FID. Tensor arguments with the batch's
    length are split alongside x; anything else (an int t, y=None) goes whole to every
    slice. With one worker it is the model's own call."""

    def __init__(self, model: nn.Module, workers: int) -> None:
        super().__init__()
        self.model = model
        self.workers = workers

    def forward(self, x: torch.Tensor, *rest: Any, **named: Any) -> torch.Tensor:
        batch = x.shape[0]

        def on_slice(rows: slice) -> torch.Tensor:
            def part(value: Any) -> Any:
                return value[rows] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch else value

            return self.model(x[rows], *map(part, rest), **{name: part(value) for name, value in named.items()})

        # With one worker, one call as the model alone would get it (GPU, compile).
        return torch.cat(map_slices(on_slice, batch, self.workers, ROWS_PER_CALL if self.workers > 1 else None))

    def __getattr__(self, name: str) -> Any:
        # The wrapped model's attributes (null_label, config), as torch.compile's wrapper does.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
