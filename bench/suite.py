"""Side-by-side benchmarks: our paths against the stock library paths a user would otherwise run.

Every benchmark builds both paths on the same weights and inputs in one process, runs a warm-up, then alternates
the paths over ``rounds`` paired rounds (the order flips every round) and reports, per ratio, the median and the
min-max over rounds. Threads and the load average are recorded with every run. Peak memory is measured in fresh
processes (one per variant). ``run_suite`` returns the rows; ``main`` (``python -m deem.bench`` / ``deem bench``)
prints them and writes ``bench.json`` + ``bench.md``.

Sizes: ``tiny`` (``DeemConfig.tiny``), ``fixture`` (parity fixture A's configuration, random weights) and ``100m``
(about 100 M parameters; slow on a small CPU, so only with ``--sizes ...,100m``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

REPO = Path(__file__).resolve().parents[1]
NOT_MEASURABLE = "not measurable here (original not installed)"
WARMUP = 1  # untimed calls of each path before the rounds (0 in smoke runs)
SIZES = ("tiny", "fixture", "100m")
BENCHMARKS = ("pipeline", "train", "decode", "interleaved", "memory")


# ------------------------------------------------------------------------------------------------ configs / inputs


def fixture_dir() -> Path:
    return Path(os.environ.get("DEEM_FIXTURES", REPO.parent / "shared" / "fixtures")) / "parity_a"


def build_config(size: str):
    """The DeemConfig of a benchmark size (random weights are built from it)."""
    from deem import DeemConfig

    if size == "tiny":
        return DeemConfig.tiny()
    if size == "fixture":
        from deem.conversion.original import config_from_original

        path = fixture_dir() / "configs.json"
        if not path.is_file():
            raise FileNotFoundError(f"fixture configs not found at {path} (set DEEM_FIXTURES)")
        c = json.loads(path.read_text())
        sd = c["stable_diffusion"]
        return config_from_original(
            c["model_config"],
            c["llama_config"],
            convnext=c["sniffer"]["timm_convnext"],
            unet=sd["unet/config.json"],
            vae=sd["vae/config.json"],
            scheduler=sd["scheduler/scheduler_config.json"],
            image_size=c["sniffer"]["adapter_default_config_override"]["image_size"],
        )
    if size == "100m":
        from deem.modeling.configuration_deem import SD21_BASE_UNET, SD21_BASE_VAE

        base = DeemConfig.tiny()
        return DeemConfig.tiny(
            vision_config=dict(
                depths=(1, 1, 2, 1), dims=(64, 128, 256, 512), embed_dim=256, image_size=128, grid_size=8
            ),
            perceiver_config=dict(
                base.perceiver_config.to_dict(),
                num_queries=16,
                hidden_size=256,
                encoder_hidden_size=256,
                num_attention_heads=8,
                intermediate_size=1024,
            ),
            text_config=dict(
                base.text_config.to_dict(),
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=11,
                num_attention_heads=12,
                num_key_value_heads=12,
                max_position_embeddings=512,
            ),
            cross_attention_config=dict(
                frequency=2, num_heads=16, num_points=2, base_spatial_shape=8, max_num_images=8
            ),
            decoder_perceiver_config=dict(
                base.decoder_perceiver_config.to_dict(),
                num_queries=16,
                hidden_size=512,
                encoder_hidden_size=768,
                num_hidden_layers=2,
                num_attention_heads=8,
                intermediate_size=1024,
            ),
            diffusion_config=dict(
                image_size=64,
                unet=dict(
                    SD21_BASE_UNET,
                    attention_head_dim=[4, 8, 8],
                    block_out_channels=[64, 128, 256],
                    cross_attention_dim=512,
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    layers_per_block=2,
                    norm_num_groups=32,
                    sample_size=8,
                ),
                vae=dict(
                    SD21_BASE_VAE,
                    block_out_channels=[32, 64, 64, 64],
                    down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4,
                    layers_per_block=1,
                    norm_num_groups=16,
                    sample_size=64,
                ),
                side_attn_dim=256,
                side_num_heads=8,
                side_num_points=4,
                side_spatial_shapes=(32, 16, 8, 4),
                side_max_num_images=4,
            ),
            image_embed_dim=256,
            num_image_tokens=16,
        )
    raise ValueError(f"unknown benchmark size {size!r}; choose from {', '.join(SIZES)}")


def build_model(size: str, seed: int = 0):
    """A random-weight model of ``size`` with every path visible (non-zero gates and side-network weights)."""
    import torch

    from deem import DeemForInterleavedGeneration

    torch.manual_seed(seed)
    model = DeemForInterleavedGeneration(build_config(size))
    with torch.no_grad():
        for layer in model.language_model.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.gate.fill_(0.5)
        model.soi_embedding.normal_(std=0.1)
        for p in model.unet_side.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model.eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def training_batch(config, seed: int = 0, text_only: bool = False):
    """Two rows of interleaved documents (row 0: text, image, text, image, text; row 1: image, text), right
    padded; decoder views for NIP / CSR. ``text_only``: the same rows without images."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q, soi, img = config.num_image_tokens, config.soi_token_id, config.image_token_id
    bos, eos, pad = config.bos_token_id, config.eos_token_id, config.pad_token_id

    def text(n):
        return torch.randint(3, config.original_vocab_size - 2, (n,), generator=g).tolist()

    if text_only:
        rows = [[bos] + text(8 + 2 * q) + [eos], [bos] + text(6 + q) + [eos]]
    else:
        rows = [
            [bos] + text(4) + [soi] + [img] * q + text(4) + [soi] + [img] * q + text(2) + [eos],
            [bos, soi] + [img] * q + text(6) + [eos],
        ]
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask}
    if not text_only:
        vis = config.vision_config.image_size
        dec = config.diffusion_config.image_size
        batch["pixel_values"] = torch.rand(3, 3, vis, vis, generator=g)
        batch["pixel_values_decoder"] = torch.rand(3, 3, dec, dec, generator=g)
        batch["num_images"] = torch.tensor([2, 1])
    return batch


# ------------------------------------------------------------------------------------------------ timing


def environment() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_1m_5m_15m": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "device": "cpu",
    }


def paired_times(
    paths: dict[str, Callable[[], object]], rounds: int, warmup: int | None = None, number: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of every path over ``rounds`` rounds; the paths alternate (order reversed every other
    round) after ``warmup`` untimed calls of each. ``number``: calls per timed sample (their mean), for paths short
    enough that one call's time is mostly the machine's noise."""
    names = list(paths)
    for _ in range(WARMUP if warmup is None else warmup):
        for name in names:
            paths[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(number):
                paths[name]()
            times[name].append((time.perf_counter() - start) / number)
    return times


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num/den -> median, min, max (and the paths' median seconds)."""
    ratios = [a / b for a, b in zip(num, den)]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "num_s": statistics.median(num),
        "den_s": statistics.median(den),
        "rounds": len(ratios),
    }


def row(measure: str, size: str, stats: dict | None, goal: str, today: str, ours: str, ref: str, note: str = ""):
    return {
        "measure": measure,
        "size": size,
        "ours": ours,
        "reference": ref,
        "stats": stats,
        "goal": goal,
        "today": today,
        "note": note,
    }


# ------------------------------------------------------------------------------------------------ benchmarks


def bench_pipeline(size: str, rounds: int, steps: int = 20, batch: int = 2, pixels: int = 64) -> list[dict]:
    """DeemImagePipeline (side network removed / on with no previous image / on with a previous image) against
    diffusers' StableDiffusionPipeline on the same UNet, VAE, scheduler, steps and CFG, conditioned on the same
    embeddings."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from deem.modeling.pipeline_deem import DeemImagePipeline

    model = build_model(size)
    sched = DDPMScheduler.from_config(model.noise_scheduler.config)
    ours = DeemImagePipeline.from_model(model, scheduler=sched)
    bare = DeemImagePipeline.from_model(model, scheduler=sched)
    bare.register_modules(side_network=None)  # the side network removed: the UNet alone
    stock = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=None,
        tokenizer=None,
        unet=model.unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for p in (ours, bare, stock):
        p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    q = model.config.decoder_perceiver_config.num_queries
    cond = torch.randn(batch, q, model.unet.config.cross_attention_dim, generator=g)
    neg = model.null_condition.detach().expand(batch, -1, -1).clone()
    vis = model.config.vision_config.image_size
    with torch.no_grad():
        maps = list(model.image_encoder(torch.rand(batch, 3, vis, vis, generator=g)).multiscale_features)
    common = dict(num_inference_steps=steps, guidance_scale=3.5, height=pixels, width=pixels, output_type="pt")

    def gen():
        return torch.Generator().manual_seed(1)

    paths = {
        "stock": lambda: stock(prompt_embeds=cond, negative_prompt_embeds=neg, generator=gen(), **common),
        "no_side": lambda: bare(prompt_embeds=cond, negative_prompt_embeds=neg, generator=gen(), **common),
        "no_previous": lambda: ours(prompt_embeds=cond, negative_prompt_embeds=neg, generator=gen(), **common),
        "previous": lambda: ours(
            prompt_embeds=cond, negative_prompt_embeds=neg, side_features=maps, generator=gen(), **common
        ),
    }
    with torch.no_grad():
        t = paired_times(paths, rounds)
    what = f"{steps} steps, batch {batch}, {pixels} px, CFG 3.5"
    return [
        row(
            f"pipeline, side network removed / diffusers StableDiffusionPipeline ({what})",
            size,
            ratio_stats(t["no_side"], t["stock"]),
            "<= 1.03",
            "2.23 (tiny), 1.81 (100M)",
            "DeemImagePipeline without side network",
            "StableDiffusionPipeline",
        ),
        row(
            "pipeline, side network on, no previous image / side network removed",
            size,
            ratio_stats(t["no_previous"], t["no_side"]),
            "<= 1.1",
            "64x stock",
            "DeemImagePipeline, no previous image",
            "DeemImagePipeline without side network",
        ),
        row(
            "pipeline, side network on, no previous image / stock",
            size,
            ratio_stats(t["no_previous"], t["stock"]),
            "<= 1.1x of side-network-removed",
            "64",
            "DeemImagePipeline, no previous image",
            "StableDiffusionPipeline",
        ),
        row(
            "pipeline, side network on, with a previous image / stock",
            size,
            ratio_stats(t["previous"], t["stock"]),
            "<= 2",
            "5.65",
            "DeemImagePipeline, previous image",
            "StableDiffusionPipeline",
        ),
    ]


def _train_step(model, batch, **weights):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **weights)
    out.loss.backward()
    return out.loss


def bench_train(size: str, rounds: int) -> list[dict]:
    """Stage-1 training step (forward + backward): full vs without CSR (loss_csr_weight=0), and text only."""
    import torch

    model = build_model(size)
    model.set_training_stage(1)
    model.train()
    batch = training_batch(model.config)
    text = training_batch(model.config, text_only=True)
    paths = {
        "full": lambda: _train_step(model, batch),
        "no_csr": lambda: _train_step(model, batch, loss_csr_weight=0.0),
        "text": lambda: _train_step(model, text),
    }
    torch.manual_seed(0)
    t = paired_times(paths, rounds)
    return [
        row(
            "stage-1 training step, full / without CSR",
            size,
            ratio_stats(t["full"], t["no_csr"]),
            "<= 1.3",
            "1.89 (paper 1.14 at 7B on A100; original here 1.73)",
            "full step",
            "step with loss_csr_weight=0",
        ),
        row(
            "stage-1 step, ours / the original's (no gradient checkpointing)",
            size,
            None,
            "<= 0.6",
            "0.80",
            f"{statistics.median(t['full']) * 1e3:.1f} ms/step",
            NOT_MEASURABLE,
        ),
        row(
            "text-only step, ours / the original's",
            size,
            None,
            "<= 0.9",
            "1.15",
            f"{statistics.median(t['text']) * 1e3:.1f} ms/step",
            NOT_MEASURABLE,
        ),
    ]


def llama_on_same_weights(model):
    """A ``LlamaForCausalLM`` holding our LLM's self-attention / MLP / norm / embedding weights and the text head's
    base rows (the cross-attention and the new-token head have no counterpart)."""
    import torch
    from transformers import LlamaForCausalLM

    text = model.config.text_config
    llama = LlamaForCausalLM(text).eval()
    ours = model.language_model.state_dict()
    state = {f"model.{k}": v for k, v in ours.items() if ".cross_attn." not in k}
    state["lm_head.weight"] = model.lm_head.base.weight
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        llama.model.embed_tokens.weight.copy_(model.language_model.embed_tokens.weight)
    return llama


def bench_decode(size: str, rounds: int, new_tokens: int = 32, batch: int = 2) -> list[dict]:
    """Greedy text decoding without images against ``LlamaForCausalLM.generate`` on the same weights, and greedy
    decoding with the prompt's images (ours, absolute)."""
    import torch

    model = build_model(size)
    cfg = model.config
    llama = llama_on_same_weights(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.original_vocab_size - 2, (batch, 12), generator=g)
    ids[:, 0] = cfg.bos_token_id
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=cfg.pad_token_id)
    img_batch = training_batch(cfg)
    img_ids = img_batch["input_ids"][:, :-2]
    img_mask = img_batch["attention_mask"][:, :-2]
    paths = {
        "ours": lambda: model.generate(input_ids=ids, attention_mask=mask, **kw),
        "llama": lambda: llama.generate(input_ids=ids, attention_mask=mask, **kw),
        "ours_images": lambda: model.generate(
            input_ids=img_ids,
            attention_mask=img_mask,
            pixel_values=img_batch["pixel_values"],
            num_images=img_batch["num_images"],
            soi="stop",
            **kw,
        ),
    }
    with torch.no_grad():
        # one call is ~0.1 s at the tiny size: 4 calls per sample, else the ratio is the machine's noise
        t = paired_times(paths, rounds, number=4 if new_tokens >= 16 else 1)
    tokps = batch * new_tokens / statistics.median(t["ours_images"])
    stats = ratio_stats(t["llama"], t["ours"])  # tok/s ours / stock = time stock / time ours
    return [
        row(
            f"text decoding without images, tok/s ours / LlamaForCausalLM.generate (batch {batch}, "
            f"{new_tokens} tokens)",
            size,
            stats,
            ">= 0.98",
            "0.84-0.91 (tiny), 0.96-0.99 (100M)",
            f"{batch * new_tokens / stats['den_s']:.0f} tok/s",
            f"{batch * new_tokens / stats['num_s']:.0f} tok/s",
        ),
        row(
            f"greedy decoding with the prompt's images, tok/s ours / the original's (batch {batch}, {new_tokens} tok)",
            size,
            None,
            ">= 1.5",
            "0.86",
            f"{tokps:.0f} tok/s",
            NOT_MEASURABLE,
        ),
    ]


def bench_interleaved(size: str, rounds: int, batch: int = 4, steps: int = 10, new_tokens: int = 8) -> list[dict]:
    """Interleaved ``generate(soi="draw")``: a batch of ``batch`` prompts ending in ``<|startofimage|>`` (one image
    per row, then ``new_tokens`` of text) against ``batch`` batch-1 calls; throughput ratio."""
    import torch

    model = build_model(size)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.original_vocab_size - 2, (batch, 8), generator=g)
    ids[:, 0] = cfg.bos_token_id
    ids[:, -1] = cfg.soi_token_id
    mask = torch.ones_like(ids)
    kw = dict(
        soi="draw",
        max_new_images=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_inference_steps=steps,
        return_dict_in_generate=True,
        do_sample=False,
    )

    def batched():
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        return model.generate(input_ids=ids, attention_mask=mask, generator=gens, **kw)

    def per_row():
        return [
            model.generate(
                input_ids=ids[i : i + 1],
                attention_mask=mask[i : i + 1],
                generator=[torch.Generator().manual_seed(i)],
                **kw,
            )
            for i in range(batch)
        ]

    with torch.no_grad():
        t = paired_times({"batched": batched, "per_row": per_row}, rounds)
    return [
        row(
            f"interleaved generate(soi='draw'), batch {batch} / {batch} batch-1 calls, throughput "
            f"({steps} denoising steps, {new_tokens} tokens)",
            size,
            ratio_stats(t["per_row"], t["batched"]),
            ">= 2.5",
            "1.57",
            f"one batched call ({statistics.median(t['batched']) * 1e3:.1f} ms)",
            f"{batch} batch-1 calls ({statistics.median(t['per_row']) * 1e3:.1f} ms)",
        )
    ]


# -------------------------------------- memory (fresh processes)

MEMORY_VARIANTS = ("full", "no_csr", "text", "full_checkpointing")


def _memory_child(size: str, variant: str, threads: int) -> dict:
    """In a fresh process: build the model, run two training steps of ``variant``; peak RSS (MiB) before the first
    step and at the end."""
    import gc
    import resource

    import torch

    torch.set_num_threads(threads)
    model = build_model(size)
    model.set_training_stage(1)
    model.train()
    if variant == "full_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = training_batch(model.config, text_only=variant == "text")
    weights = {"loss_csr_weight": 0.0} if variant == "no_csr" else {}
    gc.collect()
    before = _rss_mib("VmRSS")
    reset = _reset_peak_rss()  # Linux: VmHWM restarts from the current RSS, so the peak below is the steps'
    for _ in range(2):
        _train_step(model, batch, **weights)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps_peak = _rss_mib("VmHWM") if reset else process_peak
    return {
        "variant": variant,
        "peak_rss_mib": process_peak,
        "before_step_mib": before,
        "step_mib": max(steps_peak - before, 0.0),
        "step_peak_measured": reset,
    }


def _rss_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux ``/proc``), else the lifetime peak."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bench_memory(size: str, threads: int) -> list[dict]:
    """Peak RSS of a training-step process per variant, each in a fresh process."""
    results = {}
    for variant in MEMORY_VARIANTS:
        cmd = [sys.executable, "-m", "deem.bench.suite", "--memory-child", size, variant, str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed: {done.stderr.strip().splitlines()[-1:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for variant in MEMORY_VARIANTS:
        r = results[variant]
        rows.append(
            row(
                f"peak RSS of a training-step process ({variant})",
                size,
                None,
                "<= the original's (656 MiB at fixture size)",
                "998 MiB vs the original's 656" if variant == "full" else "",
                f"{r['peak_rss_mib']:.0f} MiB peak, {r['step_mib']:.0f} MiB for the steps",
                NOT_MEASURABLE,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------ suite / report

RUNNERS = {
    "pipeline": lambda size, rounds, threads: bench_pipeline(size, rounds),
    "train": lambda size, rounds, threads: bench_train(size, rounds),
    "decode": lambda size, rounds, threads: bench_decode(size, rounds),
    "interleaved": lambda size, rounds, threads: bench_interleaved(size, rounds),
    "memory": lambda size, rounds, threads: bench_memory(size, threads),
}


def smoke_settings() -> dict:
    """The smallest settings (each benchmark once at the tiny size), as the test suite runs them."""
    return {"sizes": ["tiny"], "rounds": 1}


def run_suite(
    benchmarks=BENCHMARKS, sizes=("tiny", "fixture"), rounds: int = 5, threads: int = 2, smoke: bool = False
) -> dict:
    """Run ``benchmarks`` at ``sizes``; returns ``{"environment": ..., "rows": [...]}``. ``smoke``: the smallest
    settings of each benchmark (one round, few steps) to check that it runs."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the pipelines' per-step bars would flood the table
    os.environ.setdefault("TQDM_DISABLE", "1")  # also those of the pipeline generate() builds
    global WARMUP
    torch.set_num_threads(threads)
    WARMUP = 0 if smoke else 1
    env = environment()
    rows = []
    for size in sizes:
        for name in benchmarks:
            if name not in RUNNERS:
                raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
            start = time.perf_counter()
            if smoke and name == "pipeline":
                result = bench_pipeline(size, rounds, steps=2)
            elif smoke and name == "interleaved":
                result = bench_interleaved(size, rounds, batch=2, steps=2, new_tokens=2)
            elif smoke and name == "decode":
                result = bench_decode(size, rounds, new_tokens=4)
            elif smoke and name == "memory":
                result = []  # fresh processes: covered by the memory child test
            else:
                result = RUNNERS[name](size, rounds, threads)
            logger.info(f"bench {name} at {size}: {time.perf_counter() - start:.1f} s")
            rows.extend(result)
    env["load_after"] = environment()["load_1m_5m_15m"]
    return {"environment": env, "rounds": rounds, "rows": rows}


def format_ratio(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"threads {env['threads']} of {env['cpu_count']} CPUs, load {env['load_1m_5m_15m']} -> "
        f"{env.get('load_after')}, torch {env['torch']}, {result['rounds']} paired rounds (median (min-max)); "
        "the original implementation is not installed here, so its rows say so",
        "",
        "| measure | size | ours | reference | ratio | goal | issue's 'today' |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ours = r["ours"]
        ref = r["reference"]
        if r["stats"] is not None:
            ours += f" ({r['stats']['num_s'] * 1e3:.1f} ms)" if "ms" not in ours and "tok/s" not in ours else ""
            ref += f" ({r['stats']['den_s'] * 1e3:.1f} ms)" if "ms" not in ref and "tok/s" not in ref else ""
        lines.append(
            f"| {r['measure']} | {r['size']} | {ours} | {ref} | {format_ratio(r['stats'])} | {r['goal']} | "
            f"{r['today']} |"
        )
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``out_dir``, each written to a temporary file and renamed."""
    from deem.evaluation.formats import atomic_write

    json_path = atomic_write(out_dir / "bench.json", (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return json_path, atomic_write(out_dir / "bench.md", to_markdown(result).encode("utf-8"))


def _memory_child_main(argv: list[str]) -> int:
    size, variant, threads = argv
    print(json.dumps(_memory_child(size, variant, int(threads))))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        sys.exit(_memory_child_main(sys.argv[2:]))
    from .__main__ import main

    sys.exit(main())
