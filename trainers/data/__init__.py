"""DEEM training data: readers for the real formats, packing, mixing, and the collator (reference §6).

Samples (every reader yields these; `DeemDataCollator` turns a list of them into ``model(**batch)`` inputs)::

    {"segments": [{"text": str, "supervise": bool}, ...],  # joined in order; one "<image>" per image
     "images": [PIL.Image (RGB), ...],
     "image_masks": [np.ndarray (H, W) bool | None, ...] | None,
     "source": str}

Pretraining documents are one supervised segment ending in ``</s>``; SFT samples alternate unsupervised prompt
segments and supervised answers (each answer ends with ``</s>``).

Readers: `read_mmc4` (interleaved documents, §6.2), `read_pairs` (webdataset tars or jsonl + folder, §6.3),
`read_llava` (LLaVA instruction JSON -> VQA SFT template), `read_referring` (COCO RLE / polygon masks through
pycocotools -> mask SFT). Then `PackedDataset` / `pack_samples` (rows of <= 2048 tokens, §6.4), `MixedDataset`
(weights, MMC4 : pairs = 2 : 1), `DeemDataCollator`.

Tokenised once: `encode_samples` gives a sample ``input_ids`` + per-token ``supervised`` flags in one batched
tokenizer call (the packer encodes ``encode_batch`` documents per call and packs on ids; a reader with
``processor`` / ``max_length`` encodes while checking the length and the ids travel with the sample); the collator
only pads and stacks encoded rows, and derives labels with the model's own `default_labels` (§4.1, plus the
original's "no image, no loss" rule for ``no_image_no_loss_sources``).

Typical stage-1 setup::

    mmc4 = PackedDataset(read_mmc4("mmc4/*.jsonl.zip", "mmc4_images/"), processor, 2048, max_images=15)
    pairs = PackedDataset(read_pairs("laion/*.tar"), processor, 2048)
    train = MixedDataset({"mmc4": mmc4, "pairs": pairs}, {"mmc4": 2, "pairs": 1}, seed=42, per_batch=4)
    collator = DeemDataCollator(processor, 2048, train_transforms=True, center_crop=True, seed=42)

Streaming: every streaming object here (the readers, `StreamingView` / `SampleList`, `PackedDataset`,
`MixedDataset`) is a `datasets.IterableDataset` (`DeemIterableDataset`) whose shards are the source's units
(files / tar shards / index chunks: ``n_shards``). Ranks: `datasets.distributed.split_dataset_by_node` (explicit
``rank`` / ``world_size``, or an initialised `torch.distributed` group when the reader is built); DataLoader
workers: datasets' own split of the shards; shuffling: `IterableDataset.shuffle(seed, buffer_size)` with
`set_epoch`; mixing: `datasets.interleave_datasets` (`mixing` module). The samples are python objects (PIL
images, numpy masks): the datasets declare `SAMPLE_FEATURES`, so datasets passes them through untouched.
Under the HF `Trainer`, accelerate splits by process: `DeemTrainer` gives it the dataset without a node split and
accelerate calls ``shard(num_processes, process_index)`` when there are at least as many shards as processes
(else `IterableDatasetShard`: every rank reads the stream and keeps its batches). With ``stopping="cycle"`` and
``max_steps`` ranks never run dry.

Bad input (missing or corrupt images, too many images, over-long text, masks that do not match their image,
malformed records): ``on_error="skip"`` drops it, counts it in ``obj.skipped[reason]`` and logs a warning with the
count; ``on_error="raise"`` raises `DataError` (a `ValueError`) naming the file / record and the problem.
Counters are per process: with DataLoader workers each worker counts (and warns about) its own part.
"""

from ._common import (
    SKIP_REASONS,
    BadSample,
    DataError,
    decode_image,
    make_sample,
    sample_text,
    tokenize_text,
    validate_sample,
)
from ._iterable import SAMPLE_FEATURES, DeemIterableDataset
from .collator import NO_IMAGE_NO_LOSS_SOURCES, DeemDataCollator
from .encoding import encode_samples, encode_texts
from .images import ImageStore
from .llava import LlavaDataset, read_llava
from .masks import (
    MaskError,
    decode_rle,
    encode_rle,
    polygons_to_mask,
    rle_counts_from_string,
    rle_counts_to_string,
    segmentation_to_mask,
)
from .mixing import DEFAULT_WEIGHTS, MixedDataset
from .mmc4 import MMC4_MAX_IMAGES, MMC4_SIM_THRESHOLD, MMC4Dataset, mmc4_image_names, read_mmc4
from .packing import MAX_IMAGES_PER_ROW, PackedDataset, SamplePacker, pack_samples
from .pairs import PairsDataset, read_pairs, webdataset_key
from .referring import ReferringDataset, conversation_segments, default_referring_turns, read_referring
from .sources import MapSource, SampleList, StreamingSource, StreamingView

__all__ = [
    "DEFAULT_WEIGHTS",
    "MAX_IMAGES_PER_ROW",
    "MMC4_MAX_IMAGES",
    "MMC4_SIM_THRESHOLD",
    "NO_IMAGE_NO_LOSS_SOURCES",
    "SAMPLE_FEATURES",
    "SKIP_REASONS",
    "BadSample",
    "DataError",
    "DeemDataCollator",
    "DeemIterableDataset",
    "ImageStore",
    "LlavaDataset",
    "MMC4Dataset",
    "MapSource",
    "MaskError",
    "MixedDataset",
    "PackedDataset",
    "PairsDataset",
    "ReferringDataset",
    "SampleList",
    "SamplePacker",
    "StreamingSource",
    "StreamingView",
    "conversation_segments",
    "decode_image",
    "decode_rle",
    "default_referring_turns",
    "encode_rle",
    "encode_samples",
    "encode_texts",
    "make_sample",
    "mmc4_image_names",
    "pack_samples",
    "polygons_to_mask",
    "read_llava",
    "read_mmc4",
    "read_pairs",
    "read_referring",
    "rle_counts_from_string",
    "rle_counts_to_string",
    "sample_text",
    "segmentation_to_mask",
    "tokenize_text",
    "validate_sample",
    "webdataset_key",
]
