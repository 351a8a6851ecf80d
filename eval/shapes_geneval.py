"""Shapes-GenEval: GenEval-layout folders of real Shapes renders (the ceiling) and the detector's checks.

:func:`write_real_folder` renders every prompt with the Shapes world (``render_spec``) into GenEval's layout, so
``vgen eval geneval --images`` on it shows what a perfect generator would score. :func:`mismatched_metadata` pairs
each prompt with another prompt of the same tag; scoring real renders against it measures how often the detector
accepts an image made for a different prompt (it should be rare).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vgen.eval.geneval import sample_path, write_prompt_metadata


def render_seed(seed: int, prompt_index: int, sample_index: int, images_per_prompt: int) -> int:
    """Seed of a real render: ``seed + prompt_index * images_per_prompt + sample_index`` (the global image index)."""
    return seed + prompt_index * images_per_prompt + sample_index


def write_real_folder(
    out: str | Path,
    metadata: Sequence[dict],
    images_per_prompt: int = 1,
    resolution: int = 64,
    seed: int = 0,
    render_metadata: Sequence[dict] | None = None,
    progress: bool = True,
) -> Path:
    """Render ``images_per_prompt`` Shapes images per prompt into ``out`` (GenEval layout, ``metadata`` in each
    folder). ``render_metadata`` (same length) renders images for other prompts than the ones written next to them,
    for mismatch checks. Existing images are kept."""
    from tqdm.auto import tqdm

    from vgen.data.shapes import render_spec

    render_metadata = metadata if render_metadata is None else render_metadata
    if len(render_metadata) != len(metadata):
        raise ValueError("render_metadata must have one entry per prompt")
    out = Path(out)
    pairs = list(zip(metadata, render_metadata))
    for p, (entry, spec) in enumerate(tqdm(pairs, desc="render", disable=None if progress else True)):
        write_prompt_metadata(out, p, entry)
        for k in range(images_per_prompt):
            path = sample_path(out, p, k)
            if not path.exists():
                render_spec(spec, resolution, render_seed(seed, p, k, images_per_prompt)).image.save(path)
    return out


def mismatched_metadata(metadata: Sequence[dict]) -> list[dict]:
    """For prompt i of tag t, the prompt half-way around the list of t's prompts with a different prompt text (the
    same prompt when all of t's prompts are equal). Same tag, so the image has the right kind of content."""
    by_tag: dict[str, list[int]] = {}
    for i, entry in enumerate(metadata):
        by_tag.setdefault(entry["tag"], []).append(i)
    partner = {}
    for indices in by_tag.values():
        n = len(indices)
        for pos, i in enumerate(indices):
            for shift in range(n // 2, n // 2 + n):
                j = indices[(pos + shift) % n]
                if metadata[j]["prompt"] != metadata[i]["prompt"]:
                    partner[i] = j
                    break
            else:
                partner[i] = i
    return [dict(metadata[partner[i]]) for i in range(len(metadata))]
