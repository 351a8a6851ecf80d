"""Input checks shared by the tokenizers: a wrong image batch ends in one :class:`~vgen.errors.UserError` line."""

from __future__ import annotations

import torch

from vgen.errors import UserError


def check_image_batch(img_BCHW: torch.Tensor, channels: int, multiple_of: int = 1) -> None:
    """Raise :class:`UserError` unless ``img_BCHW`` is a 4-D ``(B, channels, H, W)`` tensor with ``H`` and ``W``
    divisible by ``multiple_of`` (the tokenizer's downsampling factor)."""
    if not isinstance(img_BCHW, torch.Tensor) or img_BCHW.ndim != 4:
        shape = tuple(img_BCHW.shape) if isinstance(img_BCHW, torch.Tensor) else type(img_BCHW).__name__
        raise UserError(f"expected images of shape (B, {channels}, H, W), got {shape}")
    if img_BCHW.shape[1] != channels:
        raise UserError(
            f"this tokenizer takes {channels}-channel images, got {img_BCHW.shape[1]} channels (shape "
            f"{tuple(img_BCHW.shape)}): convert the images to {'RGB' if channels == 3 else f'{channels} channels'}"
        )
    H, W = img_BCHW.shape[-2:]
    if H % multiple_of or W % multiple_of:
        raise UserError(
            f"image size {H}x{W} is not a multiple of this tokenizer's downsampling factor {multiple_of}: resize or "
            f"crop the images to a multiple of {multiple_of}"
        )
