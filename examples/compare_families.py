"""The same prompts (or class labels) through pipeline folders of any family, side by side, with their speed.

    python examples/compare_families.py runs/var/final runs/raster/final runs/flowar/final \
        --prompt "a photo of a red circle" --prompt "a photo of a blue square" --out families.png
    python examples/compare_families.py var-d16 flowar-b xar-b --labels 207 360 --out imagenet.png

Each folder is loaded with `vgen.pipelines.load_pipeline` (any family: VAR, NFIG, raster AR / Token-Shuffle, FlowAR,
xAR) and sampled with its own saved defaults; text models get the prompts, class models the labels. Image i of a
model uses the generator seeded `--seed + i`, so a row is the same whatever the other rows are. The grid has one row
per model, captioned with its family and folder. Speed: after one untimed call per model, `--repeats` calls of every
model, interleaved (so a busy machine slows all alike); images/s is the median, compared with the first model.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from vgen.imaging import make_grid
from vgen.pipelines import load_pipeline
from vgen.pipelines.registry import PIPELINES

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("models", nargs="+", help="pipeline folders (model_index.json), of any image family")
parser.add_argument("--prompt", action="append", default=None,
                    help="prompt for text models; repeat for more (default: 'a photo of a red circle')")
parser.add_argument("--labels", type=int, nargs="+", default=[0, 1], help="class ids for class models (default 0 1)")
parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
parser.add_argument("--repeats", type=int, default=3, help="timed calls per model (median)")
parser.add_argument("--out", default="families.png", help="the captioned grid (PNG)")
args = parser.parse_args()
prompts = args.prompt or ["a photo of a red circle"]


def family_of(pipe) -> str:
    """The registry's family, told apart where one pipeline class serves two (NFIG's tokenizer, Token-Shuffle)."""
    name = type(pipe).__name__
    if name == "VARPipeline":
        return "NFIG" if type(pipe.vqvae).__name__ == "FrequencyVQModel" else "VAR"
    if name == "RasterARPipeline" and int(pipe.transformer.config.get("shuffle_window", 1)) > 1:
        return f"Token-Shuffle s={pipe.transformer.config['shuffle_window']}"
    return PIPELINES[name].family if name in PIPELINES else name


def sample(pipe):
    """One call with the model's saved sampling defaults; one seeded generator per image."""
    condition = {"prompt": prompts} if pipe.is_text_conditional else {"class_labels": args.labels}
    count = len(prompts) if pipe.is_text_conditional else len(args.labels)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
    return pipe(**condition, generator=generators).images  # PIL (the decode and the copy to the CPU are timed)


rows = []  # (label, pipe, captions, images, seconds per call)
for folder in args.models:
    pipe, model_dir = load_pipeline(folder)  # on CUDA when there is one
    if getattr(pipe, "produces", "images") != "images":
        parser.error(f"{folder} holds a {type(pipe).__name__} (it makes {pipe.produces}); see video_stream.py")
    pipe.set_progress_bar_config(disable=True)
    where = model_dir.resolve()
    label = f"{family_of(pipe)} {where.parent.name}/{where.name}"
    captions = prompts if pipe.is_text_conditional else [f"class {c}" for c in args.labels]
    rows.append((label, pipe, captions, sample(pipe), []))  # the untimed call gives the grid's images

for _ in range(args.repeats):  # interleaved: model 1, model 2, ..., model 1, ...
    for _label, pipe, _captions, _images, seconds in rows:
        start = time.perf_counter()
        sample(pipe)
        seconds.append(time.perf_counter() - start)

ncols = max(len(images) for _l, _p, _c, images, _s in rows)
tiles, texts = [], []
for label, _pipe, captions, images, _seconds in rows:
    blank = Image.new("RGB", images[0].size, (255, 255, 255))  # rows with fewer conditions are padded
    tiles += images + [blank] * (ncols - len(images))
    texts += [f"{label}: {c}" for c in captions] + [""] * (ncols - len(images))
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
make_grid(tiles, texts, ncols=ncols).save(out)

first = None
for label, _pipe, _captions, images, seconds in rows:
    rate = len(images) / statistics.median(seconds)
    first = first or rate
    print(f"{label}: {rate:.4g} images/s ({rate / first:.3f}x the first)")
print(f"wrote {out} ({len(rows)} models x {ncols} images)")
