"""``vgen convert``: turn released checkpoints into vgen pipeline folders.

    vgen convert var-official --vae vae_ch160v4096z32.pth --var var_d16.pth --out var-d16
    vgen generate --model var-d16 --class-label 207
"""

from __future__ import annotations

import argparse

from vgen.errors import UserError


def register(subparsers) -> None:
    from vgen.cli import OneLineErrorParser

    parser = subparsers.add_parser("convert", help="convert released checkpoints into vgen pipeline folders",
                                   description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", parser_class=OneLineErrorParser)
    var = kinds.add_parser(
        "var-official",
        help="official VAR (FoundationVision/VAR): vae_ch160v4096z32.pth + var_dXX.pth -> VARPipeline folder",
        description="Convert official VAR checkpoints (plain state dicts or training checkpoints) into a "
        "VARPipeline folder. Missing or unexpected keys are listed.",
    )
    var.add_argument("--vae", required=True, help="official VQVAE file (vae_ch160v4096z32.pth)")
    var.add_argument("--var", required=True, help="official VAR transformer file (var_d16.pth ... var_d36.pth)")
    var.add_argument("--out", required=True, help="output pipeline folder")
    var.add_argument("--num-classes", type=int, default=None,
                     help="expected number of classes (checked against the checkpoint; ImageNet: 1000)")
    var.set_defaults(func=convert_var_official)


def convert_var_official(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_output_folder
    from vgen.models.var_official import load_official_var
    from vgen.pipelines.var import VARPipeline
    from vgen.tokenizers.msvq import load_official_var_vae

    out = check_output_folder(args.out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty; choose a new --out")
    transformer = load_official_var(args.var)
    if args.num_classes is not None and transformer.config.num_classes != args.num_classes:
        raise UserError(
            f"--num-classes {args.num_classes} does not match the checkpoint, which has "
            f"{transformer.config.num_classes} classes"
        )
    vqvae = load_official_var_vae(args.vae, patch_nums=tuple(transformer.config.patch_nums))
    # the pipeline checks that the VQVAE fits the transformer (vgen.pipelines.next_scale_tokenizer)
    pipe = VARPipeline(vqvae=vqvae, transformer=transformer, text_encoder=None)
    pipe.save_pretrained(str(out))
    cfg = transformer.config
    print(f"wrote {out}: VAR depth {cfg.depth} (width {cfg.embed_dim}, {cfg.num_classes} classes, "
          f"{'shared' if cfg.shared_aln else 'per-block'} AdaLN), VQVAE vocabulary {vqvae.vocab_size}")
    return 0
