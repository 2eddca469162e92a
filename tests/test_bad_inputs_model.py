"""Bad inputs to the model, generate, the helpers, the pipeline, the configuration and loading: each is refused
before any work with our own ValueError / TypeError whose message names the problem (never an IndexError or a
shape error from inside torch, never a silent wrong result)."""

import json
import math

import pytest
import torch
from conftest import tiny_batch, tiny_model

from deem import DeemConfig, DeemForInterleavedGeneration
from deem.modeling.image_decoder_deem import DiffusionDraws


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def text_only():
    return tiny_model(seed=5, use_diffusion=False)


@pytest.fixture(scope="module")
def batch(model):
    return tiny_batch(model.config, seed=5)


def _with(batch, **changes):
    out = dict(batch)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value(out[key]) if callable(value) else value
    return out


def _ids_with(batch, row, col, value):
    ids = batch["input_ids"].clone()
    ids[row, col] = value
    return ids


CFG = DeemConfig.tiny()
V = CFG.text_config.vocab_size
Q = CFG.num_image_tokens
SIDE = CFG.vision_config.image_size
DEC = CFG.diffusion_config.image_size

# (id, how to call it: f(model, batch, text_only), exception, message regex)
FORWARD = [
    ("ids-above-vocab", lambda m, b, t: m(**_with(b, input_ids=_ids_with(b, 0, 1, V))), ValueError, r"id 128.*vocab"),
    ("ids-negative", lambda m, b, t: m(**_with(b, input_ids=_ids_with(b, 0, 1, -3))), ValueError, r"id -3.*vocab"),
    ("ids-float", lambda m, b, t: m(**_with(b, input_ids=lambda x: x.float())), TypeError, r"integer token ids"),
    ("ids-bool", lambda m, b, t: m(**_with(b, input_ids=lambda x: x > 5)), TypeError, r"integer token ids"),
    ("ids-1d", lambda m, b, t: m(**_with(b, input_ids=lambda x: x[0])), ValueError, r"input_ids must be \[batch"),
    ("ids-list", lambda m, b, t: m(**_with(b, input_ids=lambda x: x.tolist())), TypeError, r"input_ids must be"),
    (
        "ids-and-embeds",
        lambda m, b, t: m(input_ids=b["input_ids"], inputs_embeds=torch.zeros(2, 3, 32)),
        ValueError,
        r"exactly one of input_ids and inputs_embeds",
    ),
    ("no-ids-no-embeds", lambda m, b, t: m(), ValueError, r"exactly one of input_ids and inputs_embeds"),
    (
        "labels-above-vocab",
        lambda m, b, t: m(**b, labels=torch.full_like(b["input_ids"], V + 5)),
        ValueError,
        r"labels holds id 133",
    ),
    (
        "labels-negative",
        lambda m, b, t: m(**b, labels=torch.full_like(b["input_ids"], -7)),
        ValueError,
        r"labels holds id -7",
    ),
    ("labels-float", lambda m, b, t: m(**b, labels=b["input_ids"].float()), TypeError, r"labels must hold integer"),
    ("labels-shape", lambda m, b, t: m(**b, labels=b["input_ids"][:, :-1]), ValueError, r"labels shape"),
    (
        "labels-no-ids",
        lambda m, b, t: m(inputs_embeds=torch.zeros(1, 3, 32), labels=torch.zeros(1, 3).long()),
        ValueError,
        r"labels need input_ids",
    ),
    (
        "mask-shape",
        lambda m, b, t: m(**_with(b, attention_mask=lambda x: x[:, :-2])),
        ValueError,
        r"attention_mask shape",
    ),
    ("mask-values", lambda m, b, t: m(**_with(b, attention_mask=lambda x: x * 3)), ValueError, r"0 \(padding\) and 1"),
    (
        "mask-nan",
        lambda m, b, t: m(**_with(b, attention_mask=lambda x: x.float() * math.nan)),
        ValueError,
        r"attention_mask holds NaN",
    ),
    (
        "pixels-0-255",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: x * 255)),
        ValueError,
        r"pixel_values must be in \[0, 1\].*divide by 255",
    ),
    (
        "pixels-normalised",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: (x - 0.5) / 0.25)),
        ValueError,
        r"pixel_values must be in \[0, 1\].*normalis",
    ),
    (
        "pixels-nan",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: x.index_fill(0, torch.tensor([1]), math.nan))),
        ValueError,
        r"pixel_values holds NaN",
    ),
    (
        "pixels-inf",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: x.index_fill(0, torch.tensor([0]), math.inf))),
        ValueError,
        r"pixel_values holds NaN or infinite",
    ),
    (
        "pixels-uint8",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: (x * 255).to(torch.uint8))),
        TypeError,
        r"floating-point.*255",
    ),
    ("pixels-3d", lambda m, b, t: m(**_with(b, pixel_values=lambda x: x[0])), ValueError, r"4-D"),
    (
        "pixels-1-channel",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: x[:, :1])),
        ValueError,
        r"3 channel\(s\), got 1",
    ),
    (
        "pixels-too-small",
        lambda m, b, t: m(**_with(b, pixel_values=torch.rand(3, 3, 16, 16))),
        ValueError,
        r"at least 32x32 px.*got 16x16",
    ),
    (
        "pixels-non-square",
        lambda m, b, t: m(**_with(b, pixel_values=torch.rand(3, 3, SIDE, 48))),
        ValueError,
        r"square",
    ),
    (
        "pixels-too-few",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: x[:2], pixel_values_decoder=None)),
        ValueError,
        r"3 image\(s\).*but 2",
    ),
    (
        "pixels-too-many",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: torch.cat([x, x[:1]]), pixel_values_decoder=None)),
        ValueError,
        r"3 image\(s\).*but 4",
    ),
    (
        "pixels-list",
        lambda m, b, t: m(**_with(b, pixel_values=lambda x: list(x))),
        TypeError,
        r"pixel_values must be a torch.Tensor",
    ),
    (
        "pixels-without-ids",
        lambda m, b, t: m(inputs_embeds=torch.zeros(1, 3, 32), pixel_values=b["pixel_values"]),
        ValueError,
        r"need input_ids",
    ),
    ("masks-shape", lambda m, b, t: m(**b, image_masks=torch.ones(3, 1, 32, 32)), ValueError, r"image_masks"),
    ("masks-count", lambda m, b, t: m(**b, image_masks=torch.ones(2, 1, SIDE, SIDE)), ValueError, r"2 masks for 3"),
    (
        "masks-range",
        lambda m, b, t: m(**b, image_masks=torch.full((3, 1, SIDE, SIDE), 255.0)),
        ValueError,
        r"image_masks must be in \[0, 1\]",
    ),
    (
        "masks-nan",
        lambda m, b, t: m(**b, image_masks=torch.full((3, 1, SIDE, SIDE), math.nan)),
        ValueError,
        r"image_masks holds NaN",
    ),
    (
        "masks-3-channels",
        lambda m, b, t: m(**b, image_masks=torch.ones(3, 3, SIDE, SIDE)),
        ValueError,
        r"image_masks must have 1 channel",
    ),
    (
        "num-images-wrong",
        lambda m, b, t: m(**_with(b, num_images=torch.tensor([1, 2]))),
        ValueError,
        r"num_images \[1, 2\] does not match",
    ),
    (
        "num-images-length",
        lambda m, b, t: m(**_with(b, num_images=torch.tensor([2, 1, 0]))),
        ValueError,
        r"one count per row",
    ),
    (
        "run-too-short",
        lambda m, b, t: m(**_with(b, input_ids=_ids_with(b, 1, 3, 5), pixel_values=lambda x: x)),
        ValueError,
        r"placeholder run .* has \d+ tokens, expected 4",
    ),
    (
        "run-without-soi",
        lambda m, b, t: m(**_with(b, input_ids=_ids_with(b, 1, 1, 7))),
        ValueError,
        r"not preceded by the <\|startofimage\|>",
    ),
    (
        "too-long",
        lambda m, b, t: m(input_ids=torch.ones(1, 300, dtype=torch.long)),
        ValueError,
        r"sequence length 300 exceeds the model's maximum of 256",
    ),
    (
        "decoder-views-size",
        lambda m, b, t: m(**_with(b, pixel_values_decoder=torch.rand(3, 3, 16, 16))),
        ValueError,
        r"pixel_values_decoder must be 32x32",
    ),
    (
        "decoder-views-count",
        lambda m, b, t: m(**_with(b, pixel_values_decoder=torch.rand(2, 3, DEC, DEC))),
        ValueError,
        r"2 view\(s\) for 3 image",
    ),
    (
        "decoder-views-range",
        lambda m, b, t: m(**_with(b, pixel_values_decoder=lambda x: x * 255)),
        ValueError,
        r"pixel_values_decoder must be in \[0, 1\]",
    ),
    (
        "decoder-views-nan",
        lambda m, b, t: m(**_with(b, pixel_values_decoder=lambda x: x * math.nan)),
        ValueError,
        r"pixel_values_decoder holds NaN",
    ),
    (
        "decoder-views-int",
        lambda m, b, t: m(**_with(b, pixel_values_decoder=lambda x: (x * 255).long())),
        TypeError,
        r"pixel_values_decoder must be a floating-point",
    ),
    (
        "decoder-views-no-pixels",
        lambda m, b, t: m(input_ids=torch.tensor([[1, 5, 2]]), pixel_values_decoder=torch.rand(1, 3, DEC, DEC)),
        ValueError,
        r"1 view\(s\) for no pixel_values",
    ),
    (
        "loss-weight-negative",
        lambda m, b, t: m(**b, return_loss=True, loss_nip_weight=-1.0),
        ValueError,
        r"loss_nip_weight must be a number >= 0",
    ),
    (
        "loss-weight-nan",
        lambda m, b, t: m(**b, return_loss=True, loss_csr_weight=math.nan),
        ValueError,
        r"loss_csr_weight must be a number >= 0",
    ),
    (
        "csr-draws-shape",
        lambda m, b, t: m(**b, return_loss=True, csr_draws=DiffusionDraws(noise=torch.randn(3, 4, 2, 2))),
        ValueError,
        r"csr_draws.noise must have shape \(3, 4, 8, 8\)",
    ),
    (
        "csr-draws-count",
        lambda m, b, t: m(**b, return_loss=True, csr_draws=DiffusionDraws(latent_noise=torch.randn(2, 4, 4, 4))),
        ValueError,
        r"csr_draws.latent_noise must have shape \(3, 4, 8, 8\)",
    ),
    (
        "nip-draws-timesteps",
        lambda m, b, t: m(**b, return_loss=True, nip_draws=DiffusionDraws(timesteps=torch.tensor([0, 1, 5000]))),
        ValueError,
        r"nip_draws.timesteps must be in \[0, 1000\)",
    ),
    (
        "nip-draws-float-timesteps",
        lambda m, b, t: m(**b, return_loss=True, nip_draws=DiffusionDraws(timesteps=torch.rand(3))),
        ValueError,
        r"nip_draws.timesteps must be 3 integer timesteps",
    ),
    (
        "nip-draws-flags",
        lambda m, b, t: m(**b, return_loss=True, nip_draws=DiffusionDraws(null_condition=torch.tensor([True]))),
        ValueError,
        r"nip_draws.null_condition must hold 3 flags",
    ),
    (
        "draws-type",
        lambda m, b, t: m(**b, return_loss=True, csr_draws={"noise": None}),
        TypeError,
        r"csr_draws must be a DiffusionDraws",
    ),
    (
        "memory-type",
        lambda m, b, t: m(input_ids=b["input_ids"], image_memory=(1, 2)),
        ValueError,
        r"image_memory must be a DeemImageMemory",
    ),
    (
        "train-text-only-with-diffusion-weights",
        lambda m, b, t: t.train()(**_with(b, pixel_values_decoder=None)),
        ValueError,
        r"loss_nip_weight=5.0 / loss_csr_weight=5.0 needs diffusion weights",
    ),
]

GENERATE = [
    ("gen-soi-mode", lambda m, b, t: m.generate(**b, soi="paint"), ValueError, r"soi must be 'draw'"),
    (
        "gen-right-padding",
        lambda m, b, t: m.generate(**b, right_padding="ignore"),
        ValueError,
        r"right_padding must be",
    ),
    (
        "gen-ids-above-vocab",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, V + 1]]), max_new_tokens=1),
        ValueError,
        r"id 129.*vocab",
    ),
    (
        "gen-pixels-0-255",
        lambda m, b, t: m.generate(**_with(b, pixel_values=lambda x: x * 255), max_new_tokens=1),
        ValueError,
        r"pixel_values must be in \[0, 1\]",
    ),
    (
        "gen-too-long",
        lambda m, b, t: m.generate(input_ids=torch.ones(1, 250, dtype=torch.long), max_new_tokens=10),
        ValueError,
        r"exceeds the model's maximum of 256",
    ),
    (
        "gen-draw-negative-tokens",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", max_new_tokens=-1),
        ValueError,
        r"max_new_tokens must be >= 0",
    ),
    (
        "gen-draw-beams",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", num_beams=2),
        ValueError,
        r"not beam search",
    ),
    (
        "gen-draw-too-many-images",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", max_new_images=50, max_new_tokens=1),
        ValueError,
        r"at most 8 images",
    ),
    (
        "gen-draw-generators",
        lambda m, b, t: m.generate(
            input_ids=torch.tensor([[1, 5], [1, 6]]), soi="draw", generator=[torch.Generator()], max_new_tokens=1
        ),
        ValueError,
        r"1 generators for 2 rows",
    ),
    (
        "gen-draw-unknown-arg",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", colour="blue", max_new_tokens=1),
        TypeError,
        r"unexpected arguments .*colour",
    ),
    (
        "gen-draw-text-only",
        lambda m, b, t: t.generate(input_ids=torch.tensor([[1, 5, CFG.soi_token_id]]), soi="draw", max_new_tokens=1),
        ValueError,
        r"no diffusion weights",
    ),
    (
        "gen-embeds-with-pixels",
        lambda m, b, t: m.generate(inputs_embeds=torch.zeros(1, 2, 32), pixel_values=b["pixel_values"]),
        ValueError,
        r"text only",
    ),
    (
        "gen-ids-and-embeds",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), inputs_embeds=torch.zeros(1, 2, 32)),
        ValueError,
        r"not both",
    ),
    ("gen-nothing", lambda m, b, t: m.generate(), ValueError, r"needs input_ids"),
    (
        "gen-draw-steps-0",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", num_inference_steps=0),
        ValueError,
        r"num_inference_steps must be a positive integer",
    ),
    (
        "gen-draw-steps-float",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", num_inference_steps=2.5),
        ValueError,
        r"got 2.5",
    ),
    (
        "gen-draw-images-negative",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", max_new_images=-1),
        ValueError,
        r"max_new_images must be an integer >= 0",
    ),
    (
        "gen-draw-guidance-nan",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", guidance_scale=math.nan),
        ValueError,
        r"guidance_scale must be finite",
    ),
    (
        "gen-draw-guidance-str",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", guidance_scale="3"),
        TypeError,
        r"guidance_scale must be a number",
    ),
    (
        "gen-draw-height",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", height=30),
        ValueError,
        r"height must be a positive multiple of the VAE scale factor 4",
    ),
    (
        "gen-draw-width-zero",
        lambda m, b, t: m.generate(input_ids=torch.tensor([[1, 5]]), soi="draw", width=0),
        ValueError,
        r"width must be a positive multiple",
    ),
    (
        "gen-memory-and-pixels",
        lambda m, b, t: m.generate(**b, image_memory=object(), max_new_tokens=1),
        ValueError,
        r"not both",
    ),
]

HELPERS = [
    (
        "score-no-options",
        lambda m, b, t: m.score_options(torch.tensor([[1, 5]]), []),
        ValueError,
        r"options must be a non-empty list",
    ),
    (
        "score-empty-option",
        lambda m, b, t: m.score_options(torch.tensor([[1, 5]]), [[7], []]),
        ValueError,
        r"options\[1\] must be a non-empty list",
    ),
    (
        "score-option-above-vocab",
        lambda m, b, t: m.score_options(torch.tensor([[1, 5]]), [[7], [V]]),
        ValueError,
        r"options\[1\] holds id 128",
    ),
    (
        "score-option-negative",
        lambda m, b, t: m.score_options(torch.tensor([[1, 5]]), [[-1]]),
        ValueError,
        r"options\[0\] holds id -1",
    ),
    (
        "score-option-floats",
        lambda m, b, t: m.score_options(torch.tensor([[1, 5]]), [[1.5]]),
        TypeError,
        r"options\[0\] must hold integer",
    ),
    (
        "score-option-string",
        lambda m, b, t: m.score_options(torch.tensor([[1, 5]]), "yes"),
        ValueError,
        r"options must be a non-empty list",
    ),
    (
        "score-prompt-above-vocab",
        lambda m, b, t: m.score_options(torch.tensor([[1, 999]]), [[5]]),
        ValueError,
        r"id 999",
    ),
    (
        "eyes-count",
        lambda m, b, t: m.perception_consistency(torch.rand(2, 3, SIDE, SIDE), torch.rand(3, 3, DEC, DEC)),
        ValueError,
        r"3 view\(s\) for 2 image",
    ),
    (
        "eyes-decoder-size",
        lambda m, b, t: m.perception_consistency(torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, 64, 64)),
        ValueError,
        r"pixel_values_decoder must be 32x32",
    ),
    (
        "eyes-range",
        lambda m, b, t: m.perception_consistency(torch.rand(1, 3, SIDE, SIDE) * 255, torch.rand(1, 3, DEC, DEC)),
        ValueError,
        r"pixel_values must be in \[0, 1\]",
    ),
    (
        "eyes-empty-timesteps",
        lambda m, b, t: m.perception_consistency(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), timesteps=[]
        ),
        ValueError,
        r"non-empty list",
    ),
    (
        "eyes-timestep-range",
        lambda m, b, t: m.perception_consistency(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), timesteps=[100, 1000]
        ),
        ValueError,
        r"integers in \[0, 1000\), got 1000",
    ),
    (
        "eyes-timestep-negative",
        lambda m, b, t: m.perception_consistency(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), timesteps=[-1]
        ),
        ValueError,
        r"got -1",
    ),
    (
        "eyes-timestep-float",
        lambda m, b, t: m.perception_consistency(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), timesteps=[0.5]
        ),
        ValueError,
        r"got 0.5",
    ),
    (
        "eyes-no-images",
        lambda m, b, t: m.perception_consistency(torch.rand(0, 3, SIDE, SIDE), torch.rand(0, 3, DEC, DEC)),
        ValueError,
        r"at least one image",
    ),
    (
        "eyes-no-decoder",
        lambda m, b, t: m.perception_consistency(torch.rand(1, 3, SIDE, SIDE), None),
        ValueError,
        r"needs pixel_values_decoder",
    ),
    (
        "eyes-text-only",
        lambda m, b, t: t.perception_consistency(torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC)),
        ValueError,
        r"needs the diffusion decoder",
    ),
    (
        "eyes-seed",
        lambda m, b, t: m.perception_consistency(torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), seed="0"),
        TypeError,
        r"seed must be an int",
    ),
    (
        "tta-samples-0",
        lambda m, b, t: m.test_time_adaptation(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), samples=0
        ).__enter__(),
        ValueError,
        r"samples must be an integer >= 1",
    ),
    (
        "tta-steps-negative",
        lambda m, b, t: m.test_time_adaptation(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), steps=-1
        ).__enter__(),
        ValueError,
        r"steps must be an integer >= 0",
    ),
    (
        "tta-lr",
        lambda m, b, t: m.test_time_adaptation(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), lr=0
        ).__enter__(),
        ValueError,
        r"lr must be a finite number > 0",
    ),
    (
        "tta-samples-too-many",
        lambda m, b, t: m.test_time_adaptation(
            torch.rand(1, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC), samples=5000
        ).__enter__(),
        ValueError,
        r"at most the scheduler's 1000",
    ),
    (
        "tta-count",
        lambda m, b, t: m.test_time_adaptation(torch.rand(2, 3, SIDE, SIDE), torch.rand(1, 3, DEC, DEC)).__enter__(),
        ValueError,
        r"1 view\(s\) for 2 image",
    ),
]


def _pipe(m):
    p = m.image_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


PIPELINE = [
    ("pipe-no-condition", lambda m, b, t: _pipe(m)(num_inference_steps=1), ValueError, r"exactly one of"),
    (
        "pipe-width",
        lambda m, b, t: _pipe(m)(prompt_embeds=torch.zeros(1, 4, 16), num_inference_steps=1),
        ValueError,
        r"width 16 does not match",
    ),
    (
        "pipe-height",
        lambda m, b, t: _pipe(m)(prompt_embeds=torch.zeros(1, 4, 32), height=30, num_inference_steps=1),
        ValueError,
        r"multiple of the VAE scale factor",
    ),
    (
        "pipe-steps",
        lambda m, b, t: _pipe(m)(prompt_embeds=torch.zeros(1, 4, 32), num_inference_steps=0),
        ValueError,
        r"num_inference_steps",
    ),
    (
        "pipe-output-type",
        lambda m, b, t: _pipe(m)(prompt_embeds=torch.zeros(1, 4, 32), output_type="jpeg"),
        ValueError,
        r"output_type",
    ),
    (
        "pipe-context-width",
        lambda m, b, t: _pipe(m)(context_features=torch.zeros(1, 3, 5), num_inference_steps=1),
        ValueError,
        r"context_features.* width 5",
    ),
    ("pipe-text-only", lambda m, b, t: t.image_pipeline(), ValueError, r"no diffusion decoder"),
    (
        "perceiver-null-mask",
        lambda m, b, t: m.image_decoder.decoder_perceiver(
            torch.zeros(2, 3, 32), null_condition_mask=torch.tensor([True])
        ),
        ValueError,
        r"1 entries for 2 conditions",
    ),
    (
        "perceiver-width",
        lambda m, b, t: m.image_decoder.decoder_perceiver(torch.zeros(2, 3, 7)),
        ValueError,
        r"width 7 does not match .* 32",
    ),
    (
        "perceiver-text-only-null",
        lambda m, b, t: t.image_decoder.decoder_perceiver(batch_size=2),
        ValueError,
        r"no learned null condition",
    ),
]

CONFIG = [
    ("config-embed-dim", lambda m, b, t: DeemConfig.tiny(image_embed_dim=48), ValueError, r"embed_dim"),
    ("config-image-tokens", lambda m, b, t: DeemConfig.tiny(num_image_tokens=5), ValueError, r"num_queries"),
    (
        "config-decoder-width",
        lambda m, b, t: DeemConfig.tiny(
            decoder_perceiver_config=dict(hidden_size=16, encoder_hidden_size=32, num_attention_heads=4)
        ),
        ValueError,
        r"decoder_perceiver_config.hidden_size",
    ),
    (
        "config-cross-heads",
        lambda m, b, t: DeemConfig.tiny(
            cross_attention_config=dict(num_heads=5, frequency=2, base_spatial_shape=4, max_num_images=8)
        ),
        ValueError,
        r"multiple of cross_attention_config.num_heads",
    ),
]


def _save_llama(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path
    )
    return tmp_path


LOADING = [
    ("load-other-model-type", "llama", ValueError, r"model_type 'llama'.*not a DEEM"),
    ("load-sub-config", "sub", ValueError, r"model_type 'deem_vision'.*not a DEEM"),
    ("load-missing", "missing", OSError, r"."),
]

CASES = FORWARD + GENERATE + HELPERS + PIPELINE + CONFIG


def test_the_battery_is_large_and_distinct():
    ids = [c[0] for c in CASES + LOADING]
    assert len(ids) == len(set(ids)) and len(ids) >= 100


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(model, batch, text_only, call, error, message):
    model.eval()
    text_only.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "image_encoder" in k}
    with pytest.raises(error, match=message):
        call(model, batch, text_only)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing half-done to the weights


@pytest.mark.parametrize("kind, error, message", [c[1:] for c in LOADING], ids=[c[0] for c in LOADING])
def test_loading_something_else_as_deem_is_refused(tmp_path, kind, error, message):
    if kind == "llama":
        path = _save_llama(tmp_path)
    elif kind == "sub":
        DeemConfig.tiny().vision_config.save_pretrained(tmp_path)
        path = tmp_path
    else:
        path = tmp_path / "nowhere"
    for load in (DeemConfig.from_pretrained, DeemForInterleavedGeneration.from_pretrained):
        with pytest.raises(error, match=message):
            load(str(path))
    assert not (tmp_path / "nowhere").exists()


def test_a_deem_config_without_model_type_still_loads(tmp_path):
    DeemConfig.tiny().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("model_type")
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert DeemConfig.from_pretrained(tmp_path).num_image_tokens == CFG.num_image_tokens


# ---------------------------------------------------------------------------------------------------------------
# property test: randomly drawn bad tensors are refused by our checks, never by torch
# ---------------------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def tensors(draw, base: torch.Tensor):
    """``base`` or a corruption of it: another shape, dtype, value range, NaN/inf, or the meta device."""
    kind = draw(st.sampled_from(["same", "shape", "dtype", "scale", "nan", "meta", "empty", "list"]))
    x = base.clone()
    if kind == "shape":
        dims = draw(st.lists(st.integers(0, 5), min_size=0, max_size=5))
        x = torch.zeros(dims, dtype=base.dtype) if dims else torch.tensor(1, dtype=base.dtype)
    elif kind == "dtype":
        x = x.to(draw(st.sampled_from(DTYPES)))
    elif kind == "scale":
        x = x * draw(st.sampled_from([-1, 255, 1e6, -1e6]))
    elif kind == "nan" and x.is_floating_point():
        x = x.flatten().index_fill(0, torch.tensor([0]), draw(st.sampled_from([math.nan, math.inf]))).view_as(base)
    elif kind == "meta":
        x = torch.empty_like(x, device="meta")
    elif kind == "empty":
        x = x[:0]
    elif kind == "list":
        return x.tolist()
    return x


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_bad_tensors_get_our_errors(model, batch, data):
    model.eval()
    inputs = {
        key: data.draw(tensors(batch[key]), label=key)
        for key in ("input_ids", "attention_mask", "pixel_values", "num_images")
    }
    try:
        with torch.no_grad():
            out = model(**inputs, return_loss=False)
    except (ValueError, TypeError) as error:
        assert str(error) and "Traceback" not in str(error)
        assert type(error).__module__ == "builtins"
        return
    # accepted: then it was a valid call, and the result is finite
    assert torch.isfinite(out.logits).all()
    assert out.logits.shape[:2] == tuple(inputs["input_ids"].shape)
