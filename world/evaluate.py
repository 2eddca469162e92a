"""Evaluation of the world's models, through the public model API (``score_options``, ``generate``,
``generate_images``, ``generate(soi="draw")``) and the processor's prompts (`deem.modeling.prompts`).

The benchmarks of the evaluation issue run through `deem.evaluation.evaluate` on the world's sets (POPE jsonl,
robustvqa_test.json, COCO captions, the refer layout); the world's own checks are here: captions with the training
prompt (CIDEr by pycocoevalcap's ``Cider`` beside a random-caption baseline), region captions naming the right
colour / shape, text-to-image and interleaved drawings scored by the renderer's detector (`scenes.detect`), and where
``<|startofimage|>`` is emitted.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

from . import scenes as S
from .formats import CAPTION_QUESTION, SPLITS

logger = logging.get_logger(__name__)


def load(model_dir, device: str = "cpu"):
    from deem import DeemForInterleavedGeneration, DeemProcessor

    model = DeemForInterleavedGeneration.from_pretrained(model_dir).to(device).eval()
    processor = DeemProcessor.from_pretrained(model_dir)
    return model, processor


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _inputs(processor, prompts, images, device, image_masks=None):
    kwargs = {"image_masks": image_masks} if image_masks is not None else {}
    batch = processor(text=prompts, images=images, padding_side="left", **kwargs)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _option_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    a, b = tokenizer(prompt).input_ids, tokenizer(prompt + " " + answer).input_ids
    if b[: len(a)] != a:
        raise ValueError(f"answer {answer!r} changes the tokenization of the prompt's end")
    return b[len(a) :]


def _score_kwargs(batch) -> dict:
    return {k: batch[k] for k in ("attention_mask", "pixel_values", "image_masks", "num_images") if k in batch}


def official(task: str, data: Path, images: Path, model, processor, run, answer_mode="generate", **options) -> dict:
    """One benchmark through `deem.evaluation.evaluate` (the evaluation issue's protocol) on a world set; returns
    its ``metrics`` ({"generate": {...}, "score": {...}}, in percent as the paper's tables)."""
    from deem.evaluation import evaluate

    result = evaluate(
        task,
        str(data),
        str(images),
        model,
        processor=processor,
        batch_size=16,
        answer_mode=answer_mode,
        device=run.device,
        **options,
    )
    return result["metrics"]


def yes_no_sets(data: Path, model, processor, run, answer_mode="both") -> dict:
    """POPE-style (random / popular / adversarial) and RobustVQA-style (v = in-distribution, r = renditions)."""
    out = {}
    pope = data / "eval" / "pope"
    for split in SPLITS:
        out[f"pope_{split}"] = official(
            f"pope-{split}", pope / f"world_pope_{split}.jsonl", pope / "images", model, processor, run, answer_mode
        )
    robust = data / "eval" / "robustvqa"
    for key, task in (("robustvqa_in", "robustvqa-v"), ("robustvqa_ood", "robustvqa-r")):
        out[key] = official(task, robust / "robustvqa_test.json", robust, model, processor, run, answer_mode)
    return out


def evaluate_yes_no_sets(data: Path, model_dir: Path, run) -> dict:
    """In- and out-of-distribution yes/no accuracy (option scoring) of a saved model (the ablation's measure)."""
    model, processor = load(model_dir, run.device)
    robust = Path(data) / "eval" / "robustvqa"
    out = {}
    for key, task in (("robustvqa_in", "robustvqa-v"), ("robustvqa_ood", "robustvqa-r")):
        metrics = official(task, robust / "robustvqa_test.json", robust, model, processor, run, "score")
        out[key] = metrics["score"]["accuracy"] / 100.0  # deem.evaluation reports percentages
    return out


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider(references: dict, candidates: dict) -> float:
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [_words(r) for r in v] for k, v in references.items()}
    res = {k: [_words(candidates[k]) or "empty"] for k in references}
    return float(Cider().compute_score(gts, res)[0])


@torch.no_grad()
def generate_text(model, processor, prompts, images, device="cpu", max_new_tokens=24, image_masks=None) -> list[str]:
    batch = _inputs(processor, prompts, images, device, image_masks)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, soi="stop")
    new = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def captions(model, processor, data: Path, device="cpu", batch_size=16) -> dict:
    from deem.modeling.prompts import format_prompt

    folder = data / "eval" / "caption"
    coco = json.loads((folder / "captions.json").read_text())
    refs = {}
    for a in coco["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    images = coco["images"]
    generated = {}
    prompt = format_prompt("vqa", question=CAPTION_QUESTION)
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        texts = generate_text(
            model,
            processor,
            [prompt] * len(chunk),
            [[Image.open(folder / "images" / im["file_name"]).convert("RGB")] for im in chunk],
            device,
        )
        generated.update({im["id"]: t for im, t in zip(chunk, texts)})
    rng = random.Random(0)
    ids = list(refs)
    shuffled = ids[:]
    while len(ids) > 1 and any(a == b for a, b in zip(ids, shuffled)):
        rng.shuffle(shuffled)
    baseline = {a: refs[b][0] for a, b in zip(ids, shuffled)}
    return {
        "cider": cider(refs, generated),
        "cider_random_caption": cider(refs, baseline),
        "examples": [{"reference": refs[k][0], "generated": generated[k]} for k in ids[:4]],
    }


def region_captions(model, processor, data: Path, device="cpu", batch_size=8) -> dict:
    from pycocotools import mask as mask_utils

    from deem.trainers.data.referring import conversation_segments

    folder = data / "eval" / "region"
    coco = json.loads((folder / "regions.json").read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    prompt_of = lambda: conversation_segments(  # noqa: E731
        [("<image>\nIn the image there are region1 <image>. Please describe region1.", "")]
    )[0]["text"]
    rows = coco["annotations"]
    refs, generated = {}, {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        images, masks = [], []
        for a in chunk:
            image = Image.open(folder / "images" / files[a["image_id"]]).convert("RGB")
            mask = mask_utils.decode(a["segmentation"]).astype(bool)
            images.append([image, image])
            masks.append([None, mask])
        texts = generate_text(model, processor, [prompt_of()] * len(chunk), images, device, 12, image_masks=masks)
        for a, t in zip(chunk, texts):
            refs[a["id"]], generated[a["id"]] = [a["caption"]], t
    exact = float(np.mean([_words(generated[k]) == _words(refs[k][0]) for k in refs]))
    colour = float(np.mean([refs[k][0].split()[1] in _words(generated[k]).split() for k in refs]))
    shape = float(np.mean([refs[k][0].split()[2] in _words(generated[k]).split() for k in refs]))
    return {
        "cider": cider(refs, generated),
        "exact": exact,
        "colour_accuracy": colour,
        "shape_accuracy": shape,
        "examples": [{"reference": refs[k][0], "generated": generated[k]} for k in list(refs)[:4]],
    }


def _to_pil(tensor) -> Image.Image:
    array = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@torch.no_grad()
def drawings(
    model, processor, data: Path, steps: int, device="cpu", folder: Path | None = None, batch_size=8, draws=2
) -> dict:
    """Text-to-image (``generate_images``) on single-object prompts, ``draws`` seeded drawings per prompt (the 24
    prompts alone leave one drawing worth 4 points); the detector scores colour and shape."""
    prompts = _lines(data / "eval" / "draw" / "text2image.jsonl")
    rows = [(r, i + len(prompts) * d) for d in range(draws) for i, r in enumerate(prompts)]  # (prompt, seed)
    colour_ok, shape_ok, found = [], [], []
    images = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = _inputs(processor, [r["prompt"] for r, _ in chunk], None, device)
        drawn = model.generate_images(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
        )
        for (r, _), image in zip(chunk, drawn):
            pil = _to_pil(image)
            images.append((r["prompt"], pil))
            det = S.detect(pil)
            found.append(bool(det))
            colour_ok.append(bool(det) and det[0]["colour"] == r["colour"])
            shape_ok.append(bool(det) and det[0]["shape"] == r["shape"])
    if folder is not None:
        _grid([(p, [im]) for p, im in images], folder / "text2image.png", cols=8)
    return {
        "colour_accuracy": float(np.mean(colour_ok)),
        "shape_accuracy": float(np.mean(shape_ok)),
        "object_found": float(np.mean(found)),
        "colour_chance": 1 / len(S.COLOURS),
        "shape_chance": 1 / len(S.SHAPES),
        "n": len(rows),
    }


@torch.no_grad()
def soi_rate(model, processor, data: Path, device="cpu") -> dict:
    """How often ``<|startofimage|>`` comes within 3 tokens after a document's describing sentence (the MMC4 data
    put an image right after its sentence half of the time, the pairs after every caption not led by its image)."""
    prompts = [r["prompt"] for r in _lines(data / "eval" / "draw" / "stories.jsonl")]
    prompts += [r["prompt"] for r in _lines(data / "eval" / "draw" / "text2image.jsonl")]
    batch = _inputs(processor, prompts, None, device)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, soi="stop")
    new = out[:, batch["input_ids"].shape[1] :]
    logits = model(**batch, return_loss=False).logits[:, -1].float()  # left padding: the last position is the end
    probability = logits.softmax(-1)[:, model.config.soi_token_id]
    return {
        "soi_within_3_tokens": float((new == model.config.soi_token_id).any(-1).float().mean()),
        "soi_probability_next": float(probability.mean()),
        "n": len(prompts),
    }


_COLOUR_RE = re.compile(r"\b(" + "|".join(S.COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(S.SHAPES) + r")\b")


@torch.no_grad()
def stories(model, processor, data: Path, steps: int, device="cpu", max_new_tokens: int = 40) -> tuple[list, dict]:
    """Interleaved generation (``generate(soi="draw")``) from story openings; each drawn image is checked against
    the last colour and shape the text named before it."""
    rows = _lines(data / "eval" / "draw" / "stories.jsonl")
    samples, colour_ok, shape_ok = [], [], []
    for k, r in enumerate(rows):
        batch = _inputs(processor, [r["prompt"]], None, device)
        out = model.generate(
            **batch,
            soi="draw",
            max_new_tokens=max_new_tokens,
            max_new_images=2,
            do_sample=False,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(k),
        )
        pieces = processor.post_process_interleaved(out, prompt_length=0)[0]
        text_so_far, items = "", []
        for piece in pieces:
            if isinstance(piece, str):
                text_so_far += piece
                items.append(piece)
            else:
                colours, shapes_ = _COLOUR_RE.findall(text_so_far.lower()), _SHAPE_RE.findall(text_so_far.lower())
                det = S.detect(piece)
                if colours:
                    colour_ok.append(bool(det) and det[0]["colour"] == colours[-1])
                if shapes_:
                    shape_ok.append(bool(det) and det[0]["shape"] == shapes_[-1])
                items.append(piece)
        samples.append(items)
    return samples, {
        "drawn_images": len(colour_ok),
        "colour_matches_text": float(np.mean(colour_ok)) if colour_ok else None,
        "shape_matches_text": float(np.mean(shape_ok)) if shape_ok else None,
    }


def _grid(rows, path: Path, cols: int = 4, panel: tuple[float, float] = (1.6, 1.9)) -> None:
    """A matplotlib figure: each entry (text, [images]) is one ``panel`` (inches) with its text, wrapped to the
    panel's width, as the title."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    r = (n + cols - 1) // cols
    fig, axes = plt.subplots(r, cols, figsize=(cols * panel[0], r * panel[1]), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (text, ims) in zip(axes.flat, rows):
        strip = np.concatenate([np.asarray(im.convert("RGB").resize((64, 64), Image.NEAREST)) for im in ims], 1)
        ax.imshow(strip)
        ax.set_title(textwrap.fill(text, width=int(panel[0] * 21)), fontsize=6)  # ~21 characters per inch
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def evaluate_world(out: Path, folder: Path, run) -> dict:
    """Every measurement of the report, written to ``folder/metrics.json``."""
    data = out / "data"
    results = {}
    # stage 1: drawing and <|startofimage|>
    model, processor = load(out / "stage1", run.device)
    results["stage1_draw"] = drawings(model, processor, data, run.draw_steps, run.device, folder)
    results["stage1_soi"] = soi_rate(model, processor, data, run.device)
    samples, results["stage1_stories"] = stories(model, processor, data, run.draw_steps, run.device)
    _story_grid(samples, folder / "samples.png")
    base, base_processor = load(out / "assembled", run.device)
    results["assembled_soi"] = soi_rate(base, base_processor, data, run.device)
    del base
    # stage 2: yes/no (deem.evaluation), captions (deem.evaluation's coco-caption prompt and the training prompt)
    model, processor = load(out / "stage2", run.device)
    results["stage2_yes_no"] = yes_no_sets(data, model, processor, run, "score" if run.quick else "both")
    caption_dir = data / "eval" / "caption"
    results["stage2_coco_caption"] = official(
        "coco-caption",
        caption_dir / "captions.json",
        caption_dir / "images",
        model,
        processor,
        run,
        meteor=False,
        spice=False,
    )
    results["stage2_caption"] = captions(model, processor, data, run.device)
    # stage 3: region captions (deem.evaluation's refcocog-region-caption, and the world's own check)
    model, processor = load(out / "stage3", run.device)
    region = data / "eval" / "region"
    results["stage3_refcocog"] = official(
        "refcocog-region-caption", region / "refcocog", region / "images", model, processor, run, meteor=False
    )
    results["stage3_region"] = region_captions(model, processor, data, run.device)
    (folder / "metrics.json").write_text(json.dumps(results, indent=2))
    return {"metrics": str(folder / "metrics.json")}


def _story_grid(samples, path: Path) -> None:
    rows = []
    for items in samples:
        text = "".join(p if isinstance(p, str) else " [img] " for p in items)
        ims = [p for p in items if not isinstance(p, str)] or [Image.new("RGB", (32, 32), (255, 255, 255))]
        rows.append((text[:120], ims))
    _grid(rows, path, cols=2, panel=(3.0, 2.2))
