"""DeemImagePipeline: a diffusers pipeline over the model's own UNet / VAE / side network / context modules.

Checks: shared components, output types and shapes, seeded reproducibility, classifier-free guidance against a
hand-written sampler built on `unet_forward_with_side`, the context-features path, the learned null condition as
default negative, side features, callbacks, input errors, model CPU offload, and loading from a saved checkpoint
(in process and, with trust_remote_code, in a fresh process).
"""

import json
import subprocess
import sys
import textwrap
import types

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_model
from diffusers import DDIMScheduler, DDPMScheduler

STEPS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def pipe(model):
    p = model_pipeline(model)
    return p


def model_pipeline(model, scheduler=None):
    from deem.modeling.pipeline_deem import DeemImagePipeline

    p = DeemImagePipeline.from_model(model, scheduler=scheduler)
    p.set_progress_bar_config(disable=True)
    return p


def cond(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = model.config.decoder_perceiver_config.num_queries
    return torch.randn(n, q, model.unet.config.cross_attention_dim, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def side_maps(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        return list(model.image_encoder(torch.rand(n, 3, size, size, generator=g)).multiscale_features)


def manual_latents(model, condition, negative, feats, mask, guidance_scale, steps, seed, size=32):
    """Reference sampler: DDPM with the model's config, separate uncond / cond UNet calls (no batching)."""
    from deem.modeling.mmfs import unet_forward_with_side

    sched = DDPMScheduler.from_config(model.noise_scheduler.config)
    sched.set_timesteps(steps)
    g = gen(seed)
    side = 2 ** (len(model.vae.config.block_out_channels) - 1)
    latents = torch.randn(condition.shape[0], model.unet.config.in_channels, size // side, size // side, generator=g)
    latents = latents * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:

            def eps(c):
                return unet_forward_with_side(
                    model.unet, model.unet_side, latents, t, c, side_features=feats, side_mask=mask
                )

            e_cond = eps(condition)
            if guidance_scale > 1:
                e_uncond = eps(negative)
                e = e_uncond + guidance_scale * (e_cond - e_uncond)
            else:
                e = e_cond
            latents = sched.step(e, t, latents, generator=g, return_dict=False)[0]
    return latents


def zero_side(model, n):
    sn = model.unet_side
    feat_dim = sn.mid_block.feat_norm.normalized_shape[0]
    feats = [torch.zeros(n, 1, feat_dim, h, w) for h, w in sn.mid_block.attn.spatial_shapes]
    return feats, torch.zeros(n, 1)


# ---------------------------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------------------------


def test_components_are_the_models_own_objects(model, pipe):
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    keys_before = set(model.state_dict())
    assert pipe.unet is model.unet and pipe.vae is model.vae and pipe.side_network is model.unet_side
    # the image decoder's own parts, no wrapper: the side network a diffusers model, the decoder perceiver (which
    # holds the learned null condition) a transformers model, both saveable as pipeline components
    assert pipe.decoder_perceiver is model.image_decoder.decoder_perceiver
    assert pipe.decoder_perceiver.null_condition is model.image_decoder.null_condition is model.null_condition
    assert isinstance(pipe.side_network, ModelMixin) and isinstance(pipe.decoder_perceiver, PreTrainedModel)
    assert set(pipe.components) == {"unet", "vae", "scheduler", "side_network", "decoder_perceiver"}
    assert set(pipe.model_cpu_offload_seq.split("->")) == {"decoder_perceiver", "side_network", "unet", "vae"}
    assert "image_decoder.decoder_perceiver.null_condition" in keys_before
    # the default scheduler: the model's DDPM configuration, a separate object (sampling never touches training)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler is not model.noise_scheduler
    assert dict(pipe.scheduler.config) == dict(model.noise_scheduler.config)
    pipe.scheduler.set_timesteps(250)
    ts = pipe.scheduler.timesteps.tolist()
    assert ts[:3] == [997, 993, 989] and ts[-1] == 1 and len(ts) == 250  # §5.2: leading spacing, steps_offset 1
    assert pipe.config.image_size == model.config.diffusion_config.image_size == 32
    assert set(model.state_dict()) == keys_before  # nothing was attached to the model
    # any scheduler can replace it
    ddim = model_pipeline(model, scheduler=DDIMScheduler.from_config(model.noise_scheduler.config))
    assert isinstance(ddim.scheduler, DDIMScheduler) and ddim.unet is model.unet


def test_model_without_diffusion_is_refused():
    from deem.modeling.pipeline_deem import DeemImagePipeline

    with pytest.raises(ValueError, match="no diffusion decoder"):
        DeemImagePipeline.from_model(types.SimpleNamespace(unet=None))


# ---------------------------------------------------------------------------------------------------------------
# standalone sampling, outputs, reproducibility
# ---------------------------------------------------------------------------------------------------------------


def test_output_types_shapes_and_range(model, pipe):
    pe = cond(model)
    pt = pipe(prompt_embeds=pe, num_inference_steps=STEPS, output_type="pt", generator=gen(0)).images
    assert pt.shape == (2, 3, 32, 32) and pt.dtype == torch.float32
    assert float(pt.min()) >= 0.0 and float(pt.max()) <= 1.0 and pt.std() > 0
    pil = pipe(prompt_embeds=pe, num_inference_steps=STEPS, generator=gen(0)).images  # default "pil"
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil)
    assert np.array_equal(np.asarray(pil[0]), (pt[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    (arr,) = pipe(prompt_embeds=pe, num_inference_steps=STEPS, output_type="np", generator=gen(0), return_dict=False)
    assert arr.shape == (2, 32, 32, 3) and np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    lat = pipe(prompt_embeds=pe[:1], num_inference_steps=STEPS, output_type="latent", num_images_per_prompt=3).images
    assert lat.shape == (3, 4, 8, 8)
    # height / width other than the default (multiples of the VAE factor 4)
    wide = pipe(prompt_embeds=pe[:1], num_inference_steps=1, output_type="pt", height=16, width=24).images
    assert wide.shape == (1, 3, 16, 24)


def test_seed_reproducibility(model, pipe):
    pe = cond(model)
    kw = dict(prompt_embeds=pe, num_inference_steps=STEPS, output_type="pt")
    a = pipe(**kw, generator=gen(11)).images
    b = pipe(**kw, generator=gen(11)).images
    c = pipe(**kw, generator=gen(12)).images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # one generator per image
    d = pipe(**kw, generator=[gen(1), gen(2)]).images
    e = pipe(**kw, generator=[gen(1), gen(2)]).images
    assert torch.equal(d, e)
    # given latents replace the draw
    lat = torch.randn(2, 4, 8, 8, generator=gen(5))
    f = pipe(**{**kw, "num_inference_steps": 1}, latents=lat, generator=gen(0)).images
    g = pipe(**{**kw, "num_inference_steps": 1}, latents=lat.clone(), generator=gen(0)).images
    assert torch.equal(f, g)


# ---------------------------------------------------------------------------------------------------------------
# classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------


def test_guidance_one_is_the_conditional_path(model, pipe):
    pe = cond(model, seed=4)
    feats, mask = zero_side(model, 2)
    ref = manual_latents(model, pe, None, feats, mask, 1.0, STEPS, seed=9)
    out = pipe(
        prompt_embeds=pe, guidance_scale=1.0, num_inference_steps=STEPS, output_type="latent", generator=gen(9)
    ).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the negative condition plays no part without guidance
    other = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=torch.randn_like(pe),
        guidance_scale=1.0,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=gen(9),
    ).images
    assert torch.equal(out, other)


def test_guidance_matches_separate_uncond_and_cond_passes(model, pipe):
    pe = cond(model, seed=5)
    feats = [f[:, None] for f in side_maps(model)]
    mask = torch.tensor([[1.0], [0.0]])
    null = model.null_condition.detach().expand(2, -1, -1)
    ref = manual_latents(model, pe, null, feats, mask, 3.5, STEPS, seed=13)
    out = pipe(
        prompt_embeds=pe,
        side_features=[f[:, 0] for f in feats],
        side_mask=torch.tensor([1.0, 0.0]),
        guidance_scale=3.5,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=gen(13),
    ).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    no_cfg = pipe(
        prompt_embeds=pe,
        side_features=[f[:, 0] for f in feats],
        side_mask=torch.tensor([1.0, 0.0]),
        guidance_scale=1.0,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=gen(13),
    ).images
    assert (out - no_cfg).abs().max() > 1e-3


def test_guidance_batches_uncond_then_cond_with_duplicated_side_inputs(model, pipe):
    pe = cond(model, seed=6)
    maps = side_maps(model, seed=2)
    seen = {"ehs": [], "mask": [], "values": []}

    def grab_ehs(module, args, kwargs):
        seen["ehs"].append(kwargs["encoder_hidden_states"].clone())

    def grab_side(module, args):
        seen["values"].append(args[2].values[0].clone())
        seen["mask"].append(args[3].clone())

    handles = [
        model.unet.down_blocks[0].register_forward_pre_hook(grab_ehs, with_kwargs=True),
        model.unet_side.register_forward_pre_hook(grab_side),
    ]
    try:
        pipe(
            prompt_embeds=pe,
            side_features=maps,
            side_mask=torch.tensor([[1.0], [0.0]]),
            guidance_scale=2.0,
            num_inference_steps=STEPS,
            output_type="latent",
        )
    finally:
        for h in handles:
            h.remove()
    assert len(seen["ehs"]) == STEPS and len(seen["mask"]) == STEPS
    ehs = seen["ehs"][0]
    assert ehs.shape[0] == 4
    assert torch.equal(ehs[:2], model.null_condition.detach().expand(2, -1, -1))  # [uncond; cond]
    assert torch.equal(ehs[2:], pe)
    assert torch.equal(seen["mask"][0], torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    v = seen["values"][0]
    assert v.shape[0] == 4 and torch.equal(v[:2], v[2:])


def test_negative_default_is_the_learned_null_condition(model, pipe):
    pe = cond(model, seed=7)
    kw = dict(prompt_embeds=pe, guidance_scale=3.5, num_inference_steps=STEPS, output_type="latent")
    default = pipe(**kw, generator=gen(3)).images
    explicit = pipe(
        **kw, negative_prompt_embeds=model.null_condition.detach().expand(2, -1, -1).clone(), generator=gen(3)
    ).images
    single = pipe(
        **kw, negative_prompt_embeds=model.null_condition.detach().clone(), generator=gen(3)
    ).images  # [1,Q,D]
    other = pipe(**kw, negative_prompt_embeds=torch.zeros_like(pe), generator=gen(3)).images
    assert torch.equal(default, explicit) and torch.equal(default, single)
    assert (default - other).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# context features, side features, num_images_per_prompt
# ---------------------------------------------------------------------------------------------------------------


def test_context_features_path_equals_prompt_embeds_after_the_perceiver(model, pipe):
    g = gen(8)
    hidden = torch.randn(2, 9, model.config.text_config.hidden_size, generator=g)
    image_rows, soi_pos, starts = torch.tensor([0, 1]), torch.tensor([6, 3]), torch.tensor([0, 0])
    with torch.no_grad():
        ctx, ctx_mask = model.image_decoder.context_features(hidden, image_rows, soi_pos, starts)
        assert ctx_mask.sum(1).tolist() == [7, 4]
        pe = model.decoder_perceiver(ctx, ctx_mask)
    kw = dict(num_inference_steps=STEPS, output_type="pt", guidance_scale=3.5)
    a = pipe(context_features=ctx, context_mask=ctx_mask, generator=gen(21), **kw).images
    b = pipe(prompt_embeds=pe, generator=gen(21), **kw).images
    assert torch.equal(a, b)
    # the mask matters, and no mask means all positions
    c = pipe(context_features=ctx, generator=gen(21), **kw).images
    with torch.no_grad():
        d = pipe(prompt_embeds=model.decoder_perceiver(ctx), generator=gen(21), **kw).images
    assert torch.equal(c, d) and (a - c).abs().max() > 1e-4


def test_side_features_change_the_image_and_mask_zero_means_absent(model, pipe):
    pe = cond(model, seed=9)
    maps = side_maps(model, seed=4)
    kw = dict(prompt_embeds=pe, num_inference_steps=STEPS, output_type="latent", guidance_scale=3.5)
    none = pipe(**kw, generator=gen(5)).images
    present = pipe(**kw, side_features=maps, generator=gen(5)).images  # mask defaults to ones
    ones = pipe(**kw, side_features=maps, side_mask=torch.ones(2, 1), generator=gen(5)).images
    masked = pipe(**kw, side_features=maps, side_mask=torch.zeros(2), generator=gen(5)).images
    explicit_zeros = pipe(
        **kw, side_features=[torch.zeros_like(m) for m in maps], side_mask=torch.zeros(2), generator=gen(5)
    ).images
    with_axis = pipe(
        **kw, side_features=[m[:, None] for m in maps], side_mask=torch.ones(2, 1), generator=gen(5)
    ).images
    assert (present - none).abs().max() > 1e-3
    assert torch.equal(present, ones) and torch.equal(present, with_axis)
    torch.testing.assert_close(masked, none, rtol=0, atol=1e-6)
    torch.testing.assert_close(explicit_zeros, none, rtol=0, atol=1e-6)
    # per-row mask: row 0 sees its previous image, row 1 does not
    mixed = pipe(**kw, side_features=maps, side_mask=torch.tensor([1.0, 0.0]), generator=gen(5)).images
    assert (mixed[0] - none[0]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[1], none[1], rtol=1e-5, atol=1e-5)


def test_num_images_per_prompt_repeats_each_condition(model, pipe):
    pe = cond(model, seed=10)
    lat = torch.randn(4, 4, 8, 8, generator=gen(6))
    kw = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=1.0)
    many = pipe(prompt_embeds=pe, num_images_per_prompt=2, latents=lat, generator=gen(1), **kw).images
    # same as passing each condition twice (order: c0, c0, c1, c1)
    rep = pipe(prompt_embeds=pe.repeat_interleave(2, 0), latents=lat, generator=gen(1), **kw).images
    torch.testing.assert_close(many, rep, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------------------------------------------


def test_callback_on_step_end_is_called_every_step_and_can_replace_latents(model, pipe):
    pe = cond(model, seed=11)
    calls = []

    def record(p, step, timestep, kwargs):
        assert p is pipe
        calls.append((step, int(timestep), sorted(kwargs)))
        return {}

    pipe(
        prompt_embeds=pe,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    pipe.scheduler.set_timesteps(3)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert [c[1] for c in calls] == pipe.scheduler.timesteps.tolist()
    assert all(c[2] == ["latents", "prompt_embeds"] for c in calls)

    def zero_last(p, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == p.num_timesteps - 1 else {}

    out = pipe(prompt_embeds=pe, num_inference_steps=3, output_type="latent", callback_on_step_end=zero_last).images
    assert torch.equal(out, torch.zeros_like(out))

    def swap_condition(p, step, timestep, kwargs):
        return {"prompt_embeds": torch.zeros_like(kwargs["prompt_embeds"])} if step == 0 else {}

    a = pipe(prompt_embeds=pe, num_inference_steps=3, output_type="latent", generator=gen(2)).images
    b = pipe(
        prompt_embeds=pe,
        num_inference_steps=3,
        output_type="latent",
        generator=gen(2),
        callback_on_step_end=swap_condition,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images
    assert (a - b).abs().max() > 1e-4

    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(
            prompt_embeds=pe,
            num_inference_steps=1,
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["noise_pred"],
        )


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_input_errors(model, pipe):
    pe = cond(model)
    h = model.config.text_config.hidden_size
    maps = side_maps(model)
    cases = [
        (dict(), "exactly one of"),
        (dict(prompt_embeds=pe, context_features=torch.randn(2, 3, h)), "exactly one of"),
        (dict(prompt_embeds=pe[0]), r"\[N, Q, D\]"),
        (dict(prompt_embeds=torch.randn(2, 4, 7)), "cross_attention_dim"),
        (dict(context_features=torch.randn(2, 3, h + 1)), "decoder perceiver"),
        (dict(context_features=torch.randn(2, 3, h), context_mask=torch.ones(2, 4)), "context_mask"),
        (dict(prompt_embeds=pe, context_mask=torch.ones(2, 4)), "context_mask"),
        (dict(prompt_embeds=pe, height=30), "multiple of the VAE scale factor 4"),
        (dict(prompt_embeds=pe, width=0), "multiple of the VAE scale factor"),
        (dict(prompt_embeds=pe, negative_prompt_embeds=torch.randn(3, 4, 32)), "batch 3"),
        (dict(prompt_embeds=pe, negative_prompt_embeds=torch.randn(2, 5, 32)), "tokens"),
        (dict(prompt_embeds=pe, side_features=maps[:3]), "3 levels"),
        (dict(prompt_embeds=pe, side_features=maps[0]), "list of 4"),
        (dict(prompt_embeds=pe, side_features=[m[:1] for m in maps]), "batch 1"),
        (dict(prompt_embeds=pe, side_features=[m[:, :5] for m in maps]), "channels"),
        (dict(prompt_embeds=pe, side_features=[m.flatten(2) for m in maps]), r"\[N, E, h, w\]"),
        (dict(prompt_embeds=pe, side_features=maps, side_mask=torch.ones(3)), "side_mask"),
        (dict(prompt_embeds=pe, side_mask=torch.ones(2)), "without `side_features`"),
        (dict(prompt_embeds=pe, generator=[gen(0)] * 3), "3 generators"),
        (dict(prompt_embeds=pe, latents=torch.randn(2, 4, 4, 4)), "latents"),
        (dict(prompt_embeds=pe, output_type="jpeg"), "output_type"),
        (dict(prompt_embeds=pe, num_inference_steps=0), "num_inference_steps"),
        (dict(prompt_embeds=pe, num_images_per_prompt=0), "num_images_per_prompt"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("num_inference_steps", 1)
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# offload
# ---------------------------------------------------------------------------------------------------------------


def test_model_cpu_offload_runs_and_matches(model):
    pytest.importorskip("accelerate")
    from deem.modeling.mmfs import DeemUNetSideNetwork

    if not hasattr(DeemUNetSideNetwork, "dtype"):
        pytest.skip(
            "DiffusionPipeline.to / enable_model_cpu_offload read `.dtype` of every component; "
            "DeemUNetSideNetwork does not define `device` / `dtype` properties"
        )
    p = model_pipeline(model)
    pe = cond(model, seed=12)
    maps = side_maps(model, seed=1)
    ctx = torch.randn(2, 3, model.config.text_config.hidden_size, generator=gen(3))
    kw = dict(side_features=maps, num_inference_steps=STEPS, output_type="pt", guidance_scale=3.5)
    ref = p(prompt_embeds=pe, **kw, generator=gen(4)).images
    ref_ctx = p(context_features=ctx, **kw, generator=gen(4)).images
    # No accelerator here: accelerate's model-offload hooks with the CPU as execution device still exercise the hook
    # order (the UNet is driven block by block and the side projection is not a forward, so the pipeline triggers
    # those hooks itself). Sequential offload cannot be exercised on CPU (accelerate fails there for any module).
    p.enable_model_cpu_offload(device="cpu")
    try:
        hooked = sorted(n for n in p.components if hasattr(getattr(p, n), "_hf_hook"))
        out = p(prompt_embeds=pe, **kw, generator=gen(4)).images
        out_ctx = p(context_features=ctx, **kw, generator=gen(4)).images
    finally:
        p.remove_all_hooks()
    assert hooked == ["decoder_perceiver", "side_network", "unet", "vae"]
    assert torch.equal(out, ref) and torch.equal(out_ctx, ref_ctx)
    assert p.unet is model.unet and p.decoder_perceiver.null_condition is model.null_condition


# ---------------------------------------------------------------------------------------------------------------
# loading from a saved checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("deem_pipe")
    model.save_pretrained(path)
    return path


def test_from_pretrained_on_a_saved_model(model, pipe, saved):
    from deem.modeling.pipeline_deem import DeemImagePipeline

    pe = cond(model, seed=13)
    kw = dict(prompt_embeds=pe, num_inference_steps=STEPS, output_type="pt")
    ref = pipe(**kw, generator=gen(8)).images
    for extra in ({}, {"trust_remote_code": True}):
        loaded = DeemImagePipeline.from_pretrained(saved, **extra)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.unet is not model.unet and loaded.config.image_size == 32
        if extra:
            assert type(loaded.side_network).__module__.startswith("transformers_modules")
        out = loaded(**kw, generator=gen(8)).images
        assert torch.equal(out, ref), extra


FRESH = textwrap.dedent(
    """
    import importlib, json, sys, torch
    torch.set_num_threads(int(sys.argv[2]))  # the parent's, so that the float reductions split the same way
    sys.modules["deem"] = None  # only the files saved next to the weights
    from transformers import AutoModel
    path = sys.argv[1]
    ref = torch.load(path + "/pipe_reference.pt")
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    package = type(model).__module__.rsplit(".", 1)[0]
    if hasattr(model, "image_pipeline"):
        pipe = model.image_pipeline()
    else:
        pipe = importlib.import_module(package + ".pipeline_deem").DeemImagePipeline.from_model(model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=ref["prompt_embeds"], num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(8)).images
    print("RESULT" + json.dumps({"module": type(pipe).__module__, "shared": pipe.unet is model.unet,
                                 "equal": bool(torch.equal(out, ref["images"]))}))
    """
)


def test_fresh_process_trust_remote_code_pipeline(model, pipe, saved):
    if not (saved / "pipeline_deem.py").exists():
        pytest.skip(
            "pipeline_deem.py is copied next to the weights only once modeling_deem.py imports it "
            "(`from .pipeline_deem import DeemImagePipeline`)"
        )
    pe = cond(model, seed=14)
    images = pipe(prompt_embeds=pe, num_inference_steps=2, output_type="pt", generator=gen(8)).images
    torch.save({"prompt_embeds": pe, "images": images}, saved / "pipe_reference.pt")
    threads = str(torch.get_num_threads())
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(saved), threads], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out["module"].startswith("transformers_modules") and out["module"].endswith(".pipeline_deem")
    assert out["shared"] and out["equal"]


def test_prompt_embeds_as_a_list_and_per_component_dtypes(model, pipe, saved):
    from deem.modeling.pipeline_deem import DeemImagePipeline

    pe = cond(model)
    kw = dict(num_inference_steps=STEPS, output_type="pt")
    stacked = pipe(prompt_embeds=pe, generator=[gen(1), gen(2)], **kw).images
    listed = pipe(prompt_embeds=[pe[0], pe[1:2]], generator=[gen(1), gen(2)], **kw).images
    assert torch.equal(stacked, listed)
    with pytest.raises(ValueError, match="list must hold"):
        pipe(prompt_embeds=[pe], **kw)
    loaded = DeemImagePipeline.from_pretrained(saved, torch_dtype={"unet": torch.bfloat16, "default": torch.float32})
    assert loaded.unet.dtype == torch.bfloat16 and loaded.side_network.parameters().__next__().dtype == torch.float32
    assert next(loaded.vae.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="not components"):
        DeemImagePipeline.from_pretrained(saved, torch_dtype={"unet": torch.bfloat16, "text_encoder": torch.float16})


# ---------------------------------------------------------------------------------------------------------------
# saving and loading the pipeline itself (model_index.json)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pipe(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("deem_pipe_saved")
    pipe.save_pretrained(path)
    return path


def test_save_pretrained_writes_a_diffusers_layout(pipe, saved_pipe):
    index = json.loads((saved_pipe / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_deem", "DeemImagePipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["side_network"] == ["deem.modeling.mmfs", "DeemUNetSideNetwork"]
    assert index["decoder_perceiver"] == ["deem.modeling.image_decoder_deem", "DeemDecoderPerceiver"]
    assert index["image_size"] == 32
    for name in ("unet", "vae", "side_network", "decoder_perceiver", "scheduler"):
        assert (saved_pipe / name).is_dir() and any((saved_pipe / name).iterdir()), name
    assert "from deem.modeling.pipeline_deem import DeemImagePipeline" in (saved_pipe / "pipeline_deem.py").read_text()
    assert not [p.name for p in saved_pipe.iterdir() if p.name.startswith(".tmp-")]


def test_saved_pipeline_loads_and_samples_the_same(model, pipe, saved_pipe):
    from diffusers import DiffusionPipeline

    from deem.modeling.pipeline_deem import DeemImagePipeline

    pe = cond(model, seed=21)
    ctx = torch.randn(2, 3, model.config.text_config.hidden_size, generator=gen(22))
    kw = dict(num_inference_steps=STEPS, output_type="pt", guidance_scale=3.0)
    ref = pipe(prompt_embeds=pe, **kw, generator=gen(9)).images
    ref_ctx = pipe(context_features=ctx, **kw, generator=gen(9)).images
    loaded = [DeemImagePipeline.from_pretrained(saved_pipe)]
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved_pipe)  # custom code, as for every custom pipeline
    loaded.append(DiffusionPipeline.from_pretrained(saved_pipe, trust_remote_code=True))
    for p in loaded:
        assert type(p) is DeemImagePipeline
        assert p.unet is not model.unet and p.decoder_perceiver is not model.decoder_perceiver
        assert torch.equal(p.decoder_perceiver.null_condition, model.null_condition)
        p.set_progress_bar_config(disable=True)
        assert torch.equal(p(prompt_embeds=pe, **kw, generator=gen(9)).images, ref)
        assert torch.equal(p(context_features=ctx, **kw, generator=gen(9)).images, ref_ctx)
    half = DeemImagePipeline.from_pretrained(saved_pipe, dtype={"unet": torch.bfloat16, "default": torch.float32})
    assert half.unet.dtype == torch.bfloat16 and half.decoder_perceiver.dtype == torch.float32


def test_saved_pipeline_with_other_code_needs_trust(saved_pipe, tmp_path):
    import shutil

    from deem.modeling.pipeline_deem import DeemImagePipeline

    copy = tmp_path / "edited"
    shutil.copytree(saved_pipe, copy)
    (copy / "pipeline_deem.py").write_text((copy / "pipeline_deem.py").read_text() + "print('side effect')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DeemImagePipeline.from_pretrained(copy)


FRESH_PIPE = textwrap.dedent(
    """
    import json, sys, torch
    from diffusers import DiffusionPipeline
    torch.set_num_threads(int(sys.argv[2]))  # the parent's, so that the float reductions split the same way
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    ref = torch.load(sys.argv[1] + "/../reference.pt")
    out = pipe(prompt_embeds=ref["prompt_embeds"], num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(8)).images
    print("RESULT" + json.dumps({"cls": type(pipe).__module__ + "." + type(pipe).__name__,
                                 "equal": bool(torch.equal(out, ref["images"]))}))
    """
)


def test_saved_pipeline_loads_in_a_fresh_process(model, pipe, saved_pipe):
    """A new process that never imported deem: the saved pipeline_deem.py brings in our classes."""
    pe = cond(model, seed=23)
    images = pipe(prompt_embeds=pe, num_inference_steps=2, output_type="pt", generator=gen(8)).images
    torch.save({"prompt_embeds": pe, "images": images}, saved_pipe.parent / "reference.pt")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PIPE, str(saved_pipe), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT") :])
    assert out == {"cls": "deem.modeling.pipeline_deem.DeemImagePipeline", "equal": True}


def test_a_failed_save_leaves_nothing(pipe, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(pipe.side_network), "save_pretrained", broken)
    target = tmp_path / "new" / "pipe"
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(target)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    pipe.save_pretrained(target)  # then it works, with the usual permissions
    assert (target / "model_index.json").is_file() and not [
        p for p in target.parent.iterdir() if p.name.startswith(".")
    ]
    assert (target.stat().st_mode & 0o777) == (0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_no_previous_image_constant_equals_running_the_side_network(model, pipe, monkeypatch):
    """Without a previous image the pipeline adds the side network's closed-form constant residuals (no maps are
    built or sampled); running every block on zero maps with mask 0, as the pipeline did before, gives the same
    latents up to float rounding. The constant is not nothing: removing the side network changes the result."""
    pe = cond(model, seed=30)
    kw = dict(prompt_embeds=pe, num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent")
    fast = pipe(**kw, generator=gen(31)).images
    bare = model_pipeline(model)
    bare.register_modules(side_network=None)
    removed = bare(**kw, generator=gen(31)).images
    net = model.unet_side
    calls = []

    def every_block(skips, mid, features, mask):
        calls.append(features)
        feat_dim = net.mid_block.feat_norm.normalized_shape[0]
        zeros = [torch.zeros(mid.shape[0], 1, feat_dim, h, w) for h, w in net.mid_block.attn.spatial_shapes]
        projected = net.project_features(zeros)
        out = [
            block(sample, value, projected.spatial_shapes, mask)
            for block, sample, value in zip(net.blocks(), (*skips, mid), projected.values)
        ]
        return tuple(out[:-1]), out[-1]

    monkeypatch.setattr(net, "forward", every_block)
    slow = pipe(**kw, generator=gen(31)).images
    assert len(calls) == STEPS and all(f is None for f in calls)  # the pipeline built no maps
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert (fast - removed).abs().max() > 1e-3
