"""Codebook upkeep shared by the VQ tokenizers (VAR's multi-scale VQ, the frequency-band VQ, the single-scale VQ):
usage statistics, the usage percentage the training logs report, and dead-code restarts.

Every function here works the same on one process and under ``torch.distributed``: hit counts are summed over
ranks and restarted codes are broadcast from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_from_rank0_(*tensors: torch.Tensor) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (a no-op on one process)."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def usage_percent_from_counts(counts_V: torch.Tensor, tokens: float, margin_ratio: float = 0.08) -> float:
    """Percent of codes whose hit count (V,) is at least ``margin_ratio`` times the uniform count ``tokens / V``
    (VAR's usage margin is 8 % of the uniform rate)."""
    margin = margin_ratio * tokens / counts_V.numel()
    return float((counts_V >= margin).float().mean().item() * 100)


@torch.no_grad()
def replace_codes_(
    codebook_VC: torch.Tensor, dead_V: torch.Tensor, samples_NC: torch.Tensor,
    generator: torch.Generator | None = None,
) -> int:
    """Re-initialise the codes marked in ``dead_V`` (V,) bool with random rows of ``samples_NC`` (N, C), in place.

    Rows are drawn with replacement from a CPU stream (``generator`` or the global one), so the draw does not
    depend on the device. Returns the number of codes replaced (0 when there are no samples).
    """
    num_dead = int(dead_V.sum().item())
    if num_dead == 0 or samples_NC.shape[0] == 0:
        return 0
    pick = torch.randint(0, samples_NC.shape[0], (num_dead,), generator=generator, device="cpu")
    codebook_VC[dead_V] = samples_NC[pick.to(samples_NC.device)].to(codebook_VC)
    return num_dead
