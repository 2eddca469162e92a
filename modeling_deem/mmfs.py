"""Multi-image multi-scale deformable attention (MMFS) and the modules built on it (§2.5, §2.6, §2.9).

* [`MultiScaleDeformableAttention`]: the attention itself, plain PyTorch (``F.grid_sample``), no compiled op.
* [`DeemGatedCrossAttention`]: the tanh-gated block inserted into LLM layers (§2.5), and
  [`build_cross_attention_mask`] for its token -> image visibility.
* [`DeemUNetSideNetwork`]: one MMFS block per UNet skip sample plus one after the mid block (MMFSNet, §2.9),
  and [`unet_forward_with_side`]: a forward over a diffusers ``UNet2DConditionModel`` that adds its residuals.

Value layout used throughout: the feature maps of every image are flattened level by level (row-major
``h_l * w_l`` positions per level) and concatenated, ``values [N, n_img, S, C]`` with ``S = sum_l h_l * w_l``;
the per-level ``(h_l, w_l)`` are passed alongside as ``spatial_shapes``.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .pos_embed import resize_table, sincos_2d

MASK_LOGIT = -10000.0


def _as_hw(shape) -> tuple[int, int]:
    """``int`` side or ``(h, w)`` pair -> ``(h, w)``."""
    if isinstance(shape, (int, float)):
        return int(shape), int(shape)
    h, w = shape
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------------------------
# Sampling core
# ---------------------------------------------------------------------------------------------------------------


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the sampling accumulates in: fp32 for low-precision tensors, else their own."""
    return torch.float32 if t.element_size() < 4 else t.dtype


def _sample_level(value_map, grid, weight):
    """value_map [B, D, h, w], grid [B, Lq, P, 2] in [-1, 1], weight [B, 1, Lq, P] -> [B, D, Lq]."""
    sampled = F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled * weight).sum(-1)


class _DeformableSampling(torch.autograd.Function):
    """Weighted bilinear sampling over images x levels x points that keeps no per-sample activations.

    Forward and backward loop over (image, level); backward recomputes each ``grid_sample``, so the saved state is
    the inputs only (values and the [.., Lq, P]-sized offsets / weights), never ``[.., head_dim, Lq, P]`` samples.
    """

    @staticmethod
    def forward(ctx, value, reference_points, offsets, weights, level_shapes, level_factors):
        # value [N, n_img, H, D, S]; reference_points [N|1, 1, Lq, 1, 2]; offsets [N, n_img, H, Lq, P, 2];
        # weights [N, n_img, L, H, Lq, P]
        ctx.level_shapes = level_shapes
        ctx.level_factors = level_factors
        ctx.save_for_backward(value, reference_points, offsets, weights)
        n, n_img, heads, head_dim, _ = value.shape
        lq, points = offsets.shape[3], offsets.shape[4]
        factors = offsets.new_tensor(level_factors) * 2  # d(grid)/d(offset) per level, (x, y)
        grid_base = 2 * reference_points - 1
        acc_dtype = _work_dtype(value)
        out = torch.zeros(n * heads, head_dim, lq, device=value.device, dtype=acc_dtype)
        with torch.autocast(value.device.type, enabled=False):  # the value dtype throughout, also when recomputed
            for i in range(n_img):
                start = 0
                for lvl, (h, w) in enumerate(level_shapes):
                    value_map = value[:, i, :, :, start : start + h * w].reshape(n * heads, head_dim, h, w)
                    grid = (grid_base + offsets[:, i] * factors[lvl]).reshape(n * heads, lq, points, 2)
                    weight = weights[:, i, lvl].reshape(n * heads, 1, lq, points)
                    out += _sample_level(value_map, grid, weight)
                    start += h * w
        return out.to(value.dtype).view(n, heads, head_dim, lq)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, reference_points, offsets, weights = ctx.saved_tensors
        need_value, need_ref, need_offsets, need_weights = ctx.needs_input_grad[:4]
        need_grid = need_offsets or need_ref
        n, n_img, heads, head_dim, _ = value.shape
        lq, points = offsets.shape[3], offsets.shape[4]
        acc_dtype = _work_dtype(value)
        factors = offsets.new_tensor(ctx.level_factors) * 2
        grid_base = 2 * reference_points - 1
        grad_out = grad_out.reshape(n * heads, head_dim, lq, 1).to(value.dtype)
        grad_value = torch.zeros_like(value) if need_value else None
        grad_weights = torch.zeros_like(weights) if need_weights else None
        grad_offsets = torch.zeros(offsets.shape, device=offsets.device, dtype=acc_dtype) if need_offsets else None
        grad_grid_sum = torch.zeros(n, heads, lq, 1, 2, device=offsets.device, dtype=acc_dtype) if need_ref else None
        for i in range(n_img):
            start = 0
            for lvl, (h, w) in enumerate(ctx.level_shapes):
                value_map = value[:, i, :, :, start : start + h * w].reshape(n * heads, head_dim, h, w).detach()
                grid = (grid_base + offsets[:, i] * factors[lvl]).reshape(n * heads, lq, points, 2).detach()
                weight = weights[:, i, lvl].reshape(n * heads, 1, lq, points)
                value_map.requires_grad_(need_value)
                grid.requires_grad_(need_grid)
                with torch.enable_grad(), torch.autocast(value.device.type, enabled=False):
                    sampled = F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                if need_weights:
                    grad_weights[:, i, lvl] = (sampled.detach() * grad_out).sum(1).view(n, heads, lq, points)
                inputs = [t for t, need in ((value_map, need_value), (grid, need_grid)) if need]
                if inputs:
                    grads = list(torch.autograd.grad(sampled, inputs, grad_out * weight))
                    if need_value:
                        grad_map = grads.pop(0)
                        grad_value[:, i, :, :, start : start + h * w] = grad_map.view(n, heads, head_dim, h * w)
                    if need_grid:
                        grad_grid = grads.pop(0).view(n, heads, lq, points, 2)
                        if need_offsets:
                            grad_offsets[:, i] += grad_grid * factors[lvl]
                        if need_ref:
                            grad_grid_sum += grad_grid.sum(3, keepdim=True)
                start += h * w
        grad_ref = None
        if need_ref:
            grad_ref = grad_grid_sum * 2
            for dim, size in enumerate(reference_points.shape):
                if size == 1 and grad_ref.shape[dim] != 1:
                    grad_ref = grad_ref.sum(dim, keepdim=True)
            grad_ref = grad_ref.to(reference_points.dtype)
        if need_offsets:
            grad_offsets = grad_offsets.to(offsets.dtype)
        return grad_value, grad_ref, grad_offsets, grad_weights, None, None


# the dense path's [N*H, Lq, n_img*S] sampling matrix is built when it holds at most this many elements (16 MiB in
# fp32); larger problems (the 7B's LLM cross-attention, high-resolution UNet skips) loop over grid_sample
DENSE_SAMPLING_MAX_ELEMENTS = 1 << 22
# narrower heads sample faster through grid_sample (measured: head_dim 16 loop 8 ms vs dense 15 ms; 64: 100 vs 68)
DENSE_SAMPLING_MIN_HEAD_DIM = 32


def _tent_levels(ref, offsets, weights, level_shapes, level_factors):
    """Per (image, level): the points' unnormalised coordinates and their tent weights over the map's columns and
    rows, as grid_sample reads them (bilinear, ``align_corners=False``: ``ix = ((g + 1) * w - 1) / 2``): a point's
    weight on column ``x`` is ``max(0, 1 - |ix - x|)``, and columns outside the map do not exist (zero padding).
    Yields (image, level, first column, (h, w), dx [N,H,Lq,P,w] = ix - x, dy [.., h], cols, rows, attention
    weights [N,H,Lq,P], rows x attention weights), in the low-precision case in fp32."""
    work = _work_dtype(offsets)
    grid_base = (2 * ref - 1).to(work)  # [N|1, 1, Lq, 1, 2]
    total = sum(h * w for h, w in level_shapes)
    for i in range(offsets.shape[1]):
        off = offsets[:, i].to(work)  # [N, H, Lq, P, 2]
        start = i * total
        for lvl, (h, w) in enumerate(level_shapes):
            fx, fy = level_factors[lvl]
            ix = ((grid_base[..., 0] + off[..., 0] * (2 * fx) + 1) * w - 1) / 2  # [N, H, Lq, P]
            iy = ((grid_base[..., 1] + off[..., 1] * (2 * fy) + 1) * h - 1) / 2
            dx = ix[..., None] - torch.arange(w, device=ix.device, dtype=work)
            dy = iy[..., None] - torch.arange(h, device=iy.device, dtype=work)
            cols = (1 - dx.abs()).clamp_(min=0)
            rows = (1 - dy.abs()).clamp_(min=0)
            attn = weights[:, i, lvl].to(work)
            yield i, lvl, start, (h, w), dx, dy, cols, rows, attn, rows * attn[..., None]
            start += h * w


def _tent_block(weighted: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """One (image, level) block [N*H, Lq, h*w] of the sampling matrix: per query and head the sum over points of
    the attention-weighted row tents [N,H,Lq,P,h] x the column tents [.., w], one batched [h, P] @ [P, w] product
    (einsum picks the faster operand order)."""
    n, heads, lq, points, h = weighted.shape
    w = cols.shape[-1]
    block = torch.einsum("bph,bpw->bhw", weighted.reshape(-1, points, h), cols.reshape(-1, points, w))
    return block.reshape(n * heads, lq, h * w)


def _join_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(blocks, -1) if len(blocks) > 1 else blocks[0]


def _tent_matrix(ref, offsets, weights, level_shapes, level_factors) -> torch.Tensor:
    """The [N*H, Lq, n_img * S] sampling matrix, its (image, level) blocks side by side (`_tent_block`), with no
    scatter of taps (2.4x faster than scattering the 4 taps of every point at the side network's 16 heads x 8
    points x 4 levels; the same values to float rounding)."""
    tents = _tent_levels(ref, offsets, weights, level_shapes, level_factors)
    return _join_blocks([_tent_block(weighted, cols) for *_, cols, _, _, weighted in tents])


def _tent_slope(d: torch.Tensor) -> torch.Tensor:
    """d max(0, 1 - |d|) / d d with grid_sample's one-sided choice at the kinks (its taps are floor(i), floor(i) + 1):
    -1 for 0 <= d < 1, +1 for -1 <= d < 0, else 0."""
    return ((d >= -1) & (d < 0)).to(d.dtype) - ((d >= 0) & (d < 1)).to(d.dtype)


class _DenseSampling(torch.autograd.Function):
    """``_DeformableSampling`` as one matrix product: a [N*H, Lq, n_img*S] sampling matrix (`_tent_matrix`)
    multiplies the values [N*H, n_img*S, D] (one ``bmm`` instead of a ``grid_sample`` per image and
    level). Small maps only (``DENSE_SAMPLING_MAX_ELEMENTS``); like ``_DeformableSampling`` it saves its inputs
    only; the backward rebuilds the tents and differentiates them by hand, with grid_sample's one-sided derivative at
    pixel centres (`_tent_slope`)."""

    @staticmethod
    def forward(ctx, value, ref, offsets, weights, level_shapes, level_factors):
        ctx.level_shapes, ctx.level_factors = level_shapes, level_factors
        ctx.save_for_backward(value, ref, offsets, weights)
        n, n_img, heads, head_dim, total = value.shape
        values = value.permute(0, 2, 1, 4, 3).reshape(n * heads, n_img * total, head_dim)
        matrix = _tent_matrix(ref, offsets, weights, level_shapes, level_factors)
        out = torch.bmm(matrix.to(values.dtype), values)  # [N*H, Lq, D]
        return out.view(n, heads, -1, head_dim).transpose(2, 3)  # [N, H, D, Lq] as _DeformableSampling

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, ref, offsets, weights = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        n, n_img, heads, head_dim, total = value.shape
        lq, points = offsets.shape[3], offsets.shape[4]
        shapes, factors = ctx.level_shapes, ctx.level_factors
        grad = grad_out.transpose(2, 3).reshape(n * heads, -1, head_dim).to(value.dtype)  # [N*H, Lq, D]
        values = value.permute(0, 2, 1, 4, 3).reshape(n * heads, n_img * total, head_dim)
        work = _work_dtype(offsets)
        want_grid = need[1] or need[2]
        # d loss / d matrix [N*H, Lq, n_img*S]: each block is sum_p attn * rows (x) cols, differentiated by hand
        grad_matrix = torch.bmm(grad, values.transpose(1, 2)) if any(need[1:]) else None
        grad_weights = torch.zeros(weights.shape, device=weights.device, dtype=work) if need[3] else None
        grad_grid = (
            torch.zeros(n, n_img, heads, lq, points, 2, device=offsets.device, dtype=work) if want_grid else None
        )
        grad_offsets = torch.zeros_like(grad_grid) if need[2] else None
        blocks = []  # the forward's matrix, rebuilt in the same pass for d loss / d value
        tents = _tent_levels(ref, offsets, weights, shapes, factors)
        for i, lvl, start, (h, w), dx, dy, cols, rows, attn, weighted in tents:
            if need[0]:
                blocks.append(_tent_block(weighted, cols))
            if grad_matrix is None:
                continue
            block = grad_matrix[..., start : start + h * w].reshape(-1, h, w).to(work)  # [N*H*Lq, h, w]
            flat_cols, weighted = cols.reshape(-1, points, w), weighted.reshape(-1, points, h)
            d_weighted = torch.einsum("byx,bpx->bpy", block, flat_cols).view(rows.shape)
            if grad_weights is not None:
                grad_weights[:, i, lvl] = (d_weighted * rows).sum(-1)
            if want_grid:
                d_cols = torch.einsum("byx,bpy->bpx", block, weighted).view(cols.shape)
                # d ix / d grid_x = w / 2 (grid = 2 ref - 1 + offset * 2 factor)
                gx = (d_cols * _tent_slope(dx)).sum(-1) * (w / 2)
                gy = attn * (d_weighted * _tent_slope(dy)).sum(-1) * (h / 2)
                g = torch.stack([gx, gy], -1)  # [N, H, Lq, P, 2]
                grad_grid[:, i] += g
                if grad_offsets is not None:
                    fx, fy = factors[lvl]
                    grad_offsets[:, i] += g * g.new_tensor([2 * fx, 2 * fy])
        grad_value = None
        if need[0]:
            matrix = _join_blocks(blocks).to(values.dtype)
            grad_value = torch.bmm(matrix.transpose(1, 2), grad)  # [N*H, n_img*S, D]
            grad_value = grad_value.view(n, heads, n_img, total, head_dim).permute(0, 2, 1, 4, 3)
        grads = [None, grad_offsets, grad_weights]
        if need[1]:
            grad_ref = 2 * grad_grid.sum((1, 2, 4))  # [N, Lq, 2]
            if ref.shape[0] == 1:
                grad_ref = grad_ref.sum(0, keepdim=True)
            grads[0] = grad_ref.view(ref.shape)
        grads = [g.to(t.dtype) if g is not None else None for g, t in zip(grads, (ref, offsets, weights))]
        return grad_value, *grads, None, None


def deformable_sampling(value, spatial_shapes, reference_points, offsets, level_factors, weights):
    """Weighted bilinear sampling of every (image, level) map at ``reference + offset * factor_l``.

    value [N, n_img, H, D, S] (levels flattened row-major and concatenated); spatial_shapes [(h_l, w_l)];
    reference_points [N|1, Lq, 2] (x, y in [0, 1]); offsets [N, n_img, H, Lq, P, 2]; level_factors
    [(fx_l, fy_l)] (normalised displacement per unit offset); weights [N, n_img, L, H, Lq, P] -> [N, Lq, H*D].
    Bilinear, zero padding, pixel-centre convention (``align_corners=False``). Small problems run as one sampling
    matrix product (``_DenseSampling``), the rest loop over ``grid_sample`` per image and level.
    """
    n, n_img, heads, head_dim, total = value.shape
    ref = reference_points[:, None, :, None, :]  # [N|1, 1, Lq, 1, 2]
    level_shapes = tuple(_as_hw(s) for s in spatial_shapes)
    level_factors = tuple((float(fx), float(fy)) for fx, fy in level_factors)
    # the matrix product pays where grid_sample's per-channel work dominates (wide heads) and the matrix is small
    if head_dim >= DENSE_SAMPLING_MIN_HEAD_DIM and n * heads * offsets.shape[3] * n_img * total <= (
        DENSE_SAMPLING_MAX_ELEMENTS
    ):
        out = _DenseSampling.apply(value, ref, offsets, weights, level_shapes, level_factors)
    else:
        out = _DeformableSampling.apply(value, ref, offsets, weights, level_shapes, level_factors)
    return out.permute(0, 3, 1, 2).reshape(n, -1, heads * head_dim)


# ---------------------------------------------------------------------------------------------------------------
# The attention module
# ---------------------------------------------------------------------------------------------------------------


def relative_image_index(image_mask: torch.Tensor) -> torch.Tensor:
    """[..., n_img] mask -> [..., n_img] long: the most recent visible image is 1, the one before 2, ...;
    invisible 0."""
    visible = image_mask > 0
    count = visible.flip(-1).long().cumsum(-1).flip(-1)
    return count * visible


class MultiScaleDeformableAttention(nn.Module):
    r"""Multi-image multi-scale deformable attention (§2.6).

    Each query attends, per head, to ``num_points`` bilinear samples on every level of every image it may see;
    one softmax runs over all ``n_img * num_levels * num_points`` logits plus a null sink of logit 0, so a query
    that sees no image gets (almost exactly) zero before ``output_proj``. Each image gets its own query:
    ``dynamic_offset_mask(query) + query_relpos(relative image index)``.

    Args:
        d_query / d_value / d_model / d_out: query width, input value width, inner value width (split over heads),
            output width.
        spatial_shapes: the level sides the offsets are scaled for (``int`` or ``(h, w)`` per level).
        base_spatial_shape: ``int`` or ``(h, w)``; level ``l`` offsets are multiplied by
            ``spatial_shapes[l] / base_spatial_shape`` and divided by the actual map size.
        max_num_images: rows of ``query_relpos`` (relative index 0 = invisible, 1.. = visible).
    """

    def __init__(
        self,
        d_query: int,
        d_value: int,
        d_model: int,
        d_out: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        spatial_shapes: Sequence,
        base_spatial_shape=16,
        max_num_images: int = 50,
        offset_init_magnitude: float = 3.0,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        if len(spatial_shapes) != num_levels:
            raise ValueError(f"{len(spatial_shapes)} spatial_shapes given for {num_levels} levels")
        self.d_query, self.d_value, self.d_model, self.d_out = d_query, d_value, d_model, d_out
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.head_dim = d_model // num_heads
        self.max_num_images = max_num_images
        self.offset_init_magnitude = offset_init_magnitude
        self.spatial_shapes = tuple(_as_hw(s) for s in spatial_shapes)
        self.base_spatial_shape = _as_hw(base_spatial_shape)
        base_h, base_w = self.base_spatial_shape
        # (x, y) multiplier of the offsets per level (the original's non-persistent ``scale_ratios``)
        self.scale_ratios = tuple((w / base_w, h / base_h) for h, w in self.spatial_shapes)

        self.sampling_offsets = nn.Linear(d_query, num_heads * num_points * 2)
        self.dynamic_offset_mask = nn.Linear(d_query, d_query)
        self.attention_weights = nn.Linear(d_query, num_heads * num_levels * (num_points + 1))
        self.value_proj = nn.Linear(d_value, d_model)
        self.output_proj = nn.Linear(d_model, d_out)
        self.query_relpos = nn.Embedding(max_num_images, d_query)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self):
        """§2.6 Init: offsets weight 0 / bias U(-m, m) per (head, point); logits bias 0; projections xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        m = self.offset_init_magnitude
        bias = torch.empty(self.num_heads, 1, self.num_points, 2).uniform_(-m, m)
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        nn.init.zeros_(self.dynamic_offset_mask.bias)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)

    def project_values(self, values: torch.Tensor) -> torch.Tensor:
        """values [N, n_img, S, d_value] -> [N, n_img, S, d_model] (``value_proj``); reusable across calls."""
        return self.value_proj(values)

    def _logit_weights(self):
        """attention_weights rows without the (overwritten) sink logits: weight [H*L*P, d], bias [H*L*P]."""
        h, lvl, p = self.num_heads, self.num_levels, self.num_points
        weight = self.attention_weights.weight.view(h, lvl, p + 1, -1)[:, :, :p].reshape(h * lvl * p, -1)
        bias = self.attention_weights.bias.view(h, lvl, p + 1)[:, :, :p].reshape(-1)
        return weight, bias

    def forward(
        self,
        query: torch.Tensor,
        values: torch.Tensor,
        image_mask: torch.Tensor,
        spatial_shapes: Sequence | None = None,
        reference_points: torch.Tensor | None = None,
        values_projected: bool = False,
        output_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """query [N, Lq, d_query]; values [N, n_img, S, d_value] (or ``project_values`` output with
        ``values_projected=True``); image_mask [N, n_img] or [N, Lq', n_img] (1 = visible; a 3-D mask with
        Lq' != Lq contributes its last row); spatial_shapes: actual ``(h_l, w_l)`` of the flattened levels (default
        the configured ones); reference_points [Lq, 2] or [N, Lq, 2] (x, y in [0, 1], default the centre)
        -> [N, Lq, d_out]; with ``output_weights`` also the sampling weights [N, heads, Lq, n_img, levels, points]."""
        n, lq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        shapes = self.spatial_shapes if spatial_shapes is None else tuple(_as_hw(s) for s in spatial_shapes)
        if len(shapes) != levels:
            raise ValueError(f"got {len(shapes)} levels, the module was built for {levels}")
        value = values if values_projected else self.project_values(values)
        n_img, seq = value.shape[1], value.shape[2]
        if seq != sum(h * w for h, w in shapes):
            raise ValueError(
                f"values have {seq} positions per image, spatial_shapes {shapes} give {sum(h * w for h, w in shapes)}"
            )
        if n_img >= self.max_num_images:
            raise ValueError(f"{n_img} images per row; query_relpos has room for {self.max_num_images - 1}")
        dtype = value.dtype

        # 1. relative image index ([N, M, n_img], M = 1 or Lq) and the additive mask term
        if image_mask.dim() == 2:
            image_mask = image_mask[:, None, :]
        elif image_mask.shape[1] != lq:
            image_mask = image_mask[:, -1:, :]
        if image_mask.shape[-1] != n_img:
            raise ValueError(f"image_mask covers {image_mask.shape[-1]} images, values have {n_img}")
        index = relative_image_index(image_mask)

        # 3./4. per-image query = dynamic_offset_mask(query) + query_relpos(index); both heads are linear in it, so
        # Linear(q + r) = Linear(q) + W r is evaluated as a per-token term plus a gathered per-index table.
        q = self.dynamic_offset_mask(query)
        logit_weight, logit_bias = self._logit_weights()
        relpos = self.query_relpos.weight
        offsets = self.sampling_offsets(q)[:, :, None] + F.linear(relpos, self.sampling_offsets.weight)[index]
        logits = F.linear(q, logit_weight, logit_bias)[:, :, None] + F.linear(relpos, logit_weight)[index]

        # 5./6. mask term, then one softmax per (query, head) over images x levels x points and the null sink
        logits = logits.view(n, lq, n_img, heads, levels * points)
        logits = logits + ((1 - image_mask.to(logits.dtype)) * MASK_LOGIT)[..., None, None]
        logits = logits.permute(0, 1, 3, 2, 4).reshape(n, lq, heads, n_img * levels * points)
        weights = torch.softmax(F.pad(logits, (0, 1)), dim=-1)[..., :-1]
        weights = weights.view(n, lq, heads, n_img, levels, points).permute(0, 3, 4, 2, 1, 5)
        weights = weights.to(dtype).contiguous()  # [N, n_img, L, H, Lq, P]
        offsets = offsets.view(n, lq, n_img, heads, points, 2).permute(0, 2, 3, 1, 4, 5).to(dtype).contiguous()

        # 7./8. locations = reference + offset * ratio_l / (w_l, h_l); sampling
        if reference_points is None:
            reference_points = value.new_full((1, lq, 2), 0.5)
        elif reference_points.dim() == 2:
            reference_points = reference_points[None]
        reference_points = reference_points.to(dtype)
        factors = [(rx / w, ry / h) for (rx, ry), (h, w) in zip(self.scale_ratios, shapes)]
        value = value.reshape(n, n_img, seq, heads, self.head_dim).permute(0, 1, 3, 4, 2)
        sampled = deformable_sampling(value, shapes, reference_points, offsets, factors, weights)
        # 9. the sink contributes zero
        out = self.output_proj(sampled)
        if output_weights:
            return out, weights.permute(0, 3, 4, 1, 2, 5)  # [N, heads, Lq, n_img, levels, points]
        return out


# ---------------------------------------------------------------------------------------------------------------
# LLM side
# ---------------------------------------------------------------------------------------------------------------


class DeemGatedCrossAttention(nn.Module):
    r"""Gated MMFS cross-attention of an LLM layer (§2.5): ``attn(norm_query(x), norm_value(v)) * tanh(gate)``.

    Reference point (0.5, 0.5) for every query. ``forward`` returns the residual to add to the hidden states.
    """

    def __init__(self, hidden_size: int, image_embed_dim: int, cross_attention_config, rms_norm_eps: float = 1e-5):
        super().__init__()
        cfg = cross_attention_config
        if cfg.spatial_shapes is None:
            raise ValueError("cross_attention_config.spatial_shapes must be set")
        self.norm_query = LlamaRMSNorm(hidden_size, eps=rms_norm_eps)
        self.norm_value = LlamaRMSNorm(image_embed_dim, eps=rms_norm_eps)
        self.attn = MultiScaleDeformableAttention(
            d_query=hidden_size,
            d_value=image_embed_dim,
            d_model=image_embed_dim,
            d_out=hidden_size,
            num_heads=cfg.num_heads,
            num_levels=len(cfg.spatial_shapes),
            num_points=cfg.num_points,
            spatial_shapes=cfg.spatial_shapes,
            base_spatial_shape=cfg.base_spatial_shape,
            max_num_images=cfg.max_num_images,
            offset_init_magnitude=cfg.offset_init_magnitude,
        )
        self.gate = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_config(cls, config) -> "DeemGatedCrossAttention":
        """Build from a [`DeemConfig`]."""
        return cls(
            config.text_config.hidden_size,
            config.image_embed_dim,
            config.cross_attention_config,
            config.text_config.rms_norm_eps,
        )

    def project_vision_states(self, vision_states: torch.Tensor) -> torch.Tensor:
        """[B, n_img, S, image_embed_dim] -> [B, n_img, S, image_embed_dim] (``norm_value`` + ``value_proj``).

        Constant over a generation: compute once and pass with ``vision_states_projected=True``."""
        return self.attn.project_values(self.norm_value(vision_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        vision_states: torch.Tensor,
        cross_attention_mask: torch.Tensor,
        spatial_shapes: Sequence | None = None,
        vision_states_projected: bool = False,
        output_attentions: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [B, L, H]; vision_states [B, n_img, S, image_embed_dim] (c3, c4, c5 flattened and
        concatenated; ``spatial_shapes`` their sides, default the configured ones); cross_attention_mask
        [B, L', n_img] (L' = L, or any length during cached decoding: its last row is used) or [B, n_img]
        -> residual [B, L, H]; with ``output_attentions`` also the sampling weights
        [B, heads, L, n_img, levels, points]."""
        value = vision_states if vision_states_projected else self.project_vision_states(vision_states)
        out = self.attn(
            self.norm_query(hidden_states),
            value,
            cross_attention_mask,
            spatial_shapes=spatial_shapes,
            values_projected=True,
            output_weights=output_attentions,
        )
        weights = None
        if output_attentions:
            out, weights = out
        out = out * torch.tanh(self.gate).to(out.dtype)
        return (out, weights) if output_attentions else out


def build_cross_attention_mask(
    input_ids: torch.Tensor,
    soi_token_id: int,
    bos_token_id: int,
    num_images_per_row: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """[B, L] ids -> float [B, L, N_max] token -> image visibility (§2.5).

    Image n of a row (its n-th ``<soi>``; only the first ``num_images_per_row[b]`` count, default all) starts at
    ``p_n = soi position + 1``; token l sees it iff ``p_n <= l`` and ``p_n > `` the last ``<s>`` at or before l.
    """
    bsz, length = input_ids.shape
    device = input_ids.device
    pos = torch.arange(length, device=device)
    is_soi = input_ids == soi_token_id
    soi_count = is_soi.sum(1)
    if num_images_per_row is None:
        num_images = soi_count
    else:
        num_images = torch.as_tensor(num_images_per_row, device=device, dtype=torch.long).reshape(bsz)
        if bool((num_images > soi_count).any()):
            raise ValueError(f"rows have {soi_count.tolist()} <soi> tokens but {num_images.tolist()} images")
    n_max = int(num_images.max()) if bsz else 0
    never = length + 1
    rank = is_soi.long().cumsum(1) - 1
    column = torch.where(is_soi & (rank < n_max), rank, torch.full_like(rank, n_max))
    start = torch.full((bsz, n_max + 1), never, device=device, dtype=torch.long)
    start.scatter_reduce_(1, column, torch.where(is_soi, pos + 1, never).expand(bsz, length), reduce="amin")
    start = start[:, :n_max]
    start = torch.where(torch.arange(n_max, device=device) < num_images[:, None], start, torch.full_like(start, never))
    last_bos = torch.where(input_ids == bos_token_id, pos, -1).cummax(1).values  # [B, L]
    visible = (start[:, None, :] <= pos[None, :, None]) & (start[:, None, :] > last_bos[:, :, None])
    return visible.float()


# ---------------------------------------------------------------------------------------------------------------
# UNet side network
# ---------------------------------------------------------------------------------------------------------------


def unet_skip_layout(unet_config: dict, latent_size: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """diffusers UNet2DConditionModel config -> ([(channels, side)] of every down-path skip sample, (channels, side)
    of the mid block) for a ``latent_size`` latent: conv_in, each resnet of each down block, each downsampler."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    num_blocks = len(unet_config["down_block_types"])
    side = latent_size
    skips = [(channels[0], side)]
    for i in range(num_blocks):
        skips += [(channels[i], side)] * layers[i]
        if i < num_blocks - 1:  # every down block but the last has a downsampler
            side = (side + 1) // 2
            skips.append((channels[i], side))
    return skips, (channels[-1], side)


def sampling_layout(values: torch.Tensor) -> torch.Tensor:
    """[..., S, C] values -> the same values (and shape) stored channel-major (C outer, S inner), the layout the
    deformable sampling reads them in: each level's [head_dim, h, w] map is then a view, not a copy. Worth it for
    values reused over many calls (the pipeline's side features, the same at every denoising step)."""
    return values.transpose(-1, -2).contiguous().transpose(-1, -2)


class DeemSideFeatures(NamedTuple):
    """Per-block projected side-network values (``DeemUNetSideNetwork.project_features``); reusable across
    denoising steps. ``values``: one [N, n_img, S, side_attn_dim] per block (down blocks, then mid);
    ``spatial_shapes``: the ``(h_l, w_l)`` of the four levels."""

    values: tuple
    spatial_shapes: tuple


class DeemSideBlock(nn.Module):
    r"""One MMFSNet block: residual ``conv(attn(query_norm(x) + pos, feat_norm(features)))`` for a skip sample."""

    def __init__(self, channels: int, feature_dim: int, base_spatial_shape: int, latent_size: int, config):
        super().__init__()
        eps = config.side_layer_norm_eps
        self.latent_size = latent_size
        self.query_norm = nn.LayerNorm(channels, eps=eps)
        self.feat_norm = nn.LayerNorm(feature_dim, eps=eps)
        self.attn = MultiScaleDeformableAttention(
            d_query=channels,
            d_value=feature_dim,
            d_model=config.side_attn_dim,
            d_out=channels,
            num_heads=config.side_num_heads,
            num_levels=len(config.side_spatial_shapes),
            num_points=config.side_num_points,
            spatial_shapes=config.side_spatial_shapes,
            base_spatial_shape=base_spatial_shape,
            max_num_images=config.side_max_num_images,
            offset_init_magnitude=config.side_offset_init_magnitude,
        )
        self.register_buffer("pos_embed", sincos_2d(latent_size, channels), persistent=True)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self):
        """Fixed sin-cos table, zero conv (the block starts as the identity), §2.6 init of ``attn``."""
        self.pos_embed.copy_(sincos_2d(self.latent_size, self.pos_embed.shape[1]))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.attn._reset_parameters()

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """[N, n_img, S, feature_dim] -> [N, n_img, S, side_attn_dim] (``feat_norm`` + ``value_proj``)."""
        return self.attn.project_values(self.feat_norm(features))

    def no_image_residual(self) -> torch.Tensor:
        """[C] residual of a sample that sees no image (mask 0 everywhere), in closed form.

        With every image masked, each softmax weight is ``exp(logit - 10000)``, exactly 0 in floating point, so the
        sampled values are 0, the attention output is ``output_proj.bias`` at every position and the 1x1 conv turns
        it into the constant ``conv.weight @ output_proj.bias + conv.bias`` (equal to running the block up to float
        rounding, with the same gradients: the masked path passes none to the sample, offsets or values)."""
        weight = self.conv.weight
        # in float64 (rounded once to the weights' dtype): the result does not depend on how a BLAS kernel splits
        # the sum, which can vary with the tensors' memory alignment (a loaded copy would differ in the last bit)
        wide = torch.float32 if weight.device.type == "mps" else torch.float64
        out = torch.addmv(
            self.conv.bias.to(wide), weight.reshape(weight.shape[0], -1).to(wide), self.attn.output_proj.bias.to(wide)
        )
        return out.to(weight.dtype)

    def _pos(self, h: int, w: int, dtype) -> torch.Tensor:
        table = self.pos_embed
        if h == w:
            return resize_table(table, h * w).to(dtype)
        side = math.isqrt(table.shape[0])
        grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(dtype)

    def forward(self, sample, projected_features, spatial_shapes, mask):
        """sample [N, C, h, w]; projected_features [N, n_img, S, side_attn_dim]; mask [N, n_img] -> residual
        [N, C, h, w]."""
        n, c, h, w = sample.shape
        query = self.query_norm(sample.flatten(2).transpose(1, 2)) + self._pos(h, w, sample.dtype)
        ys = (torch.arange(h, device=sample.device, dtype=sample.dtype) + 0.5) / h
        xs = (torch.arange(w, device=sample.device, dtype=sample.dtype) + 0.5) / w
        reference = torch.stack([xs.repeat(h), ys.repeat_interleave(w)], dim=-1)  # [h*w, 2], x first
        out = self.attn(
            query,
            projected_features,
            mask,
            spatial_shapes=spatial_shapes,
            reference_points=reference,
            values_projected=True,
        )
        return self.conv(out.transpose(1, 2).reshape(n, c, h, w))


class DeemUNetSideNetwork(ModelMixin, ConfigMixin):
    r"""MMFSNet (§2.9): residuals for every UNet down-path skip sample (``down_blocks.k``) and the mid-block output
    (``mid_block``) from the multi-scale features of one or more images.

    A diffusers model (``ConfigMixin`` config, ``save_pretrained`` / ``from_pretrained``), like the other UNet
    adapters, so that [`DeemImagePipeline`] saves and loads it as a component; inside DEEM it is
    ``model.image_decoder.unet_side``, built by [`~DeemUNetSideNetwork.from_diffusion_config`].

    Block k's offsets are scaled by ``side_spatial_shapes / base_k``. ``base_k`` comes from
    ``side_base_spatial_shapes`` (one per down block, then the mid block) when set, else it is the side of skip
    sample k for a full-size latent (``latent_size``; for SD-2.1 this is what the original uses). The sin-cos
    query tables are ``latent_size x latent_size``.

    Args:
        unet_config (`dict`): the UNet2DConditionModel config the residuals are made for.
        latent_size (`int`): side of a full-size latent.
        feature_dim (`int`): width of the image features read (the DEEM ``image_embed_dim``).
        side_attn_dim / side_num_heads / side_num_points / side_spatial_shapes / side_base_spatial_shapes /
            side_max_num_images / side_offset_init_magnitude / side_layer_norm_eps: as in ``DeemDiffusionConfig``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        latent_size: int,
        feature_dim: int,
        side_attn_dim: int = 1024,
        side_num_heads: int = 16,
        side_num_points: int = 8,
        side_spatial_shapes: Sequence[int] = (64, 32, 16, 8),
        side_base_spatial_shapes: Sequence[int] | None = None,
        side_max_num_images: int = 10,
        side_offset_init_magnitude: float = 1.0,
        side_layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        skips, (mid_channels, mid_side) = unet_skip_layout(unet_config, latent_size)
        bases = side_base_spatial_shapes
        if bases is None:
            bases = [side for _, side in skips] + [mid_side]
        if len(bases) != len(skips) + 1:
            raise ValueError(
                f"side_base_spatial_shapes has {len(bases)} entries; the UNet needs {len(skips)} skips + 1 mid"
            )
        self.skip_layout = skips
        config = self.config
        self.down_blocks = nn.ModuleList(
            DeemSideBlock(c, feature_dim, base, latent_size, config) for (c, _), base in zip(skips, bases[:-1])
        )
        self.mid_block = DeemSideBlock(mid_channels, feature_dim, bases[-1], latent_size, config)
        self.gradient_checkpointing = False

    @classmethod
    def from_diffusion_config(cls, config, feature_dim: int) -> "DeemUNetSideNetwork":
        """The side network a ``DeemDiffusionConfig`` describes, reading ``feature_dim``-wide image features."""
        names = [
            "side_attn_dim",
            "side_num_heads",
            "side_num_points",
            "side_spatial_shapes",
            "side_base_spatial_shapes",
            "side_max_num_images",
            "side_offset_init_magnitude",
            "side_layer_norm_eps",
        ]
        kwargs = {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}
        for name in ("side_spatial_shapes", "side_base_spatial_shapes"):
            if name in kwargs:
                kwargs[name] = [int(v) for v in kwargs[name]]
        return cls(unet_config=dict(config.unet), latent_size=config.latent_size, feature_dim=feature_dim, **kwargs)

    def blocks(self) -> list:
        """The down blocks in skip order, then the mid block."""
        return [*self.down_blocks, self.mid_block]

    def project_features(self, features: Sequence[torch.Tensor]) -> DeemSideFeatures:
        """features: the four maps [N, n_img, C, h_l, w_l] -> [`DeemSideFeatures`] for every block."""
        shapes = tuple((f.shape[-2], f.shape[-1]) for f in features)
        flat = torch.cat([f.flatten(3).transpose(2, 3) for f in features], dim=2)  # [N, n_img, S, C]
        return DeemSideFeatures(tuple(block.project_features(flat) for block in self.blocks()), shapes)

    def forward(self, down_block_res_samples, mid_sample, features, mask):
        """down_block_res_samples: the UNet's skip samples [N, C_k, h_k, w_k]; mid_sample [N, C, h, w] (mid-block
        output); features: four maps [N, n_img, C, h_l, w_l] or a [`DeemSideFeatures`] (``None`` when every mask
        entry is 0); mask [N, n_img] (1 = image present) -> (tuple of down residuals, mid residual).

        Rows whose mask is 0 everywhere (no previous image) get their block's constant ``no_image_residual`` (what
        the blocks compute for them, up to float rounding): only the rows that see an image run the blocks."""
        if len(down_block_res_samples) != len(self.down_blocks):
            raise ValueError(
                f"the UNet gave {len(down_block_res_samples)} skip samples, the side network has "
                f"{len(self.down_blocks)} blocks"
            )
        n = mid_sample.shape[0]
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != n:
            raise ValueError(f"side mask has batch {mask.shape[0]}, the UNet sample {n}")
        rows = None  # None: every row sees an image
        if features is None or not torch.compiler.is_compiling():
            present = (mask != 0).any(1)
            if features is None and bool(present.any()):
                raise ValueError("side features are None but the side mask marks images as present")
            if not bool(present.all()):
                rows = present.nonzero().squeeze(1)
        if rows is not None and rows.numel() and not isinstance(features, DeemSideFeatures):
            features = self.project_features([f[rows] for f in features])  # project only the rows that see one
            subset = True
        else:
            subset = False
            if features is not None and not isinstance(features, DeemSideFeatures):
                features = self.project_features(features)
            if features is not None and features.values[0].shape[0] != n:
                raise ValueError(f"side features have batch {features.values[0].shape[0]}, the UNet sample {n}")
        residuals = []
        for k, (block, sample) in enumerate(zip(self.blocks(), (*down_block_res_samples, mid_sample))):
            if rows is None:
                residuals.append(self._run_block(block, sample, features.values[k], features.spatial_shapes, mask))
                continue
            constant = block.no_image_residual().to(sample.dtype)[None, :, None, None].expand_as(sample)
            if not rows.numel():
                residuals.append(constant)
                continue
            value = features.values[k] if subset else features.values[k][rows]
            part = self._run_block(block, sample[rows], value, features.spatial_shapes, mask[rows])
            residuals.append(constant.index_put((rows,), part))
        return tuple(residuals[:-1]), residuals[-1]

    def _run_block(self, block, sample, value, spatial_shapes, mask):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            checkpoint = getattr(self, "_gradient_checkpointing_func", None)
            if checkpoint is None:
                return torch.utils.checkpoint.checkpoint(
                    block, sample, value, spatial_shapes, mask, use_reentrant=False
                )
            return checkpoint(
                block, sample, value, spatial_shapes, mask
            )  # set by transformers' gradient_checkpointing_enable
        return block(sample, value, spatial_shapes, mask)


def check_unet_supported(unet) -> None:
    """Raise ``ValueError`` if ``unet_forward_with_side`` cannot drive this UNet2DConditionModel."""
    cfg = unet.config
    problems = []
    if getattr(unet, "class_embedding", None) is not None:
        problems.append("class embeddings")
    if cfg.get("addition_embed_type") is not None:
        problems.append(f"addition_embed_type={cfg.get('addition_embed_type')!r}")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        problems.append(f"encoder_hid_dim_type={cfg.get('encoder_hid_dim_type')!r}")
    if getattr(unet, "position_net", None) is not None:
        problems.append(f"attention_type={cfg.get('attention_type')!r}")
    if problems:
        raise ValueError(
            "unet_forward_with_side drives plain text-conditioned UNets (SD-1/2 family); this UNet uses "
            + ", ".join(problems)
        )


def unet_forward_with_side(
    unet,
    side_network: DeemUNetSideNetwork | None,
    sample: torch.Tensor,
    timestep,
    encoder_hidden_states: torch.Tensor,
    side_features=None,
    side_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``UNet2DConditionModel`` forward with MMFSNet residuals (§2.9) -> eps [N, C_out, h, w].

    sample [N, C_in, h, w]; timestep scalar or [N]; encoder_hidden_states [N, T, D]; side_features: four maps
    [N, n_img, C, h_l, w_l] or a [`DeemSideFeatures`], or ``None`` with an all-zero side_mask (no previous image);
    side_mask [N, n_img]. The side network reads the
    unmodified skips and mid-block output; its residuals are added to the skips and the mid output before the up
    path. Without side inputs this equals ``unet(sample, timestep, encoder_hidden_states).sample``. Under
    classifier-free guidance the caller duplicates features and mask like the other inputs. encoder_attention_mask
    [N, T] (1 = keep): the condition tokens the cross-attention reads, as in ``UNet2DConditionModel.forward``.
    """
    check_unet_supported(unet)
    use_side = side_network is not None and side_features is not None
    if use_side and side_mask is None:
        raise ValueError("side_mask is required with side_features")
    if side_network is not None and side_features is None and side_mask is not None:
        use_side = True  # no image anywhere (an all-zero mask): the side network's constant residuals

    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
    upsample_size = None

    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    cross = {"encoder_hidden_states": encoder_hidden_states}
    if encoder_attention_mask is not None:  # to an additive bias, as UNet2DConditionModel.forward does
        if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(
                f"encoder_attention_mask must be [N, T] = {tuple(encoder_hidden_states.shape[:2])}, got "
                f"{tuple(encoder_attention_mask.shape)}"
            )
        bias = (1 - encoder_attention_mask.to(encoder_hidden_states.dtype)) * -10000.0
        cross["encoder_attention_mask"] = bias.unsqueeze(1)

    sample = unet.conv_in(sample)
    skips = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, **cross)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, **cross)
        else:
            sample = unet.mid_block(sample, emb)

    if use_side:
        down_residuals, mid_residual = side_network(skips, sample, side_features, side_mask)
        skips = tuple(s + r for s, r in zip(skips, down_residuals))
        sample = sample + mid_residual

    for i, block in enumerate(unet.up_blocks):
        res = skips[-len(block.resnets) :]
        skips = skips[: -len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res,
                upsample_size=upsample_size,
                **cross,
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


__all__ = [
    "MultiScaleDeformableAttention",
    "DeemGatedCrossAttention",
    "DeemUNetSideNetwork",
    "DeemSideBlock",
    "DeemSideFeatures",
    "build_cross_attention_mask",
    "relative_image_index",
    "deformable_sampling",
    "sampling_layout",
    "unet_skip_layout",
    "unet_forward_with_side",
    "check_unet_supported",
]
