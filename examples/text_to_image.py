"""Text-to-image in Python with the model shipped inside vgen (64 px Shapes world; runs on a CPU in seconds).

    python examples/text_to_image.py "a photo of a red circle left of a blue square" --n 4 --out out/

One generator seeded s gives image i the seed s + i, exactly what `vgen generate --seed s` does, so the images
here are the ones `vgen generate PROMPT --n 4 --seed 0` makes.
"""

import argparse
from pathlib import Path

import torch

from vgen.pipelines import load_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt", nargs="?", default="a photo of a red circle left of a blue square")
parser.add_argument("--n", type=int, default=4, help="images")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="text_to_image_out", help="folder for the PNGs")
args = parser.parse_args()

pipe, _ = load_pipeline()  # no folder: the shipped default model, on CUDA if there is one
images = pipe(prompt=args.prompt, num_images_per_prompt=args.n,
              generator=torch.Generator().manual_seed(args.seed)).images  # image i: seed + i

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
for i, image in enumerate(images):
    image.save(out / f"{i:04d}.png")
print(f"{len(images)} images of {args.prompt!r} in {out}")
