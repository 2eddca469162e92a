"""Base classes of the readers: streaming (`StreamingSource`, an `IterableDataset`) and map-style (`MapSource`).

Sharding of a streaming source (each (rank, DataLoader worker) reads a disjoint subset; together they read all):

- slot = rank * num_workers + worker_id out of world_size * num_workers slots (`shard_slot`). The rank comes from
  the initialised `torch.distributed` group (or explicit ``rank`` / ``world_size``); ``shard_by_rank=False``
  leaves the rank split to someone else (accelerate's `IterableDatasetShard` / `dispatch_batches`, see the
  package docstring) and only splits across workers.
- The source's units (files / tar shards / index chunks) are put in one order that depends on (seed, epoch) only,
  so every slot sees the same order. ``split="shard"``: slot k reads units k, k + slots, ...;
  ``split="record"``: every slot walks all units and keeps the records whose running index is k modulo slots
  (cheap: records it does not keep are not decoded). ``"auto"`` (default) takes "shard" when there are at least
  as many units as slots, else "record".
- Random choices about a record (placement, drops, text drop) come from a generator seeded by
  (seed, epoch, unit, record), so they do not depend on the number of ranks or workers; the order inside a slot
  is shuffled through a buffer seeded by (seed, epoch, slot). `set_epoch(epoch)` changes all of them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence

from torch.utils.data import Dataset, IterableDataset

from ._common import (
    BadSample,
    DataError,
    ErrorPolicy,
    buffer_shuffle,
    iter_text_lines,
    make_rng,
    shard_slot,
    validate_sample,
)
from .encoding import encode_samples

SPLITS = ("auto", "shard", "record")


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


class StreamingSource(IterableDataset, _Checks):
    """Streaming reader base. Subclasses define `_units()`, `_iter_unit(unit, keep)` and `_build(raw, rng, where)`.

    Args (shared by every streaming reader):
        seed / shuffle / shuffle_buffer: unit order and in-slot buffer shuffle (deterministic given seed, epoch).
        split: "auto", "shard" or "record" (see the module docstring).
        shard_by_rank: split across `torch.distributed` ranks too (default True); rank / world_size: explicit.
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
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._init_checks(on_error, max_images, processor, max_length)
        self.seed, self.shuffle, self.shuffle_buffer, self.split = int(seed), shuffle, int(shuffle_buffer), split
        self.shard_by_rank, self.rank, self.world_size = shard_by_rank, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- subclass interface
    def _units(self) -> list:
        raise NotImplementedError

    def _iter_unit(self, unit, keep) -> Iterator[tuple[int, object, str]]:
        """Yield (record index in unit, raw record, where) for the records with ``keep(record index)`` true.
        `keep` must be called once per record, in order (it may count records across units)."""
        raise NotImplementedError

    def _build(self, raw, rng, where: str) -> dict | None:
        raise NotImplementedError

    def _record_rng(self, unit_index: int, record_index: int, raw):
        return make_rng(self.seed, self.epoch, 2, unit_index, record_index)

    def _lines(self, path: str, keep) -> Iterator[tuple[int, str, str]]:
        """`_iter_unit` for text files: (record index, line, "path:line") of the kept non-empty lines. An unreadable
        file (corrupt zip / gzip, bad encoding) ends its unit with a "bad_record" report."""
        r, line_no = 0, 0
        try:
            for line_no, line in enumerate(iter_text_lines(path), 1):
                if line.strip():
                    if keep(r):
                        yield r, line, f"{path}:{line_no}"
                    r += 1
        except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as err:
            self._report(BadSample("bad_record", f"cannot read past line {line_no}: {err}"), path)

    # -- iteration
    def _split_mode(self, n_units: int, slots: int) -> str:
        if self.split != "auto":
            return self.split
        return "shard" if n_units >= slots else "record"

    def _raw_stream(self, slot: int, slots: int) -> Iterator[tuple]:
        units = list(enumerate(self._units()))
        if self.shuffle:
            order = make_rng(self.seed, self.epoch, 0).permutation(len(units))
            units = [units[i] for i in order]
        if self._split_mode(len(units), slots) == "shard":
            for u, unit in units[slot::slots]:
                for r, raw, where in self._iter_unit(unit, lambda r: True):
                    yield u, r, raw, where
            return
        running = [0]

        def keep(_r: int) -> bool:
            mine = running[0] % slots == slot
            running[0] += 1
            return mine

        for u, unit in units:
            for r, raw, where in self._iter_unit(unit, keep):
                yield u, r, raw, where

    def __iter__(self) -> Iterator[dict]:
        slot, slots = shard_slot(self.shard_by_rank, self.rank, self.world_size)
        stream = self._raw_stream(slot, slots)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = buffer_shuffle(stream, self.shuffle_buffer, make_rng(self.seed, self.epoch, 1, slot))
        for u, r, raw, where in stream:
            rng = self._record_rng(u, r, raw)
            sample = self._checked(lambda: self._build(raw, rng, where), where)
            if sample is not None:
                yield sample


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
        self.dataset = dataset
        self.chunk_size = int(chunk_size)

    def _children(self) -> tuple:
        return (self.dataset,) if isinstance(self.dataset, ErrorPolicy) else ()

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _units(self) -> list:
        n = len(self.dataset)
        return [range(a, min(a + self.chunk_size, n)) for a in range(0, n, self.chunk_size)]

    def _iter_unit(self, unit, keep):
        for r, i in enumerate(unit):
            if keep(r):
                where = self.dataset._where(i) if isinstance(self.dataset, MapSource) else f"item {i}"
                yield r, i, where

    def _record_rng(self, unit_index, record_index, raw):
        return make_rng(self.seed, self.epoch, 2, 0, raw)

    def __iter__(self):
        if not isinstance(self.dataset, MapSource):
            yield from super().__iter__()
            return
        inner = self.dataset
        slot, slots = shard_slot(self.shard_by_rank, self.rank, self.world_size)
        stream = self._raw_stream(slot, slots)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = buffer_shuffle(stream, self.shuffle_buffer, make_rng(self.seed, self.epoch, 1, slot))
        for _, _, i, _ in stream:
            sample = inner.get(i)
            if sample is not None:
                yield sample

    def _build(self, raw, rng, where):
        sample = self.dataset[raw]
        return dict(sample) if sample is not None else None


class SampleList(StreamingView):
    """Ready-made samples (a list / sequence of sample dicts) as a sharded streaming source."""

    def __init__(self, samples: Sequence[dict], **kwargs):
        super().__init__(samples, **kwargs)
