"""``vgen generate``: a few images from a saved pipeline folder, as a captioned PNG grid and/or single PNGs.

    vgen generate --model DIR "a photo of a red circle" --n 4 --seed 0 --out grid.png
    vgen generate --model var-d16-folder --class-label 207 360 --n 2 --guidance-scale 1.5 --top-k 900 --top-p 0.96
    vgen generate --unconditional --n 8 --out-dir uncond/

Image i (counting over prompts/labels x ``--n``) uses seed ``--seed + i``, so any image can be regenerated alone.
Images are made ``GENERATE_BATCH`` at a time and written as they come, so ``--out-dir`` takes any ``--n``; a grid
holds at most ``MAX_GRID_IMAGES``. The resolved settings are written next to the outputs (``generate_config.json``,
and ``<grid>.json`` beside the grid); such a file replaces only one that ``vgen generate`` wrote.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from vgen.errors import UserError
from vgen.pipelines import SHIPPED_MODELS

#: Images per pipeline call.
GENERATE_BATCH = 16
#: Most images one grid shows (more would be unreadable; --out-dir takes any number).
MAX_GRID_IMAGES = 1024
#: The mark in the settings files this command writes (see :func:`vgen.cli.checks.check_own_file`).
WRITER = "vgen generate"
SETTINGS_FILE = "generate_config.json"


def register(subparsers) -> None:
    from vgen.cli.checks import positive_int, seed
    from vgen.cli.sampling_flags import add_sampling_flags

    parser = subparsers.add_parser(
        "generate",
        help="generate images from a saved pipeline (PNG grid with captions and/or single PNGs)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("prompt", nargs="*", help="prompt(s) for text-conditional models (quote each prompt)")
    parser.add_argument("--model", default=None,
                        help=f"pipeline folder (model_index.json) or a shipped model ({', '.join(SHIPPED_MODELS)}); "
                             "default: the model shipped with vgen (shapes-var)")
    parser.add_argument("--class-label", type=int, nargs="+", default=None, metavar="N",
                        help="class id(s) for class-conditional models")
    parser.add_argument("--unconditional", action="store_true",
                        help="images of the null prompt / null class (no prompt, no --class-label)")
    parser.add_argument("--n", type=positive_int, default=4, help="images per prompt / class label (default 4)")
    parser.add_argument("--seed", type=seed, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--out", default=None, help="grid image path, .png/.jpg/.jpeg/.webp (default grid.png unless "
                                                    "--out-dir is given)")
    parser.add_argument("--out-dir", default=None, help="also write each image as DIR/NNNN.png")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it shows on a terminal only, one step per generation step)")
    add_sampling_flags(parser)
    parser.set_defaults(func=run)


def _conditions(args: argparse.Namespace) -> list:
    """One entry per prompt / class label (``[None]`` for unconditional images)."""
    given = [bool(args.prompt), args.class_label is not None, args.unconditional]
    if sum(given) > 1:
        raise UserError("give prompt(s), --class-label or --unconditional, only one of them")
    if not any(given):
        raise UserError("give a prompt (text models), --class-label N (class-conditional models) or --unconditional")
    if args.unconditional:
        return [None]
    return list(args.prompt) if args.prompt else list(args.class_label)


def _check_outputs(args: argparse.Namespace, total: int) -> tuple[Path | None, Path | None]:
    """The grid path and image folder to write, checked before anything is generated."""
    from vgen.cli.checks import check_image_output, check_output_folder, check_own_file

    grid_path = Path(args.out) if args.out is not None else (Path("grid.png") if args.out_dir is None else None)
    out_dir = Path(args.out_dir) if args.out_dir is not None else None
    if grid_path is not None:
        check_image_output(grid_path, "--out")
        check_own_file(_grid_settings_path(grid_path), WRITER, "--out")
        if total > MAX_GRID_IMAGES:
            raise UserError(f"{total} images are too many for one grid (at most {MAX_GRID_IMAGES}); write them with "
                            "--out-dir DIR instead (and leave out --out)")
    if out_dir is not None:
        check_output_folder(out_dir, "--out-dir")
        check_own_file(out_dir / SETTINGS_FILE, WRITER, "--out-dir")
        theirs = sorted(p.name for p in out_dir.glob("*.png") if re.fullmatch(r"\d{4,}\.png", p.name))
        if theirs and not (out_dir / SETTINGS_FILE).exists():
            raise UserError(f"--out-dir {out_dir} holds images vgen generate did not write ({theirs[0]} ...), "
                            "which this run would replace; give a new or empty folder")
    return grid_path, out_dir


def _grid_settings_path(grid_path: Path) -> Path:
    return grid_path.with_name(grid_path.stem + ".json")


def _caption(condition, prompt_mode: bool) -> str:
    if condition is None:
        return "unconditional"
    return str(condition) if prompt_mode else f"class {condition}"


def _generate_batch(pipe, conditions: list, prompt_mode: bool, seeds: list[int], sampling: dict):
    """The images of one batch: image j is conditioned on ``conditions[j]`` and seeded with ``seeds[j]``."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if conditions[0] is None:
        condition = {"unconditional": True, "num_images_per_prompt": len(seeds)}
    elif prompt_mode:
        condition = {"prompt": conditions}
    else:
        condition = {"class_labels": conditions}
    return pipe(**condition, **sampling, generator=generators, output_type="pil").images


def run(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_seed_range
    from vgen.cli.sampling_flags import sampling_from_flags
    from vgen.imaging import make_grid
    from vgen.pipelines import load_pipeline

    conditions = _conditions(args)
    prompt_mode = bool(args.prompt)
    total = len(conditions) * args.n
    check_seed_range(args.seed, total)
    grid_path, out_dir = _check_outputs(args, total)
    pipe, model_dir = load_pipeline(args.model, args.device)
    saved, extra = sampling_from_flags(args, pipe)
    sampling = {**saved, **extra}
    if conditions[0] is not None:  # every prompt / label checked before the first image is written
        pipe.encode_condition(conditions if prompt_mode else None, None if prompt_mode else conditions, 1)
    settings = {
        "written_by": WRITER, "model": str(model_dir.resolve()), "prompt": args.prompt or None,
        "class_label": args.class_label, "unconditional": args.unconditional, "n": args.n, "seed": args.seed,
        **sampling,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    per_image = [c for c in conditions for _ in range(args.n)]
    kept = []
    for start in range(0, total, GENERATE_BATCH):
        batch = per_image[start : start + GENERATE_BATCH]
        seeds = [args.seed + start + j for j in range(len(batch))]
        # a bar per batch, on a terminal only (tqdm's disable=None), gone once the batch is done
        pipe.set_progress_bar_config(disable=True if args.no_progress else None, leave=False, unit="step",
                                     desc=f"images {start + 1}-{start + len(batch)} of {total}")
        images = _generate_batch(pipe, batch, prompt_mode, seeds, sampling)
        for j, image in enumerate(images):
            if out_dir is not None:
                image.save(out_dir / f"{start + j:04d}.png")
            if grid_path is not None:
                kept.append(image)
    written = [f"{total} images in {out_dir}"] if out_dir is not None else []
    if grid_path is not None:
        captions = [f"{_caption(c, prompt_mode)} (seed {args.seed + i})" for i, c in enumerate(per_image)]
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(kept, captions, ncols=args.n if len(conditions) > 1 else None).save(grid_path)
        _grid_settings_path(grid_path).write_text(json.dumps(settings, indent=2) + "\n")
        written.append(f"grid {grid_path}")
    print("wrote " + "; ".join(written))
    return 0
