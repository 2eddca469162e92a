"""Mixing several sources by weight (reference §6.3 `RandomMixWdsDataset`: MMC4 : pairs = 2 : 1)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from ._common import ErrorPolicy, make_rng, shard_slot

DEFAULT_WEIGHTS = {"mmc4": 2.0, "pairs": 1.0, "laion": 1.0, "blip": 1.0}
STOPPING = ("longest", "shortest", "cycle")


class MixedDataset(IterableDataset, ErrorPolicy):
    """Draw from several sources with probabilities proportional to their weights.

    Args:
        sources: name -> source (a streaming reader, a `PackedDataset`, or any iterable of samples). Each source
            shards itself across ranks and DataLoader workers (the readers here do: each (rank, worker) reads a
            disjoint part), so the mixture does too; a plain list would be read whole by every worker.
        weights: name -> weight; missing names get `DEFAULT_WEIGHTS` (mmc4 2, pairs / laion / blip 1) or 1.
        seed: the draws come from a generator seeded by (seed, epoch, rank-and-worker slot): deterministic.
        stopping: "longest" (the original's: an exhausted source leaves the mixture, the rest keep their relative
            weights, stop when all are exhausted), "shortest" (stop when the first source is exhausted), "cycle"
            (restart an exhausted source with the next epoch number; never ends: use ``max_steps``).
        per_batch: consecutive samples taken from one draw (the original drew a whole per-device batch from one
            source); with the DataLoader's batch_size equal to it every batch has a single source.
    Each sample's ``source`` is set to its source's name. `set_epoch` is passed on to the sources.
    """

    def __init__(
        self,
        sources: dict,
        weights: dict | None = None,
        seed: int = 0,
        *,
        stopping: str = "longest",
        per_batch: int = 1,
        shard_by_rank: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self._init_policy("skip")
        if not sources:
            raise ValueError("MixedDataset needs at least one source")
        if stopping not in STOPPING:
            raise ValueError(f"stopping must be one of {STOPPING}, got {stopping!r}")
        weights = dict(weights or {})
        unknown = set(weights) - set(sources)
        if unknown:
            raise ValueError(f"weights given for unknown sources {sorted(unknown)}; sources are {sorted(sources)}")
        self.sources = dict(sources)
        self.names = list(self.sources)
        self.weights = {n: float(weights.get(n, DEFAULT_WEIGHTS.get(n, 1.0))) for n in self.names}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        if per_batch < 1:
            raise ValueError(f"per_batch must be >= 1, got {per_batch}")
        self.seed, self.stopping, self.per_batch = int(seed), stopping, int(per_batch)
        self.shard_by_rank, self.rank, self.world_size = shard_by_rank, rank, world_size
        self.epoch = 0

    def _children(self) -> tuple:
        return tuple(self.sources.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for source in self.sources.values():
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)

    @property
    def probabilities(self) -> dict:
        total = sum(self.weights.values())
        return {n: w / total for n, w in self.weights.items()}

    def __iter__(self) -> Iterator[dict]:
        slot, _ = shard_slot(self.shard_by_rank, self.rank, self.world_size)
        rng = make_rng(self.seed, self.epoch, 3, slot)
        iterators = {n: iter(s) for n, s in self.sources.items() if self.weights[n] > 0}
        restarts = dict.fromkeys(iterators, 0)
        _end = object()

        def draw(name):
            sample = next(iterators[name], _end)
            if sample is _end and self.stopping == "cycle":  # restart with the next epoch number
                restarts[name] += 1
                source = self.sources[name]
                if hasattr(source, "set_epoch"):
                    source.set_epoch(self.epoch + restarts[name])
                iterators[name] = iter(source)
                sample = next(iterators[name], _end)  # still nothing: an empty source, leave it out
            return sample

        while iterators:
            names = list(iterators)
            p = np.array([self.weights[n] for n in names])
            name = names[int(rng.choice(len(names), p=p / p.sum()))]
            for _ in range(self.per_batch):
                sample = draw(name)
                if sample is _end:
                    if self.stopping == "shortest":
                        return
                    del iterators[name]
                    break
                yield dict(sample, source=name)
