"""FID as the FID community uses it: clean-fid's statistics files (mode from the name, a named dataset resolved on
disk, KID features beside them) in every mode, pytorch-fid's legacy_pytorch network from a local weights file, and
the messages for missing weights and too few images."""

import os
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from test_fid import _InceptionStandIn
from vgen.errors import UserError
from vgen.eval.features import INCEPTION_FILE, PYTORCH_INCEPTION_FILE, array_features, build_extractor
from vgen.eval.fid import FIDStats, cleanfid_stats_name, compute_fid_report, mean_cov

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Stand-ins for both Inception files (random weights in the real file formats) in one folder."""
    folder = tmp_path_factory.mktemp("inception")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch >= 2.14
        torch.jit.script(_InceptionStandIn()).save(str(folder / INCEPTION_FILE))
    import cleanfid.inception_pytorch as pytorch_inception

    # pytorch-fid's architecture (torchvision's Inception v3 with its FID blocks, as clean-fid's fid_inception_v3
    # builds it before loading the weights file), here with small random weights
    p = pytorch_inception
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained` argument
        net = p._inception_v3(num_classes=1008, aux_logits=False, pretrained=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = p.FIDInceptionA(192, 32), p.FIDInceptionA(256, 64), p.FIDInceptionA(
        288, 64)
    net.Mixed_6b, net.Mixed_6c = p.FIDInceptionC(768, 128), p.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = p.FIDInceptionC(768, 160), p.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = p.FIDInceptionE_1(1280), p.FIDInceptionE_2(2048)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("running_var"):
            value = torch.ones_like(value)
        elif key.endswith("running_mean") or not value.is_floating_point():
            value = torch.zeros_like(value)
        else:
            value = torch.randn(value.shape, generator=generator) * 0.05
        state[key] = value
    torch.save(state, folder / PYTORCH_INCEPTION_FILE)
    return folder


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    for name, shift in (("a", 0), ("b", 60)):
        (root / name).mkdir()
        for i in range(4):
            pixels = np.clip(rng.integers(0, 196, (32, 32, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))


@pytest.fixture
def cheap_distance(monkeypatch):
    """A stand-in for the Frechet distance (tested in test_fid.py): a square root of a 2048 x 2048 matrix takes
    minutes on a loaded 2-core CPU, and what these tests check is which statistics and which mode were used."""
    import vgen.eval.fid as fid

    def distance(mu1, sigma1, mu2, sigma2):
        return float(((mu1 - mu2) ** 2).sum() + np.abs(sigma1 - sigma2).sum())

    monkeypatch.setattr(fid, "frechet_distance", distance)


def test_cleanfid_names_parse():
    assert cleanfid_stats_name("lsun_church_clean_train_256.npz") == {
        "name": "lsun_church", "mode": "clean", "model": "", "split": "train", "res": "256"}
    assert cleanfid_stats_name("cifar10_legacy_tensorflow_test_32.npz")["mode"] == "legacy_tensorflow"
    assert cleanfid_stats_name("afhq_cat_legacy_pytorch_train_512.npz")["name"] == "afhq_cat"
    assert cleanfid_stats_name("mine_clean_custom_na.npz")["res"] == "na"
    assert cleanfid_stats_name("ffhq_clean_clip_vit_b_32_trainval70k_1024.npz")["model"] == "clip_vit_b_32"
    assert cleanfid_stats_name("VIRTUAL_imagenet256_labeled.npz") is None


@pytest.mark.parametrize("mode", MODES)
def test_cleanfid_statistics_file_round_trip_in_each_mode(mode, weights, image_sets, tmp_path, monkeypatch,
                                                          cheap_distance):
    """clean-fid's file of the folder b equals FID against the folder itself, in that file's mode."""
    monkeypatch.setenv("VGEN_CACHE_DIR", str(tmp_path / "cache"))
    extractor = build_extractor("inception", mode, "cpu", inception_path=weights)
    images_b = np.stack([np.asarray(Image.open(p)) for p in sorted((image_sets / "b").glob("*.png"))])
    feats_b = array_features(extractor, images_b, verbose=False)
    mu, sigma = mean_cov(feats_b)
    stats_dir = tmp_path / "cache" / "fid_stats"
    stats_dir.mkdir(parents=True)
    path = stats_dir / f"toy_{mode}_train_32.npz"  # clean-fid's name and keys
    np.savez_compressed(path, mu=mu, sigma=sigma)
    np.savez_compressed(stats_dir / f"toy_{mode}_train_32_kid.npz", feats=feats_b)
    stats = FIDStats.load(path)
    assert (stats.features, stats.mode, stats.resolution) == ("inception", mode, 32)
    with pytest.warns(UserWarning, match="FID from 4 samples with 2048-dimensional features"):
        by_folder = compute_fid_report(str(image_sets / "a"), str(image_sets / "b"), features="inception", mode=mode,
                                       inception_path=str(weights), kid=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_file = compute_fid_report(str(image_sets / "a"), str(path), inception_path=str(weights), kid=True,
                                     verbose=False)  # features and mode from the file
        by_name = compute_fid_report(str(image_sets / "a"), "cleanfid:toy/train/32", mode=mode,
                                     inception_path=str(weights), kid=True, verbose=False)
    assert by_file["mode"] == by_name["mode"] == mode and by_file["n_ref"] is None
    assert by_file["fid"] == pytest.approx(by_folder["fid"], rel=1e-6) and by_folder["fid"] > 0
    assert by_name["fid"] == by_file["fid"] and by_name["kid"] == pytest.approx(by_folder["kid"], rel=1e-6)
    other = next(m for m in MODES if m != mode)
    with pytest.raises(UserError, match=f"made with features=inception mode={mode}, but this run uses "
                                        f"features=inception mode={other}"):
        compute_fid_report(str(image_sets / "a"), str(path), mode=other, inception_path=str(weights))


def test_a_missing_named_dataset_says_where_the_file_must_be(tmp_path, monkeypatch):
    monkeypatch.setenv("VGEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError) as err:
        compute_fid_report(str(tmp_path), "cleanfid:cifar10/train/32", mode="legacy_tensorflow")
    message = str(err.value)
    assert "cifar10_legacy_tensorflow_train_32.npz" in message and "vgen never downloads" in message
    assert str(tmp_path / "cache" / "fid_stats" / "cifar10_legacy_tensorflow_train_32.npz") in message
    assert "cleanfid/stats/cifar10_legacy_tensorflow_train_32.npz" in message
    with pytest.raises(UserError, match="cleanfid:NAME/SPLIT/RES"):
        compute_fid_report(str(tmp_path), "cleanfid:cifar10", mode="clean")


def test_a_mu_sigma_file_with_another_name_is_the_adm_protocol(tmp_path):
    np.savez(tmp_path / "adm_in256_stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    stats = FIDStats.load(tmp_path / "adm_in256_stats.npz")
    assert (stats.features, stats.mode) == ("inception", "legacy_tensorflow")


def test_legacy_pytorch_names_pytorch_fids_file_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VGEN_INCEPTION_PATH", raising=False)
    with pytest.raises(UserError) as err:
        build_extractor("inception", "legacy_pytorch", "cpu")
    message = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / PYTORCH_INCEPTION_FILE) in message
    assert "pytorch-fid" in message and "\n" not in message
    bad = tmp_path / PYTORCH_INCEPTION_FILE
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="does not hold pytorch-fid's Inception weights"):
        build_extractor("inception", "legacy_pytorch", "cpu", inception_path=bad)


def test_fid_of_a_folder_without_features_or_weights_points_to_shapes(image_sets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vgen", "eval", "fid", "--samples", str(image_sets / "a"), "--ref",
                           str(image_sets / "b")], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "VGEN_INCEPTION_PATH": str(tmp_path / "none")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no --features was given" in lines[0] and "--features shapes" in lines[0]


def test_too_few_samples_warn_with_the_numbers(image_sets, tmp_path):
    # (the Shapes features have 128 dimensions: the real Frechet distance of 4 images is quick)
    proc = subprocess.run([sys.executable, "-m", "vgen", "eval", "fid", "--samples", str(image_sets / "a"), "--ref",
                           str(image_sets / "b"), "--features", "shapes"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "warning: FID from" in line]
    assert warned == [
        "vgen eval: warning: FID from 4 samples with 128-dimensional features: the covariance has rank at most 3 < "
        "128, so the value is biased and unstable; use more than 128 images (for Inception FID, 10 000 or more)",
        "vgen eval: warning: FID from 4 reference images with 128-dimensional features: the covariance has rank at "
        "most 3 < 128, so the value is biased and unstable; use more than 128 images (for Inception FID, 10 000 or "
        "more)",
    ]
