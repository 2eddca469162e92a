"""Convert an original DEEM / MM-Interleaved (``uni_interleaved``) checkpoint into a ``save_pretrained`` directory.

    python -m deem.conversion.convert_original --checkpoint pytorch_model.bin --config pretrain.yaml \
        --llm assets/lmsys/vicuna-7b-v1.5 --sd assets/stabilityai/stable-diffusion-2-1-base \
        --out deem-7b [--verify FIXTURE_DIR]

The checkpoint is read with ``torch.load(weights_only=True)`` (``.bin``/``.pt``) or safetensors; the ``model:``
section of the original YAML gives the architecture, the LLaMA directory its ``config.json`` (and tokenizer), the
SD directory its unet / vae / scheduler configs, and the ConvNeXt sizes are read from the checkpoint's own keys.
Nothing is written to ``--out`` unless the whole conversion (and ``--verify``) succeeds.
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .assemble import infer_convnext_layout
from .original import ConversionError, config_from_original, convert_state_dict

logger = logging.getLogger(__name__)

SNIFFER = "visual_tokenizer.sniffer.vision_model."


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.bin`` / ``.pt`` file (or a sharded directory), refusing pickled code."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise ConversionError(f"{path}: no .safetensors or .bin files")
        state = {}
        for f in files:
            state.update(load_checkpoint(f))
        return state
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for truncated / corrupt headers
            raise ConversionError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text:
            raise ConversionError(
                f"{path}: refused: the pickle needs arbitrary code to load (weights_only=True); only plain "
                "tensors are accepted"
            ) from err
        raise ConversionError(
            f"{path}: cannot read the checkpoint ({text.splitlines()[0] if text else type(err).__name__})"
        ) from err
    for key in ("module", "model", "state_dict"):  # DeepSpeed / trainer wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a flat dict of tensors")
    return obj


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: missing") from err


def convert(
    checkpoint,
    model_config: dict,
    llm_dir,
    sd_dir=None,
    out_dir=None,
    image_size: int = 256,
    verify_dir=None,
    dtype=torch.float32,
):
    """Convert; returns the model (and writes ``out_dir`` when given, atomically). See the module docstring."""
    from deem import DeemForInterleavedGeneration

    state = load_checkpoint(checkpoint)
    llm_dir = Path(llm_dir)
    llama = _read_json(llm_dir / "config.json") if llm_dir.is_dir() else _read_json(llm_dir)
    unet = vae = scheduler = None
    has_sd = any(k.startswith("visual_tokenizer.encoder.unet.") for k in state)
    if has_sd:
        if sd_dir is None:
            raise ConversionError(
                f"{checkpoint}: the checkpoint holds diffusion weights; pass the SD directory (--sd) for their configs"
            )
        sd_dir = Path(sd_dir)
        unet, vae = _read_json(sd_dir / "unet" / "config.json"), _read_json(sd_dir / "vae" / "config.json")
        scheduler = _read_json(sd_dir / "scheduler" / "scheduler_config.json")
    trunk_shapes = {k[len(SNIFFER) :]: tuple(v.shape) for k, v in state.items() if k.startswith(SNIFFER)}
    convnext = infer_convnext_layout(trunk_shapes, source=str(checkpoint))
    config = config_from_original(
        model_config, llama, convnext=convnext, unet=unet, vae=vae, scheduler=scheduler, image_size=image_size
    )
    with torch.device("meta"):
        skeleton = DeemForInterleavedGeneration(config)
    converted = convert_state_dict(state, expected=skeleton.state_dict())
    model = DeemForInterleavedGeneration(config)
    model.load_state_dict(converted, strict=True)
    model = model.to(dtype).eval()
    if verify_dir is not None:
        report = verify(model, verify_dir)
        logger.info("verified against %s: %s", verify_dir, report)
    if out_dir is not None:
        _save_atomically(model, out_dir, llm_dir if llm_dir.is_dir() else None, config)
    return model


SCALE_ULPS = 16


def parity_close(
    ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, ulps: int = SCALE_ULPS
) -> tuple[bool, float]:
    """Float32 parity: every element within ``atol + rtol·|ref|`` or within ``ulps`` float32 ulps of the tensor's
    scale (``ulps·eps·max|ref|``). The second bound covers small elements computed from large ones (LLM residual
    streams reach |x| ≈ 20, so different BLAS kernels leave ~1e-5 on elements of size 0.01). Returns (ok, max abs
    deviation)."""
    if ours.shape != ref.shape:
        return False, float("inf")
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    dev = (ours - ref).abs()
    scale = ulps * torch.finfo(torch.float32).eps * float(ref.abs().max()) if ref.numel() else 0.0
    ok = bool(((dev <= atol + rtol * ref.abs()) | (dev <= scale)).all()) and not bool(
        torch.isnan(ours).any() ^ torch.isnan(ref).any()
    )
    return ok, float(dev.max()) if dev.numel() else 0.0


def verify(model, fixture_dir, atol: float = 1e-5, rtol: float = 1e-5) -> dict[str, float]:
    """Run ``model`` on a recorded batch (``inputs.safetensors``) and compare with the recorded outputs
    (``intermediates.safetensors``: hidden states, logit slices, log-sum-exp, arg-max). Returns the max abs
    deviation per tensor; raises ``ConversionError`` on the first tensor outside the tolerance."""
    from safetensors.torch import load_file

    fixture_dir = Path(fixture_dir)
    inp = load_file(fixture_dir / "inputs.safetensors")
    ref = load_file(fixture_dir / "intermediates.safetensors")
    with torch.no_grad():
        out = model(
            input_ids=inp["text_ids"],
            attention_mask=inp["attention_mask"],
            pixel_values=inp["image_tensors"].to(model.dtype),
            image_masks=inp.get("image_tensors_mask"),
            num_images=inp.get("num_image_per_seq"),
            output_hidden_states=True,
            return_loss=False,
        )
    pairs = {
        f"hidden_states.{i}": (h, ref[f"mm_decoder.hidden_states.{i}"])
        for i, h in enumerate(out.hidden_states)
        if f"mm_decoder.hidden_states.{i}" in ref
    }
    cols = ref["text_decoder.logits_sel_cols"]
    pairs["logits_sel"] = (out.logits[..., cols], ref["text_decoder.logits_sel"])
    pairs["logsumexp"] = (out.logits.logsumexp(-1), ref["text_decoder.logits_logsumexp"])
    report = {}
    for name, (ours, theirs) in pairs.items():
        ok, dev = parity_close(ours, theirs, atol=atol, rtol=rtol)
        report[name] = dev
        if not ok:
            raise ConversionError(f"verification failed: {name} deviates by {dev:.3g} from {fixture_dir}")
    if not torch.equal(out.logits.argmax(-1), ref["text_decoder.logits_argmax"]):
        raise ConversionError(f"verification failed: arg-max of the logits differs from {fixture_dir}")
    return report


def _save_atomically(model, out_dir, llm_dir, config):
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir}: exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".deem-convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if llm_dir is not None and any(llm_dir.glob("tokenizer*")):
            from transformers import AutoTokenizer

            from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer

            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(llm_dir))
            decoder = config.diffusion_config.image_size if config.diffusion_config is not None else 512
            DeemProcessor(
                DeemImageProcessor(size=config.vision_config.image_size, decoder_size=decoder),
                tokenizer,
                num_image_tokens=config.num_image_tokens,
            ).save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv=None):
    import yaml

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="original .bin / .pt / .safetensors (or a directory of shards)")
    p.add_argument("--config", required=True, help="the original YAML (its `model:` section is used)")
    p.add_argument("--llm", required=True, help="LLaMA / Vicuna directory (config.json, tokenizer)")
    p.add_argument("--sd", help="Stable Diffusion directory (unet/, vae/, scheduler/ configs)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256, help="encoder resolution (256 stage 1, 448 stages 2-3)")
    p.add_argument("--verify", help="a fixture directory with inputs.safetensors + intermediates.safetensors")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = yaml.safe_load(Path(args.config).read_text())
    convert(args.checkpoint, cfg.get("model", cfg), args.llm, args.sd, args.out, args.image_size, args.verify)


if __name__ == "__main__":
    main()
