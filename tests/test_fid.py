"""FID: Frechet distance numerics, the shipped Shapes feature net, Inception weights handling, npz input, CLI."""

import json
import os
import re
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from vgen.eval.features import INCEPTION_FILE, array_features, build_extractor
from vgen.eval.fid import (
    FIDStats,
    compute_fid_report,
    frechet_distance,
    make_reference_stats,
    mean_cov,
    render_world,
)
from vgen.eval.fid_sanity import hue_rotate

from vgen.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def scipy_frechet(mu1, s1, mu2, s2):
    """Reference: ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_gaussian_stats(rng, n=600, d=24):
    a = rng.standard_normal((d, d))
    feats = rng.standard_normal((n, d)) @ a + rng.standard_normal(d)
    return mean_cov(feats)


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    for _ in range(3):
        mu1, s1 = random_gaussian_stats(rng)
        mu2, s2 = random_gaussian_stats(rng)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours > 1.0
        assert abs(ours - scipy_frechet(mu1, s1, mu2, s2)) < 1e-6
    # and the engine's own implementation agrees (clean-fid passes SciPy's deprecated `disp`; silence it)
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert abs(ours - cleanfid_frechet(mu1, s1, mu2, s2)) < 1e-6


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    mu1, s1 = random_gaussian_stats(rng)
    mu2 = mu1 + rng.standard_normal(mu1.shape)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)
    a, b = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    expected = np.sum((mu1[:8] - mu2[:8]) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1[:8], np.diag(a), mu2[:8], np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_feature_size_mismatch_is_user_error():
    with pytest.raises(UserError, match="feature sizes differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.fixture(scope="module")
def shapes_sets():
    """Two disjoint sets of 256 Shapes images (world seeds 0 and 1), uint8 (N, 64, 64, 3)."""
    return render_world("shapes", 256, 64, 0, verbose=False), render_world("shapes", 256, 64, 1, verbose=False)


@pytest.fixture(scope="module")
def shapes_extractor():
    return build_extractor("shapes", "clean", "cpu")


def test_shipped_shapes_net_loads_with_expected_contract(shapes_extractor):
    net = shapes_extractor.fn
    assert net.config.sample_size == 64 and net.config.feature_dim == 128
    assert len(shapes_extractor.digest) == 12
    feats = net(torch.full((2, 3, 64, 64), 128.0))
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()


def test_real_vs_real_is_far_below_real_vs_corrupted(shapes_sets, shapes_extractor):
    real_a, real_b = shapes_sets
    feats_a = array_features(shapes_extractor, real_a, verbose=False)
    mu_a, sigma_a = mean_cov(feats_a)

    def fid_to_a(images):
        return frechet_distance(*mean_cov(array_features(shapes_extractor, images, verbose=False)), mu_a, sigma_a)

    fid_self = fid_to_a(real_a)
    fid_real = fid_to_a(real_b)
    fid_hue = fid_to_a(hue_rotate(real_b, 180))
    rng = np.random.default_rng(0)
    fid_noise = fid_to_a(rng.integers(0, 256, real_b.shape, dtype=np.uint8))
    assert fid_self < 1e-6
    assert fid_real > 0
    assert fid_hue > 2.5 * fid_real
    assert fid_noise > 3 * fid_hue


def test_inception_missing_weights_names_the_file_and_never_downloads(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("VGEN_INCEPTION_PATH", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_extractor("inception", "clean", "cpu")
    message = str(err.value)
    assert str(tmp_path / INCEPTION_FILE) in message
    assert "inception-2015-12-05.pt" in message and "--inception-path" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded
    # an explicit path wins over the environment variable
    with pytest.raises(UserError, match=str(tmp_path / "elsewhere" / INCEPTION_FILE)):
        build_extractor("inception", "legacy_tensorflow", "cpu", inception_path=tmp_path / "elsewhere")


class _InceptionStandInLayers(torch.nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1).repeat(1, 683, 1, 1)[:, :2048]


class _InceptionStandIn(torch.nn.Module):
    """Same interface as clean-fid's TorchScript Inception (``.layers``, ``forward(x, return_features)``); the
    legacy path writes the input height into feature 0 so the test can see where resizing happened."""

    def __init__(self):
        super().__init__()
        self.layers = _InceptionStandInLayers()

    def forward(self, x, return_features: bool = False):
        feats = self.layers(x)
        feats[:, 0] = float(x.shape[2])
        return feats


def test_inception_modes_use_a_file_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("net")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch >= 2.14
        torch.jit.script(_InceptionStandIn()).save(str(tmp_path / INCEPTION_FILE))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    clean = build_extractor("inception", "clean", "cpu", inception_path=tmp_path)
    legacy = build_extractor("inception", "legacy_tensorflow", "cpu", inception_path=tmp_path / INCEPTION_FILE)
    feats_clean = array_features(clean, images, verbose=False)
    feats_legacy = array_features(legacy, images, verbose=False)
    assert feats_clean.shape == feats_legacy.shape == (3, 2048)
    # clean: PIL bicubic to 299 outside the net, then (x - 128) / 128 -> features 0..2 are normalised channel means
    channel_means = images.reshape(3, -1, 3).mean(1)
    assert np.allclose(feats_clean[:, :3], (channel_means - 128) / 128, atol=0.02)
    # legacy_tensorflow: the net receives the images at their own size (it resizes inside)
    assert np.all(feats_legacy[:, 0] == 32)


def _write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def test_npz_and_folder_inputs_agree_and_stats_round_trip(tmp_path, shapes_sets, monkeypatch):
    monkeypatch.setenv("VGEN_CACHE_DIR", str(tmp_path / "cache"))
    real_a, real_b = shapes_sets
    real_a, real_b = real_a[:160], real_b[:160]  # more images than the 128 feature dimensions
    np.savez(tmp_path / "a.npz", arr_0=real_a)
    folder_a = _write_folder(tmp_path / "a", real_a)
    folder_b = _write_folder(tmp_path / "b", real_b)
    same = compute_fid_report(str(tmp_path / "a.npz"), str(folder_a), features="shapes", device="cpu", verbose=False)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (same["n_samples"], same["n_ref"], same["resolution"]) == (160, 160, 64)

    by_folder = compute_fid_report(str(folder_a), str(folder_b), features="shapes", device="cpu", kid=True,
                                   verbose=False)
    stats_path = make_reference_stats(folder=str(folder_b), features="shapes", device="cpu", verbose=False)
    assert stats_path.parent == tmp_path / "cache" / "fid_stats" and stats_path.is_file()
    assert re.fullmatch(r"folder-b-[0-9a-f]{8}-64-shapesfeat-clean-n160\.npz", stats_path.name)
    by_stats = compute_fid_report(str(tmp_path / "a.npz"), str(stats_path), device="cpu", kid=True, verbose=False)
    assert by_stats["features"] == "shapes"  # taken from the stats file
    assert by_stats["fid"] == pytest.approx(by_folder["fid"], rel=1e-9)
    assert by_stats["kid"] == pytest.approx(by_folder["kid"], rel=1e-9)
    assert by_folder["fid"] > 1e-3

    stats = FIDStats.load(stats_path)
    assert (stats.n, stats.features, stats.mode, stats.resolution) == (160, "shapes", "clean", 64)
    assert stats.feats.shape == (160, 128) and stats.provenance["source"].startswith("folder:")
    # a reference made with another feature source or mode is refused
    with pytest.raises(UserError, match="features=shapes mode=clean"):
        compute_fid_report(str(tmp_path / "a.npz"), str(stats_path), features="inception", device="cpu")
    # mu/sigma only (as an ADM reference): no KID
    np.savez(tmp_path / "musigma.npz", mu=stats.mu, sigma=stats.sigma, n=160, features="shapes", mode="clean",
             resolution=64, digest=stats.digest, provenance="{}")
    with pytest.raises(UserError, match="KID needs the reference features"):
        compute_fid_report(str(tmp_path / "a.npz"), str(tmp_path / "musigma.npz"), device="cpu", kid=True,
                           verbose=False)


def test_world_reference_stats_are_cached_under_a_descriptive_name(tmp_path, monkeypatch):
    monkeypatch.setenv("VGEN_CACHE_DIR", str(tmp_path))
    path = make_reference_stats(world="shapes", n=150, resolution=64, features="shapes", device="cpu", verbose=False)
    assert path == tmp_path / "fid_stats" / "shapes-64-shapesfeat-clean-n150.npz"
    stats = FIDStats.load(path)
    assert (stats.n, stats.resolution, stats.provenance["source"], stats.provenance["seed"]) == (150, 64,
                                                                                                 "world:shapes", 0)
    # the same request reuses the file; the world is deterministic, so recomputing gives the same statistics
    mtime = path.stat().st_mtime_ns
    assert make_reference_stats(world="shapes", n=150, features="shapes", device="cpu", verbose=False) == path
    assert path.stat().st_mtime_ns == mtime
    again = make_reference_stats(world="shapes", n=150, features="shapes", device="cpu", out=str(tmp_path / "x.npz"),
                                 verbose=False)
    assert np.allclose(FIDStats.load(again).mu, stats.mu, atol=1e-6)
    # statistics made with other feature weights are recomputed, not reused
    stale = FIDStats.load(path)
    stale.digest = "0" * 12
    stale.save(path)
    refreshed = make_reference_stats(world="shapes", n=150, features="shapes", device="cpu", verbose=False)
    assert FIDStats.load(refreshed).digest == stats.digest != "0" * 12
    seeded = make_reference_stats(world="shapes", n=150, seed=5, features="shapes", device="cpu", verbose=False)
    assert seeded.name == "shapes-seed5-64-shapesfeat-clean-n150.npz"


def test_bad_npz_layout_is_user_error(tmp_path):
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(UserError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        compute_fid_report(str(tmp_path / "nchw.npz"), str(tmp_path / "nchw.npz"), features="shapes", device="cpu")


def _vgen(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vgen", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, timeout=300, check=False)


def test_cli_fid_prints_json_and_bad_arguments_exit_2(tmp_path, shapes_sets):
    real_a, real_b = shapes_sets
    folder_a = _write_folder(tmp_path / "a", real_a[:150])
    folder_b = _write_folder(tmp_path / "b", real_b[:150])
    result = _vgen("eval", "fid", "--samples", str(folder_a), "--ref", str(folder_b), "--features", "shapes",
                   "--kid", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"fid", "kid", "n_samples", "n_ref", "features", "mode", "resolution"} <= set(report)
    assert (report["n_samples"], report["n_ref"], report["features"], report["mode"]) == (150, 150, "shapes", "clean")
    assert report["fid"] > 0

    missing_ref = _vgen("eval", "fid", "--samples", str(folder_a))
    assert missing_ref.returncode == 2
    assert len(missing_ref.stderr.strip().splitlines()) == 1 and "--ref" in missing_ref.stderr

    no_weights = _vgen("eval", "fid", "--samples", str(folder_a), "--ref", str(folder_b), "--features", "inception",
                       env={"VGEN_INCEPTION_PATH": str(tmp_path / "none")})
    assert no_weights.returncode == 2
    lines = no_weights.stderr.strip().splitlines()
    assert len(lines) == 1 and INCEPTION_FILE in lines[0] and "Traceback" not in no_weights.stderr


def test_folder_features_skip_unreadable_files_and_read_16_bit_png(tmp_path, shapes_sets, shapes_extractor):
    from vgen.eval.features import folder_features

    images = shapes_sets[0][:6]
    folder = _write_folder(tmp_path / "imgs", images)
    clean = folder_features(shapes_extractor, folder, batch_size=4, verbose=False)
    # a 16-bit grey PNG reads as its 8-bit grey values (clean-fid's own loader makes it white)
    grey8 = np.asarray(Image.fromarray(images[0]).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(folder / "x_grey16.png")
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    (folder / "x_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    os.symlink(tmp_path / "gone.png", folder / "x_dangling.png")
    with pytest.warns(UserWarning) as caught:
        feats = folder_features(shapes_extractor, folder, batch_size=4, verbose=False)
    messages = [str(w.message) for w in caught]
    assert sum("skipping unreadable image" in m for m in messages) == 2
    assert any("x_corrupt.png" in m for m in messages) and any("x_dangling.png" in m for m in messages)
    assert messages[-1] == f"skipped 2 unreadable of 9 image files in {folder}"
    assert feats.shape == (7, 128)
    (tmp_path / "one").mkdir()
    os.replace(tmp_path / "grey8.png", tmp_path / "one" / "grey8.png")
    grey_feats = folder_features(shapes_extractor, tmp_path / "one", verbose=False)
    np.testing.assert_allclose(feats[:6], clean, atol=1e-5)
    np.testing.assert_allclose(feats[6], grey_feats[0], atol=1e-5)  # x_grey16.png, the last readable file
    # --n counts readable images
    assert folder_features(shapes_extractor, folder, batch_size=2, limit=3, verbose=False).shape == (3, 128)


def test_random_bytes_as_reference_is_one_user_error(tmp_path):
    (tmp_path / "ref.npz").write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=r"ref.npz is not a readable .npz file"):
        compute_fid_report(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), features="shapes", device="cpu")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    os.replace(tmp_path / "objects.npy", tmp_path / "objects.npz")
    with pytest.raises(UserError, match=r"objects.npz is not a readable .npz file"):
        compute_fid_report(str(tmp_path / "objects.npz"), str(tmp_path / "objects.npz"), features="shapes")
