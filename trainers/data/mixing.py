"""Mixing several sources by weight (reference §6.3 `RandomMixWdsDataset`: MMC4 : pairs = 2 : 1).

`datasets.interleave_datasets(probabilities=..., seed=..., stopping_strategy=...)` does the mixing. The thin
wrappers here add what it lacks: each sample tagged with its source's name, ``per_batch`` consecutive samples per
draw (grouped before the draw, flattened after), and a never-ending "cycle" whose every pass reshuffles its source.
"""

from __future__ import annotations

import datasets
from datasets.distributed import split_dataset_by_node

from ._common import ErrorPolicy
from ._iterable import GROUP_FEATURES, DeemIterableDataset, ExamplesWrapper, with_pass
from .packing import as_stream
from .sources import node_of

DEFAULT_WEIGHTS = {"mmc4": 2.0, "pairs": 1.0, "laion": 1.0, "blip": 1.0}
# ours -> datasets' stopping strategy; "cycle" also restarts every source without end (`_Cycled`)
STOPPING = {
    "longest": "all_exhausted_without_replacement",
    "shortest": "first_exhausted",
    "cycle": "all_exhausted_without_replacement",
}


class _Grouped(ExamplesWrapper):
    """Groups of `size` consecutive samples of one source, each sample's ``source`` set to `name`."""

    features_declared = GROUP_FEATURES

    def __init__(self, ex_iterable, name: str, size: int):
        super().__init__(ex_iterable)
        self.name, self.size = name, size

    def _like(self, ex_iterable) -> _Grouped:
        return _Grouped(ex_iterable, self.name, self.size)

    def __iter__(self):
        group, n = [], 0
        for _, sample in self.ex_iterable:
            group.append(dict(sample, source=self.name))
            if len(group) == self.size:
                yield f"{self.name}:{n}", {"samples": group}
                group, n = [], n + 1
        if group:
            yield f"{self.name}:{n}", {"samples": group}


class _Cycled(ExamplesWrapper):
    """The wrapped stream again and again, each pass reshuffled (`with_pass`); ends only if a pass is empty."""

    features_declared = GROUP_FEATURES

    def _like(self, ex_iterable) -> _Cycled:
        return _Cycled(ex_iterable)

    def __iter__(self):
        pass_index = 0
        while True:
            empty = True
            for key_example in with_pass(self.ex_iterable, pass_index):
                empty = False
                yield key_example
            if empty:
                return
            pass_index += 1


class _Flattened(ExamplesWrapper):
    """The samples of the mixed groups, one by one."""

    def _like(self, ex_iterable) -> _Flattened:
        return _Flattened(ex_iterable)

    def __iter__(self):
        for key, group in self.ex_iterable:
            for k, sample in enumerate(group["samples"]):
                yield f"{key}:{k}", sample


class MixedDataset(DeemIterableDataset, ErrorPolicy):
    """Draw from several sources with probabilities proportional to their weights (a `datasets.IterableDataset`
    made by `datasets.interleave_datasets`).

    Args:
        sources: name -> source (a streaming reader, a `PackedDataset`, a `StreamingView`; a map-style reader is
            read through its `streaming()` view, a list of samples as a `SampleList`). The sources must be split
            by node alike (all built with the same rank / world_size, or none split); the mixture is then split
            the same way (datasets applies the split to the mixture, each source keeping its shards).
        weights: name -> weight; missing names get `DEFAULT_WEIGHTS` (mmc4 2, pairs / laion / blip 1) or 1.
        seed: seeds datasets' source draws (`set_epoch` reseeds them, as datasets does; DataLoader workers draw
            their own). Deterministic.
        stopping: "longest" (the original's: an exhausted source leaves the mixture, the rest keep their relative
            weights, stop when all are exhausted: datasets' "all_exhausted_without_replacement"), "shortest" (stop
            when the first source is exhausted: "first_exhausted"), "cycle" (an exhausted source restarts,
            reshuffled for its next pass; never ends: use ``max_steps``).
        per_batch: consecutive samples taken from one draw (the original drew a whole per-device batch from one
            source); with the DataLoader's batch_size equal to it every batch has a single source, as long as
            ranks split by shards (with datasets' "examples" strategy each rank keeps every world_size-th sample).
        shard_by_rank / rank / world_size: split the mixture by node (`split_dataset_by_node`) when its sources
            are not split already (see `StreamingSource`).
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
        self._init_policy("skip")
        if not sources:
            raise ValueError("MixedDataset needs at least one source")
        if stopping not in STOPPING:
            raise ValueError(f"stopping must be one of {tuple(STOPPING)}, got {stopping!r}")
        weights = dict(weights or {})
        unknown = set(weights) - set(sources)
        if unknown:
            raise ValueError(f"weights given for unknown sources {sorted(unknown)}; sources are {sorted(sources)}")
        self.sources = {name: as_stream(s, f"MixedDataset source {name!r}") for name, s in sources.items()}
        self.names = list(self.sources)
        self.weights = {n: float(weights.get(n, DEFAULT_WEIGHTS.get(n, 1.0))) for n in self.names}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        if per_batch < 1:
            raise ValueError(f"per_batch must be >= 1, got {per_batch}")
        self.seed, self.stopping, self.per_batch = int(seed), stopping, int(per_batch)
        self.shard_by_rank, self.rank, self.world_size = shard_by_rank, rank, world_size
        splits = {n: s.node_split for n, s in self.sources.items()}
        if len(set(splits.values())) > 1:
            raise ValueError(f"the sources are split by node differently (rank, world_size): {splits}")

        parts, probabilities = [], []
        for name in (n for n in self.names if self.weights[n] > 0):  # a zero weight never draws: left out
            source = self.sources[name]
            examples = _Grouped(source._ex_iterable, name, self.per_batch)
            if stopping == "cycle":
                examples = _Cycled(examples)
            info = datasets.DatasetInfo(features=GROUP_FEATURES)
            parts.append(datasets.IterableDataset(examples, info=info, distributed=source._distributed))
            probabilities.append(self.weights[name])
        total = sum(probabilities)
        mixed = datasets.interleave_datasets(
            parts,
            probabilities=[p / total for p in probabilities],
            seed=self.seed,
            stopping_strategy=STOPPING[stopping],
        )
        distributed = mixed._distributed
        if distributed is None:
            node_rank, node_world = node_of(shard_by_rank, rank, world_size)
            if node_world > 1:
                distributed = split_dataset_by_node(mixed, node_rank, node_world)._distributed
        self._init_iterable(_Flattened(mixed._ex_iterable), distributed)

    def _children(self) -> tuple:
        return tuple(self.sources.values())

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for source in self.sources.values():
            source.set_epoch(epoch)

    @property
    def probabilities(self) -> dict:
        total = sum(self.weights.values())
        return {n: w / total for n, w in self.weights.items()}
