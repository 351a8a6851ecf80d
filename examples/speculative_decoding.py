"""Speculative Jacobi decoding (`speculative="sjd"`, lossless, the target drafts for itself) against plain sampling
of a raster AR model: target passes per image and images/s, measured in this one process.

    python examples/speculative_decoding.py runs/raster/final --prompt "a photo of a red circle" --n 4
    python examples/speculative_decoding.py llamagen-b --labels 207 360 --window 16

After each sjd call `pipe.speculative_stats` holds its per-image counts (`.summary()`: target forwards per image,
acceptance rate, mean accepted length); plain sampling runs one target pass per unit, counted here on the model's
step methods. Both use the model's saved sampling settings and image i the generator seeded `--seed + i`; their
calls are interleaved, `--repeats` times after one untimed call each, and images/s is the median.
"""

import argparse
import statistics
import time

import torch

from vgen.eval.bench_sample import counting_steps
from vgen.pipelines import load_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="a raster AR pipeline folder")
parser.add_argument("--prompt", default="a photo of a red circle", help="prompt for a text model")
parser.add_argument("--labels", type=int, nargs="+", default=[0], help="class ids for a class model")
parser.add_argument("--n", type=int, default=4, help="images per prompt / label")
parser.add_argument("--window", type=int, default=None, help="sjd's draft window (default: the model's)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()

pipe, _ = load_pipeline(args.model)  # on CUDA when there is one
if type(pipe).__name__ != "RasterARPipeline":
    parser.error(f"{args.model} holds a {type(pipe).__name__}; sjd is for raster AR (next-token) models")
pipe.set_progress_bar_config(disable=True)
condition = {"prompt": args.prompt} if pipe.is_text_conditional else {"class_labels": args.labels}
images = args.n * (1 if pipe.is_text_conditional else len(args.labels))
variants = {"plain": {"speculative": "none"}, "sjd": {"speculative": "sjd", "window": args.window}}


def sample(options):
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(images)]
    return pipe(**condition, num_images_per_prompt=args.n, generator=generators, output_type="pt", **options).images


forwards = {}
with counting_steps(pipe.transformer) as (calls, _rows):
    sample(variants["plain"])  # every call runs the whole batch: one pass per call
forwards["plain"] = sum(calls.values())
sample(variants["sjd"])
forwards["sjd"] = pipe.speculative_stats.summary()["target_forwards_per_image"]
seconds = {name: [] for name in variants}
for _ in range(args.repeats):
    for name, options in variants.items():
        start = time.perf_counter()
        sample(options)
        seconds[name].append(time.perf_counter() - start)

rate = {name: images / statistics.median(s) for name, s in seconds.items()}
units = int(pipe.transformer.sequence_length)
for name in variants:
    print(f"{name}: {forwards[name]:.2f} target forwards per image ({units} units), {rate[name]:.4g} images/s "
          f"({rate[name] / rate['plain']:.3f}x plain)")
