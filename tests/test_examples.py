"""Every script in examples/ runs as a user would run it (a fresh process, the shipped model or a tiny converted
official checkpoint), within a time bound, and does what its docstring says."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_var_cli import official_var_state_dict, tiny_vqvae

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: seconds one example may take on a loaded 2-core CPU (they take 10-30 s there)
TIME_BOUND = 240


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=TIME_BOUND, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_every_example_is_tested_and_listed():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = {"text_to_image.py", "fid_of_a_folder.py", "class_conditional_official.py"}
    assert set(scripts) == tested, "add a test for the new example here"
    listed = (EXAMPLES / "README.md").read_text()
    assert all(f"`{name}`" in listed for name in scripts)


@pytest.fixture(scope="module")
def text_to_image_folder(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("t2i")
    proc = run_example("text_to_image.py", "a photo of a red circle", "--n", "2", "--seed", "3", "--out", "imgs",
                       cwd=cwd)
    assert "2 images of 'a photo of a red circle'" in proc.stdout
    return cwd / "imgs"


def test_text_to_image_matches_vgen_generate(text_to_image_folder, tmp_path):
    files = sorted(text_to_image_folder.glob("*.png"))
    assert [f.name for f in files] == ["0000.png", "0001.png"] and Image.open(files[0]).size == (64, 64)
    # one generator seeded 3 = `vgen generate --seed 3` (image i: seed 3 + i), in the same batch of two
    proc = subprocess.run([sys.executable, "-m", "vgen", "generate", "a photo of a red circle", "--n", "2", "--seed",
                           "3", "--out-dir", str(tmp_path / "cli")], capture_output=True, text=True,
                          timeout=TIME_BOUND, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("0000.png", "0001.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(text_to_image_folder / name)),
                                      np.asarray(Image.open(tmp_path / "cli" / name)))


def test_fid_of_a_folder(text_to_image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VGEN_CACHE_DIR", str(tmp_path / "cache"))
    from vgen.data.shapes import ShapesWorld

    real = tmp_path / "real"
    real.mkdir()
    world = ShapesWorld(resolution=64, seed=7)
    for i in range(160):
        world.sample(i).image.convert("RGB").save(real / f"{i:04d}.png")
    proc = run_example("fid_of_a_folder.py", str(real), "--n-ref", "300", cwd=tmp_path)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n_samples"] == 160 and report["n_ref"] == 300
    assert 0 < report["fid"] < 30, report  # real vs real at these counts (a handful of model images: hundreds)
    assert list((tmp_path / "cache" / "fid_stats").glob("shapes-64-shapesfeat-clean-n300.npz"))


def test_class_conditional_official(tmp_path):
    torch.save(official_var_state_dict(), tmp_path / "var_tiny.pth")
    torch.save(tiny_vqvae().state_dict(), tmp_path / "vae_tiny.pth")
    from vgen.cli import main

    assert main(["convert", "var-official", "--vae", str(tmp_path / "vae_tiny.pth"), "--var",
                 str(tmp_path / "var_tiny.pth"), "--out", str(tmp_path / "var-tiny")]) == 0
    proc = run_example("class_conditional_official.py", str(tmp_path / "var-tiny"), "--labels", "3", "7",
                       "--out", "out", cwd=tmp_path)
    assert "2 images (32 px)" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["class0003.png", "class0007.png"]
