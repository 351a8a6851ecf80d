"""Sampling at scale: per-image seeds, sharding under torchrun (2 CPU processes, gloo), resume, manifest, npz."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from vgen.data import PROMPT_VOCABULARY
from vgen.eval.sample_at_scale import (
    flat_jobs,
    geneval_jobs,
    load_pipeline,
    load_prompts,
    parse_class_labels,
    pipeline_num_classes,
    run_sampling,
)
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.cli import main
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.var import VAR
from vgen.pipelines.var import VARPipeline
from vgen.distributed import setup_distributed

SAMPLING = {"guidance_scale": 1.5, "top_k": 50, "top_p": 0.9}


def tiny_pipeline(text: bool = False) -> VARPipeline:
    """Random tiny VAR pipeline: 32x32 images, 10 classes (or Shapes prompts)."""
    torch.manual_seed(0)
    vqvae = MultiScaleVQModel(
        vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8
    ).eval()
    if text:
        encoder = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2)
        var = VAR(vocab_size=64, Cvae=8, depth=1, embed_dim=32, num_heads=1, conditioning="text", text_embed_dim=32)
        return VARPipeline(vqvae=vqvae, transformer=var, text_encoder=encoder)
    var = VAR(vocab_size=64, Cvae=8, depth=1, embed_dim=32, num_heads=1, num_classes=10)
    return VARPipeline(vqvae=vqvae, transformer=var)


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "class"
    tiny_pipeline().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "text"
    tiny_pipeline(text=True).save_pretrained(str(path))
    return path


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# -------------------------------------------------------------------------------------------------------- jobs


def test_jobs_have_per_image_seeds_and_cycle_conditions(tmp_path):
    jobs = flat_jobs(tmp_path, 5, seed=100, class_labels=[7, 3])
    assert [(j.index, j.seed, j.class_label, j.path.name) for j in jobs] == [
        (0, 100, 7, "000000.png"), (1, 101, 3, "000001.png"), (2, 102, 7, "000002.png"),
        (3, 103, 3, "000003.png"), (4, 104, 7, "000004.png")]  # fmt: skip
    gj = geneval_jobs(tmp_path, [{"prompt": "a"}, {"prompt": "b"}], images_per_prompt=3, seed=10)
    assert [(j.index, j.seed, j.prompt) for j in gj][2:5] == [(2, 12, "a"), (3, 13, "b"), (4, 14, "b")]
    assert gj[4].path.relative_to(tmp_path).as_posix() == "00001/samples/0001.png"


def test_class_label_and_prompt_parsing(tmp_path):
    assert parse_class_labels("all", 4) == [0, 1, 2, 3]
    assert parse_class_labels("3, 1", 10) == [3, 1]
    with pytest.raises(UserError, match="outside 0..9"):
        parse_class_labels("1,10", 10)
    with pytest.raises(UserError, match="comma-separated"):
        parse_class_labels("red", 10)
    assert len(load_prompts("shapes")) == 553 and load_prompts("geneval")[0] == "a photo of a bench"
    (tmp_path / "p.txt").write_text("a photo of a red circle\n\na photo of a star\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a photo of a red circle", "a photo of a star"]
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="line 2"):
        load_prompts(str(tmp_path / "p.jsonl"))


# ------------------------------------------------------------------------------------------------ one process


def test_each_image_keeps_its_seed_whatever_the_batch_and_resume_skips(class_model, tmp_path, generator_seeds):
    pipe = load_pipeline(class_model, torch.device("cpu"))
    assert pipeline_num_classes(pipe) == 10
    ctx = setup_distributed()
    jobs_a = flat_jobs(tmp_path / "a", 5, seed=3, class_labels=[0, 1, 2])
    report = run_sampling(pipe, tmp_path / "a", jobs_a, ctx, batch_size=5, pipeline_kwargs=SAMPLING, npz=True,
                          progress=False)  # fmt: skip
    assert (report.written, report.skipped, report.total) == (5, 0, 5)
    # Batches of 1: image i still uses generator seed 3 + i. (Its pixels equal those of the batch of 5 only where
    # batched and single-row arithmetic round alike, so they are not compared.)
    jobs_b = flat_jobs(tmp_path / "b", 5, seed=3, class_labels=[0, 1, 2])
    run_sampling(pipe, tmp_path / "b", jobs_b, ctx, batch_size=1, pipeline_kwargs=SAMPLING, progress=False)
    assert generator_seeds == [[3, 4, 5, 6, 7], [3], [4], [5], [6], [7]]
    images = png_bytes(tmp_path / "b")
    assert len(images) == 5 and len(set(images.values())) == 5  # different seeds, different images

    # manifest and npz
    manifest = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[4] == {"index": 4, "seed": 7, "file": "000004.png", "class_label": 1}
    assert (tmp_path / "a" / "manifest.jsonl").read_text() == (tmp_path / "b" / "manifest.jsonl").read_text()
    arr = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(arr[3], np.asarray(Image.open(tmp_path / "a" / "000003.png")))

    # resume: a deleted image is made again (identically: the same seed in the same batch size), an existing one is
    # left alone
    (tmp_path / "b" / "000002.png").unlink()
    Image.new("RGB", (32, 32)).save(tmp_path / "b" / "000004.png")
    report = run_sampling(pipe, tmp_path / "b", jobs_b, ctx, batch_size=1, pipeline_kwargs=SAMPLING, progress=False)
    assert (report.written, report.skipped) == (1, 4)
    assert generator_seeds[-1] == [5]
    resumed = png_bytes(tmp_path / "b")
    assert resumed["000002.png"] == images["000002.png"] and resumed["000004.png"] != images["000004.png"]

    # an empty or cut-off image left in the folder is made again, not trusted
    (tmp_path / "b" / "000001.png").write_bytes(b"")
    (tmp_path / "b" / "000003.png").write_bytes(images["000003.png"][:100])
    report = run_sampling(pipe, tmp_path / "b", jobs_b, ctx, batch_size=1, pipeline_kwargs=SAMPLING, progress=False)
    assert (report.written, report.skipped) == (2, 3)
    resumed = png_bytes(tmp_path / "b")
    assert resumed["000001.png"] == images["000001.png"] and resumed["000003.png"] == images["000003.png"]

    # resuming with other settings is refused
    settings = {"seed": 3, **SAMPLING}
    jobs_c = flat_jobs(tmp_path / "c", 1, seed=3, class_labels=[0])
    run_sampling(pipe, tmp_path / "c", jobs_c, ctx, 1, SAMPLING, settings=settings, progress=False)
    with pytest.raises(UserError, match="top_k differ"):
        run_sampling(pipe, tmp_path / "c", jobs_c, ctx, 1, SAMPLING, settings={**settings, "top_k": 5})
    # a folder sampled before guidance profiles were recorded was made with VAR's ramp: it resumes with the ramp only
    ramp = {**settings, "guidance_profile": "ramp"}
    report = run_sampling(pipe, tmp_path / "c", jobs_c, ctx, 1, SAMPLING, settings=ramp, progress=False)
    assert report.skipped == 1
    (tmp_path / "c" / "sample_config.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="guidance_profile differ"):
        run_sampling(pipe, tmp_path / "c", jobs_c, ctx, 1, SAMPLING, settings={**settings, "guidance_profile": [1.0]})


def test_resume_removes_leftovers_of_dead_writers_and_refuses_a_corrupt_settings_file(class_model, tmp_path):
    pipe = load_pipeline(class_model, torch.device("cpu"))
    ctx = setup_distributed()
    out = tmp_path / "s"
    jobs = flat_jobs(out, 2, seed=0, class_labels=[0])
    out.mkdir()
    dead = out / ".000000.png.4194999.tmp.png"  # above Linux's largest pid: no such process
    alive = out / f".000007.png.{os.getpid()}.tmp.png"  # a writer still running
    dead.write_bytes(b"half an image")
    alive.write_bytes(b"being written")
    settings = {"seed": 0, **SAMPLING}
    run_sampling(pipe, out, jobs, ctx, 2, SAMPLING, settings=settings, npz=True, progress=False)
    assert not dead.exists() and alive.exists()
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)
    (out / "sample_config.json").write_text('{"seed": 0, "top_k"')
    before = png_bytes(out)
    with pytest.raises(UserError, match="sample_config.json is corrupt .* delete it to resume"):
        run_sampling(pipe, out, jobs, ctx, 2, SAMPLING, settings=settings, progress=False)
    assert png_bytes(out) == before


# ------------------------------------------------------------------------------------------------ two processes


def test_torchrun_two_processes_make_the_one_process_images(class_model, tmp_path, capsys):
    # One image per pipeline call and the torchrun workers' intra-op thread count (OMP_NUM_THREADS=1): every image
    # then sees the same arithmetic in both runs (CPU kernels and float reductions depend on the batch shape and the
    # thread count), so the sets are equal bit for bit; the sharding over processes does not matter.
    common = ["--model", str(class_model), "--num-samples", "7", "--class-labels", "all", "--seed", "11", "--top-k", "50",
              "--batch-size", "1"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["sample", *common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads(capsys.readouterr().out)
    assert one["written"] == 7 and one["world_size"] == 1

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vgen",
           "sample", *common, "--out", str(tmp_path / "two"), "--npz"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(result.stdout)  # only rank 0 prints
    assert two["world_size"] == 2 and two["rank"] == 0 and two["written"] == 4  # rank 0 drew 0, 2, 4, 6
    assert png_bytes(tmp_path / "one") == png_bytes(tmp_path / "two")
    assert len(png_bytes(tmp_path / "two")) == 7
    assert np.load(tmp_path / "two" / "samples.npz")["arr_0"].shape == (7, 32, 32, 3)
    assert (tmp_path / "one" / "manifest.jsonl").read_text() == (tmp_path / "two" / "manifest.jsonl").read_text()


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_bad_class_label_is_one_line_exit_2(class_model, tmp_path, capsys):
    code = main(["sample", "--model", str(class_model), "--class-labels", "0,12", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "outside 0..9" in err


def test_cli_geneval_from_a_model(text_model, tmp_path, capsys):
    args = ["eval", "geneval", "--model", str(text_model), "--metadata", "shapes", "--limit", "6",
            "--images-per-prompt", "2", "--seed", "0", "--out", str(tmp_path / "g")]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12 and summary["prompts"] == len({p["prompt"] for p in load_prompt_set(6)})
    assert summary["overall"] <= 0.2  # an untrained generator draws colour noise, which is no shape
    sample = tmp_path / "g" / "00005" / "samples" / "0001.png"
    assert Image.open(sample).size == (32, 32)
    assert json.loads((tmp_path / "g" / "00005" / "metadata.jsonl").read_text()) == load_prompt_set(6)[5]
    manifest = (tmp_path / "g" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(manifest[11])["seed"] == 11  # index p * 2 + k


def load_prompt_set(n):
    from vgen.eval.geneval import load_metadata

    return load_metadata("shapes")[:n]
