"""``ffn_kernels_auto``: run whichever of the two compiled training steps is faster, measured.

Why measured. The kernel registry's step (the grouped Triton GEMM and its backward kernel) pays
only at high FFN sparsity, and where it starts to pay depends on the GPU, the model's widths and
the batch: on an H100, one 1B layer's full gradient at 16 384 tokens is 1.07× the masked path's
at k/E 0.33 and 1.23× at 0.12, while the whole 1B step at 45% sparsity is 0.96× and at 97%
1.25× (BENCHMARKS.md, fifty-third session). The sparsity itself moves during training (the
progressive τ schedule), so no fixed choice is right for a whole run.

How. Both steps are the same function of the same state (the kernels compute the masked path's
FFN, the CPU and GPU tests hold them equal), so every trial step is a real training step: the
chooser runs each step once untimed (its compile), then a few timed steps of each, interleaved,
and keeps the one with the lower median. It measures again, without compiling, once the
sparsity has moved by ``retrial_sparsity`` from where it last chose. Several processes (multi-
host) must run the same program: ``agree`` makes one choice for all of them (process 0's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class PathChooser:
    """Picks the next step's path, from the times and sparsities of the steps before.

    ``next()`` names the path to run; ``record(path, seconds, sparsity)`` reports how that step
    went (host-side wall time of the whole step, the step's FFN sparsity). Pure Python: no JAX,
    so the policy is tested with made-up times.
    """

    def __init__(
        self,
        paths: Sequence[str] = ("masked", "kernels"),
        *,
        trial_steps: int = 3,
        retrial_sparsity: float = 0.1,
        agree: Callable[[str], str] | None = None,
    ):
        if len(paths) < 2 or len(set(paths)) != len(paths):
            raise ValueError(f"need two or more distinct paths, got {list(paths)}")
        if trial_steps < 1:
            raise ValueError(f"trial_steps must be >= 1, got {trial_steps}")
        if not retrial_sparsity > 0:
            raise ValueError(f"retrial_sparsity must be > 0, got {retrial_sparsity}")
        self.paths = tuple(paths)
        self.trial_steps = trial_steps
        self.retrial_sparsity = retrial_sparsity
        self.agree = agree or (lambda path: path)
        self.choice: str | None = None
        self.chosen_at: float | None = None
        self.medians: dict[str, float] = {}
        # the first trial: each path once untimed (its compile), then timed steps interleaved
        self._queue = [(p, False) for p in self.paths] + self._timed()
        self._times: dict[str, list[float]] = {p: [] for p in self.paths}

    def _timed(self) -> list[tuple[str, bool]]:
        return [(p, True) for _ in range(self.trial_steps) for p in self.paths]

    @property
    def trying(self) -> bool:
        """True while a trial runs (its steps are timed against each other)."""
        return bool(self._queue)

    def next(self) -> str:
        """The path the next step runs."""
        return self._queue[0][0] if self._queue else self.choice

    def record(self, path: str, seconds: float, sparsity: float) -> str | None:
        """Reports a finished step. Returns the new choice when this step ended a trial."""
        if self._queue:
            want, timed = self._queue[0]
            if path != want:
                raise ValueError(f"the chooser asked for {want!r}, the step ran {path!r}")
            self._queue.pop(0)
            if timed:
                self._times[path].append(float(seconds))
            if not self._queue:
                self.medians = {p: float(np.median(t)) for p, t in self._times.items()}
                self.choice = self.agree(min(self.paths, key=self.medians.__getitem__))
                self.chosen_at = float(sparsity)
                self._times = {p: [] for p in self.paths}
                return self.choice
            return None
        if abs(float(sparsity) - self.chosen_at) > self.retrial_sparsity:
            self._queue = self._timed()
        return None
