"""Copy a trained video pipeline into the package as the default video model, in fp16, with its head profile and a
model card whose scores come from a ``vgen eval video`` report.

    python configs/moving_shapes/ship_video_model.py RUN/final --eval EVAL.json [--cache forcing_kv]
        [--training "how it was trained"] [--out vgen/assets/default_video_model]

The weights are stored in fp16 (loading upcasts them to fp32). The Forcing-KV head profile (``head_profile.json``,
from ``vgen profile-heads``) must be beside the model: its fingerprint is taken on fp16-rounded weights, so it stays
valid for the fp16 copy. The card's scores are the report's rows at the training length for the default cache and the
real-render ceiling; the report must have been made on this model (its path is checked). Refuses a result
over :data:`vgen.pipelines.VIDEO_MODEL_BUDGET_BYTES` or one that would take vgen/assets over its budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vgen.errors import UserError
from vgen.pipelines import VIDEO_MODEL_BUDGET_BYTES
from vgen.pipelines.model_card import ModelCardInfo, Score
from vgen.pipelines.shipping import OWN_WEIGHTS, ship_pipeline
from vgen.pipelines.video import DEFAULT_VIDEO_MODEL_DIR, load_video_pipeline

#: the report's metrics that go on the card, with their names there
CARD_METRICS = {"caption_adherence": "caption adherence", "identity_persistence": "identity persistence",
                "motion_adherence": "motion adherence", "shapes_fid": "per-frame Shapes-FID"}


def eval_scores(report: dict, cache: str) -> list[Score]:
    """The card's scores from a ``vgen eval video`` report: every metric of :data:`CARD_METRICS` at the training
    length (``length_multiple`` 1) for the model's default ``cache`` and for the real renders (the ceiling)."""
    settings = report.get("settings") or {}
    rows = [row for row in report.get("results") or []
            if row.get("length_multiple") == 1 and row.get("mode") in ("real", cache)]
    if {row["mode"] for row in rows} != {"real", cache}:
        raise UserError(f"the --eval report has no rows for the real renders and the {cache} cache at the training "
                        "length; make it with 'vgen eval video --model RUN/final --videos 200 --lengths 1,2,4 > "
                        "EVAL.json'")
    how = (f"`vgen eval video`: {settings.get('videos')} Moving Shapes captions, one video each (seeds from "
           f"{settings.get('seed')}), {settings.get('training_frames')} frames (the training length), the saved "
           "sampling defaults; exact Shapes detector on every frame")
    scores = []
    for row in rows:
        what = "real renders of the same captions (ceiling)" if row["mode"] == "real" else f"{row['mode']} cache"
        scores += [Score(f"{label}, {what}", round(float(row[key]), 4), how)
                   for key, label in CARD_METRICS.items() if key in row]
    return scores


def video_model_card(report: dict, training: str, cache: str) -> ModelCardInfo:
    return ModelCardInfo(
        title="vgen moving-shapes-video: a block-causal AR video diffusion model for the 32 px Moving Shapes world",
        summary="A small block-causal video transformer that writes a clip block by block (4 latent frames per "
        "block) on the latents of a per-frame KL autoencoder, conditioned on a caption that names each object's "
        "shape, colour and direction (\"a red circle moving right\"). It samples each block with a 4-step few-step "
        "sampler on its own KV cache (full, sink + rolling window, or the Forcing-KV compressed cache with this "
        "folder's head profile), so videos can run past the training length and stream as they are made. It ships "
        "so that `vgen generate-video` and `vgen stream` work without training; it is small and CPU-trained, so "
        "the objects' outlines are soft and it follows captions only part of the time (scores below).",
        training=training,
        scores=eval_scores(report, cache),
        **{**OWN_WEIGHTS, "source": "vgen's own training run (configs/moving_shapes/train_video_model.sh)"},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder saved by 'vgen train video' (its final/ folder)")
    parser.add_argument("--eval", required=True, help="the model's 'vgen eval video' JSON report (the card's scores)")
    parser.add_argument("--training", default="Trained with configs/moving_shapes/train_video_model.sh of the vgen "
                        "repository on clips the Moving Shapes world renders (no downloaded data).",
                        help="the card's training paragraph")
    parser.add_argument("--out", default=str(DEFAULT_VIDEO_MODEL_DIR), help="where the shipped folder goes")
    parser.add_argument("--cache", default=None, help="default KV cache of the shipped model")
    args = parser.parse_args(argv)
    try:
        pipe, model_dir = load_video_pipeline(args.model, "cpu")
        if pipe.head_profile is None:
            raise UserError(f"{args.model} has no head_profile.json; run 'vgen profile-heads --model {args.model}'")
        pipe.head_profile.check_model(pipe.transformer)
        try:
            report = json.loads(Path(args.eval).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"--eval {args.eval}: not a readable JSON report ({err})") from None
        evaluated = (report.get("settings") or {}).get("model")
        if evaluated is not None and Path(evaluated).resolve() != model_dir.resolve():
            raise UserError(f"--eval {args.eval} scores {evaluated}, not {model_dir}; evaluate this model")
        if args.cache is not None:
            pipe.register_to_config(default_cache=pipe.option("cache").check(args.cache))
        card = video_model_card(report, args.training, pipe.resolve_sampling()["cache"])
        size = ship_pipeline(pipe, args.out, "vgen-moving-shapes-video", card, budget_bytes=VIDEO_MODEL_BUDGET_BYTES)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {args.out} ({size / 1e6:.2f} MB of fp16 weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
