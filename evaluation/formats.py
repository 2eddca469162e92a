"""The benchmarks' on-disk formats: writers from Python records (see the package docstring for each layout), file
readers with clear errors, and the RobustVQA converter. Every writer writes a temporary file and renames it."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

__all__ = [
    "DataError",
    "convert_imagenet_for_robustvqa",
    "read_json",
    "read_jsonl",
    "write_coco_captions",
    "write_gqa",
    "write_mmvp",
    "write_paragraphs",
    "write_pope",
    "write_refcoco",
    "write_robustvqa",
    "write_vizwiz",
    "write_vqa",
]

ROBUSTVQA_SPLITS = {"a": "imagenet_a", "r": "imagenet_r", "v": "imagenet_v2"}
VQA_FILE_NAMES = {
    "vqav2": ("v2_OpenEnded_mscoco_{sub}_questions.json", "v2_mscoco_{sub}_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{sub}_questions.json", "mscoco_{sub}_annotations.json"),
}
REFER_SPLIT_BY = {"refcocog": "umd", "refcoco": "unc", "refcoco+": "unc"}


class DataError(ValueError):
    """A data file that is missing, unreadable or not in the benchmark's format."""


# ------------------------------------------------------------------------------------------------------ writing
def atomic_write(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_json(obj, path) -> Path:
    return atomic_write(path, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def _need(record, keys, what: str, i: int) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{what} record {i} must be a dict, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{what} record {i} lacks {missing} (has {sorted(record)})")


def write_pope(records, path) -> Path:
    """POPE ``coco_pope_<split>.json`` (JSON Lines): records ``{"question_id", "image", "text", "label"}``."""
    lines = []
    for i, r in enumerate(records):
        _need(r, ("question_id", "image", "text", "label"), "POPE", i)
        lines.append(json.dumps({k: r[k] for k in ("question_id", "image", "text", "label")}, ensure_ascii=False))
    return atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def write_robustvqa(splits: dict, path) -> Path:
    """``robustvqa_test.json``: {"imagenet_a" | "imagenet_r" | "imagenet_v2": [{"file_name", "gt_caption",
    "error_caption"}]}."""
    if not isinstance(splits, dict):
        raise DataError("write_robustvqa takes {split name: records}")
    out = {}
    for split, records in splits.items():
        if split not in ROBUSTVQA_SPLITS.values():
            raise DataError(f"unknown RobustVQA split {split!r}; expected {sorted(ROBUSTVQA_SPLITS.values())}")
        for i, r in enumerate(records):
            _need(r, ("file_name", "gt_caption", "error_caption"), f"RobustVQA {split}", i)
        out[split] = [{k: r[k] for k in ("file_name", "gt_caption", "error_caption")} for r in records]
    return _write_json(out, path)


def write_mmvp(records, path) -> Path:
    """MMVP ``Questions.csv``: records ``{"index", "question", "options": [a, b], "answer": "a" | "b"}``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["Index", "Question", "Options", "Correct Answer"])
    for i, r in enumerate(records):
        _need(r, ("index", "question", "options", "answer"), "MMVP", i)
        a, b = r["options"]
        writer.writerow([r["index"], r["question"], f"(a) {a} (b) {b}", f"({r['answer']})"])
    return atomic_write(path, buf.getvalue().encode("utf-8"))


def write_vqa(records, folder, task: str = "vqav2", data_subtype: str = "val2014") -> tuple[Path, Path]:
    """The official VQA questions + annotations files in ``folder`` (names of VQAv2 or OK-VQA); records
    ``{"question_id", "image_id", "question", "answers": [10 strings]}`` (optional ``answer_type``)."""
    if task not in VQA_FILE_NAMES:
        raise DataError(f"write_vqa: task must be one of {sorted(VQA_FILE_NAMES)}, got {task!r}")
    questions, annotations = [], []
    for i, r in enumerate(records):
        _need(r, ("question_id", "image_id", "question", "answers"), "VQA", i)
        questions.append({"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]})
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(r["answers"])]
        top = max(set(r["answers"]), key=r["answers"].count) if r["answers"] else ""
        annotations.append(
            {
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "answers": answers,
                "multiple_choice_answer": top,
                "answer_type": r.get("answer_type", "other"),
                "question_type": r.get("question_type", "what"),
            }
        )
    q_name, a_name = (name.format(sub=data_subtype) for name in VQA_FILE_NAMES[task])
    common = {"info": {}, "license": {}, "data_subtype": data_subtype, "data_type": "mscoco"}
    folder = Path(folder)
    return (
        _write_json(dict(common, task_type="Open-Ended", questions=questions), folder / q_name),
        _write_json(dict(common, annotations=annotations), folder / a_name),
    )


def write_gqa(records, path) -> Path:
    """GQA ``*_balanced_questions.json``: records ``{"question_id", "image_id", "question", "answer"}``."""
    out = {}
    for i, r in enumerate(records):
        _need(r, ("question_id", "image_id", "question", "answer"), "GQA", i)
        out[str(r["question_id"])] = {
            "imageId": str(r["image_id"]),
            "question": r["question"],
            "answer": r["answer"],
            "fullAnswer": r.get("full_answer", r["answer"]),
        }
    return _write_json(out, path)


def write_vizwiz(records, path) -> Path:
    """VizWiz ``val.json``: records ``{"image", "question", "answers": [10 strings]}``."""
    out = []
    for i, r in enumerate(records):
        _need(r, ("image", "question", "answers"), "VizWiz", i)
        unanswerable = sum(a == "unanswerable" for a in r["answers"])
        out.append(
            {
                "image": r["image"],
                "question": r["question"],
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in r["answers"]],
                "answer_type": r.get("answer_type", "other"),
                "answerable": int(unanswerable < len(r["answers"]) / 2),
            }
        )
    return _write_json(out, path)


def write_coco_captions(records, path) -> Path:
    """COCO caption annotations: records ``{"image_id", "file_name", "captions": [...]}``."""
    images, annotations = [], []
    for i, r in enumerate(records):
        _need(r, ("image_id", "file_name", "captions"), "COCO caption", i)
        images.append({"id": r["image_id"], "file_name": r["file_name"]})
        for caption in r["captions"]:
            annotations.append({"id": len(annotations) + 1, "image_id": r["image_id"], "caption": caption})
    return _write_json({"info": {}, "licenses": [], "images": images, "annotations": annotations}, path)


def write_paragraphs(records, path, split_ids=None, split_path=None) -> Path:
    """Stanford ``paragraphs_v1.json``: records ``{"image_id", "paragraph"}``; ``split_ids`` -> ``split_path``."""
    out = []
    for i, r in enumerate(records):
        _need(r, ("image_id", "paragraph"), "Image2Paragraph", i)
        out.append({"image_id": r["image_id"], "paragraph": r["paragraph"], "url": r.get("url", "")})
    if split_ids is not None:
        if split_path is None:
            raise DataError("write_paragraphs: split_ids needs split_path")
        _write_json(list(split_ids), split_path)
    return _write_json(out, path)


def write_refcoco(records, folder, dataset: str = "refcocog") -> Path:
    """The refer layout in ``folder``: ``refs(<split_by>).p`` + ``instances.json`` (RLE segmentations); records
    ``{"ref_id", "image_id", "file_name", "height", "width", "mask": HxW bool array, "sentences": [...],
    "split"}`` (optional ``category_id``)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    if dataset not in REFER_SPLIT_BY:
        raise DataError(f"write_refcoco: dataset must be one of {sorted(REFER_SPLIT_BY)}, got {dataset!r}")
    refs, images, annotations = [], {}, []
    for i, r in enumerate(records):
        _need(r, ("ref_id", "image_id", "file_name", "height", "width", "mask", "sentences", "split"), "RefCOCO", i)
        mask = np.asfortranarray(np.asarray(r["mask"], dtype=np.uint8))
        if mask.shape != (r["height"], r["width"]):
            raise DataError(f"RefCOCO record {i}: mask {mask.shape} is not (height, width)")
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        ann_id = len(annotations) + 1
        bbox = [float(x) for x in mask_utils.toBbox(rle)]
        category = r.get("category_id", 1)
        annotations.append(
            {
                "id": ann_id,
                "image_id": r["image_id"],
                "category_id": category,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": bbox,
                "iscrowd": 0,
            }
        )
        images[r["image_id"]] = {
            "id": r["image_id"],
            "file_name": r["file_name"],
            "height": r["height"],
            "width": r["width"],
        }
        sentences = [
            {"raw": s, "sent": s.lower(), "tokens": s.lower().split(), "sent_id": r["ref_id"] * 100 + k}
            for k, s in enumerate(r["sentences"])
        ]
        refs.append(
            {
                "ref_id": r["ref_id"],
                "ann_id": ann_id,
                "image_id": r["image_id"],
                "file_name": r["file_name"],
                "split": r["split"],
                "category_id": category,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
            }
        )
    folder = Path(folder)
    instances = {
        "images": list(images.values()),
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
    _write_json(instances, folder / "instances.json")
    return atomic_write(folder / f"refs({REFER_SPLIT_BY[dataset]}).p", pickle.dumps(refs, protocol=2))


# ------------------------------------------------------------------------------------------------------ reading
def read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {path} does not exist" if not path.exists() else f"{what}: {path} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what}: {path} is not valid JSON ({err})") from None


def read_jsonl(path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {path} does not exist" if not path.exists() else f"{what}: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    stripped = text.strip()
    if stripped.startswith("["):  # a JSON list is accepted too
        return read_json(path, what)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{what}: {path} line {n} is not JSON ({err})") from None
    return rows


# ------------------------------------------------------------------------------------------------------ converter
def convert_imagenet_for_robustvqa(
    root, wrong_labels, class_index, split: str, out, *, prefix: str | None = None, underscores: bool = True
) -> Path:
    """Build (or extend) ``robustvqa_test.json`` from an ImageNet-A / -R / V2 folder.

    ``root``: the folder, one sub-folder per class (its WordNet id, or the class number for ImageNetV2);
    ``class_index``: ``imagenet_class_index.json`` ({"0": ["n01440764", "tench"], ...}); ``wrong_labels``: a dict
    (or JSON file) {image path relative to ``root``: the strongest wrong class name} -- the paper takes the
    highest-confidence wrong label of a zero-shot CLIP; images without a wrong label are skipped (logged).
    ``file_name`` is ``prefix/relative path`` (``prefix`` defaults to the folder's name) so ``--images`` is the
    folder above. ``underscores=False`` writes class names with spaces ("great white shark")."""
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    root = Path(root)
    if split not in ROBUSTVQA_SPLITS.values():
        raise DataError(f"split must be one of {sorted(ROBUSTVQA_SPLITS.values())}, got {split!r}")
    if not root.is_dir():
        raise DataError(f"ImageNet folder {root} is not a directory")
    index = read_json(class_index, "class index")
    try:
        names = {wnid: name for wnid, name in index.values()}
        names.update({str(k): name for k, (_, name) in index.items()})  # ImageNetV2 folders are class numbers
    except (TypeError, ValueError, AttributeError):
        raise DataError("class index must map '0'.. to [wnid, name] pairs (imagenet_class_index.json)") from None
    if not isinstance(wrong_labels, dict):
        wrong_labels = read_json(wrong_labels, "wrong labels")
    if not isinstance(wrong_labels, dict):
        raise DataError("wrong labels must be {relative image path: wrong class name}")
    prefix = root.name if prefix is None else prefix

    def clean(name: str) -> str:
        return name if underscores else name.replace("_", " ")

    records, skipped = [], 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in names:
            raise DataError(f"class folder {folder.name!r} is not in the class index")
        for image in sorted(p for p in folder.iterdir() if p.is_file()):
            rel = image.relative_to(root).as_posix()
            wrong = wrong_labels.get(rel)
            if wrong is None:
                skipped += 1
                continue
            if clean(wrong) == clean(names[folder.name]):
                raise DataError(f"wrong label of {rel} is its true class {wrong!r}")
            records.append(
                {
                    "file_name": f"{prefix}/{rel}" if prefix else rel,
                    "gt_caption": clean(names[folder.name]),
                    "error_caption": clean(wrong),
                }
            )
    if not records:
        raise DataError(f"no image of {root} has a wrong label")
    if skipped:
        logger.warning(f"{skipped} image(s) of {root} have no wrong label and were skipped")
    out = Path(out)
    existing = read_json(out, "robustvqa_test.json") if out.is_file() else {}
    existing[split] = records
    return write_robustvqa(existing, out)
