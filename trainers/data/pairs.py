"""Image-text pairs (LAION / CC / SBU / BLIP-LCS style, reference §6.3) as a streaming source.

Two layouts:
- webdataset tar shards: members grouped by key (path up to the first "." of the base name): an image
  (``key.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` ...) plus ``key.json`` with a ``caption`` field (a string, or a
  list joined by spaces, as the original) or ``key.txt``. One unit per tar file; members are read and grouped by
  the `webdataset` package (``tar_file_expander`` + ``group_by_keys``), its handler turning a corrupt shard into
  one "bad_record" report (the samples before the damage are kept).
- jsonl + image folder (or tar shards holding the images): one JSON object per line with the image path
  (``image`` / ``file_name`` / ``image_path`` / ``path``) and the caption (``caption`` / ``text``); lines read
  through fsspec (compressed .jsonl.gz / .bz2 / .xz too).

Per pair: caption lower-cased and stripped; with probability ``text_drop_prob`` (0.1) the caption is removed so
the image is unconditioned (classifier-free guidance; the text is then just ``<image></s>``); otherwise the image
goes first (p = ``image_first_prob`` = 0.5: ``<image>caption</s>``) or last (``caption<image></s>``). One
supervised segment. Note: the model's NIP branch already replaces its image condition by the learned null
embedding with p = 0.1 (``cfg_dropout_prob``); set ``text_drop_prob=0`` to train exactly as the original.
"""

from __future__ import annotations

import json
import os

from ...modeling.prompts import EOS, IMAGE_MARKER
from ._common import JSONL_SUFFIXES, BadSample, decode_image, expand_paths, make_sample
from .images import IMAGE_EXTENSIONS, ImageStore
from .sources import StreamingSource

IMAGE_KEYS = ("image", "file_name", "image_path", "path")
CAPTION_KEYS = ("caption", "text")


def webdataset_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member by the webdataset rule: split the base name at its first dot."""
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _caption(value) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    return value if isinstance(value, str) else None


def pair_text(caption: str, rng, image_first_prob: float = 0.5, text_drop_prob: float = 0.1) -> str:
    """The text of one pair (two draws from `rng`, always both: drop, then placement)."""
    drop = rng.random() < text_drop_prob
    first = rng.random() < image_first_prob
    if drop:
        return IMAGE_MARKER + EOS
    return (IMAGE_MARKER + caption if first else caption + IMAGE_MARKER) + EOS


class PairsDataset(StreamingSource):
    """Streaming image-text pairs from webdataset tars or jsonl (+ image store); see the module docstring."""

    def __init__(
        self,
        source,
        images=None,
        *,
        layout: str = "auto",
        image_first_prob: float = 0.5,
        text_drop_prob: float = 0.1,
        lowercase: bool = True,
        name: str = "pairs",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if layout not in ("auto", "tar", "jsonl"):
            raise ValueError(f"layout must be 'auto', 'tar' or 'jsonl', got {layout!r}")
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if layout == "auto":
            named_jsonl = any(str(p).lower().endswith((*JSONL_SUFFIXES, ".json")) for p in paths)
            layout = "jsonl" if named_jsonl or images is not None else "tar"
        if layout == "jsonl":
            if images is None:
                raise ValueError("jsonl pairs need `images`: the image folder (or tar shards) the paths refer to")
            self.layout, self.files = "jsonl", expand_paths(paths, (*JSONL_SUFFIXES, ".json"))
            self.store = images if isinstance(images, ImageStore) else ImageStore(images)
        else:
            self.layout, self.files = "tar", expand_paths(paths, (".tar", ".tar.gz", ".tgz"))
            self.store = None
        self.image_first_prob = float(image_first_prob)
        self.text_drop_prob = float(text_drop_prob)
        self.lowercase = lowercase
        self.name = name
        self._init_stream()

    def _units(self) -> list:
        return list(self.files)

    def _iter_unit(self, path):
        if self.layout == "jsonl":
            for r, line, where in self._lines(path):
                yield r, ("jsonl", line), where
            return
        # members grouped by key through webdataset's own tar iterator and grouping (its key rule is ours)
        from webdataset.tariterators import group_by_keys, tar_file_expander

        errors: list[BaseException] = []

        def stop(exn: BaseException) -> bool:  # webdataset handler: remember the error, end this shard
            errors.append(exn)
            return False

        try:
            stream = open(path, "rb")
        except OSError as err:
            self._report(BadSample("bad_record", f"cannot open tar shard: {err}"), path)
            return
        r, pending = 0, None
        with stream:
            files = tar_file_expander([{"url": str(path), "stream": stream}], handler=stop)
            for sample in group_by_keys(files, handler=stop):
                if pending is not None:  # a group is complete once the next one starts
                    yield self._emit(path, r, pending)
                    r += 1
                pending = sample
            if errors:  # truncated / corrupt shard: keep what was read, drop the group being read
                err = errors[0]
                message = err.args[0] if getattr(err, "args", None) else err
                problem = "cannot open tar shard" if pending is None else f"tar shard is corrupt after {r} samples"
                self._report(BadSample("bad_record", f"{problem}: {message}"), path)
                return
        if pending is not None:
            yield self._emit(path, r, pending)

    @staticmethod
    def _emit(path, r, sample):
        key = sample["__key__"]
        files = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
        return r, ("tar", key, files), f"{path}:{key}"

    def _build(self, raw, rng, where):
        if raw[0] == "jsonl":
            try:
                record = json.loads(raw[1])
            except json.JSONDecodeError as err:
                raise BadSample("bad_record", f"not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise BadSample("bad_record", "a pair must be a JSON object")
            image_path = next((record[k] for k in IMAGE_KEYS if isinstance(record.get(k), str)), None)
            caption = next((_caption(record[k]) for k in CAPTION_KEYS if _caption(record.get(k)) is not None), None)
            if image_path is None:
                raise BadSample("bad_record", f"no image path (one of {IMAGE_KEYS})")
            if caption is None:
                raise BadSample("bad_record", f"no caption (one of {CAPTION_KEYS})")
            image, _ = self.store.load(image_path)
        else:
            _, key, files = raw
            ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
            if ext is None:
                raise BadSample("missing_image", f"sample {key} has no image member (it has {sorted(files)})")
            caption = None
            if "json" in files:
                try:
                    meta = json.loads(files["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise BadSample("bad_record", f"{key}.json is not valid JSON ({err})") from None
                caption = _caption(meta.get("caption")) if isinstance(meta, dict) else None
            if caption is None and "txt" in files:
                caption = files["txt"].decode("utf-8", errors="replace")
            if caption is None:
                raise BadSample("bad_record", f"sample {key} has no caption (.json 'caption' or .txt)")
            image = decode_image(files[ext], f"{where}.{ext}")
        caption = caption.strip().lower() if self.lowercase else caption.strip()
        if not caption:
            raise BadSample("bad_record", "empty caption")
        text = pair_text(caption, rng, self.image_first_prob, self.text_drop_prob)
        return make_sample(text, [image], source=self.name)


def read_pairs(source, images=None, **kwargs) -> PairsDataset:
    """Image-text pairs -> a streaming `PairsDataset` of pretraining samples.

    Args:
        source: webdataset tar shard(s) (a path, list, glob or directory of ``.tar``), or jsonl file(s) (a path,
            list, glob or directory of ``.jsonl``).
        images: for jsonl, the image folder (or tar shards) the records' paths are relative to.
        layout: "auto" (jsonl when `source` names .jsonl / .json files or `images` is given, else tar), "tar",
            "jsonl".
        image_first_prob (0.5), text_drop_prob (0.1), lowercase (True), name ("pairs"), and the `StreamingSource`
        args (seed, shuffle, split, shard_by_rank, rank, world_size, on_error, max_images, processor, max_length).
    """
    return PairsDataset(source, images, **kwargs)
