"""``vgen generate``: a few images from a saved pipeline folder, as a captioned PNG grid and/or single PNGs.

    vgen generate --model DIR "a photo of a red circle" --n 4 --seed 0 --out grid.png
    vgen generate --model var-d16-folder --class-label 207 360 --n 2 --guidance-scale 1.5 --top-k 900 --top-p 0.96

Image i (counting over prompts/labels x ``--n``) uses seed ``--seed + i``, so any image can be regenerated alone.
The resolved settings are written next to the outputs (``generate_config.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vgen.errors import UserError


def register(subparsers) -> None:
    from vgen.cli.sample import add_guidance_profile_arg

    parser = subparsers.add_parser(
        "generate",
        help="generate images from a saved pipeline (PNG grid with captions and/or single PNGs)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("prompt", nargs="*", help="prompt(s) for text-conditional models (quote each prompt)")
    parser.add_argument("--model", default=None,
                        help="pipeline folder (model_index.json); default: the model shipped with vgen")
    parser.add_argument("--class-label", type=int, nargs="+", default=None, metavar="N",
                        help="class id(s) for class-conditional models")
    parser.add_argument("--n", type=int, default=4, help="images per prompt / class label (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (VAR ramp: official cfg; 0 = off; default: the model's saved "
                             "setting, see model_index.json)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filtering, 0 = off (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p filtering, 0 = off (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's)")
    add_guidance_profile_arg(parser)
    parser.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel-smoothed embeddings (visuals only)")
    parser.add_argument("--out", default=None, help="grid PNG path (default grid.png unless --out-dir is given)")
    parser.add_argument("--out-dir", default=None, help="also write each image as DIR/NNNN.png")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vgen.imaging import make_grid
    from vgen.pipelines import load_pipeline

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.prompt and args.class_label is not None:
        raise UserError("give either prompt(s) or --class-label, not both")
    if not args.prompt and args.class_label is None:
        raise UserError("give a prompt (text models) or --class-label N (class-conditional models)")
    pipe, model_dir = load_pipeline(args.model, args.device)
    pipe.set_progress_bar_config(disable=True)
    conditions = args.prompt or args.class_label
    total = len(conditions) * args.n
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(total)]
    sampling = pipe.resolve_sampling(guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                                     temperature=args.temperature, guidance_profile=args.guidance_profile)
    output = pipe(
        prompt=list(args.prompt) if args.prompt else None,
        class_labels=args.class_label,
        num_images_per_prompt=args.n,
        **sampling,
        more_smooth=args.more_smooth,
        generator=generators,
        output_type="pil",
    )
    images = output.images
    captions = [str(c) if args.prompt else f"class {c}" for c in conditions for _ in range(args.n)]
    captions = [f"{cap} (seed {args.seed + i})" for i, cap in enumerate(captions)]
    settings = {
        "model": str(model_dir.resolve()), "prompt": args.prompt or None, "class_label": args.class_label,
        "n": args.n, "seed": args.seed, **sampling, "more_smooth": args.more_smooth,
    }
    written = []
    if args.out_dir is not None:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(out_dir / f"{i:04d}.png")
        (out_dir / "generate_config.json").write_text(json.dumps(settings, indent=2) + "\n")
        written.append(f"{len(images)} images in {out_dir}")
    grid_path = Path(args.out) if args.out is not None else (Path("grid.png") if args.out_dir is None else None)
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, captions, ncols=args.n if len(conditions) > 1 else None).save(grid_path)
        grid_path.with_name(grid_path.stem + ".json").write_text(json.dumps(settings, indent=2) + "\n")
        written.append(f"grid {grid_path}")
    print("wrote " + "; ".join(written))
    return 0
