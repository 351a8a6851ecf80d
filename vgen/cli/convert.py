"""``vgen convert``: turn released checkpoints into vgen pipeline folders.

    vgen convert var-official --vae vae_ch160v4096z32.pth --var var_d16.pth --out var-d16
    vgen generate --model var-d16 --class-label 207
    vgen convert flowar-official --vae kl16.ckpt --flowar FlowAR-S.pth --out flowar-s
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
    flowar = kinds.add_parser(
        "flowar-official",
        help="official FlowAR (OliverRensu/FlowAR): MAR's kl16.ckpt + FlowAR-{S,L,H}.pth -> FlowARPipeline folder",
        description="Convert official FlowAR checkpoints (MAR's KL-16 autoencoder and a FlowAR-S/L/H state dict) "
        "into a FlowARPipeline folder with the official README's sampling settings for that size. Missing or "
        "unexpected keys are listed.",
    )
    flowar.add_argument("--vae", required=True, help="MAR's KL-16 autoencoder (kl16.ckpt)")
    flowar.add_argument("--flowar", required=True,
                        help="official FlowAR file (FlowAR-S.pth, FlowAR-L.pth, FlowAR-H.pth)")
    flowar.add_argument("--out", required=True, help="output pipeline folder")
    flowar.add_argument("--num-classes", type=int, default=None,
                        help="expected number of classes (checked against the checkpoint; ImageNet: 1000)")
    flowar.set_defaults(func=convert_flowar_official)


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
    if vqvae.vocab_size != transformer.config.vocab_size or vqvae.Cvae != transformer.config.Cvae:
        raise UserError(
            f"the VQVAE (vocabulary {vqvae.vocab_size}, code dim {vqvae.Cvae}) does not fit the VAR transformer "
            f"(vocabulary {transformer.config.vocab_size}, code dim {transformer.config.Cvae}); "
            "pass the VQVAE the transformer was trained with"
        )
    pipe = VARPipeline(vqvae=vqvae, transformer=transformer, text_encoder=None)
    pipe.save_pretrained(str(out))
    cfg = transformer.config
    print(f"wrote {out}: VAR depth {cfg.depth} (width {cfg.embed_dim}, {cfg.num_classes} classes, "
          f"{'shared' if cfg.shared_aln else 'per-block'} AdaLN), VQVAE vocabulary {vqvae.vocab_size}")
    return 0


def convert_flowar_official(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_output_folder
    from vgen.models.flowar_official import load_official_flowar, official_sampling_defaults, official_size_name
    from vgen.pipelines.flowar import FlowARPipeline
    from vgen.tokenizers.kl_autoencoder import load_official_kl16

    out = check_output_folder(args.out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty; choose a new --out")
    transformer = load_official_flowar(args.flowar)
    cfg = transformer.config
    if args.num_classes is not None and cfg.num_classes != args.num_classes:
        raise UserError(f"--num-classes {args.num_classes} does not match the checkpoint, which has "
                        f"{cfg.num_classes} classes")
    vae = load_official_kl16(args.vae)
    defaults = official_sampling_defaults(transformer)
    pipe = FlowARPipeline(vae=vae, transformer=transformer, text_encoder=None,
                          **{f"default_{name}": value for name, value in defaults.items()})
    pipe.save_pretrained(str(out))
    size = official_size_name(cfg) or "a non-released size"
    print(f"wrote {out}: FlowAR ({size}: {cfg.encoder_depth}+{cfg.decoder_depth} blocks of width "
          f"{cfg.encoder_embed_dim}, {cfg.flow_head} flow head {cfg.flow_depth} x {cfg.flow_width}, "
          f"{cfg.num_classes} classes, {pipe.resolution} px), sampling defaults "
          + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0
