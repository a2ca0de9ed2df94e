"""Where a model parameter comes from in a Hugging Face checkpoint (see `Source`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Source(NamedTuple):
    """Where a parameter comes from: one Hugging Face tensor, or several joined (fused q/k/v or
    gate/up projections read as one matrix, so decode launches one kernel instead of several).

    Attributes:
        names: HF tensor names.
        transpose: transpose each tensor (`nn.Linear` [out, in] -> our [in, out]).
        mode: "single", "concat" (join along `axis` of our layout) or "stack" (new `axis`).
        axis: the axis for concat/stack, in our layout.
    """

    names: tuple[str, ...]
    transpose: bool
    mode: str = "single"
    axis: int = -1

    @classmethod
    def of(cls, entry) -> Source:
        """Accepts a Source or the plain `(hf_name, transpose)` pair families use."""
        if isinstance(entry, Source):
            return entry
        name, transpose = entry
        return cls((name,), transpose)

    def shape(self, hf_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        shapes = [tuple(reversed(s)) if self.transpose else s for s in hf_shapes]
        if self.mode == "single":
            return shapes[0]
        if len({len(s) for s in shapes}) != 1:
            return ()
        if self.mode == "stack":
            if len(set(shapes)) != 1:
                return ()
            s = list(shapes[0])
            s.insert(self.axis % (len(s) + 1), len(shapes))
            return tuple(s)
        ax = self.axis % len(shapes[0])
        rest = {s[:ax] + s[ax + 1 :] for s in shapes}
        if len(rest) != 1:
            return ()
        s = list(shapes[0])
        s[ax] = sum(x[ax] for x in shapes)
        return tuple(s)

    def load(self, read, index, dtype) -> np.ndarray:
        """The parameter (or its slice `index`, in our layout) as a numpy array of `dtype`."""
        if self.mode == "single":
            hf_index = None
            if index is not None:
                hf_index = tuple(reversed(index)) if self.transpose else index
            x = np.asarray(read(self.names[0], hf_index))
            return (x.T if self.transpose else x).astype(dtype)
        parts = [np.asarray(read(n, None)) for n in self.names]
        parts = [p.T if self.transpose else p for p in parts]
        join = np.stack if self.mode == "stack" else np.concatenate
        x = join(parts, axis=self.axis).astype(dtype)
        return x if index is None else x[index]
