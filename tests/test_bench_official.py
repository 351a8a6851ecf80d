"""``vgen bench sample --official PATH``: vgen's VAR sampler against the official VAR code in one process.

The project never ships the official code, so the comparison itself runs where a checkout is named by
``VGEN_OFFICIAL_VAR`` (a clone of FoundationVision/VAR) and is skipped elsewhere; what a user gets wrong (a folder
that is not the official code, a text model, a tokenizer the official code cannot build) is tested everywhere.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.cli import main
from vgen.models.var import VAR
from vgen.pipelines.var import VARPipeline


@pytest.fixture(scope="module")
def tiny_var(tmp_path_factory):
    """A class-conditional VAR on a tokenizer with the official VQVAE's fixed architecture (small widths)."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 4))
    var = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 4), depth=2, embed_dim=64, num_heads=2, num_classes=4)
    VARPipeline(vqvae=vq, transformer=var).save_pretrained(root / "var")
    # not buildable by the official code: its VQVAE hard-codes ch_mult (1, 1, 2, 2, 4)
    vq_small = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                 using_sa=False, patch_nums=(1, 2, 4))
    VARPipeline(vqvae=vq_small, transformer=var).save_pretrained(root / "var_small_vq")
    return root


@pytest.fixture
def official_checkout() -> Path:
    path = os.environ.get("VGEN_OFFICIAL_VAR")
    if not path:
        pytest.skip("set VGEN_OFFICIAL_VAR to a checkout of the official VAR code to run the comparison")
    return Path(path)


def _bench(*args):
    return main(["bench", "sample", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 *args])


def test_a_folder_that_is_not_the_official_code_is_one_line(tmp_path, tiny_var, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "var.py").write_text("raise SystemExit('must not run')\n")
    assert _bench("--official", str(tmp_path), "--model", str(tiny_var / "var")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a checkout of the official VAR code (missing models/vqvae.py" in err[0]
    assert "clone FoundationVision/VAR" in err[0]


def test_random_var_needs_official_and_a_known_size(tiny_var, capsys, tmp_path):
    assert _bench("--random-var", "var-d16") == 2
    assert "--random-var is for the comparison with official code: add --official PATH" in capsys.readouterr().err
    # the official comparison's sampling flags would be ignored by the plain benchmark: one line instead
    assert _bench("--model", str(tiny_var / "var"), "--top-k", "20", "--autocast", "bf16") == 2
    assert "--top-k, --autocast are for the comparison with official code" in capsys.readouterr().err
    assert _bench("--official", str(tmp_path), "--random-var", "var-d16", "--model", str(tiny_var / "var")) == 2
    assert "either --model DIR or --random-var SIZE" in capsys.readouterr().err


def test_official_comparison(official_checkout, tiny_var, capsys):
    assert _bench("--official", str(official_checkout), "--model", str(tiny_var / "var"), "--cfg", "1.5",
                  "--top-k", "20", "--top-p", "0.9") == 0
    report = json.loads(capsys.readouterr().out)
    # the same weights give the same greedy tokens at every scale, and the same images from them
    assert report["parity"]["greedy_tokens_identical"] and report["parity"]["tokens_per_image"] == 21
    assert report["parity"]["greedy_max_pixel_difference"] < 1e-4
    assert [row["batch_size"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["vgen_speedup"] == pytest.approx(row["official_seconds_per_batch"] / row["vgen_seconds_per_batch"])
        assert len(row["official_seconds_all"]) == len(row["vgen_seconds_all"]) == 1
    assert report["sampling"] == {"cfg": 1.5, "guidance": "VAR's linear ramp", "top_k": 20, "top_p": 0.9,
                                  "more_smooth": False, "decode": True}


def test_official_comparison_refuses_what_the_official_code_cannot_build(official_checkout, tiny_var, capsys):
    small_vq = str(tiny_var / "var_small_vq")
    assert _bench("--official", str(official_checkout), "--model", small_vq, "--top-k", "20") == 2
    err = capsys.readouterr().err
    assert "the official VQVAE hard-codes ch_mult=(1, 1, 2, 2, 4)" in err and "differs in ch_mult, num_res_blocks, " \
        "using_sa" in err


def test_official_comparison_refuses_a_top_k_above_the_codebook(official_checkout, tiny_var, capsys):
    # the default top-k 900 is official VAR's setting for 4096 codes; the official sampler fails on a smaller codebook
    assert _bench("--official", str(official_checkout), "--model", str(tiny_var / "var")) == 2
    assert "--top-k 900 is more than the model's 64 codes" in capsys.readouterr().err
