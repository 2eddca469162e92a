"""The world's data in the real formats, read back by the project's own readers (`deem.trainers.data`) and by the
evaluation (`deem.evaluation`).

`write_world_data(root, sizes, seed)` writes, from exact scene graphs (`scenes`)::

    root/mmc4/docs.jsonl + root/mmc4/images/     MMC4 documents: text_list, image_info (image_name,
                                                 matched_text_index, matched_sim): a scene, then 1-2 changes
    root/pairs/pairs-00000.tar ...               webdataset shards: KEY.png + KEY.json {"caption"}
    root/llava/llava.json + root/llava/images/   LLaVA instruction JSON (yes/no existence, count, colour)
    root/llava/grounding.json                    LLaVA JSON, main-object yes/no, plain + described (stage 2 warm-up)
    root/referring/refs.json + images/           COCO instances with compressed-RLE masks and a caption each
    root/eval/...                                the evaluation sets (`write_eval_sets`)
    root/scenes.jsonl                            every image's scene graph (what the scorers compare against)

Every file is written to a temporary name and renamed when complete; the whole folder is written beside ``root``
and renamed at the end.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deem.evaluation.formats import atomic_write

from . import scenes as S

SPLITS = ("random", "popular", "adversarial")
CAPTION_QUESTION = "Could you provide a short description of the image?"
YES_NO_SUFFIX = " Please anwser yes or no"  # the POPE / RobustVQA prompts' wording (and typo)


def main_object_question(shape: str) -> str:
    """The RobustVQA question ("Is {label} the main object in this image?") for a world shape."""
    return f"Is a {shape} the main object in this image?"


@dataclass
class WorldSizes:
    """How many records of each kind (training sets, then evaluation sets)."""

    image_size: int = 32
    mmc4_docs: int = 600
    pairs: int = 1500
    llava_images: int = 800
    grounding_images: int = 300
    referring_images: int = 300
    pope_images: int = 60
    robust_images: int = 60
    caption_images: int = 60
    region_images: int = 30
    draw_prompts: int = 24
    stories: int = 4
    max_objects: int = 3
    pairs_per_shard: int = 500

    @classmethod
    def quick(cls) -> "WorldSizes":
        return cls(
            mmc4_docs=120,
            pairs=300,
            llava_images=300,
            grounding_images=60,
            referring_images=60,
            pope_images=10,
            robust_images=20,
            caption_images=8,
            region_images=4,
            draw_prompts=8,
            stories=2,
        )


def _atomic_json(path: Path, value) -> None:
    atomic_write(path, json.dumps(value, indent=None).encode())


def _atomic_lines(path: Path, rows) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _Writer:
    def __init__(self, root: Path, sizes: WorldSizes, seed: int):
        self.root, self.sizes = root, sizes
        self.rng = random.Random(seed)
        self.graphs: list[dict] = []

    def image(self, folder: Path, name: str, scene: S.Scene, style: str = "plain", seed: int = 0) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / name, _png(S.render(scene, self.sizes.image_size, style, seed)))
        self.graphs.append({"file": str((folder / name).relative_to(self.root)), "style": style, **scene.to_dict()})
        return name

    # -- training sets

    def mmc4(self):
        out, images = self.root / "mmc4", self.root / "mmc4" / "images"
        docs = []
        for d in range(self.sizes.mmc4_docs):
            scene = S.random_scene(self.rng, self.sizes.max_objects)
            texts, infos = [f"There is {S.caption(scene)}"[:-1] + "."], []
            infos.append({"image_name": self.image(images, f"d{d:05d}_0.png", scene), "matched_text_index": 0})
            for k in range(1, self.rng.randint(2, 3)):
                scene, sentence = S.change_scene(scene, self.rng)
                texts.append(sentence)
                infos.append({"image_name": self.image(images, f"d{d:05d}_{k}.png", scene), "matched_text_index": k})
            for info in infos:
                info["matched_sim"] = 1.0
            docs.append({"url": f"world://doc/{d}", "text_list": texts, "image_info": infos})
        _atomic_lines(out / "docs.jsonl", docs)

    def pairs(self):
        out = self.root / "pairs"
        out.mkdir(parents=True, exist_ok=True)
        per = self.sizes.pairs_per_shard
        for shard in range(0, self.sizes.pairs, per):
            path = out / f"pairs-{shard // per:05d}.tar"
            tmp = path.with_name(f".{path.name}.tmp")
            with tarfile.open(tmp, "w") as tar:
                for i in range(shard, min(shard + per, self.sizes.pairs)):
                    # single-object scenes half of the time: what text-to-image is checked on
                    scene = S.random_scene(self.rng, 1 if i % 2 == 0 else self.sizes.max_objects)
                    self.graphs.append({"file": f"pairs/{path.name}#{i:06d}", "style": "plain", **scene.to_dict()})
                    for name, data in (
                        (f"{i:06d}.png", _png(S.render(scene, self.sizes.image_size))),
                        (f"{i:06d}.json", json.dumps({"caption": S.short_caption(scene) + "."}).encode()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)

    def llava(self):
        out = self.root / "llava"
        images = out / "images"
        records = []
        for i in range(self.sizes.llava_images):
            scene = S.random_scene(self.rng, self.sizes.max_objects)
            name = self.image(images, f"q{i:05d}.png", scene)
            conv = []
            turns = S.scene_questions(scene, self.rng, 4) + [(CAPTION_QUESTION, S.caption(scene))]
            if len(scene.objects) == 1:
                true = scene.objects[0].shape
                label = true if self.rng.random() < 0.5 else self.rng.choice([x for x in S.SHAPES if x != true])
                turns.append((main_object_question(label), "yes" if label == true else "no"))
            turns = [(q + YES_NO_SUFFIX if a in ("yes", "no") and self.rng.random() < 0.5 else q, a) for q, a in turns]
            for k, (q, a) in enumerate(turns):
                conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
                conv.append({"from": "gpt", "value": a})
            records.append({"id": f"world-{i}", "image": name, "conversations": conv})
        _atomic_json(out / "llava.json", records)

    def grounding(self):
        """``llava/grounding.json`` (images in ``llava/images``): the optional yes/no warm-up of stage 2
        (``--grounding-steps``). Single-object scenes, four main-object questions each (the true shape twice, two
        others), and every record once more with a short description before each question ("a big red circle. Is
        a circle the main object in this image?"). The described copies are answerable from the text alone, which
        the world's LLM learns by matching words; the same heads then learn to read the answer off the image of the
        plain copies (trained on plain records alone, or mixed into the LLaVA set, the answer stayed constant)."""
        out = self.root / "llava"
        images = out / "images"
        records = []
        for i in range(self.sizes.grounding_images):
            scene = S.random_scene(self.rng, 1)
            name = self.image(images, f"g{i:05d}.png", scene)
            obj = scene.objects[0]
            others = [x for x in S.SHAPES if x != obj.shape]
            turns = [
                (obj.shape, "yes"),
                (obj.shape, "yes"),
                (self.rng.choice(others), "no"),
                (self.rng.choice(others), "no"),
            ]
            self.rng.shuffle(turns)
            for tag, prefix in (("", ""), ("-described", f"a {obj.size} {obj.colour} {obj.shape}. ")):
                conv = []
                for k, (shape, answer) in enumerate(turns):
                    question = prefix + main_object_question(shape)
                    conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
                    conv.append({"from": "gpt", "value": answer})
                records.append({"id": f"world-grounding-{i}{tag}", "image": name, "conversations": conv})
        _atomic_json(out / "grounding.json", records)

    def referring(self, folder: str = "referring", count: int | None = None, name: str = "refs.json"):
        from pycocotools import mask as mask_utils

        out, images = self.root / folder, self.root / folder / "images"
        coco = {
            "images": [],
            "annotations": [],
            "categories": [{"id": i + 1, "name": s} for i, s in enumerate(S.SHAPES)],
        }
        size = self.sizes.image_size
        for i in range(count if count is not None else self.sizes.referring_images):
            scene = S.random_scene(self.rng, self.sizes.max_objects)
            file = self.image(images, f"r{i:05d}.png", scene)
            coco["images"].append({"id": i + 1, "file_name": file, "height": size, "width": size})
            for obj in scene.objects:
                rle = mask_utils.encode(np.asfortranarray(S.object_mask(obj, size).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0, x1, y1 = S._box(obj, size)
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": i + 1,
                        "category_id": S.SHAPES.index(obj.shape) + 1,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "iscrowd": 0,
                        "caption": f"a {obj.colour} {obj.shape}",
                    }
                )
        _atomic_json(out / name, coco)
        if folder.startswith("eval"):  # also the refer layout deem.evaluation reads (refcocog-region-caption)
            from pycocotools import mask as mask_utils

            from deem.evaluation import write_refcoco

            files = {im["id"]: im["file_name"] for im in coco["images"]}
            records = [
                {
                    "ref_id": a["id"],
                    "image_id": a["image_id"],
                    "file_name": files[a["image_id"]],
                    "height": size,
                    "width": size,
                    "mask": mask_utils.decode(a["segmentation"]).astype(bool),
                    "sentences": [a["caption"]],
                    "split": "val",
                }
                for a in coco["annotations"]
            ]
            write_refcoco(records, out / "refcocog", dataset="refcocog")

    # -- evaluation sets

    def pope(self):
        """POPE-style existence questions (the official jsonl: question_id, image, text, label), one file per
        negative sampling: random (any absent object), popular (the most frequent absent ones), adversarial (absent
        objects that share a colour or a shape with a present one)."""
        out, images = self.root / "eval" / "pope", self.root / "eval" / "pope" / "images"
        freq = {(s, c): 0 for s in S.SHAPES for c in S.COLOURS}
        scenes_ = []
        for i in range(self.sizes.pope_images):
            scene = S.random_scene(self.rng, self.sizes.max_objects)
            scenes_.append((self.image(images, f"p{i:05d}.png", scene), scene))
            for o in scene.objects:
                freq[(o.shape, o.colour)] += 1
        popular = sorted(freq, key=lambda k: -freq[k])
        for split in SPLITS:
            rows = []
            for name, scene in scenes_:
                present = [(o.shape, o.colour) for o in scene.objects]
                absent = [k for k in freq if k not in present]
                if split == "random":
                    negatives = self.rng.sample(absent, len(present))
                elif split == "popular":
                    negatives = [k for k in popular if k in absent][: len(present)]
                else:
                    near = [k for k in absent if any(k[0] == p[0] or k[1] == p[1] for p in present)]
                    negatives = self.rng.sample(near, min(len(near), len(present)))
                for (shape, colour), label in [(p, "yes") for p in present] + [(n, "no") for n in negatives]:
                    rows.append(
                        {
                            "question_id": len(rows),
                            "image": name,
                            "text": S.existence_question(shape, colour),
                            "label": label,
                        }
                    )
            _atomic_lines(out / f"world_pope_{split}.jsonl", rows)

    def robust(self):
        """RobustVQA-style sets: single-object images, "Is {shape} the main object in this image?", one label per
        image (answer yes for the true shape, no for another), in the training rendition (``in``) and in each
        out-of-distribution rendition (``ood``)."""
        out = self.root / "eval" / "robustvqa"
        official = {}  # deem.evaluation's robustvqa_test.json: imagenet_v2 = in-distribution, imagenet_r = renditions
        for split, styles in (("in", ("plain",)), ("ood", S.OOD_STYLES)):
            rows, records = [], []
            images = out / split
            for i in range(self.sizes.robust_images):
                scene = S.random_scene(self.rng, 1)
                style = styles[i % len(styles)]
                name = self.image(images, f"o{i:05d}.png", scene, style=style, seed=i)
                true = scene.objects[0].shape
                other = self.rng.choice([s for s in S.SHAPES if s != true])
                records.append(
                    {"file_name": f"{split}/{name}", "gt_caption": f"a {true}", "error_caption": f"a {other}"}
                )
                for label, answer in ((true, "yes"), (other, "no")):
                    rows.append(
                        {
                            "question_id": len(rows),
                            "image": name,
                            "label": f"a {label}",
                            "text": main_object_question(label),
                            "answer": answer,
                            "style": style,
                        }
                    )
            _atomic_lines(out / f"world_robustvqa_{split}.jsonl", rows)
            official["imagenet_v2" if split == "in" else "imagenet_r"] = records
        from deem.evaluation import write_robustvqa

        write_robustvqa(official, out / "robustvqa_test.json")

    def captions(self):
        """COCO-caption style test set: images + annotations with 3 reference captions each."""
        out, images = self.root / "eval" / "caption", self.root / "eval" / "caption" / "images"
        coco = {"images": [], "annotations": []}
        for i in range(self.sizes.caption_images):
            scene = S.random_scene(self.rng, self.sizes.max_objects)
            coco["images"].append({"id": i + 1, "file_name": self.image(images, f"c{i:05d}.png", scene)})
            for v in range(3):
                coco["annotations"].append(
                    {"id": len(coco["annotations"]) + 1, "image_id": i + 1, "caption": S.caption(scene, v)}
                )
        _atomic_json(out / "captions.json", coco)

    def prompts(self):
        """Text-to-image prompts (single objects: every colour and shape) and story openings for drawing."""
        out = self.root / "eval" / "draw"
        rows = []
        for i in range(self.sizes.draw_prompts):
            obj = S.Obj(S.SHAPES[i % len(S.SHAPES)], list(S.COLOURS)[(i // len(S.SHAPES) + i) % len(S.COLOURS)])
            rows.append({"prompt": S.short_caption(S.Scene((obj,))) + ".", "colour": obj.colour, "shape": obj.shape})
        _atomic_lines(out / "text2image.jsonl", rows)
        stories = []
        for i in range(self.sizes.stories):
            scene = S.random_scene(self.rng, 1)
            stories.append({"prompt": f"There is {S.caption(scene)}"[:-1] + ".", **scene.to_dict()})
        _atomic_lines(out / "stories.jsonl", stories)


def write_world_data(root, sizes: WorldSizes | None = None, seed: int = 0) -> Path:
    """Write every training and evaluation set of the world into ``root`` (a new folder; see the module docstring)."""
    from deem.conversion.assemble import staged_output_dir

    sizes = sizes or WorldSizes()
    root = Path(root)
    with staged_output_dir(root, overwrite=True) as tmp:
        w = _Writer(Path(tmp), sizes, seed)
        w.mmc4()
        w.pairs()
        w.llava()
        w.referring()
        w.pope()
        w.robust()
        w.captions()
        w.referring(folder="eval/region", count=sizes.region_images, name="regions.json")
        w.prompts()
        w.grounding()  # last: the sets above are the same as before it existed
        _atomic_lines(Path(tmp) / "scenes.jsonl", w.graphs)
        _atomic_json(Path(tmp) / "world.json", {"seed": seed, **sizes.__dict__})
    return root


def world_text(seed: int = 0, n: int = 3000) -> list[str]:
    """Sentences of the world (captions, changes, questions, answers, the prompt templates): the corpus of the
    tokenizer and of the language model's pretraining."""
    from deem.modeling.prompts import TEMPLATES

    rng = random.Random(seed)
    lines = []
    for t in TEMPLATES.values():
        lines += [t.system.strip(), t.user.replace("{image}", " ").replace("{question}", "").strip(), t.assistant]
    for _ in range(n):
        scene = S.random_scene(rng)
        lines.append(S.caption(scene, rng.randint(0, 2)))
        lines.append(S.short_caption(scene) + ".")
        nxt, change = S.change_scene(scene, rng)
        lines.append(f"There is {S.caption(scene)}"[:-1] + ". " + change + " " + S.caption(nxt))
        for q, a in S.scene_questions(scene, rng, 4):
            lines.append(f"{q} The answer is {a}.")
        lines.append(f"Is {rng.choice(S.SHAPES)} the main object in this image? Please anwser yes or no")
    return lines
