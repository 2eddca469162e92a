"""The `datasets` plumbing of the streaming path: every streaming object of the package is a
`datasets.IterableDataset`, so sharding, shuffling and mixing are datasets' own.

- `DeemIterableDataset`: the base class (a `datasets.IterableDataset` subclass). Its `shard` keeps the subclass (so
  `set_epoch` still reaches the readers after accelerate shards it) and `without_node_split` gives the same data
  with no rank split (what a `Trainer` hands accelerate, which splits by process itself).
- `SourceExamples`: datasets' `ExamplesIterable` over a reader's units (``gen_kwargs = {"shards": [(unit index,
  unit), ...], "pass_index": int}``, so ``n_shards`` is the number of units), yielding the *raw* records (json
  lines, tar members' bytes, indices): datasets' shuffle buffer holds those, not decoded images. Unit order is
  left alone when the reader does not shuffle. `BuiltExamples` then builds (and checks) the samples.
- The streams declare `SAMPLE_FEATURES` in both the dataset and its outer examples iterable: datasets then passes
  the python samples (PIL images, numpy masks) through untouched, with no Arrow encoding.
- `ExamplesWrapper`: the base of the few wrappers for what datasets lacks (packing, source tags and per-batch
  groups, a never-ending cycle that reshuffles every pass); they pass sharding and shuffling to what they wrap.
"""

from __future__ import annotations

import copy

import datasets
import numpy as np
import torch
from datasets.iterable_dataset import ExamplesIterable, _BaseExamplesIterable, shift_ex_examples_rngs

SAMPLE_FEATURES = datasets.Features(
    {
        "segments": datasets.List({"text": datasets.Value("string"), "supervise": datasets.Value("bool")}),
        "images": datasets.List(datasets.Image()),
        "image_masks": datasets.List(datasets.List(datasets.List(datasets.Value("bool")))),
        "source": datasets.Value("string"),
    }
)
# a group of consecutive samples of one source (MixedDataset's per-batch draws)
GROUP_FEATURES = datasets.Features({"samples": datasets.List(dict(SAMPLE_FEATURES))})


class DeemIterableDataset(datasets.IterableDataset, torch.utils.data.IterableDataset):
    """A `datasets.IterableDataset` whose derived copies (`shard`, `without_node_split`) keep their class."""

    def _init_iterable(self, ex_iterable, distributed=None, features=SAMPLE_FEATURES) -> None:
        datasets.IterableDataset.__init__(
            self, ex_iterable, info=datasets.DatasetInfo(features=features), distributed=distributed
        )

    def _derived(self, ex_iterable, distributed) -> DeemIterableDataset:
        """A shallow copy reading `ex_iterable` with `distributed`: counters, sources and epochs stay shared."""
        new = copy.copy(self)
        new._ex_iterable = copy.copy(ex_iterable)
        new._distributed = copy.deepcopy(distributed)
        new._epoch = torch.tensor(self.epoch).share_memory_()
        new._starting_state_dict = None
        new._prepare_ex_iterable_for_iteration()
        return new

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> DeemIterableDataset:
        """datasets' `IterableDataset.shard` (what accelerate calls per process), keeping this class."""
        ex_iterable = self._ex_iterable.shard_data_sources(num_shards=num_shards, index=index, contiguous=contiguous)
        return self._derived(ex_iterable, self._distributed)

    @property
    def node_split(self) -> tuple[int, int] | None:
        """(rank, world_size) of the split by node (`datasets.distributed.split_dataset_by_node`), or None."""
        d = self._distributed
        return None if d is None else (d.rank, d.world_size)

    def without_node_split(self) -> DeemIterableDataset:
        """The same data with no split by rank (DataLoader workers still split the shards). A `Trainer` hands
        this to accelerate, which splits by process itself (``shard`` per process when ``n_shards`` allows)."""
        return self._derived(self._ex_iterable, None) if self._distributed is not None else self


class _Generate:
    """The generator function of a `SourceExamples`: ``owner._generate(**gen_kwargs)``. Copies of the examples
    iterable (datasets deep-copies them when it interleaves) keep the same owner, so its counters stay one."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, **kwargs):
        return self.owner._generate(**kwargs)

    def __deepcopy__(self, memo):
        return self


class SourceExamples(ExamplesIterable):
    """datasets' `ExamplesIterable` over ``owner._generate(shards=[(unit index, unit), ...], pass_index=k)``."""

    def __init__(self, owner_or_fn, kwargs: dict, shuffle: bool = True):
        fn = owner_or_fn if isinstance(owner_or_fn, _Generate) else _Generate(owner_or_fn)
        super().__init__(fn, kwargs)
        self.shuffle = shuffle

    def _like(self, kwargs: dict) -> SourceExamples:
        return SourceExamples(self.generate_examples_fn, kwargs, self.shuffle)

    def shuffle_data_sources(self, generator: np.random.Generator) -> SourceExamples:
        if not self.shuffle:  # a reader with shuffle=False keeps its unit order in every epoch
            return self._like(self.kwargs)
        return self._like(super().shuffle_data_sources(generator).kwargs)

    def shard_data_sources(self, num_shards: int, index: int, contiguous=True) -> SourceExamples:
        return self._like(super().shard_data_sources(num_shards, index, contiguous=contiguous).kwargs)

    def reshard_data_sources(self) -> SourceExamples:
        return self._like(self.kwargs)


class ExamplesWrapper(_BaseExamplesIterable):
    """An examples iterable over one other (``self.ex_iterable``): sharding and shuffling go to the wrapped one.
    Subclasses define `__iter__` and `_like(ex_iterable)` (a copy of themselves around another iterable)."""

    features_declared = SAMPLE_FEATURES

    def __init__(self, ex_iterable: _BaseExamplesIterable):
        super().__init__()
        self.ex_iterable = ex_iterable

    def _like(self, ex_iterable) -> ExamplesWrapper:
        raise NotImplementedError

    def __deepcopy__(self, memo):  # the wrapped iterable is copied; the wrapper's own objects are shared
        return self._like(copy.deepcopy(self.ex_iterable, memo))

    @property
    def is_typed(self) -> bool:
        return True

    @property
    def features(self):
        return self.features_declared

    @property
    def num_shards(self) -> int:
        return self.ex_iterable.num_shards

    def shuffle_data_sources(self, generator):
        return self._like(self.ex_iterable.shuffle_data_sources(generator))

    def shard_data_sources(self, num_shards: int, index: int, contiguous=True):
        return self._like(self.ex_iterable.shard_data_sources(num_shards, index, contiguous=contiguous))

    def reshard_data_sources(self):
        return self._like(self.ex_iterable.reshard_data_sources())

    def _init_state_dict(self) -> dict:
        self._state_dict = {"examples_iterable": self.ex_iterable._init_state_dict(), "type": type(self).__name__}
        return self._state_dict


class BuiltExamples(ExamplesWrapper):
    """The samples ``owner._build_record(raw item)`` of a stream of raw records (bad / dropped ones left out)."""

    def __init__(self, ex_iterable, owner):
        super().__init__(ex_iterable)
        self.owner = owner

    def _like(self, ex_iterable) -> BuiltExamples:
        return BuiltExamples(ex_iterable, self.owner)

    def __iter__(self):
        for key, item in self.ex_iterable:
            sample = self.owner._build_record(item)
            if sample is not None:
                yield key, sample


def with_pass(ex_iterable, pass_index: int):
    """`ex_iterable` for pass `pass_index` of a never-ending cycle: unit order reshuffled and shuffle buffers
    reseeded as datasets does per epoch, and the readers' per-record draws keyed by the pass."""
    if pass_index == 0:
        return ex_iterable
    ex_iterable = ex_iterable.shuffle_data_sources(np.random.default_rng([pass_index, 0x5EED]))
    ex_iterable = shift_ex_examples_rngs(ex_iterable, pass_index)

    def set_pass(node):
        node = copy.copy(node)
        if isinstance(node, SourceExamples):
            return node._like({**node.kwargs, "pass_index": pass_index})
        if hasattr(node, "ex_iterable"):
            node.ex_iterable = set_pass(node.ex_iterable)
        if hasattr(node, "ex_iterables"):
            node.ex_iterables = [set_pass(e) for e in node.ex_iterables]
        return node

    return set_pass(ex_iterable)
