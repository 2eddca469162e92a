"""Data-pipeline throughput: samples/s from the readers to packed, collated batches (no model).

``python -m deem.bench.data [--docs 2000 --pairs 2000 --workers 0 2 4 --out result.json]`` writes a few thousand
synthetic MMC4 documents (jsonl + an image folder) and image-text pairs (webdataset tars), then times the
training input path of stage 1 for each number of DataLoader workers: ``read_mmc4`` / ``read_pairs`` ->
``PackedDataset`` (rows of <= ``max_length`` tokens) -> ``MixedDataset`` (2 : 1) -> ``DeemDataCollator``
(tokens, labels, both image views). Reported: source samples/s (documents + pairs consumed), packed rows/s and
batches/s, each the best of ``repeats`` passes over the same files (worker start-up included); and, in this
process, reader -> packed rows alone with the number of tokenizer calls and texts it made (``pack_only``).

The tokenizer is a small byte-fallback BPE trained here (LLaMA-style, no download); images are ``image_size``
JPEGs processed at ``encoder_size`` / ``decoder_size`` (the 7B model: 448 / 512).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

_WORDS = (
    "the a cat dog river people red bus green field small bird girl chef airplane market building fence hill road "
    "sits walks near toward over under beside looks at is painted on flies standing morning evening train station "
    "kitchen window white large blue sky cloudy boat calm old woman reads newspaper bench zebra giraffe savanna"
).split()


def _tokenizer(vocab_size: int = 2000):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from ..modeling.processing_deem import prepare_tokenizer

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(_WORDS, int(rng.integers(4, 14)))) + "." for _ in range(3000)]
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=True, add_bos_token=True, add_eos_token=False)
    return prepare_tokenizer(tok)


def _jpeg(rng, size: int) -> bytes:
    import PIL.Image

    pixels = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _sentence(rng) -> str:
    return " ".join(rng.choice(_WORDS, int(rng.integers(6, 20)))) + "."


def write_fixture(root: Path, n_docs: int, n_pairs: int, image_size: int = 256, n_files: int = 8, seed: int = 0):
    """Synthetic MMC4 documents (``n_files`` jsonl files + an image folder) and webdataset pair tars."""
    rng = np.random.default_rng(seed)
    images = root / "mmc4_images"
    images.mkdir(parents=True, exist_ok=True)
    pool = [_jpeg(rng, image_size) for _ in range(64)]
    for k in range(256):
        (images / f"img{k:05d}.jpg").write_bytes(pool[k % len(pool)])
    docs_dir = root / "mmc4"
    docs_dir.mkdir(exist_ok=True)
    files = [open(docs_dir / f"docs_{f:03d}.jsonl", "w") for f in range(n_files)]
    try:
        for d in range(n_docs):
            n_sent = int(rng.integers(4, 12))
            infos = [
                {
                    "image_name": f"img{int(rng.integers(256)):05d}.jpg",
                    "matched_text_index": int(rng.integers(n_sent)),
                    "matched_sim": float(rng.uniform(0.2, 0.4)),
                }
                for _ in range(int(rng.integers(1, 6)))
            ]
            doc = {"text_list": [_sentence(rng) for _ in range(n_sent)], "image_info": infos}
            files[d % n_files].write(json.dumps(doc) + "\n")
    finally:
        for f in files:
            f.close()
    pairs_dir = root / "pairs"
    pairs_dir.mkdir(exist_ok=True)
    per_shard = max(1, -(-n_pairs // n_files))
    k = 0
    for s in range(n_files):
        with tarfile.open(pairs_dir / f"{s:05d}.tar", "w") as tar:
            for _ in range(min(per_shard, n_pairs - k)):
                for name, data in (
                    (f"{k:08d}.jpg", pool[k % len(pool)]),
                    (f"{k:08d}.json", json.dumps({"caption": _sentence(rng)}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return docs_dir, images, pairs_dir


def _pipeline(root: Path, processor, max_length: int, batch_size: int, workers: int, seed: int):
    from torch.utils.data import DataLoader

    from ..trainers.data import DeemDataCollator, MixedDataset, PackedDataset, read_mmc4, read_pairs

    mmc4 = read_mmc4(root / "mmc4", root / "mmc4_images", seed=seed)
    pairs = read_pairs(root / "pairs", seed=seed)
    mixed = MixedDataset(
        {
            "mmc4": PackedDataset(mmc4, processor, max_length),
            "pairs": PackedDataset(pairs, processor, max_length),
        },
        seed=seed,
    )
    collator = DeemDataCollator(processor, max_length, seed=seed, center_crop=True)
    return DataLoader(mixed, batch_size=batch_size, num_workers=workers, collate_fn=collator, persistent_workers=False)


def _time_pass(loader) -> dict:
    start = time.perf_counter()
    rows = batches = images = tokens = 0
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        batches += 1
        rows += batch["input_ids"].shape[0]
        images += int(batch["num_images"].sum())
        tokens += int(batch["attention_mask"].sum())
    return {
        "seconds": time.perf_counter() - start,
        "first_batch_s": first,
        "batches": batches,
        "rows": rows,
        "images": images,
        "tokens": tokens,
    }


def _pack_only(root: Path, processor, max_length: int, seed: int) -> dict:
    """Reader -> packed rows (no collator), in this process, counting the tokenizer's calls and texts."""
    from ..trainers.data import PackedDataset, read_mmc4, read_pairs

    tok_cls = type(processor.tokenizer)
    original = tok_cls.__call__
    counts = {"calls": 0, "texts": 0}

    def counting(self, text=None, *args, **kwargs):
        counts["calls"] += 1
        counts["texts"] += 1 if isinstance(text, str) else len(text)
        return original(self, text, *args, **kwargs)

    tok_cls.__call__ = counting
    try:
        start = time.perf_counter()
        rows = 0
        for source in (
            read_mmc4(root / "mmc4", root / "mmc4_images", seed=seed),
            read_pairs(root / "pairs", seed=seed),
        ):
            rows += sum(1 for _ in PackedDataset(source, processor, max_length))
        seconds = time.perf_counter() - start
    finally:
        tok_cls.__call__ = original
    return {"seconds": seconds, "rows": rows, "tokenizer_calls": counts["calls"], "tokenizer_texts": counts["texts"]}


def run(
    n_docs: int = 2000,
    n_pairs: int = 2000,
    workers=(0, 2, 4),
    *,
    max_length: int = 2048,
    batch_size: int = 4,
    image_size: int = 256,
    encoder_size: int = 448,
    decoder_size: int = 512,
    repeats: int = 1,
    root: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict:
    """Time the stage-1 input path for each number of workers; returns a JSON-ready dict (see module docstring)."""
    import torch

    from ..modeling.image_processing_deem import DeemImageProcessor
    from ..modeling.processing_deem import DeemProcessor

    torch.set_num_threads(1)
    tok = _tokenizer()
    processor = DeemProcessor(DeemImageProcessor(size=encoder_size, decoder_size=decoder_size), tok)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root) if root is not None else Path(tmp)
        t0 = time.perf_counter()
        write_fixture(base, n_docs, n_pairs, image_size)
        fixture_s = time.perf_counter() - t0
        results = []
        for w in workers:
            best = None
            for _ in range(max(1, repeats)):
                loader = _pipeline(base, processor, max_length, batch_size, int(w), seed)
                timing = _time_pass(loader)
                if best is None or timing["seconds"] < best["seconds"]:
                    best = timing
            consumed = n_docs + n_pairs  # every document and pair is read once per pass
            best.update(
                workers=int(w),
                source_samples_per_s=consumed / best["seconds"],
                rows_per_s=best["rows"] / best["seconds"],
                batches_per_s=best["batches"] / best["seconds"],
                images_per_s=best["images"] / best["seconds"],
                tokens_per_s=best["tokens"] / best["seconds"],
            )
            results.append(best)
        pack = _pack_only(base, processor, max_length, seed)
        pack["source_samples_per_s"] = (n_docs + n_pairs) / pack["seconds"]
    return {
        "n_docs": n_docs,
        "n_pairs": n_pairs,
        "max_length": max_length,
        "batch_size": batch_size,
        "image_size": image_size,
        "encoder_size": encoder_size,
        "decoder_size": decoder_size,
        "cpu_count": os.cpu_count(),
        "fixture_seconds": fixture_s,
        "results": results,
        "pack_only": pack,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deem.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000, help="synthetic MMC4 documents")
    parser.add_argument("--pairs", type=int, default=2000, help="synthetic image-text pairs (webdataset tars)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="DataLoader worker counts")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256, help="stored JPEG side")
    parser.add_argument("--encoder-size", type=int, default=448)
    parser.add_argument("--decoder-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    for name in ("docs", "pairs", "max_length", "batch_size", "image_size", "encoder_size", "decoder_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(w < 0 for w in args.workers):
        parser.error("--workers must be >= 0")
    result = run(
        args.docs,
        args.pairs,
        args.workers,
        max_length=args.max_length,
        batch_size=args.batch_size,
        image_size=args.image_size,
        encoder_size=args.encoder_size,
        decoder_size=args.decoder_size,
        repeats=args.repeats,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    pack = result["pack_only"]
    print(
        f"reader -> packed rows only (workers=0): {pack['source_samples_per_s']:.1f} source samples/s, "
        f"{pack['tokenizer_calls']} tokenizer calls for {pack['tokenizer_texts']} texts"
    )
    for r in result["results"]:
        print(
            f"workers={r['workers']}: {r['source_samples_per_s']:.1f} source samples/s, {r['rows_per_s']:.2f} "
            f"packed rows/s, {r['batches_per_s']:.2f} batches/s ({r['seconds']:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
