"""Command line: ``deem`` (or ``python -m deem``).

``deem`` / ``deem demo``: build the tiny default model, run one training-mode forward on generated images and
print the loss components and the parameter table. ``deem params [--config 7b|tiny] [--stage N]``: the
per-component parameter table (the 7B model is built on the meta device, no memory or download needed).
"""

import argparse
import time

import torch


def format_table(rows, title: str) -> str:
    width = max(len(r["component"]) for r in rows)
    lines = [title, f"{'component':<{width}}  {'total':>15}  {'trainable':>15}"]
    for r in rows:
        lines.append(f"{r['component']:<{width}}  {r['total']:>15,}  {r['trainable']:>15,}")
    return "\n".join(lines)


def build(config_name: str, device: str | None = None):
    from . import DeemConfig, DeemForInterleavedGeneration

    config = DeemConfig() if config_name == "7b" else DeemConfig.tiny()
    if device == "meta":
        with torch.device("meta"):
            return DeemForInterleavedGeneration(config)
    return DeemForInterleavedGeneration(config)


def cmd_params(args) -> None:
    start = time.perf_counter()
    model = build(args.config, device="meta" if args.config == "7b" else None)
    built = time.perf_counter() - start
    stages = [args.stage] if args.stage else [1, 2, 3]
    for stage in stages:
        print(
            format_table(
                model.parameter_table(stage), f"\n{args.config} model, stage {stage} preset (built in {built:.1f} s)"
            )
        )


def cmd_demo(args) -> None:
    from . import DeemConfig, DeemForInterleavedGeneration

    torch.manual_seed(args.seed)
    config = DeemConfig.tiny()
    model = DeemForInterleavedGeneration(config).set_training_stage(1).train()
    q, soi, img = config.num_image_tokens, config.soi_token_id, config.image_token_id
    g = torch.Generator().manual_seed(args.seed)
    text = lambda n: torch.randint(3, config.original_vocab_size - 2, (n,), generator=g).tolist()  # noqa: E731
    row = (
        [config.bos_token_id]
        + text(3)
        + [soi]
        + [img] * q
        + text(4)
        + [soi]
        + [img] * q
        + text(2)
        + [config.eos_token_id]
    )
    vis, dec = config.vision_config.image_size, config.diffusion_config.image_size
    batch = {
        "input_ids": torch.tensor([row]),
        "attention_mask": torch.ones(1, len(row), dtype=torch.long),
        "pixel_values": torch.rand(2, 3, vis, vis, generator=g),
        "pixel_values_decoder": torch.rand(2, 3, dec, dec, generator=g),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(args.steps):
        out = model(**batch, generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(
            f"step {step}: loss {out.loss.item():.4f} = ntp {out.loss_ntp.item():.4f}"
            f" + {config.loss_nip_weight:g}*nip {out.loss_nip.item():.4f} + {config.loss_csr_weight:g}*csr "
            f"{out.loss_csr.item():.4f}"
        )
    print(format_table(model.parameter_table(), "\ntiny model, stage 1 (current requires_grad)"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="deem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="tiny model, generated images: loss components and parameter table")
    demo.add_argument("--steps", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    params = sub.add_parser("params", help="per-component parameter table for the stage presets")
    params.add_argument("--config", choices=["7b", "tiny"], default="7b")
    params.add_argument("--stage", type=int, choices=[1, 2, 3])
    sub.add_parser(
        "assemble", help="fresh DEEM from LLaMA + SD-2.1 + open_clip checkpoints (see --help)", add_help=False
    )
    sub.add_parser("convert", help="original DEEM checkpoint -> HF directory (see --help)", add_help=False)
    sub.add_parser(
        "train", help="train one DEEM stage: deem train --stage N --config cfg.yaml (see --help)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "assemble":
        from .conversion.assemble import main as assemble_main

        return assemble_main(rest)
    if args.command == "convert":
        from .conversion.convert_original import main as convert_main

        return convert_main(rest)
    if args.command == "train":
        from .trainers.cli import main as train_main

        return train_main(rest)
    args = parser.parse_args(argv)
    if args.command == "params":
        cmd_params(args)
    else:
        if args.command is None:
            args = demo.parse_args([])
        cmd_demo(args)


if __name__ == "__main__":
    main()
