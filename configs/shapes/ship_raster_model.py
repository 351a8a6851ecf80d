"""Copy the best raster AR of the Token-Shuffle comparison into the package as ``shapes-raster``, in fp16.

    python configs/shapes/ship_raster_model.py runs/raster_s1_64/final [--out vgen/assets/raster_model]

``vgen generate --model shapes-raster "a photo of a red circle"`` then runs it without training anything. The card
(README.md) holds its measured scores from configs/shapes/README.md ("Raster AR and Token-Shuffle"). Refuses a result
over a shipped model's 25 MB budget or one that would take vgen/assets over 90 MB.
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
        "`configs/shapes/ship_raster_model.py` in fp16.",
        scores=[
            Score("Shapes-GenEval overall", 0.0175, GENEVAL_HOW + "; single 0.069, two 0.008, counting 0.0, colors "
                  "0.024, position 0.005, color_attr 0.0; the saved sampling defaults (CFG 3)"),
            Score("Shapes-FID", 28.02, FID_HOW + "; the saved sampling defaults"),
        ],
        **OWN_WEIGHTS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder saved by 'vgen train raster-ar' (its final/ folder)")
    parser.add_argument("--out", default=str(SHIPPED_MODELS["shapes-raster"]), help="where the shipped folder goes")
    args = parser.parse_args(argv)
    pipe, _ = load_pipeline(args.model, "cpu")
    try:
        size = ship_pipeline(pipe, Path(args.out), "vgen-shapes-raster", raster_model_card())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {args.model} -> {args.out}: {size / 1e6:.1f} MB of fp16 weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
