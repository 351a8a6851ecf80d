"""Compare next-scale pipelines (VAR and NFIG folders) in one process: sampling speed and per-scale teacher-forced loss.

    python configs/shapes/compare_next_scale.py runs/var_compare/final runs/nfig_compare/final --speed --per-scale

``--speed``: every folder generates ``--batch-size`` images per call with its saved sampling defaults (prompts from
the Shapes-GenEval set, image i seeded i), the calls of all folders interleaved (``--warmup`` untimed rounds, then
``--repeats`` timed rounds), so load on the machine falls on all of them alike; prints images/s (median round) and
the ratio to the first folder. ``--per-scale``: the cross-entropy (nats) and top-1 accuracy of the transformer's
teacher-forced predictions, per scale (per band for NFIG), on ``--n`` held-out world images with their captions
(world seed ``--seed``; training uses 0), condition never dropped: which steps each model finds hard. Every
result is one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vgen.data.shapes import ShapesDataset
from vgen.eval.geneval import load_metadata
from vgen.pipelines import load_pipeline


def speed(pipes: dict, batch_size: int, repeats: int, warmup: int) -> list[dict]:
    prompts = [entry["prompt"] for entry in load_metadata("shapes")[:batch_size]]
    seconds: dict[str, list[float]] = {name: [] for name in pipes}
    for round_index in range(warmup + repeats):
        for name, pipe in pipes.items():
            generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
            start = time.perf_counter()
            pipe(prompt=prompts, generator=generators, output_type="pt")
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    first = next(iter(pipes))
    rate = {name: batch_size / statistics.median(s) for name, s in seconds.items()}
    return [{"folder": name, "batch_size": batch_size, "images_per_s": round(rate[name], 3),
             "relative_to_first": round(rate[name] / rate[first], 3), "seconds_per_call": [round(s, 3) for s in
                                                                                           seconds[name]],
             "steps": len(pipes[name].transformer.patch_nums), "threads": torch.get_num_threads()}
            for name in pipes]


@torch.no_grad()
def per_scale_loss(pipe, images: torch.Tensor, captions: list[str], batch: int = 50) -> dict:
    transformer, vqvae = pipe.transformer, pipe.vqvae
    patch_nums = list(transformer.patch_nums)
    ce = torch.zeros(len(patch_nums))
    hits = torch.zeros(len(patch_nums))
    for start in range(0, len(images), batch):
        x, text = images[start : start + batch], captions[start : start + batch]
        idx_Bl = vqvae.img_to_idxBl(x)
        ids_BT, mask_BT = pipe.text_encoder.tokenize(text)
        pooled_BD, tokens_BTD = pipe.text_encoder(ids_BT, mask_BT)
        cond = transformer.text_condition(pooled_BD, tokens_BTD, mask_BT)
        logits_BLV = transformer(None, vqvae.quantize.idxBl_to_var_input(idx_Bl), cond=cond)
        offset = 0
        for si, idx in enumerate(idx_Bl):
            logits = logits_BLV[:, offset : offset + idx.shape[1]].float()
            ce[si] += F.cross_entropy(logits.flatten(0, 1), idx.flatten(), reduction="sum")
            hits[si] += (logits.argmax(-1) == idx).sum()
            offset += idx.shape[1]
    tokens = torch.tensor([len(images) * pn * pn for pn in patch_nums], dtype=torch.float32)
    return {"patch_nums": patch_nums, "loss_per_scale": [round(float(v), 3) for v in ce / tokens],
            "accuracy_per_scale": [round(float(v), 3) for v in hits / tokens],
            "loss": round(float(ce.sum() / tokens.sum()), 4), "images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--per-scale", action="store_true")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1, help="world seed of the held-out images (training: 0)")
    args = parser.parse_args()

    pipes = {}
    for folder in args.folders:
        pipe, _ = load_pipeline(folder, "cpu")
        pipe.set_progress_bar_config(disable=True)
        pipes[str(folder)] = pipe
    if args.speed:
        for line in speed(pipes, args.batch_size, args.repeats, args.warmup):
            print(json.dumps(line), flush=True)
    if args.per_scale:
        resolution = next(iter(pipes.values())).vqvae.resolution
        dataset = ShapesDataset(resolution=resolution, length=args.n, seed=args.seed)
        items = [dataset[i] for i in range(args.n)]
        images = torch.stack([item["image"] for item in items])
        captions = [item["caption"] for item in items]
        for name, pipe in pipes.items():
            print(json.dumps({"folder": name, **per_scale_loss(pipe, images, captions)}), flush=True)


if __name__ == "__main__":
    main()
