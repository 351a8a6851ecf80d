"""``vgen bench speculative`` on tiny random text pipelines: the JSON report (target-only first, a sweep of the
method's knob, speedups measured as ratios in one process), quality deltas with tiny sample counts, the PNG plot
and ``--combine``; bad arguments are one line."""

import json

import pytest
import torch
from PIL import Image
from vgen.cli import main
from vgen.data import PROMPT_VOCABULARY
from vgen.models.raster_ar import RasterAR
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.pipelines.raster_ar import RasterARPipeline

from test_raster_ar_train import tiny_vq


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def text_pipeline(grid, seed):
    torch.manual_seed(seed)
    transformer = RasterAR(vocab_size=64, grid_size=grid, depth=1, embed_dim=32, num_heads=2, conditioning="text",
                           text_embed_dim=16).eval()
    with torch.no_grad():
        transformer.output.weight.normal_(0, 0.5)
    encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16, depth=1, num_heads=2).eval()
    return RasterARPipeline(vqvae=tiny_vq(), transformer=transformer, text_encoder=encoder,
                            default_guidance_scale=2.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    text_pipeline(4, 1).save_pretrained(str(root / "target"))  # 32 px
    text_pipeline(2, 2).save_pretrained(str(root / "low"))  # 16 px: the mulo-sd drafter
    return root


def test_speed_report_with_a_sweep_and_plot(folders, tmp_path, capsys):
    out = tmp_path / "mulo.json"
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "mulo-sd",
                 "--drafter", str(folders / "low"), "--sweep", "0", "0.2", "--set", "pool_k=2", "radius=0",
                 "--batch-sizes", "1", "2", "--repeats", "1", "--output", str(out), "--plot",
                 str(tmp_path / "p.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    speed = report["speed"]
    assert [r["setting"] for r in speed] == ["target-only", "mulo-sd tau=0", "mulo-sd tau=0.2"] * 2
    assert [r["batch_size"] for r in speed] == [1, 1, 1, 2, 2, 2]
    base = speed[0]
    assert base["speedup"] == 1.0 and base["target_forwards_per_image"] == 16 and base["acceptance_rate"] is None
    tau0 = speed[1]
    assert tau0["acceptance_rate"] == 1.0 and tau0["target_forwards_per_image"] == 1 + 2  # prefill + 2 rounds
    assert tau0["drafter_forwards_per_image"] == 4 and tau0["speedup"] > 0
    assert Image.open(tmp_path / "p.png").size[0] > 300


def test_quality_deltas_and_combined_plot(folders, tmp_path, capsys):
    from vgen.eval.fid import make_reference_stats

    ref = make_reference_stats(world="shapes", n=40, resolution=32, features="shapes",
                               out=str(tmp_path / "ref.npz"), verbose=False)
    out = tmp_path / "sjd.json"
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "sjd", "--set",
                 "window=3", "--batch-sizes", "1", "--repeats", "1", "--quality", "--geneval-limit", "6",
                 "--geneval-images-per-prompt", "1", "--fid-samples", "8", "--fid-ref", str(ref), "--samples-dir",
                 str(tmp_path / "samples"), "--output", str(out)]) == 0
    quality = json.loads(capsys.readouterr().out)["quality"]
    assert [q["setting"] for q in quality] == ["target-only", "sjd"]
    assert quality[0]["geneval_delta"] == 0.0 and quality[0]["fid_delta"] == 0.0
    assert all(q["fid_samples"] == 8 and 0 <= q["geneval"] <= 1 for q in quality)
    assert len(list((tmp_path / "samples").glob("target-target-only/fid/*.png"))) == 8
    assert main(["bench", "speculative", "--combine", str(out), str(out), "--plot", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size[0] >= 900  # two panels: GenEval and FID


def test_bad_bench_arguments(folders, capsys):
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "sjd",
                 "--sweep", "0.1"]) == 2
    assert "has no default knob to sweep" in capsys.readouterr().err
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "mulo-sd",
                 "--set", "bogus=1"]) == 2
    assert "--set bogus: not a speculative knob" in capsys.readouterr().err
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "sjd",
                 "--quality"]) == 2
    assert "--quality needs --fid-ref" in capsys.readouterr().err
