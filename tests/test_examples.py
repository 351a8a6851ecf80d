"""Every script in examples/ runs as a user would run it (a fresh process, the shipped model or a tiny converted
official checkpoint), within a time bound, and does what its docstring says."""

import json
import re
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
    tested = {"text_to_image.py", "fid_of_a_folder.py", "class_conditional_official.py", "compare_families.py",
              "video_stream.py", "speculative_decoding.py"}
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


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """Tiny random class-conditional pipelines of four image families, saved as a user's run folders would be."""
    from test_flowar_pipeline import tiny_flowar, tiny_vae
    from test_raster_ar_pipeline import tiny_pipe
    from test_xar_pipeline import tiny_xar
    from vgen.tokenizers.msvq import MultiScaleVQModel

    from vgen.models.var import VAR
    from vgen.pipelines.flowar import FlowARPipeline
    from vgen.pipelines.var import VARPipeline
    from vgen.pipelines.xar import XARPipeline

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, using_sa=False,
                           patch_nums=(1, 2, 4))
    var = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 4), depth=1, embed_dim=32, num_heads=2, num_classes=4)
    VARPipeline(vqvae=vq, transformer=var, default_top_k=0, default_top_p=0.0).save_pretrained(root / "var" / "final")
    tiny_pipe(window=2).save_pretrained(root / "raster" / "final")
    FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar(), default_num_steps=2).save_pretrained(
        root / "flowar" / "final")
    XARPipeline(vae=tiny_vae(), transformer=tiny_xar(), default_num_steps=2).save_pretrained(root / "xar" / "final")
    return root


def test_compare_families(family_folders, tmp_path):
    names = ["var", "raster", "flowar", "xar"]
    proc = run_example("compare_families.py", *(str(family_folders / n / "final") for n in names), "--labels", "1",
                       "2", "3", "--repeats", "2", "--out", "grid.png", cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "wrote grid.png (4 models x 3 images)"
    pattern = re.compile(r"^(.+) (\w+)/final: ([0-9.e+]+) images/s \(([0-9.]+)x the first\)$")
    rows = [pattern.match(line) for line in lines[:-1]]
    assert all(rows), lines
    assert [(m[1], m[2]) for m in rows] == [("VAR", "var"), ("Token-Shuffle s=2", "raster"), ("FlowAR", "flowar"),
                                            ("xAR", "xar")]
    rates = [float(m[3]) for m in rows]
    assert all(r > 0 for r in rates) and float(rows[0][4]) == 1.0
    for m, rate in zip(rows, rates):
        assert float(m[4]) == pytest.approx(rate / rates[0], rel=2e-3, abs=2e-3)
    grid = Image.open(tmp_path / "grid.png")
    # 16 px tiles (the largest: raster AR) enlarged 8x to 128, 3 columns, 4 rows with 3 caption lines each
    assert grid.width == 3 * (128 + 6) + 6 and grid.height > 4 * (128 + 6)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    from test_video_pipeline import tiny_pipeline

    folder = tmp_path_factory.mktemp("video") / "model"
    tiny_pipeline().save_pretrained(folder)
    return folder


def test_video_stream(video_folder, tmp_path):
    proc = run_example("video_stream.py", str(video_folder), "a red circle moving right", "--frames", "6",
                       "--cache", "sink_window", "--switch-at", "4", "a blue square moving up", "--out", "clip.gif",
                       cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    pattern = re.compile(r"^block (\d) frames (\d)-(\d): denoise ([0-9.]+) s, commit ([0-9.]+) s, "
                         r"decode ([0-9.]+) s, ready at ([0-9.]+) s$")
    blocks = [pattern.match(line) for line in lines[:-1]]
    assert all(blocks) and len(blocks) == 3, lines
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in blocks] == [(0, 0, 1), (1, 2, 3), (2, 4, 5)]
    ready = [float(m[7]) for m in blocks]
    assert ready == sorted(ready) and float(blocks[0][4]) > 0
    assert re.match(r"^wrote clip.gif \(6 frames of 32x32 px in 3 blocks, [0-9.e+]+ frames/s\)$", lines[-1])
    gif = Image.open(tmp_path / "clip.gif")
    assert gif.n_frames == 6 and gif.size == (128, 128)  # save_video enlarges 4x


def test_speculative_decoding(family_folders, tmp_path):
    proc = run_example("speculative_decoding.py", str(family_folders / "raster" / "final"), "--labels", "1", "--n",
                       "2", "--repeats", "1", cwd=tmp_path)
    pattern = re.compile(r"^(plain|sjd): ([0-9.]+) target forwards per image \((\d+) units\), ([0-9.e+]+) "
                         r"images/s \(([0-9.]+)x plain\)$")
    rows = [pattern.match(line) for line in proc.stdout.strip().splitlines()]
    assert all(rows) and [m[1] for m in rows] == ["plain", "sjd"], proc.stdout
    # 4x4 codes in 2x2 Token-Shuffle windows: 4 units, one target pass each without speculation
    assert float(rows[0][2]) == 4.0 and rows[0][3] == "4" and float(rows[0][5]) == 1.0
    assert 1.0 <= float(rows[1][2]) <= 4.0 and float(rows[1][4]) > 0
