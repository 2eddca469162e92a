"""Fixed sine-cosine position tables (§2.2.2 of the reference).

The 2-D table puts the row (y) coordinate in the first half of the channels and the column (x)
coordinate in the second half; each half is ``[sin(p * w_k), cos(p * w_k)]`` with
``w_k = 1 / 10000 ** (k / (D / 4))``.
"""

import math

import torch
import torch.nn.functional as F


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[P] float positions -> [P, dim] table ``[sin(p w), cos(p w)]`` with ``w_k = 10000^(-k/(dim/2))``."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid_size: int, dim: int, cls_row: bool = False) -> torch.Tensor:
    """[grid_size**2 (+1), dim] table for a square grid in row-major order; optional all-zero cls row first."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos width must be a multiple of 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # y of each cell (row index outer)
    cols = coords.repeat(grid_size)  # x of each cell
    table = torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)
    if cls_row:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def resize_table(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Fit a (cls +) square-grid table to ``num_positions`` rows (``get_abs_pos`` of the original).

    A table whose row count is not a perfect square is taken to carry a cls row in front; the grid part is
    resized with bicubic interpolation (align_corners False) and the cls row re-attached. ``num_positions``
    counts the cls row too when the table has one.
    """
    rows = table.shape[0]
    has_cls = math.isqrt(rows) ** 2 != rows
    grid = table[1:] if has_cls else table
    src = math.isqrt(grid.shape[0])
    dst_count = num_positions - 1 if has_cls else num_positions
    dst = math.isqrt(dst_count)
    if dst * dst != dst_count:
        raise ValueError(f"cannot fit a {src}x{src} position table to {num_positions} positions (not a square grid)")
    if dst != src:
        dtype = grid.dtype
        grid = grid.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(dtype)
    return torch.cat([table[:1], grid], dim=0) if has_cls else grid
