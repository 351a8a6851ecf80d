"""``vgen data preview``: look at a data world as a labelled grid before training on it.

vgen data preview --world shapes --n 16 --resolution 64 --out grid.png
vgen data preview --world moving_shapes --n 4 --frames 8 --out videos.png
vgen data preview --world folder --path my_images/ --out folder.png
"""

from __future__ import annotations

import argparse

from vgen.errors import UserError

MAX_PREVIEW = 256


def register(subparsers) -> None:
    from vgen.cli import OneLineErrorParser
    from vgen.cli.checks import positive_int, seed

    data = subparsers.add_parser("data", help="inspect the data worlds (shapes, moving_shapes, your image folder)")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=OneLineErrorParser)
    preview = commands.add_parser(
        "preview",
        help="write a labelled grid of samples from a data world",
        description="Write a grid of samples (with captions) from a data world; videos are shown as rows of frames.",
    )
    preview.add_argument("--world", choices=("shapes", "moving_shapes", "folder"), default="shapes")
    preview.add_argument("--path", default=None, help="image folder (for --world folder)")
    preview.add_argument("--n", type=positive_int, default=None,
                         help="how many samples (default 16 images or 4 videos)")
    preview.add_argument("--resolution", type=positive_int, default=64, help="pixels per side (default 64)")
    preview.add_argument("--seed", type=seed, default=0, help="world seed (default 0)")
    preview.add_argument("--frames", type=positive_int, default=8,
                         help="frames per video for moving_shapes (default 8)")
    preview.add_argument("--tag", default=None, help="shapes only: show one GenEval category, e.g. counting")
    preview.add_argument("--out", default="grid.png", help="output image file (.png/.jpg/.webp)")
    preview.set_defaults(func=run_preview)


def run_preview(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_image_output

    out = check_image_output(args.out, "--out")
    n = args.n if args.n is not None else (4 if args.world == "moving_shapes" else 16)
    if not 1 <= n <= MAX_PREVIEW:
        raise UserError(f"--n must be from 1 to {MAX_PREVIEW}, got {n}")
    if args.tag is not None and args.world != "shapes":
        raise UserError("--tag applies to --world shapes only")
    if args.world == "folder" and args.path is None:
        raise UserError("--world folder needs --path DIR (a directory of .jpg/.jpeg/.png/.webp images)")
    # Checked before the worlds (and torch) are imported, so a typo fails at once.
    from vgen.data.shape_render import MAX_RESOLUTION, MIN_RESOLUTION

    if args.world != "folder" and not MIN_RESOLUTION <= args.resolution <= MAX_RESOLUTION:
        raise UserError(
            f"--resolution must be from {MIN_RESOLUTION} to {MAX_RESOLUTION} for the {args.world} world, "
            f"got {args.resolution}"
        )
    from vgen.imaging import make_grid, make_video_grid

    if args.world == "shapes":
        from vgen.data.shapes import ShapesWorld

        world = ShapesWorld(args.resolution, args.seed, tag_weights={args.tag: 1.0} if args.tag else None)
        samples = [world.sample(i) for i in range(n)]
        grid = make_grid([s.image for s in samples], [s.caption for s in samples])
    elif args.world == "moving_shapes":
        from vgen.data.moving_shapes import MovingShapesWorld

        world = MovingShapesWorld(args.resolution, args.frames, args.seed)
        videos = [world.sample(i) for i in range(n)]
        grid = make_video_grid([v.images for v in videos], [v.caption for v in videos])
    else:
        from vgen.data.folder import ImageFolderDataset

        dataset = ImageFolderDataset(args.path, args.resolution)
        count = min(n, len(dataset))
        images = [dataset.load_image(i) for i in range(count)]
        captions = [dataset.captions[i] or dataset.relative_names[i] for i in range(count)]
        grid = make_grid(images, captions)

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        grid.save(out)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err}") from err
    print(out)
    return 0
