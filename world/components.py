"""Stage 0: the three components DEEM is assembled from, pretrained on the world and written in their real formats
(what Vicuna, SD-2.1 and the CLIP ConvNeXt are in the paper):

* ``llm/``: a LLaMA language model (``LlamaForCausalLM.save_pretrained``) + a LLaMA-style byte-fallback BPE tokenizer
  (``tokenizers``) trained on the world's text;
* ``sd/``: a Stable-Diffusion-style text-to-image model in diffusers layout (``vae/``, ``unet/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``, ``model_index.json``): the VAE trained to reconstruct world images, then the UNet
  and the CLIP text encoder trained together on captioned world images (epsilon prediction, 10 % empty prompts);
* ``open_clip_pytorch_model.safetensors``: an open_clip-layout checkpoint (``visual.trunk.*`` a timm ConvNeXt,
  ``visual.head.proj``, a bag-of-words text tower, ``logit_scale``) trained contrastively on image-caption pairs.

`pretrain_components(out, ...)` trains and writes all three (`deem.world.components` ships the result of
``python -m deem.world.components --out world/pretrained``); `deem assemble` then builds the DEEM from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

from deem.modeling.configuration_deem import SD21_BASE_SCHEDULER

from . import scenes as S
from .formats import world_text

logger = logging.get_logger(__name__)

SD_TEXT_LEN = 48
SHIPPED = Path(__file__).resolve().parent / "pretrained"


@dataclass
class ComponentSizes:
    image_size: int = 32
    vocab_size: int = 480
    llm_hidden: int = 96
    llm_layers: int = 3
    llm_steps: int = 300
    vae_steps: int = 1500
    unet_steps: int = 4000
    clip_steps: int = 300
    batch_size: int = 32
    corpus_scenes: int = 3000  # scenes whose sentences make the tokenizer's and the LLM's corpus
    unet_single_object: float = 0.8  # share of one-object scenes in the UNet's captioned images

    @classmethod
    def quick(cls) -> "ComponentSizes":
        return cls(llm_hidden=64, llm_layers=2, llm_steps=30, vae_steps=30, unet_steps=30, clip_steps=30)


def _progress(name, steps):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=name, leave=False, disable=logging.is_progress_bar_enabled() is False)


def _set_lr(opt, step: int, steps: int, peak: float, warmup: int, floor: float = 0.0) -> None:
    """Every group of ``opt`` at ``peak`` x linear warm-up over ``warmup`` steps x a cosine over ``steps`` from 1
    down to ``floor`` (the schedule of each component's pretraining)."""
    cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps))
    lr = peak * min(1.0, (step + 1) / warmup) * cosine
    for group in opt.param_groups:
        group["lr"] = lr


def _images(rng: random.Random, n: int, size: int, max_objects: int = 3, single: float = 0.5):
    scenes_ = [S.random_scene(rng, 1 if rng.random() < single else max_objects) for _ in range(n)]
    pixels = np.stack([np.asarray(S.render(s, size)) for s in scenes_]).astype(np.float32) / 127.5 - 1.0
    return scenes_, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------- tokenizer, LLM


def train_tokenizer(lines: list[str], vocab_size: int):
    """A LLaMA-style tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, byte pieces, ``▁`` word prefix) trained on
    ``lines``, as a transformers ``LlamaTokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(lines, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=True, add_bos_token=True, add_eos_token=False)


def pretrain_llm(out: Path, sizes: ComponentSizes, seed: int = 0) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    lines = world_text(seed, n=sizes.corpus_scenes)
    tokenizer = train_tokenizer(lines, sizes.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.llm_hidden,
        intermediate_size=sizes.llm_hidden * 2,
        num_hidden_layers=sizes.llm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = [tokenizer(line).input_ids + [2] for line in lines]
    stream = [t for row in ids for t in row]
    block = 64
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in _progress("LLM", sizes.llm_steps):
        _set_lr(opt, step, sizes.llm_steps, 3e-3, 20)
        batch = blocks[torch.randint(0, len(blocks), (sizes.batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])), "vocab": len(tokenizer)}


# ---------------------------------------------------------------------------------------------------- Stable Diffusion

UNET = {
    "act_fn": "silu",
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "center_input_sample": False,
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
VAE = {
    "act_fn": "silu",
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
}
SCHEDULER = {  # SD 2.1-base's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    **SD21_BASE_SCHEDULER,
    "skip_prk_steps": True,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.8.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(symbols: list[str], ranks: dict) -> list[str]:
    """CLIP's BPE on one word's symbols: merge the adjacent pair of lowest rank until none is ranked."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def world_words() -> list[str]:
    """The words of the world's text-to-image prompts (`scenes.short_caption`)."""
    return ["a", "an", "and", *S.COLOURS, *S.SHAPES]


def clip_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) under which every word of ``words`` is one token ``"{word}</w>"``: each word's
    remaining pieces are merged pairwise, so merges an earlier word added (which may split a later one
    differently) are kept and built upon."""
    ranks: dict = {}
    for word in words:
        while len(pieces := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
    return list(ranks)


def write_clip_tokenizer(path: Path, max_length: int = SD_TEXT_LEN, pad_token: str = "<|endoftext|>") -> int:
    """SD's ``tokenizer/``: a byte-level CLIP BPE (vocab.json + merges.txt, "</w>" word ends) whose merges make
    every world word one token (`world_words`; any other text falls back to characters); returns the vocabulary
    size."""
    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = clip_merges(world_words())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in tokens))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special["pad_token"] = pad_token
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "errors": "replace"}))
    return len(tokens)


def _attribute_accuracy(images: torch.Tensor, targets: list[tuple[str, str]]) -> dict:
    """How often the detector's largest object in each image of a [-1, 1] batch has its target's colour / shape
    (an image where it finds nothing counts as wrong)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    found = [next(iter(S.detect(p.numpy())), None) for p in pixels]
    n = len(targets)
    return {
        "colour": sum(d is not None and d["colour"] == c for d, (c, _) in zip(found, targets)) / n,
        "shape": sum(d is not None and d["shape"] == s for d, (_, s) in zip(found, targets)) / n,
    }


@torch.no_grad()
def reconstruction_scores(vae, size: int = 32, n: int = 200, seed: int = 123) -> dict:
    """How often the detector still names the right colour / shape after the VAE's encode + decode of one-object
    renders (``renders``: the same on the renders themselves, the detector's own ceiling)."""
    scenes_, x = _images(random.Random(seed), n, size, single=1.0)
    targets = [(s.objects[0].colour, s.objects[0].shape) for s in scenes_]
    reconstructions = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return {
        "renders": _attribute_accuracy(x, targets),
        "reconstructions": _attribute_accuracy(reconstructions, targets),
    }


@torch.no_grad()
def sd_prompt_following(sd_dir, per_prompt: int = 2, steps: int = 20, guidance_scale: float = 5.0, seed: int = 0):
    """The SD component on its own, as a diffusers user runs it: `StableDiffusionPipeline` (DDIM, ``steps``,
    classifier-free guidance) on "a {colour} {shape}." for every colour and shape; the detector scores what it
    draws. Chance is 1 / colours and 1 / shapes."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    targets = [(c, s) for c in S.COLOURS for s in S.SHAPES for _ in range(per_prompt)]
    size = pipe.vae.config.sample_size
    images = pipe(
        [f"a {c} {s}." for c, s in targets],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return {
        **_attribute_accuracy(images * 2 - 1, targets),
        "chance": {"colour": 1 / len(S.COLOURS), "shape": 1 / len(S.SHAPES)},
        "images": len(targets),
        "steps": steps,
        "guidance_scale": guidance_scale,
    }


def pretrain_sd(out: Path, sizes: ComponentSizes, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    rng = random.Random(seed + 1)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    report = {}
    for step in _progress("VAE", sizes.vae_steps):
        # warm-up, then cosine to 5 %: 150 constant-rate steps left reconstructions that named the wrong colour in
        # 2 of 3 images (red drawn orange, green grey), which no UNet trained on the latents can undo
        _set_lr(opt, step, sizes.vae_steps, 2e-3, 30, floor=0.05)
        _, x = _images(rng, sizes.batch_size, sizes.image_size)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        loss.backward()
        opt.step()
        opt.zero_grad()
        report.setdefault("vae_first", float(loss.detach()))
        report["vae_last"] = float(loss.detach())
    vae.eval().requires_grad_(False)
    report["vae_reconstruction"] = reconstruction_scores(vae, sizes.image_size)
    with torch.no_grad():
        _, x = _images(rng, 128, sizes.image_size)
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    report["latent_scaling_factor"] = 1.0 / std

    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab = write_clip_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=UNET["cross_attention_dim"],
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SD_TEXT_LEN,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        projection_dim=UNET["cross_attention_dim"],
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**UNET)
    noise_sched = DDPMScheduler(
        **{
            k: v
            for k, v in SCHEDULER.items()
            if k in ("beta_end", "beta_schedule", "beta_start", "num_train_timesteps")
        }
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sf = vae.config.scaling_factor
    for step in _progress("UNet", sizes.unet_steps):
        _set_lr(opt, step, sizes.unet_steps, 1e-3, 50, floor=0.1)
        scenes_, x = _images(rng, sizes.batch_size, sizes.image_size, single=sizes.unet_single_object)
        prompts = [S.short_caption(s) + "." if rng.random() > 0.1 else "" for s in scenes_]
        ids = tokenizer(prompts, padding="max_length", max_length=SD_TEXT_LEN, truncation=True, return_tensors="pt")
        cond = text_encoder(ids.input_ids).last_hidden_state
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * sf
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(noise_sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        value = float(loss.detach())
        report.setdefault("unet_first", value)
        report["unet_last"] = 0.98 * report.get("unet_last", value) + 0.02 * value
    vae.save_pretrained(out / "vae")
    unet.eval().save_pretrained(out / "unet")
    text_encoder.eval().save_pretrained(out / "text_encoder")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    report["prompt_following"] = sd_prompt_following(out)
    return report


# ---------------------------------------------------------------------------------------------------- CLIP ConvNeXt


def pretrain_clip(path: Path, tokenizer, sizes: ComponentSizes, seed: int = 0) -> dict:
    """Contrastive (InfoNCE both ways) ConvNeXt + bag-of-words text tower; open_clip keys, safetensors."""
    from safetensors.torch import save_file
    from timm.models.convnext import ConvNeXt

    rng = random.Random(seed + 2)
    torch.manual_seed(seed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    dims = (16, 32, 64, 96)
    trunk = ConvNeXt(in_chans=3, depths=(1, 1, 1, 1), dims=dims, num_classes=0, drop_path_rate=0.0)
    width = 64
    head = torch.nn.Linear(dims[-1], width, bias=False)
    token_embedding = torch.nn.Embedding(len(tokenizer), width)
    text_projection = torch.nn.Parameter(torch.eye(width))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*trunk.parameters(), *head.parameters(), *token_embedding.parameters(), text_projection, logit_scale]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    accs = []
    for step in _progress("CLIP", sizes.clip_steps):
        _set_lr(opt, step, sizes.clip_steps, 2e-3, 20)
        scenes_, x = _images(rng, sizes.batch_size * 2, sizes.image_size)
        x = ((x + 1) / 2 - mean) / std
        image = F.normalize(head(trunk(x)), dim=-1)
        texts = [S.caption(s, rng.randint(0, 2)) for s in scenes_]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        emb = token_embedding(enc.input_ids) * enc.attention_mask[..., None]
        text = F.normalize((emb.sum(1) / enc.attention_mask.sum(1, keepdim=True)) @ text_projection, dim=-1)
        logits = logit_scale.exp().clamp(max=100) * image @ text.T
        labels = torch.arange(len(texts))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
        accs.append(float((logits.argmax(1) == labels).float().mean()))
    state = {f"visual.trunk.{k}": v.detach().clone().contiguous() for k, v in trunk.state_dict().items()}
    state["visual.head.proj.weight"] = head.weight.detach().clone()
    state["token_embedding.weight"] = token_embedding.weight.detach().clone()
    state["text_projection"] = text_projection.detach().clone()
    state["logit_scale"] = logit_scale.detach().clone()
    save_file(state, str(path))
    return {"clip_batch_acc_last": float(np.mean(accs[-10:])), "chance": 1.0 / (sizes.batch_size * 2)}


def pretrain_components(out, sizes: ComponentSizes | None = None, seed: int = 0) -> dict:
    """Train and write ``out/llm``, ``out/sd``, ``out/open_clip_pytorch_model.safetensors`` (+ ``report.json``)."""
    from deem.conversion.assemble import staged_output_dir

    sizes = sizes or ComponentSizes()
    report = {"sizes": asdict(sizes), "seed": seed, "seconds": {}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "report.json"
    if done_file.is_file():
        report = json.loads(done_file.read_text())
        report.setdefault("seconds", {})
        report["sizes"] = asdict(sizes)  # the components trained now use these; a resumed one was the same command
    from transformers import AutoTokenizer

    # each component is written to a new folder beside its place and renamed when complete: a rerun keeps the
    # finished ones (resume)
    for name, target in (
        ("llm", out / "llm"),
        ("clip", out / "open_clip_pytorch_model.safetensors"),
        ("sd", out / "sd"),
    ):
        if target.exists() and name in report:
            continue
        start = time.time()
        with staged_output_dir(out / f".{name}.staging", overwrite=True) as tmp:
            tmp = Path(tmp)
            if name == "llm":
                report[name] = pretrain_llm(tmp / "llm", sizes, seed)
            elif name == "clip":
                tokenizer = AutoTokenizer.from_pretrained(out / "llm")
                report[name] = pretrain_clip(tmp / target.name, tokenizer, sizes, seed)
            else:
                report[name] = pretrain_sd(tmp / "sd", sizes, seed)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(tmp / target.name, target)
        shutil.rmtree(out / f".{name}.staging", ignore_errors=True)
        report["seconds"][name] = round(time.time() - start, 1)
        tmp_report = out / ".report.json.tmp"
        tmp_report.write_text(json.dumps(report, indent=2))
        os.replace(tmp_report, done_file)
    return report


def component_paths(root) -> dict:
    root = Path(root)
    return {"llm": root / "llm", "sd": root / "sd", "clip": root / "open_clip_pytorch_model.safetensors"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deem.world.components", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(SHIPPED))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = pretrain_components(args.out, ComponentSizes.quick() if args.quick else ComponentSizes(), args.seed)
    report["command"] = f"python -m deem.world.components --out {args.out} --seed {args.seed}" + (
        " --quick" if args.quick else ""
    )
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
