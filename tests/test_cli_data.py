"""``vgen data preview``: writes labelled grids; bad arguments end as one stderr line with exit code 2."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vgen.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vgen", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_preview_shapes_writes_a_png_grid(tmp_path):
    out = tmp_path / "grids" / "shapes.png"
    result = run_cli("data", "preview", "--world", "shapes", "--n", "6", "--resolution", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.width == 3 * (128 + 6) + 6  # 6 tiles -> 3 columns of enlarged 64-px tiles
    assert np.asarray(grid.convert("RGB")).std() > 10


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resolution", "7"], "--resolution must be from 32 to 512"),
        (["--world", "folder"], "needs --path"),
        (["--world", "cubes"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path):
    result = run_cli("data", "preview", *args, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_preview_moving_shapes_draws_one_row_per_video(tmp_path, capsys):
    out = tmp_path / "videos.png"
    assert main(["data", "preview", "--world", "moving_shapes", "--n", "2", "--frames", "3", "--out", str(out)]) == 0
    grid = Image.open(out)
    assert grid.width == 6 * 2 + 3 * 128 + 2 * 2  # 64-px frames enlarged to 128
    assert capsys.readouterr().out.strip() == str(out)


def test_preview_folder_and_its_errors(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        Image.new("RGB", (50, 40), (80 * k, 100, 50)).save(folder / f"{k}.png")
    out = tmp_path / "folder.png"
    assert (
        main(["data", "preview", "--world", "folder", "--path", str(folder), "--resolution", "32", "--out", str(out)])
        == 0
    )
    assert Image.open(out).width == 2 * (128 + 6) + 6
    capsys.readouterr()
    assert main(["data", "preview", "--world", "folder", "--path", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert main(["data", "preview", "--out", str(tmp_path / "grid.gif")]) == 2
    assert "grid.gif: the file name must end in one of .png" in capsys.readouterr().err
    assert main(["data", "preview", "--world", "moving_shapes", "--tag", "counting", "--out", str(out)]) == 2
