"""The benchmark tasks: how each reads its data, builds its prompts (paper Fig. 8 / `deem.modeling.prompts`),
generates (the original eval collators' settings) and scores."""

from __future__ import annotations

import csv
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.prompts import IMAGE_MARKER, format_prompt
from .formats import REFER_SPLIT_BY, ROBUSTVQA_SPLITS, DataError, read_json, read_jsonl

__all__ = ["TASKS", "Task", "get_task"]

# the original eval collators (reference §5.1): VQA-like beams 3, <= 10 new tokens, length penalty 0; captions
# beams 5, 8..20 tokens; Image2Paragraph 90 tokens, repetition penalty 1.2; generate_texts defaults otherwise
_SHORT = {"num_beams": 3, "max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": 0.0}
_CAPTION = {"num_beams": 5, "max_new_tokens": 20, "min_new_tokens": 8}
_PARAGRAPH = {"num_beams": 5, "max_new_tokens": 90, "min_new_tokens": 90, "repetition_penalty": 1.2}
_REFERRING = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
GENERATION_OPTIONS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty")
# the referring prompt of paper Fig. 8 (c): the whole image, then the region as a masked image
REFERRING_QUESTION = f"{IMAGE_MARKER} Provide a short description for this <ref>region1</ref> {IMAGE_MARKER}"


@dataclass(frozen=True)
class Task:
    name: str
    benchmark: str
    family: str
    split: str
    generation: dict
    closed: bool = False  # option scoring (answer_mode "score") possible
    options: dict = field(default_factory=dict)  # task options and their defaults
    protocol: str = ""


def _t(name, benchmark, family, data_split, generation, closed=False, protocol="", **options):
    return Task(name, benchmark, family, data_split, dict(generation), closed, options, protocol)


_POPE_PROTOCOL = "POPE: paper Fig. 8 (d) prompt; accuracy / precision / recall / F1 / yes-ratio"
_VQA_PROTOCOL = "paper Fig. 8 (a) prompt; official VQA accuracy with the EvalAI answer normalisation"
_CAPTION_PROTOCOL = "pycocoevalcap (PTB tokenisation): BLEU, METEOR, ROUGE-L, CIDEr, SPICE"
TASKS_BY_NAME: dict[str, Task] = {
    t.name: t
    for t in [
        *(
            _t(f"pope-{s}", f"POPE-{s.capitalize()}", "pope", s, _SHORT, True, _POPE_PROTOCOL, parser="pope")
            for s in ("random", "popular", "adversarial")
        ),
        *(
            _t(
                f"robustvqa-{k}",
                f"RobustVQA-{k.upper()}",
                "robustvqa",
                v,
                _SHORT,
                True,
                "DEEM App. D.1: true class -> yes, strongest wrong class -> no; exact-match accuracy",
            )
            for k, v in ROBUSTVQA_SPLITS.items()
        ),
        _t("mmvp", "MMVP", "mmvp", "test", _SHORT, True, "options (a)/(b); pair accuracy"),
        _t("vqav2", "VQAv2", "vqa", "val", _SHORT, protocol=_VQA_PROTOCOL),
        _t("okvqa", "OK-VQA", "vqa", "val", _SHORT, protocol=_VQA_PROTOCOL),
        _t("gqa", "GQA", "gqa", "testdev", _SHORT, protocol="paper Fig. 8 (a) prompt; exact match"),
        _t("vizwiz", "VizWiz", "vizwiz", "val", _SHORT, protocol=_VQA_PROTOCOL),
        _t(
            "coco-caption",
            "COCO Caption",
            "caption",
            "karpathy-test",
            _CAPTION,
            protocol=_CAPTION_PROTOCOL,
            meteor=True,
            spice=True,
        ),
        _t(
            "image2paragraph",
            "Image2Paragraph",
            "paragraph",
            "test",
            _PARAGRAPH,
            protocol=_CAPTION_PROTOCOL,
            meteor=True,
            spice=True,
            split_file=None,
        ),
        *(
            _t(
                f"{d}-region-caption",
                f"{d.replace('refcoco', 'RefCOCO')} region caption",
                "refcoco",
                "val",
                _REFERRING,
                protocol="stage-3 mask prompt (paper Fig. 8 (c)); CIDEr, METEOR (pycocoevalcap)",
                split="val",
                references="all",
                meteor=True,
                spice=False,
            )
            for d in ("refcocog", "refcoco", "refcoco+")
        ),
        _t(
            "t2i-fid",
            "MS-COCO text-to-image",
            "fid",
            "val",
            {},
            protocol="generate_images from the text-to-image prompt; FID (torchmetrics, torch-fidelity Inception)",
            inception_weights=None,
            feature_extractor=None,
            samples_per_prompt=1,
            clip_scorer=None,
            num_inference_steps=250,
            guidance_scale=3.5,
            image_size=None,
            seed=0,
        ),
    ]
}
TASKS = tuple(TASKS_BY_NAME)


def get_task(name) -> Task:
    if not isinstance(name, str) or name not in TASKS_BY_NAME:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS_BY_NAME[name]


# -------------------------------------------------------------------------------------------------- samples
def _image(images: Path, name, what: str) -> Path:
    if not isinstance(name, str) or not name:
        raise DataError(f"{what}: the image name must be a non-empty string, got {name!r}")
    return images / name


def _str(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _answers(raw, what: str) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{what}: 'answers' must be a non-empty list, got {raw!r}")
    out = []
    for a in raw:
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, str):
            raise DataError(f"{what}: every answer must be a string (or {{'answer': str}}), got {a!r}")
        out.append(a)
    return out


def _yes_no(label, what: str) -> str:
    label = label.strip().lower() if isinstance(label, str) else label
    if label not in ("yes", "no"):
        raise DataError(f"{what}: label must be 'yes' or 'no', got {label!r}")
    return label


def _sample(sid, image, prompt, target, options=None, **extra) -> dict:
    return {
        "id": str(sid),
        "images": [image],
        "masks": None,
        "prompt": prompt,
        "target": target,
        "options": options,
        **extra,
    }


YES_NO = [" yes", " no"]


def _pope(task, data, images, opts):
    rows = read_jsonl(data, f"{task.name} data")
    out = []
    for i, r in enumerate(rows):
        what = f"{task.name} data {data} record {i}"
        if not isinstance(r, dict) or not {"question_id", "image", "text", "label"} <= set(r):
            raise DataError(f"{what} must hold question_id, image, text and label (POPE's format), got {r!r}")
        out.append(
            _sample(
                r["question_id"],
                _image(images, r["image"], what),
                format_prompt("pope", question=_str(r["text"], f"{what} text")),
                _yes_no(r["label"], what),
                YES_NO,
            )
        )
    return out


def _robustvqa(task, data, images, opts):
    blob = read_json(data, f"{task.name} data")
    if not isinstance(blob, dict) or task.split not in blob:
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise DataError(
            f"{task.name} data {data} must be a dict with the split {task.split!r} (RobustVQA's "
            f"robustvqa_test.json), got {keys}"
        )
    out = []
    for i, r in enumerate(blob[task.split]):
        what = f"{task.name} data {data} [{task.split}][{i}]"
        if not isinstance(r, dict) or not {"file_name", "gt_caption", "error_caption"} <= set(r):
            raise DataError(f"{what} must hold file_name, gt_caption and error_caption, got {r!r}")
        image = _image(images, r["file_name"], what)
        for label, answer in ((r["gt_caption"], "yes"), (r["error_caption"], "no")):
            prompt = format_prompt("robustvqa", label=_str(label, f"{what} label"))
            out.append(_sample(f"{i}-{answer}", image, prompt, answer, YES_NO))
    return out


_MMVP_OPTIONS = re.compile(r"^\s*\(a\)\s*(.*?)\s*\(b\)\s*(.*?)\s*$", re.S | re.I)


def _mmvp(task, data, images, opts):
    path = Path(data)
    if not path.is_file():
        raise DataError(f"mmvp data {path} does not exist (MMVP's Questions.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"Index", "Question", "Options", "Correct Answer"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"mmvp data {path} must be a CSV with columns {sorted(need)}")
    out = []
    for i, r in enumerate(rows):
        what = f"mmvp data {path} row {i + 2}"
        match = _MMVP_OPTIONS.match(r["Options"] or "")
        answer = (r["Correct Answer"] or "").strip().strip("()").lower()
        if not match or answer not in ("a", "b") or not (r["Index"] or "").strip().isdigit():
            raise DataError(f"{what}: needs an integer Index, Options '(a) .. (b) ..' and Correct Answer (a)/(b)")
        index = int(r["Index"])
        question = f"{_str(r['Question'], what + ' Question').strip()} (a) {match.group(1)} (b) {match.group(2)}"
        out.append(
            _sample(
                index,
                images / f"{index}.jpg",
                format_prompt("vqa", question=question),
                answer,
                [" (a)", " (b)"],
                choices=[match.group(1), match.group(2)],
            )
        )
    return out


def _find_one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise DataError(f"{what}: {folder} must hold exactly one {pattern} file, found {[p.name for p in found]}")
    return found[0]


def _vqa(task, data, images, opts):
    data = Path(data)
    if data.is_dir():
        qfile, afile = _find_one(data, "*questions*.json", task.name), _find_one(data, "*annotations*.json", task.name)
    elif data.is_file():
        qfile, afile = data, _find_one(data.parent, "*annotations*.json", task.name)
    else:
        raise DataError(f"{task.name} data {data} does not exist (a folder with the questions + annotations files)")
    qs, anns = read_json(qfile, f"{task.name} questions"), read_json(afile, f"{task.name} annotations")
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise DataError(f"{qfile} is not a VQA questions file (no 'questions' list)")
    if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
        raise DataError(f"{afile} is not a VQA annotations file (no 'annotations' list)")
    sub = qs.get("data_subtype", "val2014")
    by_id = {a.get("question_id"): a for a in anns["annotations"] if isinstance(a, dict)}
    out = []
    for i, q in enumerate(qs["questions"]):
        what = f"{qfile} question {i}"
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            raise DataError(f"{what} must hold question_id, image_id and question, got {q!r}")
        if q["question_id"] not in by_id:
            raise DataError(f"{what}: question_id {q['question_id']} has no annotation in {afile}")
        if not isinstance(q["image_id"], int):
            raise DataError(f"{what}: image_id must be an integer, got {q['image_id']!r}")
        answers = _answers(by_id[q["question_id"]].get("answers"), f"{afile} question_id {q['question_id']}")
        image = images / f"COCO_{sub}_{q['image_id']:012d}.jpg"
        out.append(_sample(q["question_id"], image, format_prompt("vqa", question=_str(q["question"], what)), answers))
    return out


def _gqa(task, data, images, opts):
    blob = read_json(data, "gqa data")
    if not isinstance(blob, dict):
        raise DataError(f"gqa data {data} must be GQA's {{question id: question}} dict")
    out = []
    for qid, q in blob.items():
        what = f"gqa data {data} question {qid}"
        if not isinstance(q, dict) or not {"imageId", "question", "answer"} <= set(q):
            raise DataError(f"{what} must hold imageId, question and answer, got {q!r}")
        out.append(
            _sample(
                qid,
                _image(images, f"{q['imageId']}.jpg", what),
                format_prompt("vqa", question=_str(q["question"], what)),
                _str(q["answer"], what),
            )
        )
    return out


def _vizwiz(task, data, images, opts):
    rows = read_json(data, "vizwiz data")
    if not isinstance(rows, list):
        raise DataError(f"vizwiz data {data} must be VizWiz's list of questions")
    out = []
    for i, r in enumerate(rows):
        what = f"vizwiz data {data} record {i}"
        if not isinstance(r, dict) or not {"image", "question", "answers"} <= set(r):
            raise DataError(f"{what} must hold image, question and answers, got {r!r}")
        out.append(
            _sample(
                r["image"],
                _image(images, r["image"], what),
                format_prompt("vizwiz", question=_str(r["question"], what)),
                _answers(r["answers"], what),
            )
        )
    return out


def coco_captions(data, what: str) -> list[tuple[int, str, list[str]]]:
    """(image id, file name, captions) of a COCO caption annotations file, in image order."""
    blob = read_json(data, what)
    if (
        not isinstance(blob, dict)
        or not isinstance(blob.get("images"), list)
        or not isinstance(blob.get("annotations"), list)
    ):
        raise DataError(f"{what} {data} must be COCO caption annotations ({{'images': [...], 'annotations': [...]}})")
    caps: dict = {}
    for i, a in enumerate(blob["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise DataError(f"{what} {data} annotation {i} must hold image_id and a caption string, got {a!r}")
        caps.setdefault(a["image_id"], []).append(a["caption"])
    out = []
    for i, im in enumerate(blob["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{what} {data} image {i} must hold id and file_name, got {im!r}")
        if im["id"] not in caps:
            raise DataError(f"{what} {data}: image {im['id']} has no caption")
        out.append((im["id"], im["file_name"], caps[im["id"]]))
    return out


def _caption(task, data, images, opts):
    return [
        _sample(i, images / name, format_prompt("caption"), refs)
        for i, name, refs in coco_captions(data, "coco-caption data")
    ]


def _paragraph(task, data, images, opts):
    rows = read_json(data, "image2paragraph data")
    if not isinstance(rows, list):
        raise DataError(f"image2paragraph data {data} must be the list of paragraphs_v1.json")
    keep = None
    if opts.get("split_file") is not None:
        ids = read_json(opts["split_file"], "image2paragraph split_file")
        if not isinstance(ids, list):
            raise DataError(f"split_file {opts['split_file']} must be a JSON list of image ids")
        keep = set(ids)
    out = []
    for i, r in enumerate(rows):
        what = f"image2paragraph data {data} record {i}"
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("paragraph"), str):
            raise DataError(f"{what} must hold image_id and paragraph, got {r!r}")
        if keep is None or r["image_id"] in keep:
            out.append(
                _sample(
                    r["image_id"], images / f"{r['image_id']}.jpg", format_prompt("image2paragraph"), [r["paragraph"]]
                )
            )
    return out


def _refcoco(task, data, images, opts):
    from pycocotools import mask as mask_utils

    folder = Path(data)
    dataset = task.name.removesuffix("-region-caption")
    refs_file = folder / f"refs({REFER_SPLIT_BY[dataset]}).p"
    if not folder.is_dir() or not refs_file.is_file() or not (folder / "instances.json").is_file():
        raise DataError(f"{task.name} data {folder} must be a folder with {refs_file.name} and instances.json")
    try:
        with open(refs_file, "rb") as f:
            refs = pickle.load(f)  # the refer toolkit's format is a pickle; only open files you trust
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{refs_file} is not a refer pickle ({err})") from None
    instances = read_json(folder / "instances.json", f"{task.name} instances")
    anns = {a["id"]: a for a in instances.get("annotations", [])}
    imgs = {im["id"]: im for im in instances.get("images", [])}
    if opts["references"] not in ("all", "first"):
        raise ValueError(
            f"references must be 'all' or 'first' (the original kept the first), got {opts['references']!r}"
        )
    out = []
    for i, ref in enumerate(refs):
        what = f"{refs_file} ref {i}"
        if not isinstance(ref, dict) or not {"ref_id", "ann_id", "image_id", "split", "sentences"} <= set(ref):
            raise DataError(f"{what} must hold ref_id, ann_id, image_id, split and sentences")
        if ref["split"] != opts["split"]:
            continue
        if ref["ann_id"] not in anns or ref["image_id"] not in imgs:
            raise DataError(f"{what}: annotation {ref['ann_id']} or image {ref['image_id']} is not in instances.json")
        ann, im = anns[ref["ann_id"]], imgs[ref["image_id"]]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, im["height"], im["width"]))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, im["height"], im["width"])
        else:
            rle = seg
        sentences = [s["sent"] if isinstance(s, dict) else s for s in ref["sentences"]]
        if not sentences:
            raise DataError(f"{what} has no sentences")
        refs_out = sentences if opts["references"] == "all" else sentences[:1]
        image = images / im["file_name"]
        sample = _sample(ref["ref_id"], image, format_prompt("referring", question=REFERRING_QUESTION), refs_out)
        sample["images"] = [image, image]
        sample["masks"] = [None, rle]
        out.append(sample)
    if not out:
        raise DataError(f"{task.name}: no ref of {refs_file} is in split {opts['split']!r}")
    return out


def _fid(task, data, images, opts):
    out = []
    for i, name, caps in coco_captions(data, "t2i-fid data"):
        out.append(_sample(i, images / name, format_prompt("text2image", caption=caps[0]), None, caption=caps[0]))
    return out


LOADERS = {
    "pope": _pope,
    "robustvqa": _robustvqa,
    "mmvp": _mmvp,
    "vqa": _vqa,
    "gqa": _gqa,
    "vizwiz": _vizwiz,
    "caption": _caption,
    "paragraph": _paragraph,
    "refcoco": _refcoco,
    "fid": _fid,
}


def load_samples(task: Task, data, images, options: dict) -> list[dict]:
    """Every sample of ``data`` (checked: records, duplicate ids, image files present) before any model work."""
    images = Path(images)
    if not images.is_dir():
        raise DataError(
            f"--images {images} is not a directory" if images.exists() else f"--images {images} does not exist"
        )
    if not Path(data).exists():
        raise DataError(f"--data {data} does not exist")
    samples = LOADERS[task.family](task, data, images, options)
    if not samples:
        raise DataError(f"{task.name}: {data} holds no samples")
    seen = set()
    for s in samples:
        if s["id"] in seen:
            raise DataError(f"{task.name}: sample id {s['id']!r} appears twice in {data}")
        seen.add(s["id"])
    missing = sorted({str(p) for s in samples for p in s["images"] if not p.is_file()})
    if missing:
        raise DataError(f"{task.name}: {len(missing)} image file(s) missing under {images}, e.g. {missing[:3]}")
    return samples
