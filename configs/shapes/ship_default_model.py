"""Copy a trained text VAR pipeline into the package as the default model, in fp16, with its sampling defaults.

    python configs/shapes/ship_default_model.py RUN/final [--guidance-scale 1.5] [--temperature 1.0] \
        [--top-k 0] [--top-p 0.0] [--guidance-profile ramp|S1,...,SK] [--out vgen/assets/default_model]

The weights are stored in fp16 (half the bytes; loading upcasts them to fp32, so CPU inference is unchanged up to
fp16 rounding of the weights). Refuses a result over the 25 MB budget of a shipped model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vgen.samplers.guidance import parse_guidance_profile

from vgen.errors import UserError
from vgen.pipelines import DEFAULT_MODEL_BUDGET_BYTES, DEFAULT_MODEL_DIR, load_pipeline


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
    pipe.register_to_config(_name_or_path="vgen-shapes-default")  # not the training run's local path
    for name in ("vqvae", "transformer", "text_encoder"):
        component = getattr(pipe, name)
        component.register_to_config(_name_or_path=f"vgen-shapes-default/{name}")
        component.half()
    out = Path(args.out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging))
    size = sum(p.stat().st_size for p in staging.rglob("*.safetensors"))
    if size > DEFAULT_MODEL_BUDGET_BYTES:
        shutil.rmtree(staging)
        print(f"error: the weights take {size / 1e6:.1f} MB, over the {DEFAULT_MODEL_BUDGET_BYTES / 1e6:.0f} MB budget; "
              "ship a smaller model", file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"shipped {args.model} -> {out}: {size / 1e6:.1f} MB of fp16 weights, sampling defaults "
          f"{ {k: v for k, v in pipe.config.items() if k.startswith('default_')} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
