"""Copy a trained Shapes pipeline into the package as one of the shipped models besides the default, in fp16.

    python configs/shapes/ship_model.py shapes-raster runs/raster_s1_64/final [--out vgen/assets/raster_model]
    python configs/shapes/ship_model.py shapes-xar runs/xar_shapes/final

``vgen generate --model NAME "a photo of a red circle"`` then runs it without training anything. Each name has its
card (README.md) with the measured scores from configs/shapes/README.md. Refuses a result over a shipped model's 25 MB
budget or one that would take vgen/assets over 90 MB. The default model has its own script (ship_default_model.py:
it also saves sampling defaults).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgen.errors import UserError
from vgen.pipelines import SHIPPED_MODELS, load_pipeline
from vgen.pipelines.model_card import ModelCardInfo, Score
from vgen.pipelines.shipping import OWN_WEIGHTS, ship_pipeline

GENEVAL_HOW = ("553 Shapes-GenEval prompts x 4 images (seeds 0-2211), exact Shapes detector: `vgen eval geneval "
               "--metadata shapes --images-per-prompt 4 --out G`")
FID_HOW = ("2000 samples (`vgen sample --metadata shapes --num-samples 2000`) against 10 000 real images, Shapes "
           "features (`vgen eval fid --features shapes`)")


def raster_model_card() -> ModelCardInfo:
    """The shipped raster AR's card (its measurements are in configs/shapes/README.md)."""
    return ModelCardInfo(
        title="vgen shapes-raster: text-to-image raster next-token AR (LlamaGen layout) for the 64 px Shapes world",
        summary="A small LlamaGen-style GPT that writes an image as 8 x 8 codes of a single-scale VQ tokenizer, one "
        "code per step in raster order (64 steps), conditioned on the prompt's words. It is the best model of vgen's "
        "Token-Shuffle comparison on the Shapes world (windows of 1, 2 and 4 codes per step, the same transformer) "
        "and is shipped so that raster AR, its KV-cached decoding and the target-only speculative samplers "
        "(`--speculative sjd|lantern`) can be tried without training. It is weak: its tokenizer, trained 500 "
        "steps, does not keep the Shapes palette (its own reconstructions score 0.096 on Shapes-GenEval), so "
        "samples are coloured blobs; the default model (`shapes-var`) is the one to use for images.",
        training="Trained with `bash configs/shapes/train_raster.sh` of the vgen repository on images the Shapes "
        "world renders (no downloaded data), 2 CPU cores, fp32: the tokenizer `raster_vq.yaml` 500 x 32 steps "
        "(954 s), then `raster_s1_64.yaml` 1000 x 32 steps (1032 s on shared cores). Shipped with "
        "`configs/shapes/ship_model.py shapes-raster` in fp16.",
        scores=[
            Score("Shapes-GenEval overall", 0.0175, GENEVAL_HOW + "; single 0.069, two 0.008, counting 0.0, colors "
                  "0.024, position 0.005, color_attr 0.0; the saved sampling defaults (CFG 3)"),
            Score("Shapes-FID", 28.02, FID_HOW + "; the saved sampling defaults"),
        ],
        **OWN_WEIGHTS,
    )


XAR_FID_HOW = ("1000 samples (`vgen sample --metadata shapes --num-samples 1000`, prompts of the Shapes-GenEval set "
               "in turn, seeds 0-999) against 10 000 real images, Shapes features (`vgen eval fid --features shapes`)")
XAR_GENEVAL_HOW = ("553 Shapes-GenEval prompts x 1 image (seeds 0-552), exact Shapes detector: `vgen eval geneval "
                   "--metadata shapes --images-per-prompt 1 --out G`")


def xar_model_card() -> ModelCardInfo:
    """The shipped xAR's card (its measurements are the family table's, configs/shapes/README.md)."""
    return ModelCardInfo(
        title="vgen shapes-xar: text-to-image xAR (next-X prediction with flow matching) for the 64 px Shapes world",
        summary="A small xAR: the image is 2 x 2 cells of 4 x 4 continuous tokens (16 channels: patch 2 on a "
        "16x16x4 KL latent), generated cell after cell; each cell is denoised by the whole transformer with 12 "
        "Euler-Maruyama flow steps under velocity guidance, conditioned on the finished cells through a KV cache and "
        "on the prompt's words through cross-attention. It is the best xAR of vgen's Shapes runs and is shipped so "
        "that xAR's unit-wise flow sampling (and `--speculative cspd` with a drafter of the same units) can be tried "
        "without training. It is weak: its samples put blobs of the prompt's colours on the background with soft "
        "outlines that the Shapes detector does not accept, and its autoencoder (251 steps) turns black green; the "
        "default model (`shapes-var`) is the one to use for images.",
        training="Trained with the vgen repository only on images the Shapes world renders (no downloaded data), 2 "
        "CPU cores, fp32: the KL autoencoder `kl_autoencoder.yaml` 251 x 32 steps (488 s; PSNR 26.26 dB), then "
        "`xar_text.yaml` 1200 x 32 steps (888 s, final loss 0.47): `vgen train xar --config "
        "configs/shapes/xar_text.yaml --set task.autoencoder=runs/kl_shapes/final train.steps=1200`. Shipped with "
        "`configs/shapes/ship_model.py shapes-xar` in fp16.",
        scores=[
            Score("Shapes-GenEval overall", 0.017, XAR_GENEVAL_HOW + "; single 0.04, two 0.00, counting 0.00, colors "
                  "0.06, position 0.00, color_attr 0.00; the saved sampling defaults (12 steps, CFG 2)"),
            Score("Shapes-FID", 17.24, XAR_FID_HOW + "; the saved sampling defaults"),
        ],
        **OWN_WEIGHTS,
    )


#: each shipped name (a key of :data:`vgen.pipelines.SHIPPED_MODELS`) -> (pipeline class it must be, its card)
CARDS = {
    "shapes-raster": ("RasterARPipeline", raster_model_card),
    "shapes-xar": ("XARPipeline", xar_model_card),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(CARDS), help="which shipped model to write")
    parser.add_argument("model", help="pipeline folder saved by 'vgen train' (its final/ folder)")
    parser.add_argument("--out", default=None, help="where the shipped folder goes (default: its place in vgen/assets)")
    args = parser.parse_args(argv)
    pipeline_class, card = CARDS[args.name]
    out = Path(args.out) if args.out else SHIPPED_MODELS[args.name]
    try:
        pipe, _ = load_pipeline(args.model, "cpu")
        if type(pipe).__name__ != pipeline_class:
            raise UserError(f"{args.model} holds a {type(pipe).__name__}; {args.name} ships a {pipeline_class}")
        size = ship_pipeline(pipe, out, f"vgen-{args.name}", card())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {args.model} -> {out}: {size / 1e6:.1f} MB of fp16 weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
