"""t2i-fid: images drawn with ``model.generate_images`` from the text-to-image prompt, FID against the reference
images with torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's Inception, weights from the path the
user gives -- nothing is downloaded -- or a user feature extractor ``"module:callable"`` returning a module that
maps uint8 [N, 3, 299, 299] images to [N, D] features). ``samples_per_prompt > 1`` draws several images per prompt
and keeps the one a CLIP scorer (a transformers CLIP model folder) rates highest against the caption."""

from __future__ import annotations

import importlib
import io
import zlib
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["feature_extractor", "run_fid_generation", "score_fid"]

FID_SIZE = 299  # the Inception's input side: real and drawn images are resized to it (bicubic) before features


def feature_extractor(options: dict):
    """The FID feature module: torch-fidelity's Inception from ``inception_weights``, or the user's callable."""
    if options.get("feature_extractor"):
        spec = options["feature_extractor"]
        module_name, _, attr = str(spec).partition(":")
        if not attr:
            raise ValueError(f"feature_extractor must be 'module:callable', got {spec!r}")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"feature_extractor {spec!r} cannot be imported ({err})") from None
        return factory()
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=["2048"],
        feature_extractor_weights_path=str(options["inception_weights"]),
    )


def _uint8(images, device):
    import numpy as np
    import PIL.Image
    import torch

    arrays = []
    for im in images:
        im = im.convert("RGB").resize((FID_SIZE, FID_SIZE), PIL.Image.BICUBIC)
        arrays.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(arrays).to(device)


def _clip_rank(clip_dir, caption: str, images) -> tuple[int, list[float]]:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    cache = _clip_rank.__dict__.setdefault("cache", {})
    if clip_dir not in cache:
        cache[clip_dir] = (CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir))
    model, processor = cache[clip_dir]
    with torch.no_grad():
        inputs = processor(text=[caption], images=images, return_tensors="pt", padding=True)
        scores = model(**inputs).logits_per_image[:, 0].tolist()
    return max(range(len(scores)), key=scores.__getitem__), scores


def run_fid_generation(model, processor, shard, appender, out: Path, batch_size, options, device, progress):
    """Draw each pending prompt's image(s), keep one, save it as ``out/images/<id>.png``, append its record."""
    import torch
    from torchvision.transforms.functional import to_pil_image

    from .formats import atomic_write

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    n = options["samples_per_prompt"]
    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]
        enc = processor(text=[s["prompt"] for s in batch], padding_side="left", return_tensors="pt")
        draws = []
        for k in range(n):
            gens = [
                torch.Generator().manual_seed(options["seed"] + 7919 * k + zlib.crc32(s["id"].encode())) for s in batch
            ]
            kwargs = {
                "num_inference_steps": options["num_inference_steps"],
                "guidance_scale": options["guidance_scale"],
            }
            if options.get("image_size"):
                kwargs["height"] = kwargs["width"] = options["image_size"]
            images = model.generate_images(
                enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), generator=gens, **kwargs
            )
            draws.append([to_pil_image(im.float().clamp(0, 1).cpu()) for im in images])
        records = []
        for b, s in enumerate(batch):
            candidates = [d[b] for d in draws]
            record = {"id": s["id"], "image": f"images/{s['id']}.png"}
            pick = 0
            if n > 1:
                pick, scores = _clip_rank(options["clip_scorer"], s["caption"], candidates)
                record["clip_scores"] = scores
            buf = io.BytesIO()
            candidates[pick].save(buf, format="PNG")
            atomic_write(folder / f"{s['id']}.png", buf.getvalue())
            records.append(record)
        appender.write(records)
        progress.update(len(batch))


def score_fid(samples, records, out: Path, options, device) -> dict:
    """FID of the drawn images against the samples' reference images (torchmetrics)."""
    import PIL.Image
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(samples) < 2:
        raise ValueError(f"FID needs at least 2 images per side, got {len(samples)}")
    module = feature_extractor(options)
    metric = FrechetInceptionDistance(feature=module, normalize=False).to(device)
    chunk = 16
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        real = [PIL.Image.open(s["images"][0]) for s in part]
        fake = [PIL.Image.open(out / records[s["id"]]["image"]) for s in part]
        with torch.no_grad():
            metric.update(_uint8(real, device), real=True)
            metric.update(_uint8(fake, device), real=False)
    value = float(metric.compute())
    return {"fid": value, "num_images": len(samples), "samples_per_prompt": options["samples_per_prompt"]}
