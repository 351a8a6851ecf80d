"""``vgen bench sample``: one command for every family (here a tiny VAR and a tiny FlowAR pipeline); counts of
network passes follow from the sampling settings, and the JSON has what the README table needs."""

import json

import pytest
import torch
from vgen.eval.bench_sample import counting_steps
from vgen.tokenizers.kl_autoencoder import AutoencoderKL
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.cli import main
from vgen.models.flowar import FlowAR
from vgen.models.var import VAR
from vgen.pipelines.flowar import FlowARPipeline
from vgen.pipelines.var import VARPipeline


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, using_sa=False,
                           patch_nums=(1, 2, 4))
    var = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 4), depth=1, embed_dim=32, num_heads=2, num_classes=4)
    VARPipeline(vqvae=vq, transformer=var, default_top_k=0, default_top_p=0.0).save_pretrained(root / "var")
    flowar = FlowAR(latent_channels=4, scales=(1, 2, 4), encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, flow_depth=1, flow_width=32,
                    flow_num_heads=2, num_classes=4)
    vae = AutoencoderKL(z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, encoder_attn_levels=())
    FlowARPipeline(vae=vae, transformer=flowar, default_num_steps=4).save_pretrained(root / "flowar")
    return root


def _bench(capsys, folder, *extra):
    assert main(["bench", "sample", "--model", str(folder), "--batch-sizes", "1,2", "--repeats", "1",
                 "--warmup", "0", "--device", "cpu", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_flowar_counts_ar_passes_and_flow_head_calls(pipelines, capsys):
    report = _bench(capsys, pipelines / "flowar")
    assert report["pipeline"] == "FlowARPipeline" and report["sampling"]["num_steps"] == 4
    for row in report["results"]:
        # 3 scales x 4 Euler steps of the head; one AR pass per scale (prefill = scale 0, commit = the next ones)
        assert row["calls_per_batch"] == {"prefill": 1, "velocity": 12, "commit": 2}
        # CFG (weight 2.4 at the last scale) doubles every model batch
        assert row["forwards_per_image"] == {"prefill": 2.0, "velocity": 24.0, "commit": 4.0, "total": 30.0}
        assert row["images_per_s"] > 0 and row["peak_memory_kind"] == "cpu_resident_growth"
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert report["throughput_ratio"] == pytest.approx(
        report["results"][1]["images_per_s"] / report["results"][0]["images_per_s"])


def test_var_counts_one_pass_per_scale(pipelines, capsys):
    report = _bench(capsys, pipelines / "var", "--class-label", "1")
    assert report["pipeline"] == "VARPipeline"
    for row in report["results"]:
        # prefill only builds the start tokens: not a forward
        assert row["calls_per_batch"] == {"prefill": 1, "logits_for_scale": 3}
        assert row["forwards_per_image"] == {"logits_for_scale": 6.0, "total": 6.0}


def test_counting_restores_the_model_and_bad_sizes_are_one_line(pipelines, capsys):
    pipe = FlowARPipeline.from_pretrained(str(pipelines / "flowar"))
    with counting_steps(pipe.transformer) as (calls, _rows):
        pipe.transformer.prefill(pipe.transformer.class_condition(torch.tensor([0])))
    assert calls == {"prefill": 1} and "prefill" not in vars(pipe.transformer)
    assert main(["bench", "sample", "--model", str(pipelines / "flowar"), "--batch-sizes", "0,2"]) == 2
    assert "--batch-sizes must be positive integers" in capsys.readouterr().err


def test_several_models_in_one_process(pipelines, capsys):
    assert main(["bench", "sample", "--model", str(pipelines / "var"), str(pipelines / "flowar"), "--batch-sizes",
                 "1", "--repeats", "2", "--warmup", "0", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["pipeline"] for r in report["models"]] == ["VARPipeline", "FlowARPipeline"]
    assert all(len(r["results"][0]["seconds_all"]) == 2 for r in report["models"])
    ratios = report["images_per_s_relative_to_first"]
    assert ratios[0] == {"1": 1.0}
    flowar = report["models"][1]["results"][0]["images_per_s"] / report["models"][0]["results"][0]["images_per_s"]
    assert ratios[1]["1"] == pytest.approx(flowar)


def test_token_shuffle_windows_read_apart(tmp_path, capsys):
    # the Token-Shuffle comparison: the same transformer in raster order (s = 1) and on 2x2 windows, in one process
    from test_raster_ar_pipeline import tiny_pipe

    for window in (1, 2):
        tiny_pipe(window=window, default_guidance_scale=2.0).save_pretrained(tmp_path / f"s{window}")
    assert main(["bench", "sample", "--model", str(tmp_path / "s1"), str(tmp_path / "s2"), "--batch-sizes", "1",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    s1, s2 = (r["structure"] for r in report["models"])
    assert s1 == {"units_per_image": 16, "tokens_per_step": 1, "shuffle_window": 1}
    assert s2 == {"units_per_image": 4, "tokens_per_step": 4, "shuffle_window": 2}
    # one prefill + one decode per unit after the first, every row doubled by CFG
    for report_, units in zip(report["models"], (16, 4)):
        assert report_["results"][0]["forwards_per_image"]["total"] == 2.0 * units
