"""``vgen eval <target>``: scoring generated images.

Targets:

* ``fid``         FID (and KID) of a sample folder / ``.npz`` against reference statistics or a folder;
* ``fid-ref``     reference statistics (mu, sigma, features) of the Shapes world or an image folder, cached;
* ``fid-sanity``  the FID sanity table (real vs real / blurred / hue-rotated / noise) with Shapes features;
* ``geneval``     GenEval scoring, defined in :mod:`vgen.cli.eval_geneval`.

Heavy imports (torch, clean-fid) happen inside the command functions so that ``vgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json

from vgen.cli import OneLineErrorParser
from vgen.cli.checks import nonnegative_int, positive_int, seed
from vgen.cli.eval_geneval import register_geneval

FEATURES_HELP = (
    "feature network: 'shapes' (the shipped Shapes-world net), 'inception' (clean-fid's Inception, needs "
    "inception-2015-12-05.pt on disk) or 'module.path:callable' (a callable returning a module or function that "
    "maps float images (B,3,H,W) in [0,255] to features (B,F))"
)
MODE_HELP = (
    "clean-fid mode: 'clean' (PIL bicubic resize outside the net; not comparable with paper numbers) or "
    "'legacy_tensorflow' (TF1 bilinear resize inside the Inception net; matches TF FID / the ADM protocol)"
)


def _add_feature_args(parser: argparse.ArgumentParser, features_default: str | None) -> None:
    parser.add_argument("--features", default=features_default, help=FEATURES_HELP)
    parser.add_argument("--mode", default="clean", choices=["clean", "legacy_tensorflow"], help=MODE_HELP)
    parser.add_argument(
        "--inception-path",
        default=None,
        help="Inception weights file inception-2015-12-05.pt (default: $VGEN_INCEPTION_PATH, else clean-fid's "
        "location /tmp/inception-2015-12-05.pt)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per feature-network batch")
    parser.add_argument("--num-workers", type=nonnegative_int, default=0, help="data-loader workers for image folders")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _run_fid(args: argparse.Namespace) -> int:
    from vgen.eval.fid import compute_fid_report

    report = compute_fid_report(
        samples=args.samples,
        ref=args.ref,
        features=args.features,
        mode=args.mode,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        inception_path=args.inception_path,
        kid=args.kid,
        limit=args.n,
    )
    print(json.dumps(report, indent=2))
    return 0


def _run_fid_ref(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_output_file
    from vgen.eval.fid import make_reference_stats

    if args.out is not None:
        check_output_file(args.out, "--out", (".npz",))

    path = make_reference_stats(
        world=args.world,
        folder=args.folder,
        n=args.n,
        resolution=args.resolution,
        seed=args.seed,
        features=args.features,
        mode=args.mode,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        inception_path=args.inception_path,
        out=args.out,
        store_features=not args.no_store_features,
        overwrite=args.overwrite,
    )
    print(json.dumps({"stats": str(path)}))
    return 0


def _run_fid_sanity(args: argparse.Namespace) -> int:
    from vgen.eval.fid_sanity import markdown_table, sanity_table

    rows = sanity_table(n=args.n, resolution=args.resolution, batch_size=args.batch_size, device=args.device)
    print(markdown_table(rows) if args.markdown else json.dumps(rows, indent=2))
    return 0


def register_fid(sub) -> None:
    parser = sub.add_parser(
        "fid",
        help="FID (and optionally KID) of samples against reference statistics or a folder; prints JSON",
        description="FID of --samples (image folder, or .npz with arr_0 uint8 NHWC as for OpenAI's ADM evaluator) "
        "against --ref (a stats .npz from 'vgen eval fid-ref', an ADM-style .npz with mu/sigma, an image folder, "
        "or an .npz of images). Prints JSON: fid, n_samples, n_ref, features, mode, resolution, kid.",
    )
    parser.add_argument("--samples", required=True, help="folder of images or .npz (arr_0: uint8 N,H,W,3)")
    parser.add_argument("--ref", required=True, help="reference stats .npz, image .npz, or folder of images")
    _add_feature_args(parser, features_default=None)
    parser.add_argument("--kid", action="store_true", help="also compute KID (needs reference features)")
    parser.add_argument("--n", type=positive_int, default=None, help="use only the first N readable samples (>= 2)")
    parser.set_defaults(func=_run_fid)


def register_fid_ref(sub) -> None:
    parser = sub.add_parser(
        "fid-ref",
        help="reference statistics for FID (Shapes world or an image folder), cached as .npz",
        description="Compute mu, sigma (and the features, for KID) of a reference set and save them as .npz. "
        "Without --out the file is cached under ~/.cache/vgen/fid_stats/ with a name encoding source, "
        "resolution, features, mode and count, and reused on the next call.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", choices=["shapes"], help="procedural data world to render")
    source.add_argument("--folder", help="folder of reference images")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="number of images (world: default 10000; folder: all)")
    parser.add_argument("--resolution", type=positive_int, default=64, help="world resolution in pixels")
    parser.add_argument("--seed", type=seed, default=0, help="world seed")
    parser.add_argument("--out", default=None, help="output .npz (default: the cache file)")
    parser.add_argument("--overwrite", action="store_true", help="recompute even if the output exists")
    parser.add_argument(
        "--no-store-features", action="store_true", help="do not keep the features in the file (no KID later)"
    )
    _add_feature_args(parser, features_default="shapes")
    parser.set_defaults(func=_run_fid_ref)


def register_fid_sanity(sub) -> None:
    parser = sub.add_parser(
        "fid-sanity",
        help="FID sanity table with Shapes features: real vs real / blurred / hue-rotated / uniform noise",
    )
    parser.add_argument("--n", type=positive_int, default=5000, help="images per set")
    parser.add_argument("--resolution", type=positive_int, default=64, help="world resolution in pixels")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per feature-network batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    parser.set_defaults(func=_run_fid_sanity)


#: ``vgen eval`` targets, in the order ``vgen eval --help`` lists them.
TARGETS = {
    "fid": register_fid,
    "fid-ref": register_fid_ref,
    "fid-sanity": register_fid_sanity,
    "geneval": register_geneval,
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score samples: FID, reference statistics, GenEval")
    sub = parser.add_subparsers(dest="eval_target", metavar="TARGET", parser_class=OneLineErrorParser)
    for register_target in TARGETS.values():
        register_target(sub)
