"""FID and KID on clean-fid's feature pipeline, with cached reference statistics.

* :func:`frechet_distance` is clean-fid's formula (``||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))``, retry with
  ``eps * I`` when the product is singular, error on a large imaginary part), written without SciPy's ``disp``
  argument, which SciPy 1.17 deprecates and 1.18 removes (clean-fid 0.1.35 still passes it).
* :func:`kernel_distance` is clean-fid's KID (cubic polynomial kernel, 100 subsets of <= 1000), seeded so that a
  KID is reproducible (clean-fid draws its subsets from the unseeded global NumPy generator).
* :class:`FIDStats` is a reference-statistics ``.npz``: ``mu``, ``sigma``, ``n``, ``features``, ``mode``,
  ``resolution``, ``digest``, ``provenance`` (JSON) and optionally ``feats`` (the features, for KID). Files from
  OpenAI's ADM evaluator (``mu``/``sigma`` only, e.g. ``VIRTUAL_imagenet256_labeled.npz``) load as Inception /
  ``legacy_tensorflow`` statistics: that is how they were made.

Comparability: only Inception features with ``--mode legacy_tensorflow`` against the ADM reference ``mu``/``sigma``
on 50k losslessly saved samples reproduce the FID of VAR / MAR / xAR / LlamaGen papers (ADM protocol). ``clean``
mode and Shapes features give numbers to compare with each other only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import linalg

from vgen.errors import UserError
from vgen.memory import check_fits_in_memory

#: Bytes of one image's features as stored (float32, up to Inception's 2048): for memory checks before rendering.
FEATURE_BYTES = 4 * 2048


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); ``mu (F,)``, ``sigma (F, F)``."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]} (statistics of different networks)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # product (almost) singular, e.g. fewer samples than feature dimensions
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(
                f"FID is numerically unstable (imaginary part {np.abs(covmean.imag).max():.3g}): use more images "
                f"than feature dimensions ({mu1.shape[0]})"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, seed: int = 0) -> float:
    """clean-fid's KID of features ``(N1, F)`` and ``(N2, F)``, with its subsets drawn under ``seed``."""
    from cleanfid.fid import kernel_distance as cleanfid_kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(cleanfid_kernel_distance(feats1.astype(np.float64), feats2.astype(np.float64)))
    finally:
        np.random.set_state(state)


def mean_cov(feats_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, F)`` -> ``mu (F,)``, ``sigma (F, F)`` (unbiased covariance, as clean-fid)."""
    if len(feats_NF) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(feats_NF)}")
    feats = feats_NF.astype(np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


@dataclass
class FIDStats:
    """Reference statistics. ``feats (n, F)`` is kept when KID should be possible later."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: str
    mode: str
    resolution: int
    digest: str = ""
    feats: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, feats_NF: np.ndarray, features: str, mode: str, resolution: int, digest: str = "",
                      keep_features: bool = True, provenance: dict | None = None) -> FIDStats:
        mu, sigma = mean_cov(feats_NF)
        return cls(mu, sigma, len(feats_NF), features, mode, int(resolution), digest,
                   feats_NF.astype(np.float32) if keep_features else None, provenance or {})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n), "features": np.str_(self.features),
                  "mode": np.str_(self.mode), "resolution": np.int64(self.resolution), "digest": np.str_(self.digest),
                  "provenance": np.str_(json.dumps(self.provenance, sort_keys=True))}
        if self.feats is not None:
            arrays["feats"] = self.feats
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # never leave a half-written cache file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FIDStats:
        """Read a vgen stats file, or an ADM-evaluator reference (``mu``, ``sigma``; TF Inception features)."""
        with open_npz(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise UserError(f"{path} holds no FID statistics (keys mu, sigma); keys: {', '.join(data.files)}")
            if "features" not in data:  # ADM evaluator reference batch
                return cls(data["mu"], data["sigma"], -1, "inception", "legacy_tensorflow", -1,
                           provenance={"source": f"ADM evaluator reference {Path(path).name}"})
            return cls(data["mu"], data["sigma"], int(data["n"]), str(data["features"]), str(data["mode"]),
                       int(data["resolution"]), str(data["digest"]),
                       data.get("feats"), json.loads(str(data["provenance"])))


@contextlib.contextmanager
def open_npz(path: str | os.PathLike):
    """``np.load`` of an ``.npz`` without pickles; a file that is not one (random bytes, a truncated archive, object
    arrays) is a :class:`UserError`."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{path} is not a readable .npz file ({reason}); give statistics from 'vgen eval fid-ref', an "
                        "ADM reference batch, or images in arr_0") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not an .npz archive (expected mu/sigma or arr_0)")
    with data:
        try:
            yield data
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{path} is a damaged .npz file ({type(err).__name__}: {str(err)[:120]})") from None


def is_stats_file(path: str | os.PathLike) -> bool:
    """An ``.npz`` with ``mu`` and ``sigma`` (as opposed to images in ``arr_0``)."""
    if not str(path).endswith(".npz") or not os.path.isfile(path):
        return False
    with open_npz(path) as data:
        return "mu" in data.files and "sigma" in data.files


def load_images_npz(path: str | os.PathLike) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)`` from ``arr_0`` of an ``.npz`` (the ADM evaluator's sample format)."""
    from vgen.eval.features import check_image_array

    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open_npz(path) as data:
        if "arr_0" not in data.files:
            raise UserError(f"{path} has no arr_0 (expected images uint8 N,H,W,3 as written by 'vgen sample')")
        images = data["arr_0"]
    check_image_array(images, f"arr_0 of {path}")
    return images


def cache_dir() -> Path:
    """``$VGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/vgen``, else ``~/.cache/vgen``."""
    if os.environ.get("VGEN_CACHE_DIR"):
        return Path(os.environ["VGEN_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "vgen"


def _features_tag(features: str) -> str:
    return {"shapes": "shapesfeat", "inception": "inception"}.get(features, re.sub(r"[^A-Za-z0-9]+", "-", features))


def default_stats_path(source: str, resolution: int, features: str, mode: str, n: int) -> Path:
    """``<cache>/fid_stats/<source>-<resolution>-<features>-<mode>-n<n>.npz``, e.g.
    ``~/.cache/vgen/fid_stats/shapes-64-shapesfeat-clean-n10000.npz``."""
    return cache_dir() / "fid_stats" / f"{source}-{resolution}-{_features_tag(features)}-{mode}-n{n}.npz"


def render_world(world: str, n: int, resolution: int, seed: int, verbose: bool = True) -> np.ndarray:
    """``n`` images ``(n, H, W, 3)`` uint8 of a procedural world (indices 0 .. n-1 under ``seed``)."""
    if world != "shapes":
        raise UserError(f"unknown world {world!r}; available: shapes")
    check_fits_in_memory(n * (3 * resolution**2 + FEATURE_BYTES), f"{n} rendered {resolution} px images and their "
                         "features", "give a smaller --n")
    from tqdm import tqdm

    from vgen.data.shapes import ShapesWorld

    shapes = ShapesWorld(resolution=resolution, seed=seed)
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc=f"render {world} {resolution}px", disable=None if verbose else True):
        out[i] = np.asarray(shapes.sample(i).image.convert("RGB"))
    return out


def make_reference_stats(
    world: str | None = None,
    folder: str | None = None,
    n: int | None = None,
    resolution: int = 64,
    seed: int = 0,
    features: str = "shapes",
    mode: str = "clean",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    inception_path: str | None = None,
    out: str | None = None,
    store_features: bool = True,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Compute (or reuse) reference statistics of a world or an image folder; returns the ``.npz`` path."""
    from vgen.eval.features import build_extractor, folder_features, folder_images, folder_resolution

    if (world is None) == (folder is None):
        raise UserError("give exactly one of --world or --folder")
    if n is not None and n < 2:
        raise UserError(f"--n must be at least 2, got {n}")
    if world is not None:
        n = 10_000 if n is None else n
        source = world if seed == 0 else f"{world}-seed{seed}"
        provenance = {"source": f"world:{world}", "seed": seed, "indices": f"0..{n - 1}"}
    else:
        count = len(folder_images(folder))
        n = count if n is None else min(n, count)
        resolution = folder_resolution(folder)
        resolved = Path(folder).resolve()
        # name + hash of the full path: two folders called `real` get two cache files
        source = "folder-{}-{}".format(re.sub(r"[^A-Za-z0-9]+", "-", resolved.name).strip("-"),
                                       hashlib.sha1(str(resolved).encode()).hexdigest()[:8])
        provenance = {"source": f"folder:{resolved}", "files": count}
    path = Path(out) if out is not None else default_stats_path(source, resolution, features, mode, n)
    if path.is_file() and not overwrite:
        stats = FIDStats.load(path)
        if (stats.features, stats.mode, stats.n, stats.provenance.get("source")) != (
            features, mode, n, provenance["source"]):
            raise UserError(f"{path} holds other statistics ({stats.provenance.get('source')}, features="
                            f"{stats.features}, mode={stats.mode}, n={stats.n}); pass --overwrite or another --out")
        if not _stale_shapes_digest(stats):
            return path
    extractor = build_extractor(features, mode, device, inception_path)
    if world is not None:
        images = render_world(world, n, resolution, seed, verbose)
        feats = _array_features(extractor, images, batch_size, verbose)
    else:
        feats = folder_features(extractor, folder, batch_size, num_workers, limit=n, verbose=verbose)
    import vgen

    provenance.update(vgen=vgen.__version__, clean_fid=importlib.metadata.version("clean-fid"),
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    stats = FIDStats.from_features(feats, extractor.name, mode, resolution, extractor.digest, store_features,
                                   provenance)
    return stats.save(path)


def _stale_shapes_digest(stats: FIDStats) -> bool:
    """Statistics made with Shapes feature weights other than the installed ones (recomputed, never reused)."""
    if stats.features != "shapes":
        return False
    from vgen.eval.shapes_features import weights_digest

    return stats.digest != weights_digest()


def _array_features(extractor, images: np.ndarray, batch_size: int, verbose: bool) -> np.ndarray:
    from vgen.eval.features import array_features

    return array_features(extractor, images, batch_size, description=f"features ({extractor.name})", verbose=verbose)


def _set_features(extractor, target: str, batch_size: int, num_workers: int, limit: int | None,
                  verbose: bool) -> tuple[np.ndarray, int]:
    """Features and resolution of a folder or an images ``.npz``."""
    from vgen.eval.features import folder_features, folder_resolution

    if os.path.isdir(target):
        return folder_features(extractor, target, batch_size, num_workers, limit, verbose), folder_resolution(target)
    if str(target).endswith(".npz"):
        images = load_images_npz(target)[:limit]
        return _array_features(extractor, images, batch_size, verbose), int(images.shape[1])
    raise UserError(f"{target} is neither an image folder nor an .npz file")


def compute_fid_report(
    samples: str,
    ref: str,
    features: str | None = None,
    mode: str = "clean",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    inception_path: str | None = None,
    kid: bool = False,
    limit: int | None = None,
    verbose: bool = True,
) -> dict:
    """FID of ``samples`` (folder or images ``.npz``) against ``ref`` (stats ``.npz``, images ``.npz`` or folder).

    Returns ``{"fid", "n_samples", "n_ref", "features", "mode", "resolution", "ref_resolution"}`` plus ``"kid"``
    when ``kid`` (which needs reference features: a folder / images ref, or a stats file that kept them).
    ``features=None`` takes the reference statistics' feature source (``inception`` for image references).
    """
    from vgen.eval.features import build_extractor

    if limit is not None and limit < 2:
        raise UserError(f"--n must be at least 2 (FID needs two images), got {limit}")
    if not os.path.exists(samples):
        raise UserError(f"--samples not found: {samples}")
    if not os.path.exists(ref):
        raise UserError(f"--ref not found: {ref}")
    ref_stats = FIDStats.load(ref) if is_stats_file(ref) else None
    if ref_stats is not None:
        features = features or ref_stats.features
        if (features, mode) != (ref_stats.features, ref_stats.mode):
            raise UserError(
                f"reference {ref} was made with features={ref_stats.features} mode={ref_stats.mode}, but this run "
                f"uses features={features} mode={mode}; pass the same --features/--mode or recompute the reference"
            )
    extractor = build_extractor(features or "inception", mode, device, inception_path)
    if ref_stats is not None and ref_stats.digest and ref_stats.digest != extractor.digest:
        raise UserError(f"reference {ref} was made with other {features} weights (digest {ref_stats.digest}, "
                        f"installed {extractor.digest}); recompute it with 'vgen eval fid-ref ... --overwrite'")
    sample_feats, resolution = _set_features(extractor, samples, batch_size, num_workers, limit, verbose)
    if ref_stats is None:
        ref_feats, ref_resolution = _set_features(extractor, ref, batch_size, num_workers, None, verbose)
        ref_stats = FIDStats.from_features(ref_feats, extractor.name, mode, ref_resolution)
    mu, sigma = mean_cov(sample_feats)
    report = {
        "fid": frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma),
        "n_samples": len(sample_feats),
        "n_ref": ref_stats.n if ref_stats.n >= 0 else None,  # None: an ADM reference (count not stored)
        "features": extractor.name,
        "mode": mode,
        "resolution": resolution,
        "ref_resolution": ref_stats.resolution if ref_stats.resolution >= 0 else None,
    }
    if kid:
        if ref_stats.feats is None:
            raise UserError(f"KID needs the reference features, and {ref} holds only mu/sigma: pass a folder as "
                            "--ref, or remake the stats with 'vgen eval fid-ref' (without --no-store-features)")
        report["kid"] = kernel_distance(sample_feats, ref_stats.feats)
    return report
