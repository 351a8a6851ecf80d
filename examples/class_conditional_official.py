"""Class-conditional images from an official VAR checkpoint (FoundationVision/VAR), converted once for vgen.

    vgen convert var-official --vae vae_ch160v4096z32.pth --var var_d16.pth --out var-d16
    python examples/class_conditional_official.py var-d16 --labels 207 360 --out out/

Official VAR's ImageNet settings are the converted folder's saved defaults (cfg 1.5 on VAR's ramp, top-k 900,
top-p 0.96), so a call that leaves them out uses them. On a GPU the pipeline runs in bfloat16 (float32 logits).
"""

import argparse
from pathlib import Path

import torch

from vgen.pipelines.var import VARPipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="folder written by 'vgen convert var-official'")
parser.add_argument("--labels", type=int, nargs="+", default=[207, 360], help="ImageNet class ids")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="class_conditional_out")
args = parser.parse_args()

cuda = torch.cuda.is_available()
pipe = VARPipeline.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32)
pipe = pipe.to("cuda" if cuda else "cpu")
images = pipe(class_labels=args.labels, generator=torch.Generator().manual_seed(args.seed)).images

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
for label, image in zip(args.labels, images):
    image.save(out / f"class{label:04d}.png")
print(f"{len(images)} images ({image.size[0]} px) in {out}")
