"""Base classes of the readers: streaming (`StreamingSource`, a `datasets.IterableDataset`) and map-style
(`MapSource`, a torch `Dataset`).

A streaming source is datasets' own streaming dataset over the source's units (files / tar shards / index chunks):
``n_shards`` is the number of units, and datasets does the rest.

- Ranks: `datasets.distributed.split_dataset_by_node` (applied when ``rank`` / ``world_size`` are given, or, with
  ``shard_by_rank``, from an initialised `torch.distributed` group when the source is built). ``split="shard"``
  (datasets' "shards" strategy: each rank reads units k, k + world_size, ...; needs at least world_size units),
  ``"record"`` ("examples": every rank walks the same stream and keeps every world_size-th sample, so each builds
  them all), ``"auto"`` (default; datasets' "auto": "shards" when world_size divides the number of units).
- DataLoader workers: datasets gives each worker its own units (workers beyond the number of units idle).
- Shuffling (``shuffle=True``): `IterableDataset.shuffle(seed, buffer_size=shuffle_buffer)` (unit order from the
  seed, then a shuffle buffer); `set_epoch(epoch)` reshuffles the units and reseeds the buffer as datasets does.
  Every rank sees the same unit order, so the split stays disjoint and complete.
- Random choices about a record (placement, drops, text drop) come from a generator seeded by
  (seed, epoch, unit, record), so they do not depend on the number of ranks or workers.

Under the HF `Trainer` the rank split is accelerate's: `DeemTrainer` hands it `without_node_split()` and accelerate
calls `shard(num_processes, process_index)` (enough units) or reads through `IterableDatasetShard` (fewer units).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import Dataset

from ._common import BadSample, DataError, ErrorPolicy, iter_text_lines, make_rng, validate_sample
from ._iterable import BuiltExamples, DeemIterableDataset, SourceExamples
from .encoding import encode_samples

SPLITS = {"auto": "auto", "shard": "shards", "record": "examples"}  # ours -> datasets' strategy


class _Checks(ErrorPolicy):
    """Checks that every built sample passes: the contract, ``max_images`` and (with a processor) ``max_length``."""

    def _init_checks(self, on_error: str, max_images: int | None, processor, max_length: int | None) -> None:
        self._init_policy(on_error)
        self.max_images = max_images
        self.processor = processor
        self.max_length = max_length if processor is not None else None

    def _check(self, sample: dict) -> None:
        validate_sample(sample, self.max_images)
        if self.max_length is not None:  # encoded once here; the packer and the collator reuse the ids
            n = len(encode_samples(self.processor, [sample])[0]["input_ids"])
            if n > self.max_length:
                raise BadSample("too_long", f"{n} tokens, more than max_length={self.max_length}")

    def _checked(self, build, where: str):
        """Run `build()`; return its sample (or None when a sampling rule dropped it, or it was bad and skipped)."""
        try:
            sample = build()
            if sample is not None:
                self._check(sample)
            return sample
        except BadSample as bad:
            self._report(bad, where)
            return None


class StreamingSource(DeemIterableDataset, _Checks):
    """Streaming reader base (a `datasets.IterableDataset`). Subclasses define `_units()`, `_iter_unit(unit)` and
    `_build(raw, rng, where)`, and call `_init_stream()` at the end of their ``__init__``.

    Args (shared by every streaming reader):
        seed / shuffle / shuffle_buffer: `IterableDataset.shuffle(seed, buffer_size)` when shuffling.
        split: "auto", "shard" or "record" (see the module docstring).
        shard_by_rank: split across an initialised `torch.distributed` group (default True); rank / world_size:
            explicit (both or neither).
        on_error: "skip" (count in `skipped`, warn) or "raise" (`DataError`).
        max_images: samples with more images are bad input ("too_many_images").
        processor / max_length: when both are given, samples longer than max_length tokens are bad ("too_long").
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        split: str = "auto",
        shard_by_rank: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "skip",
        max_images: int | None = None,
        processor=None,
        max_length: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        self._init_checks(on_error, max_images, processor, max_length)
        # not .shuffle / .split: those are datasets' (the method, the split name)
        self.seed, self.shuffling, self.shuffle_buffer, self.split_mode = int(seed), shuffle, int(shuffle_buffer), split
        self.shard_by_rank, self.rank, self.world_size = shard_by_rank, rank, world_size
        self._node = node_of(shard_by_rank, rank, world_size)
        self._record_epoch = [0]  # the epoch of the per-record draws, shared with derived copies (shard, ...)

    def _init_stream(self) -> None:
        """Build the datasets side: units -> `SourceExamples` (raw records) -> `shuffle` -> `BuiltExamples`
        (samples), split by `split_dataset_by_node`."""
        units = list(enumerate(self._units()))
        examples = SourceExamples(self, {"shards": units, "pass_index": 0}, shuffle=self.shuffling)
        stream = datasets.IterableDataset(examples)
        if self.shuffling:
            stream = stream.shuffle(seed=self.seed, buffer_size=max(self.shuffle_buffer, 1), max_buffer_input_shards=1)
        rank, world_size = self._node
        if world_size > 1:
            stream = split_dataset_by_node(stream, rank, world_size, strategy=SPLITS[self.split_mode])
        self._init_iterable(BuiltExamples(stream._ex_iterable, self), stream._distributed)

    def set_epoch(self, epoch: int) -> None:
        """datasets' `set_epoch` (unit order, shuffle buffer) and the epoch of the per-record draws."""
        super().set_epoch(int(epoch))
        self._record_epoch[0] = int(epoch)

    # -- subclass interface
    def _units(self) -> list:
        raise NotImplementedError

    def _iter_unit(self, unit) -> Iterator[tuple[int, object, str]]:
        """Yield (record index in unit, raw record, where) for every record of `unit`."""
        raise NotImplementedError

    def _build(self, raw, rng, where: str) -> dict | None:
        raise NotImplementedError

    def _record_rng(self, unit_index: int, record_index: int, raw, epoch: int):
        return make_rng(self.seed, epoch, 2, unit_index, record_index)

    def _lines(self, path: str) -> Iterator[tuple[int, str, str]]:
        """`_iter_unit` for text files: (record index, line, "path:line") of the non-empty lines. An unreadable
        file (corrupt zip / gzip, bad encoding) ends its unit with a "bad_record" report."""
        r, line_no = 0, 0
        try:
            for line_no, line in enumerate(iter_text_lines(path), 1):
                if line.strip():
                    yield r, line, f"{path}:{line_no}"
                    r += 1
        except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as err:
            self._report(BadSample("bad_record", f"cannot read past line {line_no}: {err}"), path)

    # -- what datasets runs: the raw records of a group of units, then (after the shuffle buffer) the samples
    def _generate(self, shards: list, pass_index: int = 0) -> Iterator[tuple[str, dict]]:
        epoch = self._record_epoch[0] + pass_index
        for u, unit in shards:
            for r, raw, where in self._iter_unit(unit):
                yield f"{u}:{r}", {"unit": u, "record": r, "raw": raw, "where": where, "epoch": epoch}

    def _build_record(self, item: dict) -> dict | None:
        rng = self._record_rng(item["unit"], item["record"], item["raw"], item["epoch"])
        return self._checked(lambda: self._build(item["raw"], rng, item["where"]), item["where"])


def node_of(shard_by_rank: bool = True, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) to split by: explicit, else an initialised `torch.distributed` group's (when
    `shard_by_rank`), else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}")
    if rank is None:
        rank, world_size = 0, 1
        if shard_by_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return int(rank), int(world_size)


class MapSource(Dataset, _Checks):
    """Map-style reader base: ``len`` records, ``ds[i]`` builds record i. Subclasses define `__len__`,
    `_where(i)` and `_build_item(i, rng)`.

    A bad or dropped record at index i is replaced by the next usable one (i + 1, ...), counted in `skipped` /
    `dropped` (with ``on_error="raise"`` a bad one raises). The random choices of item i come from
    (seed, epoch, i). `streaming(...)` gives a sharded `IterableDataset` view.
    """

    def __init__(self, *, seed: int = 0, on_error: str = "skip", max_images=None, processor=None, max_length=None):
        super().__init__()
        self._init_checks(on_error, max_images, processor, max_length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        raise NotImplementedError

    def _where(self, i: int) -> str:
        raise NotImplementedError

    def _build_item(self, i: int, rng) -> dict | None:
        raise NotImplementedError

    def _item_rng(self, i: int):
        return make_rng(self.seed, self.epoch, 2, 0, i)

    def get(self, i: int) -> dict | None:
        """Item i, or None when it is bad (skipped) or dropped by a sampling rule."""
        rng = self._item_rng(i)
        return self._checked(lambda: self._build_item(i, rng), self._where(i))

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        for step in range(n):
            sample = self.get((i + step) % n)
            if sample is not None:
                return sample
        raise DataError(f"{type(self).__name__}: none of the {n} records gives a usable sample")

    def streaming(self, **kwargs) -> StreamingView:
        """A sharded, shuffled streaming view (`StreamingView`); kwargs as `StreamingSource`'s sharding args."""
        return StreamingView(self, **kwargs)


class StreamingView(StreamingSource):
    """Streaming, sharded view of a `MapSource` (bad records skipped, not replaced) or of any sequence of samples.

    Units are chunks of `chunk_size` consecutive indices. `skipped` / `dropped` are the wrapped source's.
    """

    def __init__(self, dataset: Sequence, chunk_size: int = 1000, **kwargs):
        seed = kwargs.pop("seed", getattr(dataset, "seed", 0))
        on_error = kwargs.pop("on_error", getattr(dataset, "on_error", "skip"))
        super().__init__(seed=seed, on_error=on_error, **kwargs)
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dataset = dataset
        self.chunk_size = int(chunk_size)
        self._init_stream()

    def _children(self) -> tuple:
        return (self.dataset,) if isinstance(self.dataset, ErrorPolicy) else ()

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _units(self) -> list:
        n = len(self.dataset)
        return [range(a, min(a + self.chunk_size, n)) for a in range(0, n, self.chunk_size)]

    def _iter_unit(self, unit):
        for r, i in enumerate(unit):
            where = self.dataset._where(i) if isinstance(self.dataset, MapSource) else f"item {i}"
            yield r, i, where

    def _record_rng(self, unit_index, record_index, raw, epoch):
        return make_rng(self.seed, epoch, 2, 0, raw)

    def _build_record(self, item: dict) -> dict | None:
        if isinstance(self.dataset, MapSource):  # built (and checked) with the map-style source's seed and epoch
            return self.dataset.get(item["raw"])
        return super()._build_record(item)

    def _build(self, raw, rng, where):
        sample = self.dataset[raw]
        return dict(sample) if sample is not None else None


class SampleList(StreamingView):
    """Ready-made samples (a list / sequence of sample dicts) as a sharded streaming source."""

    def __init__(self, samples: Sequence[dict], **kwargs):
        super().__init__(samples, **kwargs)
