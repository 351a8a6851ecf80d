"""Measure trained tokenizers on held-out images and draw what each scale / frequency band adds.

    python configs/shapes/measure_tokenizers.py runs/msvq_compare/final runs/frvae_compare/final --geneval \
        --bands-png configs/shapes/frvae_vs_msvq_bands.png
    python configs/shapes/measure_tokenizers.py runs/vq_shapes/final runs/kl_shapes/final --world moving_shapes

For every folder (any vgen tokenizer: multi-scale VQ, FR-VAE, single-scale VQ, KL autoencoder) it prints one JSON
line: PSNR (dB, images in [0, 1]) of the reconstructions of ``--n`` held-out images (world seed ``--seed``; the
training runs use seed 0), and for VQ tokenizers the codes used and the perplexity of the code histogram, for
multi-scale ones the PSNR after each scale (cumulative reconstructions), for KL autoencoders the latent std before
and after the scale factor. ``--geneval`` (Shapes world) adds the Shapes-GenEval of the reconstructions of one real
render per prompt (render seed 1000 + prompt index): the ceiling a generator on that tokenizer can reach.
``--bands-png`` draws, for the first ``--bands-images`` images, the original and the cumulative reconstruction
after each scale (band), one row per image and multi-scale tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from vgen.data.shapes import render_spec
from vgen.eval.geneval import evaluate_image, load_metadata, summarise
from vgen.eval.shapes_detector import ShapesDetector
from vgen.tokenizers.kl_autoencoder import AutoencoderKL
from vgen.tokenizers.loading import load_tokenizer
from vgen.tokenizers.msvq import MultiScaleVQModel
from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

from vgen.imaging import make_grid, tensor_to_pil
from vgen.train.reconstruction import build_image_dataset, psnr_01

KIND_NAMES = {"MultiScaleVQModel": "msvq", "FrequencyVQModel": "frvae", "SingleScaleVQModel": "vq",
              "AutoencoderKL": "kl"}


def code_stats(counts_V: torch.Tensor) -> dict:
    p = counts_V[counts_V > 0] / counts_V.sum()
    return {"codes_used": int((counts_V > 0).sum()), "vocab_size": counts_V.numel(),
            "perplexity": float(torch.exp(-(p * p.log()).sum()))}


@torch.no_grad()
def measure(model, images: torch.Tensor, batch: int = 100) -> dict:
    """Held-out metrics of one tokenizer on ``images`` (N, 3, H, W) in [-1, 1]."""
    out: dict = {"kind": KIND_NAMES[type(model).__name__], "images": len(images),
                 "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
    psnr_sum, per_scale, counts, stds = 0.0, None, None, []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        if isinstance(model, MultiScaleVQModel):  # also FrequencyVQModel
            idx_Bl = model.img_to_idxBl(x)
            recons = model.idxBl_to_img(idx_Bl, last_one=False)
            psnrs = torch.stack([psnr_01(r, x) for r in recons]) * len(x)
            per_scale = psnrs if per_scale is None else per_scale + psnrs
            psnr_sum += float(psnrs[-1])
            ids = torch.cat([i.flatten() for i in idx_Bl])
        elif isinstance(model, SingleScaleVQModel):
            enc = model.encode(x)
            psnr_sum += float(psnr_01(model.decode(enc.quant).clamp(-1, 1), x)) * len(x)
            ids = enc.idx.flatten()
        else:
            posterior = model.encode(x)
            psnr_sum += float(psnr_01(model.decode(posterior.mode()).clamp(-1, 1), x)) * len(x)
            stds.append(posterior.sample(torch.Generator().manual_seed(start)).flatten())
            continue
        hist = torch.bincount(ids, minlength=model.vocab_size).float()
        counts = hist if counts is None else counts + hist
    out["psnr"] = round(psnr_sum / len(images), 2)
    if per_scale is not None:
        out["psnr_per_scale"] = [round(float(v) / len(images), 2) for v in per_scale]
    if counts is not None:
        out.update(code_stats(counts))
    if isinstance(model, AutoencoderKL):
        z = torch.cat(stds)
        out.update(latent_std=round(float(z.std()), 4), scaled_latent_std=round(float(z.std()) * model.scale_factor, 4),
                   scale_factor=round(model.scale_factor, 4), latent_shape=[model.latent_channels,
                                                                         *model.latent_size(images.shape[-1])])
    return out


@torch.no_grad()
def reconstruct(model, x_B3HW: torch.Tensor) -> torch.Tensor:
    """The tokenizer's reconstruction (B, 3, H, W) in [-1, 1] of ``x_B3HW`` in [-1, 1], all scales for multi-scale
    ones, the posterior mode for KL autoencoders."""
    if isinstance(model, MultiScaleVQModel):  # also FrequencyVQModel
        return model.img_to_reconstructed_img(x_B3HW)
    if isinstance(model, SingleScaleVQModel):
        return model.decode(model.encode(x_B3HW).quant).clamp(-1, 1)
    return model.decode(model.encode(x_B3HW).mode()).clamp(-1, 1)


@torch.no_grad()
def reconstruction_geneval(model, resolution: int = 64, render_seed: int = 1000) -> dict:
    """Shapes-GenEval (``summarise``'s dict) of the reconstructions of one real render per Shapes prompt, prompt i
    rendered with seed ``render_seed + i``."""
    detector, results = ShapesDetector(), []
    for i, entry in enumerate(load_metadata("shapes")):
        image = render_spec(entry, resolution, render_seed + i).image
        x_13HW = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        results.append(evaluate_image(tensor_to_pil(reconstruct(model, x_13HW)[0]), entry, detector))
    return summarise(results)


#: row labels and step names of the bands picture, per tokenizer kind
ROW_LABELS = {"msvq": ("multi-scale VQ", "scale"), "frvae": ("FR-VAE", "band")}


@torch.no_grad()
def bands_picture(models: dict, images: torch.Tensor):
    """Rows: one per (image, multi-scale tokenizer kind, :data:`ROW_LABELS`); columns: the original (captioned with
    the row's tokenizer), then the cumulative reconstruction from steps 1..k for every k, captioned with k, the
    token map of step k and the PSNR (dB) against the original."""
    tiles, captions, ncols = [], [], None
    for x in images:
        for kind, model in models.items():
            label, step = ROW_LABELS[kind]
            recons = model.img_to_reconstructed_img(x[None], last_one=False)
            tiles.append(tensor_to_pil(x))
            captions.append(f"{label}: original")
            for k, r in enumerate(recons):
                tiles.append(tensor_to_pil(r[0]))
                pn = model.patch_nums[k]
                steps = f"{step}s 1-{k + 1}" if k else f"{step} 1"
                captions.append(f"{steps} (+{pn}x{pn}) {float(psnr_01(r, x[None])):.1f} dB")
            ncols = len(recons) + 1
    return make_grid(tiles, captions, ncols=ncols, caption_lines=2, min_tile=128, font_size=11)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--world", default="shapes", choices=["shapes", "moving_shapes"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1, help="world seed of the held-out images (training: 0)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--geneval", action="store_true",
                        help="Shapes-GenEval of the reconstructions of one real Shapes render per prompt")
    parser.add_argument("--bands-png", type=Path, default=None)
    parser.add_argument("--bands-images", type=int, default=3)
    args = parser.parse_args()

    dataset = build_image_dataset(args.world, "", args.resolution, args.n, args.seed)
    images = torch.stack([dataset[i]["image"] for i in range(args.n)])
    models = {str(folder): load_tokenizer(folder) for folder in args.folders}
    for folder, model in models.items():
        line = {"folder": folder, "world": args.world, **measure(model, images)}
        if args.geneval:
            summary = reconstruction_geneval(model, args.resolution)
            line["reconstruction_geneval"] = round(summary["overall"], 3)
            line["reconstruction_geneval_tasks"] = {tag: round(task["accuracy"], 3)
                                                    for tag, task in summary["tasks"].items()}
        print(json.dumps(line), flush=True)
    if args.bands_png is not None:
        multi = {KIND_NAMES[type(m).__name__]: m for m in models.values() if isinstance(m, MultiScaleVQModel)}
        picture = bands_picture(multi, images[: args.bands_images])
        picture.quantize(colors=256, method=2, dither=0).save(args.bands_png, optimize=True)
        print(f"wrote {args.bands_png} ({args.bands_png.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
