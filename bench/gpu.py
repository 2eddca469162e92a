"""Absolute timings on an accelerator: ``python -m deem.bench.gpu`` (7B default config, random weights, bf16).

Rows: stage-1 training step (forward + backward) at batch 4 with and without CSR, greedy decode tok/s with the
prompt's images, seconds per 512-px image at 50 denoising steps (first image of a document, and with a previous
image). The model is first built on the meta device (parameter count and bytes, no memory), then built on the
device itself with initialisation skipped and every parameter drawn there (no host copy of 7B weights). Runs on
CPU at the tiny size (``--size tiny --device cpu``), which is how the test suite checks it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from transformers.utils import logging

logger = logging.get_logger(__name__)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def build_on_device(size: str, device, dtype):
    """(model, parameter count): meta build for the count, then the real model built on ``device``."""
    import torch
    from transformers.initialization import no_init_weights

    from deem import DeemConfig, DeemForInterleavedGeneration

    config = DeemConfig() if size == "7b" else DeemConfig.tiny()
    with torch.device("meta"):
        count = sum(p.numel() for p in DeemForInterleavedGeneration(config).parameters())
    logger.info(f"{size}: {count / 1e9:.2f} B parameters, {count * 2 / 2**30:.1f} GiB in bf16")
    torch.manual_seed(0)
    with torch.device(device), no_init_weights():
        model = DeemForInterleavedGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for layer in model.language_model.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.gate.fill_(0.5)
    model.to(dtype)
    if model.vae is not None:
        model.vae.float()  # the VAE stays fp32 (its encode / decode run in fp32)
    return model, count


def _batch(config, device, rows: int, generator):
    import torch

    q, soi, img = config.num_image_tokens, config.soi_token_id, config.image_token_id
    bos, eos = config.bos_token_id, config.eos_token_id

    def text(n):
        return torch.randint(3, config.original_vocab_size - 2, (n,), generator=generator).tolist()

    seqs = [[bos] + text(32) + [soi] + [img] * q + text(32) + [soi] + [img] * q + text(16) + [eos] for _ in range(rows)]
    vis, dec = config.vision_config.image_size, config.diffusion_config.image_size
    return {
        "input_ids": torch.tensor(seqs, device=device),
        "attention_mask": torch.ones(rows, len(seqs[0]), dtype=torch.long, device=device),
        "pixel_values": torch.rand(2 * rows, 3, vis, vis, generator=generator).to(device),
        "pixel_values_decoder": torch.rand(2 * rows, 3, dec, dec, generator=generator).to(device),
        "num_images": torch.full((rows,), 2, device=device),
    }


def run(
    size: str = "7b",
    device: str | None = None,
    batch: int = 4,
    steps: int = 50,
    new_tokens: int = 64,
    repeats: int = 3,
    pixels: int | None = None,
) -> dict:
    """Measure the rows on ``device`` (default CUDA if available) and return ``{"rows": [...], ...}``."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, count = build_on_device(size, dev, dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    rows = []

    model.set_training_stage(1)
    model.train()
    data = _batch(cfg, dev, batch, g)
    data["pixel_values"] = data["pixel_values"].to(dtype)

    def step(**weights):
        model.zero_grad(set_to_none=True)
        model(**data, **weights).loss.backward()

    full = _timed(step, dev, repeats)
    no_csr = _timed(lambda: step(loss_csr_weight=0.0), dev, repeats)
    model.zero_grad(set_to_none=True)
    rows.append((f"stage-1 step, batch {batch}, full", f"{statistics.median(full):.3f} s"))
    rows.append((f"stage-1 step, batch {batch}, without CSR", f"{statistics.median(no_csr):.3f} s"))
    rows.append(("stage-1 CSR overhead (full / without)", f"{statistics.median(full) / statistics.median(no_csr):.2f}"))

    model.eval()
    prompt = _batch(cfg, dev, 2, g)
    ids, mask = prompt["input_ids"][:, :-1], prompt["attention_mask"][:, :-1]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, soi="stop")
    with torch.no_grad():
        dec = _timed(
            lambda: model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=prompt["pixel_values"].to(dtype),
                num_images=prompt["num_images"],
                **kw,
            ),
            dev,
            repeats,
        )
    rows.append(
        (
            f"greedy decode with the prompt's images, batch 2, {new_tokens} tokens",
            f"{2 * new_tokens / statistics.median(dec):.1f} tok/s",
        )
    )

    pipe = model.image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    side = pixels or cfg.diffusion_config.image_size
    q = cfg.decoder_perceiver_config.num_queries
    cond = torch.randn(1, q, model.unet.config.cross_attention_dim, generator=g).to(dev, dtype)
    vis = cfg.vision_config.image_size
    with torch.no_grad():
        maps = list(model.image_encoder(torch.rand(1, 3, vis, vis, generator=g).to(dev, dtype)).multiscale_features)
        common = dict(prompt_embeds=cond, num_inference_steps=steps, height=side, width=side, output_type="pt")
        first = _timed(lambda: pipe(**common), dev, max(1, repeats - 1))
        prev = _timed(lambda: pipe(**common, side_features=maps), dev, max(1, repeats - 1))
    rows.append((f"{side}-px image, {steps} steps, CFG, no previous image", f"{statistics.median(first):.2f} s"))
    rows.append((f"{side}-px image, {steps} steps, CFG, with a previous image", f"{statistics.median(prev):.2f} s"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"size": size, "device": name, "dtype": str(dtype), "parameters": count, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        f"{result['size']} model ({result['parameters'] / 1e9:.2f} B parameters, random weights), {result['dtype']} "
        f"on {result['device']}",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    lines += [f"| {m} | {v} |" for m, v in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deem.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args.size, args.device, args.batch, args.steps, args.new_tokens, args.repeats)
    print(to_markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
