"""MMFS deformable attention, gated LLM cross-attention, UNet side network (MMFSNet) and the UNet forward.

Parity tests reproduce fixture A (original implementation outputs) from the converted original weights.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deem.conversion.original_keys_diffusion import (
    UNET_PREFIX,
    VAE_PREFIX,
    check_ignore_tokens,
    convert_cross_attention_state_dicts,
    convert_side_network_state_dict,
    extract_prefixed,
    original_side_base_spatial_shapes,
    rename_cross_attention_key,
    rename_side_network_key,
)
from deem.modeling.configuration_deem import DeemCrossAttentionConfig, DeemDiffusionConfig
from deem.modeling.mmfs import (
    DeemGatedCrossAttention,
    DeemUNetSideNetwork,
    MultiScaleDeformableAttention,
    build_cross_attention_mask,
    deformable_sampling,
    relative_image_index,
    unet_forward_with_side,
    unet_skip_layout,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: the straightforward formulation of §2.6, one image and one level at a time
# ---------------------------------------------------------------------------------------------------------------


def naive_mmfs(attn: MultiScaleDeformableAttention, query, values, image_mask, shapes, reference_points=None):
    n, lq, _ = query.shape
    heads, levels, points, hd = attn.num_heads, attn.num_levels, attn.num_points, attn.head_dim
    n_img = values.shape[1]
    if image_mask.dim() == 2:
        image_mask = image_mask[:, None, :].expand(n, lq, n_img)
    elif image_mask.shape[1] != lq:
        image_mask = image_mask[:, -1:, :].expand(n, lq, n_img)
    image_mask = image_mask.to(query.dtype)
    # relative index, by explicit loops
    index = torch.zeros(n, lq, n_img, dtype=torch.long)
    for b in range(n):
        for q in range(lq):
            k = 0
            for i in reversed(range(n_img)):
                if image_mask[b, q, i] > 0:
                    k += 1
                    index[b, q, i] = k
    if reference_points is None:
        reference_points = torch.full((lq, 2), 0.5, dtype=query.dtype)
    if reference_points.dim() == 2:
        reference_points = reference_points[None].expand(n, lq, 2)
    base_h, base_w = attn.base_spatial_shape
    logits_all, locs_all = [], []
    for i in range(n_img):
        q_i = attn.dynamic_offset_mask(query) + attn.query_relpos(index[:, :, i])  # [N, Lq, d]
        off = attn.sampling_offsets(q_i).view(n, lq, heads, 1, points, 2)
        logit = attn.attention_weights(q_i).view(n, lq, heads, levels, points + 1)
        logit = logit + ((1 - image_mask[:, :, i]) * -10000.0)[:, :, None, None, None]
        logit = torch.cat([logit[..., :points], torch.full_like(logit[..., :1], -math.log(n_img * levels))], dim=-1)
        locs = []
        for lvl, (h, w) in enumerate(shapes):
            sh, sw = attn.spatial_shapes[lvl]
            ratio = torch.tensor([sw / base_w, sh / base_h], dtype=query.dtype)
            locs.append(
                reference_points[:, :, None, None, :]
                + off[:, :, :, 0] * ratio / torch.tensor([w, h], dtype=query.dtype)
            )
        logits_all.append(logit)
        locs_all.append(torch.stack(locs, 3))  # [N, Lq, H, L, P, 2]
    logits = torch.stack(logits_all, 3)  # [N, Lq, H, n_img, L, P+1]
    weights = torch.softmax(logits.flatten(3), -1).view_as(logits)
    value = attn.value_proj(values)  # [N, n_img, S, dm]
    out = torch.zeros(n, lq, heads, hd, dtype=query.dtype)
    for i in range(n_img):
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            vmap = (
                value[:, i, start : start + h * w]
                .reshape(n, h, w, heads, hd)
                .permute(0, 3, 4, 1, 2)
                .reshape(n * heads, hd, h, w)
            )
            grid = 2 * locs_all[i][:, :, :, lvl] - 1  # [N, Lq, H, P, 2]
            grid = grid.permute(0, 2, 1, 3, 4).reshape(n * heads, lq, points, 2)
            sampled = F.grid_sample(vmap, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            w_il = weights[:, :, :, i, lvl, :points].permute(0, 2, 1, 3).reshape(n * heads, 1, lq, points)
            out += (sampled * w_il).sum(-1).view(n, heads, hd, lq).permute(0, 3, 1, 2)
            start += h * w
        # the sink slot multiplies an all-zero token: nothing to add
    return attn.output_proj(out.reshape(n, lq, heads * hd))


def make_attn(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(
        d_query=24,
        d_value=20,
        d_model=32,
        d_out=16,
        num_heads=4,
        num_levels=3,
        num_points=3,
        spatial_shapes=[8, 4, 2],
        base_spatial_shape=4,
        max_num_images=6,
        offset_init_magnitude=2.0,
    )
    args.update(kw)
    attn = MultiScaleDeformableAttention(**args)
    with torch.no_grad():  # make every term matter (the init zeroes weights / biases)
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return attn.to(dtype)


def random_inputs(
    n=2, lq=7, n_img=3, shapes=((8, 8), (4, 4), (2, 2)), d_query=24, d_value=20, dtype=torch.float64, seed=1
):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(n, lq, d_query, generator=g, dtype=dtype)
    values = torch.randn(n, n_img, sum(h * w for h, w in shapes), d_value, generator=g, dtype=dtype)
    ref = torch.rand(n, lq, 2, generator=g, dtype=dtype)
    return query, values, ref


# ---------------------------------------------------------------------------------------------------------------
# MultiScaleDeformableAttention
# ---------------------------------------------------------------------------------------------------------------


def test_relative_image_index():
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0.5, 0, 0, 1]])
    expected = torch.tensor([[3, 0, 2, 1], [0, 0, 0, 0], [2, 1, 0, 0], [2, 0, 0, 1]])
    assert torch.equal(relative_image_index(mask), expected)


@pytest.mark.parametrize("mask_kind", ["3d", "2d", "3d_other_length"])
def test_mmfs_matches_naive(mask_kind):
    attn = make_attn()
    query, values, ref = random_inputs()
    shapes = [(8, 8), (4, 4), (2, 2)]
    n, lq, n_img = 2, 7, 3
    if mask_kind == "3d":
        mask = (torch.rand(n, lq, n_img, generator=torch.Generator().manual_seed(3)) > 0.4).double()
        mask[0, 0] = 0  # a query that sees nothing
        mask[1, 1] = 1
        mask[1, 2] = torch.tensor([0.9995, 0.0, 1.0])  # soft mask: visible, logits shifted by (1 - m) * -10000
    elif mask_kind == "2d":
        mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    else:
        mask = torch.tensor(
            [[[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]], dtype=torch.float64
        )
    with torch.no_grad():
        ours = attn(query, values, mask, spatial_shapes=shapes, reference_points=ref)
        ref_out = naive_mmfs(attn, query, values, mask, shapes, ref)
    torch.testing.assert_close(ours, ref_out, atol=1e-10, rtol=1e-10)


def test_mmfs_float32_matches_naive_and_default_centre():
    attn = make_attn(dtype=torch.float32)
    query, values, _ = random_inputs(dtype=torch.float32, lq=5)
    mask = torch.tensor([[[1, 1, 1]] * 5, [[0, 1, 0]] * 5], dtype=torch.float32)
    with torch.no_grad():
        ours = attn(query, values, mask)  # configured shapes, centre reference point
        ref_out = naive_mmfs(attn, query, values, mask, attn.spatial_shapes)
    torch.testing.assert_close(ours, ref_out, atol=1e-6, rtol=1e-6)
    # the configured shapes differ from the actual maps only through the scale ratios
    assert attn.scale_ratios == ((2.0, 2.0), (1.0, 1.0), (0.5, 0.5))


def test_blind_query_outputs_zero_before_projection():
    attn = make_attn(dtype=torch.float32)
    query, values, ref = random_inputs(dtype=torch.float32)
    mask = torch.ones(2, 7, 3)
    mask[0, 2] = 0
    mask[1, :] = 0
    with torch.no_grad():
        out = attn(query, values, mask, spatial_shapes=[(8, 8), (4, 4), (2, 2)], reference_points=ref)
    bias = attn.output_proj.bias
    torch.testing.assert_close(out[0, 2], bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], bias.expand(7, -1), atol=1e-6, rtol=0)
    assert (out[0, 3] - bias).abs().max() > 1e-2  # a seeing query is not blind


def test_query_relpos_follows_relative_index():
    """Visible images get query_relpos[rank from the most recent]: shifting the rows changes exactly that."""
    attn = make_attn()
    query, values, ref = random_inputs(n=1, lq=3)
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)  # indices: image0 -> 2, image2 -> 1
    shapes = [(8, 8), (4, 4), (2, 2)]
    with torch.no_grad():
        base = attn(query, values, mask, shapes, ref)
        attn.query_relpos.weight[3:].add_(5.0)  # unused rows: nothing changes
        torch.testing.assert_close(attn(query, values, mask, shapes, ref), base)
        attn.query_relpos.weight[0].add_(5.0)  # row 0 only touches the invisible image (weight ~0)
        torch.testing.assert_close(attn(query, values, mask, shapes, ref), base, atol=1e-12, rtol=0)
        attn.query_relpos.weight[2].add_(1.0)  # row 2 = the older visible image
        assert (attn(query, values, mask, shapes, ref) - base).abs().max() > 1e-3
        torch.testing.assert_close(
            attn(query, values, mask, shapes, ref), naive_mmfs(attn, query, values, mask, shapes, ref)
        )


def test_gradients_match_naive_and_flow_everywhere():
    attn = make_attn()
    query, values, ref = random_inputs()
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    shapes = [(8, 8), (4, 4), (2, 2)]
    grads = []
    for fn in (lambda q, v: attn(q, v, mask, shapes, ref), lambda q, v: naive_mmfs(attn, q, v, mask, shapes, ref)):
        attn.zero_grad()
        q = query.clone().requires_grad_()
        v = values.clone().requires_grad_()
        (fn(q, v) * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        grads.append([q.grad, v.grad] + [p.grad.clone() for p in attn.parameters()])
    names = ["query", "values"] + [n for n, _ in attn.named_parameters()]
    for name, a, b in zip(names, *grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
        assert a.abs().max() > 0, name


def test_sampling_core_gradcheck():
    g = torch.Generator().manual_seed(0)
    n, n_img, heads, hd, lq, points = 2, 2, 2, 3, 4, 2
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(n, n_img, heads, hd, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(1, lq, 2, generator=g, dtype=torch.float64, requires_grad=True)
    offsets = torch.randn(n, n_img, heads, lq, points, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(n, n_img, 2, heads, lq, points, generator=g, dtype=torch.float64, requires_grad=True)
    factors = [(0.3, 0.2), (0.5, 0.25)]
    assert torch.autograd.gradcheck(
        lambda v, r, o, w: deformable_sampling(v, shapes, r, o, factors, w), (value, ref, offsets, weights)
    )


def test_no_per_sample_activations_saved():
    """Training memory: the saved state must not hold [.., head_dim, Lq, points]-sized samples per image/level."""
    attn = make_attn(dtype=torch.float32, d_model=128, num_heads=4, num_points=4)
    query, values, ref = random_inputs(dtype=torch.float32, n=1, lq=64, n_img=4)
    mask = torch.ones(1, 64, 4)
    shapes = [(8, 8), (4, 4), (2, 2)]

    def saved_numel(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(query.requires_grad_(), values.requires_grad_())
        return total[0]

    ours = saved_numel(lambda q, v: attn(q, v, mask, shapes, ref))
    naive = saved_numel(lambda q, v: naive_mmfs(attn, q, v, mask, shapes, ref))
    sample_size = 4 * 3 * (4 * 32 * 64 * 4)  # n_img * levels * [heads, head_dim, Lq, points]
    assert naive > sample_size
    assert ours < sample_size / 2 and ours + 0.9 * sample_size < naive, (ours, naive)


def test_bf16_runs_and_tracks_fp32():
    attn = make_attn(dtype=torch.float32)
    query, values, ref = random_inputs(dtype=torch.float32)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    shapes = [(8, 8), (4, 4), (2, 2)]
    with torch.no_grad():
        full = attn(query, values, mask, shapes, ref)
    attn_bf16 = attn.to(torch.bfloat16)
    q = query.bfloat16().requires_grad_()
    out = attn_bf16(q, values.bfloat16(), mask.bool(), shapes, ref.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - full).abs().max() < 0.05 * full.abs().max()
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()
    assert torch.isfinite(attn_bf16.sampling_offsets.weight.grad.float()).all()


def test_init():
    attn = MultiScaleDeformableAttention(
        8,
        12,
        16,
        8,
        num_heads=2,
        num_levels=2,
        num_points=3,
        spatial_shapes=[4, 2],
        base_spatial_shape=4,
        max_num_images=50,
        offset_init_magnitude=1.5,
    )
    assert attn.sampling_offsets.weight.abs().max() == 0
    bias = attn.sampling_offsets.bias.view(2, 1, 3, 2)
    assert bias.abs().max() <= 1.5 and bias.abs().max() > 0
    assert attn.attention_weights.bias.abs().max() == 0 and attn.dynamic_offset_mask.bias.abs().max() == 0
    assert attn.value_proj.bias.abs().max() == 0 and attn.output_proj.bias.abs().max() == 0
    assert 0.015 < attn.query_relpos.weight.std() < 0.025
    assert sorted(n for n, _ in attn.named_parameters()) == sorted(
        [
            f"{m}.{p}"
            for m in ("sampling_offsets", "dynamic_offset_mask", "attention_weights", "value_proj", "output_proj")
            for p in ("weight", "bias")
        ]
        + ["query_relpos.weight"]
    )
    assert not list(attn.buffers())


# ---------------------------------------------------------------------------------------------------------------
# Gated cross-attention and the visibility mask
# ---------------------------------------------------------------------------------------------------------------


def test_build_cross_attention_mask_two_documents():
    bos, soi, img, t, pad = 1, 9, 8, 5, 0
    row0 = [bos, t, soi, img, img, t, soi, img, t, bos, t, soi, img, t]  # doc 1: images 0, 1; doc 2: image 2
    row1 = [pad, pad, bos, t, soi, img, t, soi, img, t, t, t, t, t]  # left-padded; 2nd soi has no image yet
    ids = torch.tensor([row0, row1])
    mask = build_cross_attention_mask(ids, soi, bos, num_images_per_row=[3, 1])
    # image n starts at its first placeholder (soi + 1); visible until the next <s>
    e0 = torch.zeros(14, 3)
    e0[3:9, 0] = 1  # image 0 (p=3) for l=3..8
    e0[7:9, 1] = 1  # image 1 (p=7) for l=7..8
    e0[12:14, 2] = 1  # image 2 (p=12) for l=12..13, after the <s> at 9
    e1 = torch.zeros(14, 3)
    e1[5:, 0] = 1  # only the first image of row 1 counts
    assert mask.dtype == torch.float32
    assert torch.equal(mask, torch.stack([e0, e1]))
    # default: every <soi> is an image
    assert build_cross_attention_mask(ids, soi, bos).shape == (2, 14, 3)
    assert build_cross_attention_mask(ids, soi, bos)[1, 8:, 1].eq(1).all()
    with pytest.raises(ValueError):
        build_cross_attention_mask(ids, soi, bos, num_images_per_row=[4, 1])


def test_gated_cross_attention_cached_decoding_and_projection_reuse():
    xcfg = DeemCrossAttentionConfig(
        num_heads=4, num_points=2, spatial_shapes=[4, 2], base_spatial_shape=4, max_num_images=5
    )
    block = DeemGatedCrossAttention(16, 8, xcfg, rms_norm_eps=1e-6).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hidden = torch.randn(2, 6, 16, dtype=torch.float64)
    vision = torch.randn(2, 2, 20, 8, dtype=torch.float64)
    mask = torch.zeros(2, 6, 2, dtype=torch.float64)
    mask[:, 2:, 0] = 1
    mask[0, 4:, 1] = 1
    full = block(hidden, vision, mask)
    # one query with the whole 3-D mask (cached decoding) = the last row of the full pass
    last = block(hidden[:, -1:], vision, mask)
    torch.testing.assert_close(last, full[:, -1:])
    projected = block.project_vision_states(vision)
    torch.testing.assert_close(block(hidden, projected, mask, vision_states_projected=True), full)
    # blind tokens get the output bias through the gate only
    torch.testing.assert_close(full[:, :2], (block.attn.output_proj.bias * torch.tanh(block.gate)).expand(2, 2, 16))
    block.gate.data.zero_()
    assert block(hidden, vision, mask).abs().max() == 0
    assert sorted(k for k in block.state_dict()) == sorted(
        ["gate", "norm_query.weight", "norm_value.weight"]
        + [
            f"attn.{m}.{p}"
            for m in ("sampling_offsets", "dynamic_offset_mask", "attention_weights", "value_proj", "output_proj")
            for p in ("weight", "bias")
        ]
        + ["attn.query_relpos.weight"]
    )


# ---------------------------------------------------------------------------------------------------------------
# UNet + side network
# ---------------------------------------------------------------------------------------------------------------


def tiny_unet_config():
    return {
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 12,
        "norm_num_groups": 4,
        "sample_size": 8,
        "use_linear_projection": True,
    }


def tiny_side_config(**kw):
    cfg = DeemDiffusionConfig(
        unet=tiny_unet_config(),
        vae={
            "block_out_channels": [4, 4, 4],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "norm_num_groups": 2,
        },
        image_size=32,
        side_attn_dim=16,
        side_num_heads=2,
        side_num_points=2,
        side_spatial_shapes=(8, 4, 2, 1),
        side_max_num_images=3,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_skip_layout():
    sd21 = DeemDiffusionConfig()
    skips, mid = unet_skip_layout(sd21.unet, sd21.latent_size)
    assert [c for c, _ in skips] == [320] * 4 + [640] * 3 + [1280] * 5
    assert [s for _, s in skips] == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8] and mid == (1280, 8)
    assert original_side_base_spatial_shapes(sd21.unet, 512) == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8]


def test_unet_forward_without_side_equals_diffusers():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    sample = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, 12)
    for timestep in (torch.tensor([3, 700]), torch.tensor(500), 250, 17.5):
        with torch.no_grad():
            expected = unet(sample, timestep, context).sample
            assert torch.equal(unet_forward_with_side(unet, None, sample, timestep, context), expected)
    # odd latent sizes go through the forward_upsample_size path
    odd = torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        assert torch.equal(unet_forward_with_side(unet, None, odd, 3, context[:1]), unet(odd, 3, context[:1]).sample)
        # a fresh side network has zero convs: it adds exactly nothing
        net = DeemUNetSideNetwork.from_diffusion_config(tiny_side_config(), feature_dim=6)
        feats = [torch.randn(2, 1, 6, s, s) for s in (8, 4, 2, 1)]
        out = unet_forward_with_side(
            unet, net, sample, torch.tensor([3, 700]), context, side_features=feats, side_mask=torch.ones(2, 1)
        )
        assert torch.equal(out, unet(sample, torch.tensor([3, 700]), context).sample)


def test_unet_side_cfg_batch_and_unsupported():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    net = DeemUNetSideNetwork.from_diffusion_config(tiny_side_config(), feature_dim=6).eval()
    assert len(net.down_blocks) == 6
    with torch.no_grad():
        for block in net.blocks():
            block.conv.weight.normal_(0, 0.5)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 5, 12)
    feats = [torch.randn(1, 2, 6, s, s) for s in (8, 4, 2, 1)]
    mask = torch.tensor([[1.0, 1.0]])
    with torch.no_grad():
        single = unet_forward_with_side(unet, net, sample, 10, context, side_features=feats, side_mask=mask)
        plain = unet(sample, 10, context).sample
        assert (single - plain).abs().max() > 1e-3
        doubled = unet_forward_with_side(
            unet,
            net,
            sample.repeat(2, 1, 1, 1),
            10,
            context.repeat(2, 1, 1),
            side_features=[f.repeat(2, 1, 1, 1, 1) for f in feats],
            side_mask=mask.repeat(2, 1),
        )
        torch.testing.assert_close(doubled[:1], single, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(doubled[1:], single, atol=1e-6, rtol=1e-6)
        projected = net.project_features([f.repeat(2, 1, 1, 1, 1) for f in feats])
        reused = unet_forward_with_side(
            unet,
            net,
            sample.repeat(2, 1, 1, 1),
            10,
            context.repeat(2, 1, 1),
            side_features=projected,
            side_mask=mask.repeat(2, 1),
        )
        assert torch.equal(reused, doubled)
        with pytest.raises(ValueError, match="batch"):
            unet_forward_with_side(
                unet, net, sample.repeat(2, 1, 1, 1), 10, context.repeat(2, 1, 1), side_features=feats, side_mask=mask
            )
    bad = UNet2DConditionModel(**tiny_unet_config(), num_class_embeds=3)
    with pytest.raises(ValueError, match="class embeddings"):
        unet_forward_with_side(bad, None, sample, 10, context)


def test_side_network_gradients_and_checkpointing():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    net = DeemUNetSideNetwork.from_diffusion_config(tiny_side_config(), feature_dim=6)
    with torch.no_grad():
        for block in net.blocks():
            block.conv.weight.normal_(0, 0.5)
    sample = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, 12)
    feats = [torch.randn(2, 1, 6, s, s) for s in (8, 4, 2, 1)]
    mask = torch.tensor([[1.0], [0.0]])
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = ckpt
        unet_forward_with_side(
            unet, net, sample, 10, context, side_features=feats, side_mask=mask
        ).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert grads[0]["down_blocks.0.attn.sampling_offsets.weight"].abs().max() > 0
    assert grads[0]["mid_block.attn.value_proj.weight"].abs().max() > 0
    assert all(not b.startswith("pos_embed") for b in grads[0])


# ---------------------------------------------------------------------------------------------------------------
# Conversion keys and fixture parity
# ---------------------------------------------------------------------------------------------------------------


def test_key_renames():
    assert (
        rename_side_network_key("mmfs_down_blocks.3.mmfs.sampling_offsets.weight")
        == "down_blocks.3.attn.sampling_offsets.weight"
    )
    assert rename_side_network_key("mmfs_mid_block.pos_embed") == "mid_block.pos_embed"
    assert rename_side_network_key("mmfs_down_blocks.0.conv.bias") == "down_blocks.0.conv.bias"
    assert rename_side_network_key("mmfs_mid_block.mmfs.ignore_token") is None
    assert rename_cross_attention_key("norm1.weight") == "norm_query.weight"
    assert rename_cross_attention_key("norm2.weight") == "norm_value.weight"
    assert rename_cross_attention_key("gate") == "gate"
    assert rename_cross_attention_key("attn.query_relpos.weight") == "attn.query_relpos.weight"
    assert rename_cross_attention_key("attn.ignore_token") is None
    with pytest.raises(KeyError):
        rename_side_network_key("mmfs_down_blocks.0.unknown.weight")
    with pytest.raises(ValueError):
        check_ignore_tokens({"a.ignore_token": torch.tensor([0.0, 1.0])})


@pytest.fixture(scope="module")
def fixture_a(parity_a_dir):
    """Fixture A from conftest (``../shared/fixtures`` or ``DEEM_FIXTURES``); a missing fixture fails, never skips."""
    return (
        json.loads((parity_a_dir / "configs.json").read_text()),
        load_file(str(parity_a_dir / "original_state_dict.safetensors")),
        load_file(str(parity_a_dir / "intermediates.safetensors")),
        load_file(str(parity_a_dir / "inputs.safetensors")),
    )


def _diffusers_config(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def test_fixture_unet_and_side_network_parity(fixture_a):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs, original, inter, _ = fixture_a
    sd_cfg = configs["stable_diffusion"]
    unet_cfg = _diffusers_config(sd_cfg["unet/config.json"])
    vae_cfg = _diffusers_config(sd_cfg["vae/config.json"])
    unet = UNet2DConditionModel.from_config(unet_cfg).eval()
    unet.load_state_dict(extract_prefixed(original, UNET_PREFIX), strict=True)
    AutoencoderKL.from_config(vae_cfg).load_state_dict(extract_prefixed(original, VAE_PREFIX), strict=True)

    image_size = configs["model_config"]["image_decoder_config"]["image_size"]
    config = DeemDiffusionConfig(unet=unet_cfg, vae=vae_cfg, image_size=image_size, side_spatial_shapes=(64, 32, 16, 8))
    config.side_base_spatial_shapes = original_side_base_spatial_shapes(unet_cfg, image_size)
    assert config.side_base_spatial_shapes == [8, 8, 8, 4, 1]
    image_embed_dim = configs["model_config"]["image_embed_dim"]
    net = DeemUNetSideNetwork.from_diffusion_config(config, image_embed_dim).eval()
    converted = convert_side_network_state_dict(original)
    net.load_state_dict(converted, strict=True)
    torch.testing.assert_close(
        net.down_blocks[0].pos_embed,
        original["visual_tokenizer.encoder.mmfs_module.mmfs_down_blocks.0.pos_embed"],
        atol=0,
        rtol=0,
    )

    noisy, timesteps = inter["unet_probe.noisy_latents"], inter["unet_probe.timesteps"]
    cases = {
        "pred_decoder_cond": ("image_decoder.context_features", "image_decoder"),
        "pred_encoder_cond": ("encoder_path.dif_embed", "encoder_path"),
        "pred_decoder_cond_no_mmfs": ("image_decoder.context_features", None),
    }
    deviations = {}
    with torch.no_grad():
        for name, (context, side) in cases.items():
            if side is None:
                out = unet_forward_with_side(unet, net, noisy, timesteps, inter[context])
            else:
                feats = [inter[f"{side}.mmfs_features.{i}"] for i in range(4)]
                out = unet_forward_with_side(
                    unet,
                    net,
                    noisy,
                    timesteps,
                    inter[context],
                    side_features=feats,
                    side_mask=inter[f"{side}.mmfs_mask"],
                )
            expected = inter[f"unet_probe.{name}"]
            deviations[name] = (out - expected).abs().max().item()
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=name)
    print("max abs deviation vs fixture A:", deviations)
    # the side network matters in this fixture (the probe would not catch a no-op)
    assert (inter["unet_probe.pred_decoder_cond"] - inter["unet_probe.pred_decoder_cond_no_mmfs"]).abs().max() > 1e-2


def test_fixture_llm_cross_attention_parity(fixture_a):
    """Layer 0 of the fixture LLM (self-attention, gated MMFS cross-attention, MLP) reproduces its recorded output."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    configs, original, inter, inputs = fixture_a
    llama = {
        k: v
        for k, v in configs["llama_config"].items()
        if k not in ("architectures", "transformers_version", "torch_dtype")
    }
    lcfg = LlamaConfig(**llama)
    lcfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(lcfg, 0).eval()
    prefix = "mm_decoder.layers.0."
    layer.load_state_dict(
        {k[len(prefix) :]: v for k, v in original.items() if k.startswith(prefix) and ".llama_cross_attn." not in k}
    )
    model_cfg = configs["model_config"]
    xcfg = DeemCrossAttentionConfig(spatial_shapes=model_cfg["spatial_shapes"])
    cross = DeemGatedCrossAttention(lcfg.hidden_size, model_cfg["image_embed_dim"], xcfg, lcfg.rms_norm_eps).eval()
    converted = convert_cross_attention_state_dicts(original)
    assert sorted(converted) == [0]
    cross.load_state_dict(converted[0], strict=True)

    special = configs["special_tokens"]
    mask = build_cross_attention_mask(inputs["text_ids"], special["soi"], special["bos"], inputs["num_image_per_seq"])
    assert torch.equal(mask, inter["mm_decoder.cross_attention_mask"])

    x0 = inter["mm_decoder.hidden_states.0"]
    bsz, length, _ = x0.shape
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None].repeat(bsz, 1, 1, 1)
    causal = causal.masked_fill(inputs["attention_mask"][:, None, None, :] == 0, torch.finfo(torch.float32).min)
    positions = torch.arange(length)[None].expand(bsz, length)
    with torch.no_grad():
        h = (
            x0
            + layer.self_attn(
                hidden_states=layer.input_layernorm(x0),
                attention_mask=causal,
                position_embeddings=LlamaRotaryEmbedding(lcfg)(x0, positions),
                position_ids=positions,
            )[0]
        )
        xattn = cross(h, inter["mm_decoder.vision_hidden_states"], mask)
        h = h + xattn
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    assert xattn.abs().max() > 1e-2
    torch.testing.assert_close(h, inter["mm_decoder.hidden_states.1"], atol=1e-5, rtol=1e-5)


def _side_network_every_row(net, skips, mid, feats, mask):
    """The side network with every row through its blocks (no constant shortcut for rows without an image)."""
    projected = net.project_features(feats)
    out = [
        block(sample, value, projected.spatial_shapes, mask)
        for block, sample, value in zip(net.blocks(), (*skips, mid), projected.values)
    ]
    return out[:-1], out[-1]


def test_side_network_rows_without_an_image_get_the_closed_form():
    """Rows whose mask is 0 get the constant no_image_residual instead of running the blocks: the same residuals up
    to float rounding, and the same gradients for every parameter and the UNet samples."""
    torch.manual_seed(0)
    net = DeemUNetSideNetwork.from_diffusion_config(tiny_side_config(), feature_dim=6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    skips, mid = [torch.randn(3, c, s, s) for c, s in net.skip_layout], torch.randn(3, 16, 2, 2)
    feats = [torch.randn(3, 1, 6, s, s) for s in (8, 4, 2, 1)]
    for mask in (torch.tensor([[1.0], [0.0], [0.0]]), torch.zeros(3, 1), torch.ones(3, 1)):
        results = []
        for fn in (net, lambda *a: _side_network_every_row(net, *a)):
            net.zero_grad()
            inputs = [s.clone().requires_grad_() for s in (*skips, mid)]
            down, mid_res = fn(inputs[:-1], inputs[-1], feats, mask)
            weights = [torch.randn(r.shape, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(down)]
            loss = sum((r * w).sum() for r, w in zip(down, weights)) + mid_res.square().sum()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
            results.append(([*down, mid_res], [i.grad for i in inputs], grads))
        (fast, fast_in, fast_p), (slow, slow_in, slow_p) = results
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(fast_in, slow_in):  # None: the fast path does not depend on the sample (no image seen)
            torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, rtol=1e-4, atol=1e-5)
        for name in slow_p:  # parameters the fast path never reaches get exactly zero gradient the slow way
            torch.testing.assert_close(
                fast_p.get(name, torch.zeros_like(slow_p[name])), slow_p[name], atol=1e-5, rtol=1e-4
            )
        if not bool(mask.any()):
            # no image anywhere: constant maps, and no features needed at all
            assert all(bool((r == r[:1, :, :1, :1]).all()) for r in fast)
            down, mid_res = net(skips, mid, None, mask)
            for a, b in zip([*down, mid_res], slow):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="marks images as present"):
        net(skips, mid, None, torch.ones(3, 1))


@pytest.mark.parametrize("n_img", [1, 2])
def test_dense_sampling_equals_the_grid_sample_loop(monkeypatch, n_img):
    """The matrix-product path (wide heads, small maps) gives the grid_sample loop's values and gradients,
    taps outside the maps included (offsets up to several map widths)."""
    import deem.modeling.mmfs as mmfs

    g = torch.Generator().manual_seed(1)
    shapes = [(6, 5), (3, 3), (2, 1)]
    total = sum(h * w for h, w in shapes)
    n, heads, head_dim, lq, points = 2, 2, 32, 7, 3
    inputs = (
        torch.randn(n, n_img, heads, head_dim, total, generator=g, dtype=torch.float64),
        torch.rand(1, lq, 2, generator=g, dtype=torch.float64),
        torch.randn(n, n_img, heads, lq, points, 2, generator=g, dtype=torch.float64) * 3,
        torch.rand(n, n_img, len(shapes), heads, lq, points, generator=g, dtype=torch.float64),
    )
    factors = [(1 / w, 1 / h) for h, w in shapes]
    results = {}
    for name, limit in (("dense", 1 << 40), ("loop", 0)):
        monkeypatch.setattr(mmfs, "DENSE_SAMPLING_MAX_ELEMENTS", limit)
        leaves = [t.clone().requires_grad_() for t in inputs]
        calls = []
        monkeypatch.setattr(mmfs._DenseSampling, "apply", _counting(mmfs._DenseSampling.apply, calls))
        out = mmfs.deformable_sampling(leaves[0], shapes, leaves[1], leaves[2], factors, leaves[3])
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results[name] = [out.detach()] + [t.grad for t in leaves]
        assert len(calls) == (1 if name == "dense" else 0)
    for what, a, b in zip(("out", "value", "ref", "offsets", "weights"), results["dense"], results["loop"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=what)
        assert b.abs().max() > 0, what


def _counting(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped


def test_dense_sampling_gradcheck():
    import deem.modeling.mmfs as mmfs

    g = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (2, 2)]
    args = (
        torch.randn(1, 2, 1, 2, 16, generator=g, dtype=torch.float64, requires_grad=True),
        torch.rand(1, 1, 3, 1, 2, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 2, 1, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True),
        torch.rand(1, 2, 2, 1, 3, 2, generator=g, dtype=torch.float64, requires_grad=True),
    )
    factors = ((0.3, 0.2), (0.5, 0.25))
    assert torch.autograd.gradcheck(lambda *a: mmfs._DenseSampling.apply(*a, tuple(shapes), factors), args)


@pytest.mark.parametrize("on_pixel_centres", [False, True])
def test_dense_sampling_matches_grid_sample_values_and_gradients(on_pixel_centres):
    """The tent-matrix path (forward and its hand-written backward) against the grid_sample loop, float64: the same
    values and the same four gradients, also where every point sits exactly on a pixel centre (zero offsets at the
    centre of odd-sized maps, a 1x1 level), where grid_sample's one-sided derivative is the convention to follow."""
    import deem.modeling.mmfs as mmfs

    g = torch.Generator().manual_seed(3)
    shapes = ((5, 5), (3, 3), (1, 1)) if on_pixel_centres else ((3, 4), (2, 2), (1, 1))
    total, levels = sum(h * w for h, w in shapes), len(shapes)
    n, n_img, heads, dim, lq, points = 2, 2, 3, 4, 5, 3
    f64 = torch.float64
    value = torch.randn(n, n_img, heads, dim, total, generator=g, dtype=f64)
    if on_pixel_centres:
        ref = torch.full((1, 1, lq, 1, 2), 0.5, dtype=f64)
        offsets = torch.zeros(n, n_img, heads, lq, points, 2, dtype=f64)
    else:
        ref = torch.rand(n, 1, lq, 1, 2, generator=g, dtype=f64)
        offsets = torch.randn(n, n_img, heads, lq, points, 2, generator=g, dtype=f64) * 3
    weights = torch.rand(n, n_img, levels, heads, lq, points, generator=g, dtype=f64)
    factors = tuple((1.0 / w, 1.0 / h) for h, w in shapes)
    probe = None
    results = []
    for fn in (mmfs._DenseSampling, mmfs._DeformableSampling):
        args = [t.clone().requires_grad_(True) for t in (value, ref, offsets, weights)]
        out = fn.apply(*args, shapes, factors)
        if probe is None:
            probe = torch.randn(out.shape, generator=g, dtype=f64)
        (out * probe).sum().backward()
        results.append((out.detach(), [a.grad for a in args]))
    (dense, dense_grads), (loop, loop_grads) = results
    torch.testing.assert_close(dense, loop, atol=1e-12, rtol=1e-12)
    for name, a, b in zip(("value", "reference_points", "offsets", "weights"), dense_grads, loop_grads):
        assert a is not None and a.abs().sum() > 0 or name == "offsets" and on_pixel_centres, name
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11, msg=name)
