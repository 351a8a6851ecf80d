"""NFIG (next-frequency prediction): VAR's transformer over the bands of the FR-VAE tokenizer.

``vgen train var`` with a frequency tokenizer lowers the loss and exports an NFIG pipeline (a ``VARPipeline`` whose
``vqvae`` is a :class:`FrequencyVQModel`) that saves, loads (also in a fresh process, through every loader) and
generates with ``vgen generate`` / ``vgen sample`` / ``vgen eval geneval``; a tokenizer that does not fit the
transformer, or is no next-scale tokenizer at all, is one clear line. Tiny sizes: 32 px images, 4 bands (1, 2, 4, 8:
85 tokens), 64 codes of 16 dims."""

import json
import shutil
import subprocess
import sys

import diffusers
import pytest
import torch
from PIL import Image
from vgen.data import PROMPT_VOCABULARY
from vgen.tokenizers.frvae import FrequencyVQModel
from vgen.tokenizers.msvq import MultiScaleVQModel
from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

from vgen.cli import main
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.var import VAR
from vgen.pipelines import load_pipeline
from vgen.pipelines.var import VARPipeline
from vgen.train.loop import TrainConfig, train
from vgen.train.var_task import VARTask, VARTaskConfig

PATCH_NUMS = (1, 2, 4, 8)
TOKENIZER = dict(vocab_size=64, z_channels=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, using_sa=False,
                 patch_nums=PATCH_NUMS)
PROMPT = "a photo of a red circle"


def frequency_tokenizer(seed: int = 0, **overrides) -> FrequencyVQModel:
    torch.manual_seed(seed)
    return FrequencyVQModel(**{**TOKENIZER, **overrides}).eval()


def tiny_transformer(seed: int = 1, **overrides) -> VAR:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=64, Cvae=16, patch_nums=PATCH_NUMS, depth=1, embed_dim=32, num_heads=2,
                  conditioning="text", text_embed_dim=32)
    return VAR(**{**kwargs, **overrides}).eval()


def tiny_nfig_pipeline(**transformer_overrides) -> VARPipeline:
    torch.manual_seed(2)
    encoder = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2)
    return VARPipeline(vqvae=frequency_tokenizer(), transformer=tiny_transformer(**transformer_overrides),
                       text_encoder=encoder, default_top_k=0, default_top_p=0.0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("frvae") / "tokenizer"
    frequency_tokenizer(band_edges=(0.1, 0.3, 0.6, 1.0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nfig_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nfig") / "pipe"
    tiny_nfig_pipeline().save_pretrained(str(path))
    return path


def images_of(pipe, seeds=(0, 1)) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=[PROMPT] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pt").images


# ------------------------------------------------------------------------------------------------------ training


def tiny_cfg(tokenizer_dir, **kw) -> VARTaskConfig:
    base = dict(tokenizer=str(tokenizer_dir), depth=1, embed_dim=32, num_heads=2, conditioning="text",
                text_embed_dim=32, text_depth=1, text_heads=2, resolution=32, dataset_length=64,
                sample_prompts=(PROMPT, "a photo of two blue stars"))
    return VARTaskConfig(**{**base, **kw})


def test_train_var_on_the_frequency_tokenizer_lowers_the_loss_and_exports_an_nfig_pipeline(tokenizer_dir, tmp_path):
    task = VARTask(tiny_cfg(tokenizer_dir))
    # the saved class, with its own band edges (a MultiScaleVQModel load would drop them and quantize scales)
    assert type(task.vqvae) is FrequencyVQModel
    assert task.vqvae.quantize.band_edges == (0.1, 0.3, 0.6, 1.0)
    assert task.transformer_kwargs()["patch_nums"] == PATCH_NUMS
    cfg = TrainConfig(steps=20, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", log_every=5,
                      ckpt_every=0, sample_every=20, out_dir=str(tmp_path / "run"))
    train(task, cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < first - 0.3, (first, last)  # starts near ln(64) = 4.16
    assert log[-1]["accuracy"] > log[0]["accuracy"]
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    index = json.loads((tmp_path / "run" / "final" / "model_index.json").read_text())
    assert index["_class_name"] == "VARPipeline" and index["vqvae"] == ["vgen.tokenizers.frvae", "FrequencyVQModel"]
    pipe = VARPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    assert type(pipe.vqvae) is FrequencyVQModel and pipe.vqvae.quantize.band_edges == (0.1, 0.3, 0.6, 1.0)
    assert images_of(pipe).shape == (2, 3, 32, 32)


def test_train_var_refuses_a_tokenizer_without_scales(tmp_path):
    torch.manual_seed(0)
    SingleScaleVQModel(vocab_size=64, codebook_dim=8, ch=16, ch_mult=(1, 2), z_channels=16, norm_num_groups=8
                       ).save_pretrained(tmp_path / "vq")
    with pytest.raises(UserError, match="holds a SingleScaleVQModel; vgen train var needs a next-scale tokenizer, a "
                                        r"MultiScaleVQModel \(VAR\) or FrequencyVQModel \(NFIG\)"):
        VARTask(tiny_cfg(tmp_path / "vq"))


# ------------------------------------------------------------------------------------------------------ pipeline


def test_nfig_pipeline_saves_loads_and_generates_the_same_images(nfig_dir):
    pipe = tiny_nfig_pipeline()
    index = json.loads((nfig_dir / "model_index.json").read_text())
    assert index["vqvae"] == ["vgen.tokenizers.frvae", "FrequencyVQModel"]
    expected = images_of(pipe)
    for loaded in (VARPipeline.from_pretrained(str(nfig_dir)), load_pipeline(nfig_dir, "cpu")[0],
                   diffusers.DiffusionPipeline.from_pretrained(str(nfig_dir))):
        assert type(loaded) is VARPipeline and type(loaded.vqvae) is FrequencyVQModel
        assert loaded.vqvae.quantize.band_edges == pipe.vqvae.quantize.band_edges
        torch.testing.assert_close(images_of(loaded), expected, rtol=0, atol=0)  # same weights, same arithmetic
    assert expected.shape == (2, 3, 32, 32) and 0 <= expected.min() and expected.max() <= 1
    assert not torch.equal(expected[0], expected[1])


def test_nfig_images_are_the_decoded_bands_of_the_sampled_tokens(monkeypatch):
    # What the pipeline returns is the FR-VAE's decoding of the sampled band tokens: the loop's f_hat is the sum of
    # the bands the tokenizer itself composes from those ids.
    pipe = tiny_nfig_pipeline()
    sampled = []
    import vgen.pipelines.var as var_pipeline

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        sampled.append(out.idx_Bl)
        return out

    generate = var_pipeline.generate_next_scale
    monkeypatch.setattr(var_pipeline, "generate_next_scale", recording)
    images = images_of(pipe)
    with torch.no_grad():
        decoded = pipe.vqvae.idxBl_to_img(sampled[0]).add(1).mul(0.5)
    assert [idx.shape for idx in sampled[0]] == [(2, pn * pn) for pn in PATCH_NUMS]
    torch.testing.assert_close(images, decoded.clamp(0, 1), rtol=0, atol=1e-5)


def test_generate_in_a_fresh_process_and_sample_and_geneval_in_process(nfig_dir, tmp_path):
    # a fresh interpreter has imported no tokenizer module: the loader must still find FrequencyVQModel
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "generate", "--model", str(nfig_dir), PROMPT, "--n", "2", "--seed", "3",
         "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "imgs")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "imgs").glob("*.png")) == ["0000.png", "0001.png"]
    assert Image.open(tmp_path / "imgs" / "0000.png").size == (32, 32)

    assert main(["sample", "--model", str(nfig_dir), "--num-samples", "3", "--metadata", str(_prompts(tmp_path)),
                 "--out", str(tmp_path / "samples"), "--batch-size", "2", "--npz"]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    # image 0 of `vgen sample` (seed 0) and image 0 of `vgen generate --seed 0`: the same generator, prompt, batch
    assert main(["generate", "--model", str(nfig_dir), PROMPT, "--n", "2", "--seed", "0",
                 "--out-dir", str(tmp_path / "gen0")]) == 0
    assert (tmp_path / "gen0" / "0000.png").read_bytes() == (tmp_path / "samples" / "000000.png").read_bytes()

    assert main(["eval", "geneval", "--model", str(nfig_dir), "--metadata", "shapes", "--limit", "2",
                 "--images-per-prompt", "1", "--out", str(tmp_path / "geneval")]) == 0
    assert len(list((tmp_path / "geneval").glob("0000*/samples/0000.png"))) == 2


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPT}\na photo of two blue stars\n")
    return path


# ------------------------------------------------------------------------------------------------------ mismatches


@pytest.mark.parametrize("tokenizer, message", [
    (lambda: frequency_tokenizer(vocab_size=32), r"codebook size 32 vs 64, tokenizer vs transformer"),
    (lambda: frequency_tokenizer(z_channels=8), r"code dimension 8 vs 16, tokenizer vs transformer"),
    (lambda: frequency_tokenizer(patch_nums=(1, 2, 3, 8)), r"patch_nums \[1, 2, 3, 8\] vs \[1, 2, 4, 8\]"),
    (lambda: MultiScaleVQModel(**{**TOKENIZER, "vocab_size": 128}), r"\(MultiScaleVQModel\) .*codebook size 128"),
])
def test_a_tokenizer_that_does_not_fit_the_transformer_is_one_clear_line(tokenizer, message):
    with pytest.raises(UserError, match=message) as err:
        VARPipeline(vqvae=tokenizer(), transformer=tiny_transformer())
    assert "use the tokenizer the transformer was trained with" in str(err.value) and "\n" not in str(err.value)


def test_a_tokenizer_without_a_residual_quantizer_is_refused():
    torch.manual_seed(0)
    vq = SingleScaleVQModel(vocab_size=64, codebook_dim=16, ch=16, ch_mult=(1, 2), z_channels=16, norm_num_groups=8)
    with pytest.raises(UserError, match="is a SingleScaleVQModel, which has no residual quantizer"):
        VARPipeline(vqvae=vq, transformer=tiny_transformer())


def test_a_folder_whose_tokenizer_was_swapped_fails_in_one_line(nfig_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(nfig_dir, broken)
    shutil.rmtree(broken / "vqvae")
    frequency_tokenizer(vocab_size=32).save_pretrained(broken / "vqvae")
    with pytest.raises(UserError, match="codebook size 32 vs 64"):
        load_pipeline(broken, "cpu")
    capsys.readouterr()
    assert main(["generate", "--model", str(broken), PROMPT, "--out", str(tmp_path / "g.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "codebook size 32 vs 64" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "g.png").exists()


def test_the_comparison_config_builds_the_same_transformer_on_both_tokenizers(tmp_path):
    # configs/shapes/var_nfig_compare.yaml: one transformer config, only task.tokenizer differs between the VAR and
    # the NFIG run; the two compare tokenizers share codebook, latent and parameter count.
    from conftest import REPO_ROOT
    from vgen.train.registry import load_run_config, load_task

    shapes = REPO_ROOT / "configs" / "shapes"
    transformers = {}
    for kind in ("msvq", "frvae"):
        tok_cfg, _ = load_run_config("tokenizer", shapes / f"{kind}_compare.yaml")
        load_task("tokenizer")(tok_cfg).build_model().save_pretrained(tmp_path / kind)
        var_cfg, train_cfg = load_run_config("var", shapes / "var_nfig_compare.yaml",
                                             [f"task.tokenizer={tmp_path / kind}"])
        task = VARTask(var_cfg)
        assert type(task.vqvae).__name__ == {"msvq": "MultiScaleVQModel", "frvae": "FrequencyVQModel"}[kind]
        transformers[kind] = task.build_model().transformer
    shapes_of = {kind: {k: v.shape for k, v in m.state_dict().items()} for kind, m in transformers.items()}
    assert shapes_of["msvq"] == shapes_of["frvae"]
    assert transformers["frvae"].patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert train_cfg.steps > 0 and train_cfg.precision == "fp32"
