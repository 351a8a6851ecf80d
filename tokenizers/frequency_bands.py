"""Frequency bands of a latent map: the decomposer and composer of NFIG's FR-VAE.

A latent ``f`` (B, C, H, W) is split by its 2-D spectrum: ``F = fft2(f)``, band i keeps the frequencies whose
radius lies in ``(sigma_{i-1}, sigma_i]`` (band 0 also keeps the DC term), and ``ifft2`` brings each band back to
the spatial domain. The masks partition the spectrum, so the bands sum to ``f`` (the composer is a sum).

Radii are measured in cycles per latent pixel and normalised so that the highest frequency of the grid (the corner
of the spectrum, ``sqrt(0.5**2 + 0.5**2)`` for even sides) has radius 1. The default edges follow NFIG's rule,
edges growing with each band's share of the tokens::

    sigma_i = sigma_{i-1} + (h_i * w_i / sum_j h_j * w_j) * sigma_max,   sigma_max = 1

so the last edge is 1 and every frequency belongs to exactly one band. The radial masks are symmetric under
``k -> -k``, so each band of a real latent is real (its imaginary part is float noise and is dropped).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from vgen.errors import UserError


def token_share_band_edges(patch_nums: Sequence[int]) -> tuple[float, ...]:
    """NFIG's band edges for the token maps ``patch_nums`` (sides, coarse to fine): the cumulative token share,
    ``sigma_i = sum_{j<=i} pn_j**2 / sum_j pn_j**2`` (the last one is exactly 1)."""
    tokens = [int(pn) ** 2 for pn in patch_nums]
    total = sum(tokens)
    return tuple(cum / total for cum in itertools.accumulate(tokens))


def check_band_edges(band_edges: Sequence[float], num_bands: int) -> tuple[float, ...]:
    """``band_edges`` as a tuple of floats, or one :class:`UserError` line when there is not one edge per band, the
    edges do not increase, or the last edge leaves part of the spectrum (radius up to 1) outside every band."""
    edges = tuple(float(e) for e in band_edges)
    if len(edges) != num_bands:
        raise UserError(
            f"band_edges has {len(edges)} entries but the schedule has {num_bands} bands (one per patch_num): give "
            "one upper edge per band, or leave band_edges unset for NFIG's token-share edges"
        )
    if edges[0] < 0 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise UserError(f"band_edges must be non-negative and strictly increasing, got {list(edges)}")
    if edges[-1] < 1.0:
        raise UserError(
            f"band_edges {list(edges)} do not cover the spectrum: frequencies of normalised radius above "
            f"{edges[-1]:g} (up to 1, the corner of the spectrum) belong to no band; end the schedule at 1.0"
        )
    return edges


def normalised_radius(height: int, width: int) -> torch.Tensor:
    """(H, W) float64 radius of every ``fft2`` bin, in cycles per pixel divided by the largest radius of the grid
    (so it lies in [0, 1])."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    radius_HW = torch.sqrt(fy[:, None].square() + fx[None, :].square())
    largest = radius_HW.max()
    return radius_HW / largest if largest > 0 else radius_HW


@functools.lru_cache(maxsize=32)
def _masks_cpu(band_edges: tuple[float, ...], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    radius_HW = normalised_radius(height, width)
    upper_KHW = radius_HW[None] <= torch.tensor(band_edges, dtype=torch.float64)[:, None, None]
    upper_KHW[:, 0, 0] = True  # the DC term belongs to band 0 whatever its edge
    lower_KHW = torch.cat((torch.zeros_like(upper_KHW[:1]), upper_KHW[:-1]))
    return (upper_KHW & ~lower_KHW).float(), upper_KHW.float()


def band_masks(band_edges: Sequence[float], height: int, width: int, device=None) -> torch.Tensor:
    """(K, H, W) float 0/1 masks ``M_i`` over the ``fft2`` bins: bin in band i iff its radius is in
    ``(edge_{i-1}, edge_i]`` (band 0 also holds DC). With covering edges they sum to 1 at every bin."""
    return _masks_cpu(tuple(float(e) for e in band_edges), int(height), int(width))[0].to(device)


def lowpass_masks(band_edges: Sequence[float], height: int, width: int, device=None) -> torch.Tensor:
    """(K, H, W) float 0/1 masks ``P_i = M_0 + ... + M_i`` (everything up to band i's upper edge)."""
    return _masks_cpu(tuple(float(e) for e in band_edges), int(height), int(width))[1].to(device)


def apply_spectral_mask(x_BChw: torch.Tensor, mask_HW: torch.Tensor) -> torch.Tensor:
    """``real(ifft2(fft2(x) * mask))`` in float32 (FFTs need full precision), returned in ``x``'s dtype."""
    spectrum = torch.fft.fft2(x_BChw.float())
    return torch.fft.ifft2(spectrum * mask_HW.to(device=x_BChw.device, dtype=torch.float32)).real.to(x_BChw.dtype)


def band_components(f_BChw: torch.Tensor, band_edges: Sequence[float]) -> list[torch.Tensor]:
    """The decomposer: latent (B, C, H, W) -> K band components, each (B, C, H, W), that sum to ``f``."""
    masks_KHW = band_masks(band_edges, f_BChw.shape[-2], f_BChw.shape[-1], f_BChw.device)
    return [apply_spectral_mask(f_BChw, mask_HW) for mask_HW in masks_KHW]
