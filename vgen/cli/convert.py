"""``vgen convert``: turn released checkpoints into vgen pipeline folders.

    vgen convert var-official --vae vae_ch160v4096z32.pth --var var_d16.pth --out var-d16
    vgen generate --model var-d16 --class-label 207
    vgen convert llamagen-official --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --out llamagen-b
    vgen convert flowar-official --vae kl16.ckpt --flowar FlowAR-S.pth --out flowar-s
    vgen convert xar-official --vae kl16.ckpt --xar xAR-B.pth --out xar-b
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vgen.errors import UserError


def new_output_folder(path: str) -> Path:
    """``--out``: a folder to write into that is new or empty (a converter never mixes its files with others)."""
    from vgen.cli.checks import check_output_folder

    out = check_output_folder(path, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty; choose a new --out")
    return out


def check_num_classes(expected: int | None, found: int) -> None:
    """``--num-classes`` (None: not given) against the classes of the checkpoint read."""
    if expected is not None and found != expected:
        raise UserError(f"--num-classes {expected} does not match the checkpoint, which has {found} classes")


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
    xar = kinds.add_parser(
        "xar-official",
        help="official xAR (OliverRensu/xAR): MAR's kl16.ckpt + xAR-{B,L,H}.pth -> XARPipeline folder",
        description="Convert official xAR checkpoints (MAR's KL-16 autoencoder and an xAR-B/L/H state dict) into an "
        "XARPipeline folder with the official README's sampling settings for that size. Missing or unexpected keys "
        "are listed.",
    )
    xar.add_argument("--vae", required=True, help="MAR's KL-16 autoencoder (kl16.ckpt)")
    xar.add_argument("--xar", required=True, help="official xAR file (xAR-B.pth, xAR-L.pth, xAR-H.pth)")
    xar.add_argument("--out", required=True, help="output pipeline folder")
    xar.add_argument("--num-classes", type=int, default=None,
                     help="expected number of classes (checked against the checkpoint; ImageNet: 1000)")
    xar.set_defaults(func=convert_xar_official)
    register_llamagen(kinds)


def register_llamagen(kinds) -> None:
    llamagen = kinds.add_parser(
        "llamagen-official",
        help="official LlamaGen (FoundationVision/LlamaGen): vq_ds16_c2i.pt + c2i_*.pt -> RasterARPipeline folder",
        description="Convert official class-conditional LlamaGen checkpoints (DDP files with weights under 'model', "
        "FSDP raw state dicts, 'module' / 'state_dict' wrappers) into a RasterARPipeline folder. Missing or "
        "unexpected keys are listed.",
    )
    llamagen.add_argument("--vq", required=True, help="official VQ tokenizer file (vq_ds16_c2i.pt)")
    llamagen.add_argument("--gpt", required=True, help="official GPT file (c2i_B_256.pt, c2i_L_384.pt, ...)")
    llamagen.add_argument("--out", required=True, help="output pipeline folder")
    llamagen.add_argument("--image-size", type=int, default=256,
                          help="image side the GPT was trained for: 256 for the *_256 files, 384 for *_384 "
                               "(token grid = image size / the VQ's downsampling; default 256)")
    llamagen.add_argument("--num-heads", type=int, default=None,
                          help="attention heads (read from the released size with this width and depth by default)")
    llamagen.add_argument("--guidance-scale", type=float, default=2.0,
                          help="CFG weight saved as the folder's default (LlamaGen's evaluation: 2.0 for B and L)")
    llamagen.set_defaults(func=convert_llamagen_official)


def convert_llamagen_official(args: argparse.Namespace) -> int:
    from vgen.models.raster_ar_official import load_official_llamagen_gpt
    from vgen.pipelines.raster_ar import RasterARPipeline
    from vgen.tokenizers.single_scale_vq import load_official_llamagen_vq

    out = new_output_folder(args.out)
    vqvae = load_official_llamagen_vq(args.vq)
    grid, leftover = divmod(args.image_size, vqvae.downsample)
    if leftover or grid < 1:
        raise UserError(
            f"--image-size {args.image_size} is not a multiple of the VQ's downsampling factor {vqvae.downsample}"
        )
    transformer = load_official_llamagen_gpt(args.gpt, num_heads=args.num_heads, grid_size=grid)
    pipe = RasterARPipeline(vqvae=vqvae, transformer=transformer, text_encoder=None,
                            default_guidance_scale=args.guidance_scale)
    pipe.save_pretrained(str(out))
    cfg = transformer.config
    print(f"wrote {out}: LlamaGen GPT {cfg.depth} layers (width {cfg.embed_dim}, {cfg.num_heads} heads, "
          f"{cfg.num_classes} classes), {grid}x{grid} tokens ({args.image_size} px), VQ vocabulary {vqvae.vocab_size}")
    return 0


def convert_var_official(args: argparse.Namespace) -> int:
    from vgen.models.var_official import load_official_var
    from vgen.pipelines.model_card import ModelCardInfo
    from vgen.pipelines.var import VARPipeline
    from vgen.tokenizers.msvq import load_official_var_vae

    out = new_output_folder(args.out)
    transformer = load_official_var(args.var)
    check_num_classes(args.num_classes, transformer.config.num_classes)
    vqvae = load_official_var_vae(args.vae, patch_nums=tuple(transformer.config.patch_nums))
    # the pipeline checks that the VQVAE fits the transformer (vgen.pipelines.next_scale_tokenizer)
    pipe = VARPipeline(vqvae=vqvae, transformer=transformer, text_encoder=None)
    cfg = transformer.config
    pipe.model_card = ModelCardInfo(
        title=f"VAR-d{cfg.depth} (official checkpoint, converted)",
        summary="Official VAR (Tian et al., NeurIPS 2024, FoundationVision/VAR): class-conditional next-scale "
        f"prediction, converted key for key by `vgen convert var-official` ({cfg.num_classes} classes; ImageNet "
        "ids for the released checkpoints).",
        training="Trained by the VAR authors (FoundationVision/VAR); for ImageNet 256 px checkpoints: ImageNet-1k, "
        "the paper's recipe. Not retrained by vgen.",
        source=f"{Path(args.vae).name} (VQVAE) and {Path(args.var).name} (transformer)",
        license="mit",
        license_note="FoundationVision/VAR releases its code and checkpoints under the MIT licence (check the terms "
        "that came with your copy; the ImageNet training images have their own terms)",
    )
    pipe.save_pretrained(str(out))
    print(f"wrote {out}: VAR depth {cfg.depth} (width {cfg.embed_dim}, {cfg.num_classes} classes, "
          f"{'shared' if cfg.shared_aln else 'per-block'} AdaLN), VQVAE vocabulary {vqvae.vocab_size}")
    return 0


def convert_flowar_official(args: argparse.Namespace) -> int:
    from vgen.models.flowar_official import load_official_flowar, official_sampling_defaults, official_size_name
    from vgen.pipelines.flowar import FlowARPipeline
    from vgen.tokenizers.kl_autoencoder import load_official_kl16

    out = new_output_folder(args.out)
    transformer = load_official_flowar(args.flowar)
    cfg = transformer.config
    check_num_classes(args.num_classes, cfg.num_classes)
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


def convert_xar_official(args: argparse.Namespace) -> int:
    from vgen.models.xar_official import load_official_xar, official_sampling_defaults, official_size_name
    from vgen.pipelines.xar import XARPipeline
    from vgen.tokenizers.kl_autoencoder import load_official_kl16

    out = new_output_folder(args.out)
    transformer = load_official_xar(args.xar)
    cfg = transformer.config
    check_num_classes(args.num_classes, cfg.num_classes)
    vae = load_official_kl16(args.vae)
    defaults = official_sampling_defaults(transformer)
    pipe = XARPipeline(vae=vae, transformer=transformer, text_encoder=None,
                       **{f"default_{name}": value for name, value in defaults.items()})
    pipe.save_pretrained(str(out))
    size = official_size_name(cfg) or "a non-released size"
    layout = transformer.layout
    print(f"wrote {out}: xAR ({size}: {cfg.encoder_depth}+{cfg.decoder_depth} blocks of width "
          f"{cfg.encoder_embed_dim}, {layout.num_units} cells of {cfg.entity_size}x{cfg.entity_size} tokens, "
          f"{cfg.num_classes} classes, {pipe.resolution} px), sampling defaults "
          + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0
