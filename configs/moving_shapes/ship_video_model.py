"""Copy a trained video pipeline into the package as the default video model, in fp16, with its head profile.

    python configs/moving_shapes/ship_video_model.py RUN/final [--cache forcing_kv] [--out vgen/assets/default_video_model]

The weights are stored in fp16 (loading upcasts them to fp32). The Forcing-KV head profile (``head_profile.json``,
from ``vgen profile-heads``) must be beside the model: its fingerprint is taken on fp16-rounded weights, so it stays
valid for the fp16 copy. Refuses a result over :data:`VIDEO_MODEL_BUDGET_BYTES` (the streaming demo's model ships in
every install, next to the 23.7 MB text-to-image model).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vgen.errors import UserError
from vgen.pipelines.video import DEFAULT_VIDEO_MODEL_DIR, load_video_pipeline

VIDEO_MODEL_BUDGET_BYTES = 8 * 10**6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder saved by 'vgen train video' (its final/ folder)")
    parser.add_argument("--out", default=str(DEFAULT_VIDEO_MODEL_DIR), help="where the shipped folder goes")
    parser.add_argument("--cache", default=None, help="default KV cache of the shipped model")
    args = parser.parse_args(argv)
    try:
        pipe, _ = load_video_pipeline(args.model, "cpu")
        if pipe.head_profile is None:
            raise UserError(f"{args.model} has no head_profile.json; run 'vgen profile-heads --model {args.model}'")
        pipe.head_profile.check_model(pipe.transformer)
        if args.cache is not None:
            pipe.register_to_config(default_cache=pipe.option("cache").check(args.cache))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pipe.register_to_config(_name_or_path="vgen-moving-shapes-video")  # not the training run's local path
    for name in ("autoencoder", "transformer", "text_encoder"):
        component = getattr(pipe, name)
        component.register_to_config(_name_or_path=f"vgen-moving-shapes-video/{name}")
        component.half()
    out = Path(args.out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging))
    size = sum(p.stat().st_size for p in staging.rglob("*.safetensors"))
    if size > VIDEO_MODEL_BUDGET_BYTES:
        shutil.rmtree(staging)
        print(f"error: the weights take {size / 1e6:.1f} MB, over the {VIDEO_MODEL_BUDGET_BYTES / 1e6:.0f} MB budget",
              file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"shipped {out} ({size / 1e6:.2f} MB of fp16 weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
