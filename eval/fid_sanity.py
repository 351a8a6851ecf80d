"""The FID sanity table: does FID with Shapes features rank obvious corruptions above real images?

Reference: ``n`` Shapes images (world seed 0). Compared sets, all built from ``n`` *other* images (world seed 1):
the images themselves (real vs real), Gaussian-blurred (radius 1 and 2 px per 64 px), hue-rotated by 90 degrees,
RGB channels permuted (R, G, B -> G, B, R), and uniform noise. Run::

    vgen eval fid-sanity --n 5000 --markdown     # or: python -m vgen.eval.fid_sanity --n 5000 --markdown
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter
from vgen.eval.features import array_features, build_extractor
from vgen.eval.fid import frechet_distance, kernel_distance, mean_cov, render_world


def gaussian_blur(images_NHW3: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images_NHW3])


def hue_rotate(images_NHW3: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the hue of uint8 RGB images (PIL's HSV, hue in 0..255) by ``degrees``."""
    shift = round(degrees / 360 * 256)
    out = []
    for im in images_NHW3:
        hsv = np.asarray(Image.fromarray(im).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
        out.append(np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB")))
    return np.stack(out)


def corruptions(resolution: int, seed: int = 0) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> function uint8 ``(N, H, W, 3)`` -> uint8 ``(N, H, W, 3)``."""
    rng = np.random.default_rng(seed)
    return {
        "real (disjoint seeds)": lambda x: x,
        f"Gaussian blur r={resolution / 64:g}px": lambda x: gaussian_blur(x, resolution / 64),
        f"Gaussian blur r={2 * resolution / 64:g}px": lambda x: gaussian_blur(x, 2 * resolution / 64),
        "hue rotated 90 deg": lambda x: hue_rotate(x, 90),
        "channels permuted (GBR)": lambda x: x[..., [1, 2, 0]],
        "uniform noise": lambda x: rng.integers(0, 256, size=x.shape, dtype=np.uint8),
    }


def sanity_table(n: int = 5000, resolution: int = 64, batch_size: int = 128, device: str | None = None,
                 verbose: bool = True) -> list[dict]:
    """Rows ``{"set", "fid", "kid", "n"}`` of FID/KID (Shapes features) of each compared set vs the reference."""
    extractor = build_extractor("shapes", "clean", device)
    ref_feats = array_features(extractor, render_world("shapes", n, resolution, 0, verbose), batch_size,
                               "features reference", verbose)
    ref_mu, ref_sigma = mean_cov(ref_feats)
    others = render_world("shapes", n, resolution, 1, verbose)
    rows = []
    for name, corrupt in corruptions(resolution).items():
        feats = array_features(extractor, corrupt(others), batch_size, f"features {name}", verbose)
        mu, sigma = mean_cov(feats)
        rows.append({"set": name, "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
                     "kid": kernel_distance(feats, ref_feats), "n": n})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| compared with the reference | FID | KID |", "|---|---:|---:|"]
    lines += [f"| {row['set']} | {row['fid']:.2f} | {row['kid']:.4f} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    args = parser.parse_args()
    rows = sanity_table(args.n, args.resolution, args.batch_size, args.device)
    print(markdown_table(rows) if args.markdown else json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
