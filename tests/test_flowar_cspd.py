"""FlowARPipeline with ``speculative="cspd"`` (and ``flow_sampler="sde"``) on tiny random pipelines: the call and
its counts, a drafter equal to the target accepts every scale, the saved drafter path, the CLI flags, and one-line
refusals (no drafter, another autoencoder or scales, a next-token method; cspd on a next-token model)."""

import json

import pytest
import torch
from vgen.cli import main
from vgen.errors import UserError
from vgen.pipelines import load_pipeline
from vgen.pipelines.flowar import FlowARPipeline

from test_flowar_pipeline import tiny_flowar, tiny_vae


def pipeline(**overrides):
    pipe = FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar(**overrides), default_guidance_scale=2.0,
                          default_num_steps=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cspd")
    pipeline().save_pretrained(str(root / "target"))
    pipeline().save_pretrained(str(root / "same"))  # the same weights (seeded): a drafter equal to the target
    torch.manual_seed(4)
    small = tiny_flowar(decoder_embed_dim=16, encoder_embed_dim=16, flow_width=16)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    FlowARPipeline(vae=tiny_vae(), transformer=small).save_pretrained(str(root / "small"))
    FlowARPipeline(vae=tiny_vae(scale_factor=0.25), transformer=tiny_flowar()).save_pretrained(str(root / "vae"))
    FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar(scales=(1, 4))).save_pretrained(str(root / "scales"))
    return root


def gens(n):
    return [torch.Generator().manual_seed(s) for s in range(n)]


def test_cspd_call_counts_and_a_drafter_equal_to_the_target(folders):
    pipe, _ = load_pipeline(folders / "target", "cpu")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2, 3], speculative="cspd", drafter=str(folders / "small"), gamma=2,
                  prefill_fraction=0.3, generator=gens(3), output_type="pt").images
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    stats = pipe.speculative_stats
    assert stats.drafted.tolist() == [2, 2, 2] and stats.units.tolist() == [3, 3, 3]  # 1 of 3 scales pre-filled
    assert stats.target_forwards.tolist() == [pipe.target_only_forwards(flow_sampler="sde")] * 3
    assert int((stats.accepted + stats.resampled + stats.fallbacks).sum()) == 6
    pipe(class_labels=[1, 2], speculative="cspd", drafter=str(folders / "same"), gamma=3, prefill_fraction=0.0,
         generator=gens(2), output_type="pt")
    assert pipe.speculative_stats.summary()["acceptance_rate"] == 1.0
    target_only = pipe(class_labels=[1, 2], flow_sampler="sde", generator=gens(2), output_type="pt").images
    assert pipe.speculative_stats is None and torch.isfinite(target_only).all()
    ode = pipe(class_labels=[1, 2], generator=gens(2), output_type="pt").images
    assert (ode - target_only).abs().max() > 1e-3  # another sampler


def test_saved_cspd_settings_and_drafter_path(folders, tmp_path):
    pipe, _ = load_pipeline(folders / "target", "cpu")
    pipe.register_sampling_defaults(**{**pipe.sampling_defaults(), "speculative": "cspd",
                                       "drafter": str(folders / "small"), "gamma": 2})
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["default_speculative"] == "cspd" and not index["default_drafter"].startswith("/")
    loaded, _ = load_pipeline(tmp_path / "saved", "cpu")
    loaded.set_progress_bar_config(disable=True)
    loaded(class_labels=[0], generator=gens(1), output_type="pt")
    assert loaded.speculative_stats is not None and int(loaded.speculative_stats.drafted[0]) == 2  # 1 of 3 pre-filled
    # what the CLI does: every resolved setting passed, the saved relative drafter path among them
    loaded(class_labels=[0], generator=gens(1), output_type="pt", **loaded.resolve_sampling())
    assert int(loaded.speculative_stats.drafted[0]) == 2


def test_generate_cli_flags(folders, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(folders / "target"), "--class-label", "1", "--n", "2", "--speculative",
                 "cspd", "--drafter", str(folders / "small"), "--gamma", "2", "--prefill-fraction", "0.2",
                 "--rejection-rounds", "4", "--out", str(out)]) == 0
    settings = json.loads((tmp_path / "grid.json").read_text())
    assert (settings["speculative"], settings["gamma"], settings["prefill_fraction"],
            settings["rejection_rounds"]) == ("cspd", 2, 0.2, 4)
    for extra, message in ((["--drafter", str(folders / "vae")], "another autoencoder"),
                           (["--drafter", str(folders / "scales")], "a drafter must share the scales"),
                           ([], "needs a drafter")):
        assert main(["generate", "--model", str(folders / "target"), "--class-label", "1", "--speculative", "cspd",
                     *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["generate", "--model", str(folders / "target"), "--class-label", "1", "--speculative", "sjd",
                 "--out", str(out)]) == 2
    assert "FlowAR takes none, cspd" in capsys.readouterr().err


def test_refusals_in_the_api(folders):
    pipe = pipeline()
    with pytest.raises(UserError, match="--drafter is for --speculative cspd"):
        pipe(class_labels=[1], drafter=str(folders / "small"))
    with pytest.raises(UserError, match="rejection_rounds must be"):
        pipe(class_labels=[1], rejection_rounds=0)
    with pytest.raises(UserError, match="prefill_fraction must be"):
        pipe(class_labels=[1], prefill_fraction=2.0)
    from test_speculative_bench import text_pipeline

    with pytest.raises(UserError, match="speculative cspd is for continuous-token"):
        text_pipeline(2, 1).resolve_sampling(speculative="cspd")
