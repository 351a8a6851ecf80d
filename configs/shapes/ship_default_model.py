"""Copy a trained text VAR pipeline into the package as the default model, in fp16, with its sampling defaults.

    python configs/shapes/ship_default_model.py RUN/final [--guidance-scale 1.5] [--temperature 1.0] \
        [--top-k 0] [--top-p 0.0] [--guidance-profile ramp|S1,...,SK] [--out vgen/assets/default_model]

The weights are stored in fp16 (half the bytes; loading upcasts them to fp32, so CPU inference is unchanged up to
fp16 rounding of the weights), with the model card of :func:`default_model_card` (README.md: what it is, how it was
trained, its measured scores, licence, how to load it). Refuses a result over the 25 MB budget of a shipped model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgen.samplers.guidance import parse_guidance_profile

from vgen.errors import UserError
from vgen.pipelines import DEFAULT_MODEL_BUDGET_BYTES, DEFAULT_MODEL_DIR, load_pipeline
from vgen.pipelines.model_card import ModelCardInfo, Score
from vgen.pipelines.shipping import OWN_WEIGHTS, ship_pipeline

GENEVAL_HOW = ("553 Shapes-GenEval prompts x 4 images (seeds 0-2211), exact Shapes detector: `vgen eval geneval "
               "--metadata shapes --images-per-prompt 4 --out G`")
FID_HOW = ("5000 samples (`vgen sample --metadata shapes --num-samples 5000`) against 10 000 real images, Shapes "
           "features (`vgen eval fid --features shapes`); real vs real: 0.25")


def default_model_card() -> ModelCardInfo:
    """The shipped default model's card (its measurements are in configs/shapes/README.md)."""
    return ModelCardInfo(
        title="vgen default model: text-to-image VAR for the 64 px Shapes world",
        summary="The model `vgen generate` uses when no --model is given: a text-conditional VAR (next-scale "
        "prediction) for vgen's procedural Shapes world. It knows six shapes (circle, square, triangle, star, "
        "hexagon, diamond), GenEval's ten colours, counts up to four and the relations left of, right of, above "
        "and below; another word is an error that lists the known ones. It runs on a CPU in seconds. Inside vgen, "
        "`vgen.pipelines.load_pipeline()` (no argument) loads it.",
        training="Trained with `bash configs/shapes/train_default_model.sh` of the vgen repository, only on images "
        "the Shapes world renders (no downloaded data): a multi-scale VQ tokenizer (3000 x 32 steps on 2 CPU cores), "
        "then four VAR stages (2700 x 128 and 1800 x 128 steps on one GPU in bf16; the text path with word mixing, "
        "1000 x 96 on CPU; every weight with captions weighted towards the failing tasks, 2800 x 128 on one GPU), "
        "each stage starting from the previous one's EMA weights. Shipped with "
        "`configs/shapes/ship_default_model.py` in fp16; configs/shapes/README.md has every command and time.",
        scores=[
            Score("Shapes-GenEval overall", 0.699, GENEVAL_HOW + "; single 0.881, two 0.715, counting 0.234, colors "
                  "0.992, position 0.575, color_attr 0.795; the saved sampling defaults"),
            Score("Shapes-GenEval overall, VAR's ramp at CFG 1.5", 0.657, GENEVAL_HOW + " with `--guidance-profile "
                  "ramp --guidance-scale 1.5`"),
            Score("Shapes-FID", 1.84, FID_HOW + "; the saved sampling defaults"),
            Score("Shapes-FID, VAR's ramp at CFG 1.5", 0.87, FID_HOW),
        ],
        **OWN_WEIGHTS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder saved by 'vgen train var' (its final/ folder)")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="where the shipped folder goes")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default CFG scale")
    parser.add_argument("--guidance-profile", type=parse_guidance_profile, default=None,
                        help="default share of the CFG scale per scale: 'ramp' (VAR's) or K comma-separated numbers")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    args = parser.parse_args(argv)

    pipe, _ = load_pipeline(args.model, "cpu")
    defaults = {"guidance_scale": args.guidance_scale, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p}
    if args.guidance_profile is not None:
        try:
            defaults["guidance_profile"] = pipe.check_guidance_profile(args.guidance_profile)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    pipe.register_to_config(**{f"default_{k}": v for k, v in defaults.items() if v is not None})
    out = Path(args.out)
    try:
        size = ship_pipeline(pipe, out, "vgen-shapes-default", default_model_card(), DEFAULT_MODEL_BUDGET_BYTES)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {args.model} -> {out}: {size / 1e6:.1f} MB of fp16 weights, sampling defaults "
          f"{ {k: v for k, v in pipe.config.items() if k.startswith('default_')} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
