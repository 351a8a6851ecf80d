"""Speculative decoding as a pipeline option on tiny random RasterAR pipelines: every method through the call and
the CLI, drafter checks in one line, saved drafter paths relative to the pipeline folder, and the learned / resize
up-samplers of MuLo-SD."""

import json
import os
import subprocess
import sys

import pytest
import torch
from vgen.cli import main
from vgen.errors import UserError
from vgen.models.latent_upsampler import CodeUpsampler, LatentUpsampler
from vgen.models.raster_ar import RasterAR
from vgen.pipelines import load_pipeline
from vgen.pipelines.raster_ar import RasterARPipeline

from test_raster_ar_pipeline import tiny_vq


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def pipeline(grid=4, seed=1, vq=None, vocab_size=64, window=1, **defaults):
    torch.manual_seed(seed)
    transformer = RasterAR(vocab_size=vocab_size, grid_size=grid, depth=1, embed_dim=32, num_heads=2, num_classes=5,
                           shuffle_window=window).eval()
    with torch.no_grad():
        transformer.output.weight.normal_(0, 0.5)
    pipe = RasterARPipeline(vqvae=vq if vq is not None else tiny_vq(), transformer=transformer, **defaults)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    pipeline(4, seed=1).save_pretrained(str(root / "target"))
    pipeline(4, seed=2).save_pretrained(str(root / "drafter"))
    pipeline(2, seed=3).save_pretrained(str(root / "low"))  # 8 px: a 2x2 grid, r = 2
    torch.manual_seed(9)
    other_vq = tiny_vq()
    with torch.no_grad():
        other_vq.quantize.embedding.weight.normal_()
    pipeline(4, seed=2, vq=other_vq).save_pretrained(str(root / "other_tokenizer"))
    pipeline(4, seed=2, window=2).save_pretrained(str(root / "windows"))
    torch.manual_seed(4)
    LatentUpsampler(codebook_dim=8, factor=2, width=8, depth=1).save_pretrained(str(root / "upsampler"))
    return root


def gens(n, start=0):
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


@pytest.mark.parametrize("options", [
    dict(speculative="sjd", window=3),
    dict(speculative="exact", gamma=2, drafter="drafter"),
    dict(speculative="lantern", pool_k=3, delta=0.3),
    dict(speculative="lantern", pool_k=3, delta=0.3, drafter="drafter", gamma=3),
    dict(speculative="mulo-sd", drafter="low", tau=0.05),
    dict(speculative="mulo-sd", drafter="low", tau=0.05, upsampler="upsampler"),
])
def test_every_method_through_the_pipeline(folders, options):
    pipe, _ = load_pipeline(folders / "target", "cpu")
    pipe.set_progress_bar_config(disable=True)
    options = {k: str(folders / v) if k in ("drafter", "upsampler") else v for k, v in options.items()}
    images = pipe(class_labels=[1, 3], num_images_per_prompt=2, generator=gens(4), output_type="pt",
                  **options).images
    assert images.shape == (4, 3, 16, 16)
    stats = pipe.speculative_stats.summary()
    assert stats["target_forwards_per_image"] >= 1 and 0.0 <= stats["acceptance_rate"] <= 1.0
    if options["speculative"] in ("exact", "mulo-sd") or "drafter" in options:
        assert stats["drafter_forwards_per_image"] > 0
    pipe(class_labels=[1], generator=gens(1), output_type="pt")
    assert pipe.speculative_stats is None  # a plain call after a speculative one


@pytest.mark.parametrize("method", ["sjd", "lantern"])
def test_token_shuffle_windows_speculate_too(folders, method):
    pipe, _ = load_pipeline(folders / "windows", "cpu")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2], generator=gens(2), output_type="pt", speculative=method, window=2).images
    assert images.shape == (2, 3, 16, 16)
    assert pipe.speculative_stats.units.tolist() == [4, 4]  # 2x2 windows of 2x2 codes


def test_lossless_methods_reproduce_their_own_images(folders):
    pipe, _ = load_pipeline(folders / "target", "cpu")
    pipe.set_progress_bar_config(disable=True)
    a = pipe(class_labels=[2, 4], generator=gens(2, 7), output_type="pt", speculative="sjd").images
    b = pipe(class_labels=[2, 4], generator=gens(2, 7), output_type="pt", speculative="sjd").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("options,message", [
    (dict(speculative="exact"), "--speculative exact needs a drafter: pass --drafter DIR"),
    (dict(speculative="mulo-sd"), "--speculative mulo-sd needs a drafter"),
    (dict(speculative="sjd", drafter="drafter"), "--speculative sjd drafts with the target itself"),
    (dict(speculative="exact", drafter="other_tokenizer"), "uses another tokenizer or vocabulary than this model"),
    (dict(speculative="exact", drafter="low"), "--speculative exact needs a drafter at this model's resolution"),
    (dict(speculative="exact", drafter="windows"), "--speculative exact needs a drafter at this model's resolution"),
    (dict(speculative="mulo-sd", drafter="drafter"), "mulo-sd needs a drafter on a smaller grid"),
    (dict(speculative="mulo-sd", drafter="low", upsampler="nowhere"), "up-sampler folder .*nowhere not found"),
    (dict(speculative="exact", drafter="nowhere"), "model folder not found"),
    (dict(speculative="medusa"), "speculative must be one of none, sjd, exact, lantern, mulo-sd"),
    (dict(speculative="lantern", delta=1.5), r"delta must be in \[0, 1\]"),
    (dict(speculative="sjd", window=17), "window must be an integer from 1 to 16"),
])
def test_bad_speculative_settings_are_one_line(folders, options, message):
    pipe, _ = load_pipeline(folders / "target", "cpu")
    options = {k: str(folders / v) if k in ("drafter", "upsampler") else v for k, v in options.items()}
    with pytest.raises(UserError, match=message) as err:
        pipe(class_labels=[1], generator=gens(1), output_type="pt", **options)
    assert "\n" not in str(err.value)


def test_saved_drafter_path_is_relative_to_the_pipeline_folder(folders, tmp_path, monkeypatch):
    pipe, _ = load_pipeline(folders / "target", "cpu")
    pipe.register_to_config(default_speculative="exact", default_drafter=str(folders / "drafter"), default_gamma=2)
    pipe.save_pretrained(str(tmp_path / "with_drafter"))
    index = json.loads((tmp_path / "with_drafter" / "model_index.json").read_text())
    assert index["default_drafter"] == os.path.relpath(folders / "drafter", tmp_path / "with_drafter")
    assert not os.path.isabs(index["default_drafter"])
    monkeypatch.chdir(tmp_path)  # somewhere the relative path means nothing
    loaded, _ = load_pipeline(tmp_path / "with_drafter", "cpu")
    loaded.set_progress_bar_config(disable=True)
    loaded(class_labels=[0], generator=gens(1), output_type="pt")
    assert loaded.speculative_stats is not None and loaded.speculative_stats.drafter_forwards.sum() > 0
    # saved again elsewhere, the path is rewritten for the new folder
    loaded.save_pretrained(str(tmp_path / "nested" / "again"))
    again = json.loads((tmp_path / "nested" / "again" / "model_index.json").read_text())
    assert (tmp_path / "nested" / "again" / again["default_drafter"]).resolve() == (folders / "drafter").resolve()


def test_upsamplers_map_low_codes_to_the_target_grid(folders):
    vq = tiny_vq()
    low = torch.randint(0, 64, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    resize = CodeUpsampler(vq, None, 2)(low)
    assert resize.shape == (2, 6, 8) and int(resize.max()) < 64
    fresh = LatentUpsampler(codebook_dim=8, factor=2, width=8, depth=2)
    learned = CodeUpsampler(vq, fresh)(low)
    assert torch.equal(learned, low.repeat_interleave(2, 1).repeat_interleave(2, 2))  # starts as nearest-neighbour
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    # row-causal: the first rows' output does not change when later rows change
    changed = low.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 64
    latent = vq.quantize.lookup(low.flatten(1), (3, 4))
    latent_changed = vq.quantize.lookup(changed.flatten(1), (3, 4))
    out, out_changed = fresh(latent), fresh(latent_changed)
    assert torch.allclose(out[:, :, :4], out_changed[:, :, :4]) and not torch.allclose(out, out_changed)


def test_generate_cli_with_speculation(folders, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(folders / "target"), "--class-label", "1", "--n", "2",
                 "--speculative", "mulo-sd", "--drafter", str(folders / "low"), "--tau", "0.2", "--out",
                 str(out)]) == 0
    settings = json.loads((tmp_path / "grid.json").read_text())
    assert settings["speculative"] == "mulo-sd" and settings["tau"] == 0.2
    assert main(["generate", "--model", str(folders / "target"), "--class-label", "1", "--speculative", "exact",
                 "--drafter", str(folders / "other_tokenizer"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another tokenizer or vocabulary" in err[0]


def test_sample_cli_with_speculation_in_a_fresh_process(folders, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "sample", "--model", str(folders / "target"), "--class-labels", "0,1",
         "--num-samples", "3", "--speculative", "sjd", "--window", "4", "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((tmp_path / "s" / "sample_config.json").read_text())
    assert settings["speculative"] == "sjd" and settings["window"] == 4
    assert len(list((tmp_path / "s").glob("*.png"))) == 3


def test_default_sample_folder_names_a_drafter_by_its_folder_name(folders):
    import argparse
    from pathlib import Path

    from vgen.cli.sample import default_out_dir

    pipe, _ = load_pipeline(folders / "target", "cpu")
    sampling = pipe.resolve_sampling(speculative="exact", drafter=str(folders / "drafter"))
    name = default_out_dir(Path("m"), argparse.Namespace(seed=0, n=10), sampling, pipe)
    assert name.parent == Path("samples") and "-speculativeexact-drafterdrafter-" in name.name
