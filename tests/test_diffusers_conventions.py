"""The diffusers conventions every vgen pipeline inherits from VGenPipeline, tested on VARPipeline: the generic
loader (and what happens without the family import), half precision from from_pretrained and .to(), step
callbacks, latent output, progress bars, the seed mapping of one generator, dtype-keeping saves with variants,
model cards from every save path, quiet loading and the offload message."""

import io
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from vgen.data import PROMPT_VOCABULARY
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.var import VAR
from vgen.pipelines import load_pipeline
from vgen.pipelines.model_card import ModelCardInfo, Score, front_matter, read_card_info
from vgen.pipelines.var import VARPipeline

from test_var_train import _ship_script, tiny_cfg, tokenizer_dir  # noqa: F401 - tokenizer_dir is a fixture
from step_callbacks import interrupt_after, seeds

PATCH_NUMS = (1, 2, 4)
LENGTH = sum(pn * pn for pn in PATCH_NUMS)


def tiny(text: bool = False) -> VARPipeline:
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), norm_num_groups=8,
                           patch_nums=PATCH_NUMS).eval()
    if text:
        encoder = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2).eval()
        var = VAR(vocab_size=64, Cvae=8, patch_nums=PATCH_NUMS, depth=2, embed_dim=32, num_heads=2,
                  conditioning="text", text_embed_dim=32, text_cross_attn=True).eval()
        pipe = VARPipeline(vq, var, encoder, default_top_k=0, default_top_p=0.0)
    else:
        var = VAR(vocab_size=64, Cvae=8, patch_nums=PATCH_NUMS, depth=2, embed_dim=32, num_heads=2,
                  num_classes=3).eval()
        pipe = VARPipeline(vq, var, default_top_k=0, default_top_p=0.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conventions") / "t2i"
    tiny(text=True).save_pretrained(folder)
    return folder


# -- loaders ----------------------------------------------------------------------------------------------------


def test_generic_loader_without_the_family_import_fails_as_documented(text_folder):
    """diffusers imports no module a folder names (its security rule), so without `import vgen.pipelines.var` the
    generic loader cannot find VARPipeline; the folder's model card gives the supported calls."""
    code = f"import diffusers\ndiffusers.DiffusionPipeline.from_pretrained({str(text_folder)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "has no attribute VARPipeline" in proc.stderr
    card = (text_folder / "README.md").read_text()
    assert "import vgen.pipelines.var" in card and "load_pipeline(" in card and "no attribute VARPipeline" in card


def test_loading_is_quiet_without_accelerate(text_folder):
    code = ("import vgen.pipelines.var, diffusers\n"
            "diffusers.utils.logging.disable_progress_bar()\n"
            f"diffusers.DiffusionPipeline.from_pretrained({str(text_folder)!r})\n"
            f"vgen.pipelines.var.VARPipeline.from_pretrained({str(text_folder)!r}).to(__import__('torch').bfloat16)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "accelerate" not in proc.stderr and "should be kept in float32" not in proc.stderr


def test_the_vacuous_fp32_warning_is_dropped_but_a_real_one_kept():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("diffusers.models.modeling_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        var = tiny().transformer
        var.to(torch.bfloat16)
        assert not any("kept in float32" in r for r in records)
        var._keep_in_fp32_modules = ["head"]
        var.to(torch.float32)
        assert any("kept in float32: ['head']" in r for r in records)
    finally:
        logger.removeHandler(handler)


def test_offload_says_it_is_not_supported():
    with pytest.raises(UserError, match="enable_model_cpu_offload is not supported by vgen pipelines yet"):
        tiny().enable_model_cpu_offload()


# -- half precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dtype", "torch_dtype", "to"])
def test_bf16_text_to_image_on_cpu(text_folder, how):
    ref = VARPipeline.from_pretrained(text_folder)
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompt="a photo of a red circle", generator=seeds(0), top_k=1, output_type="pt").images
    if how == "to":
        pipe = VARPipeline.from_pretrained(text_folder).to(torch.bfloat16)
    elif how == "dtype":
        pipe = VARPipeline.from_pretrained(text_folder, dtype=torch.bfloat16)
    else:
        with pytest.warns(FutureWarning, match="torch_dtype"):  # diffusers >= 0.36 renamed it
            pipe = VARPipeline.from_pretrained(text_folder, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert {m.dtype for m in (pipe.vqvae, pipe.transformer, pipe.text_encoder)} == {torch.bfloat16}
    pooled, tokens, _ = pipe.text_encoder.encode(["a photo of a red circle"])
    assert pooled.dtype == tokens.dtype == torch.bfloat16
    images = pipe(prompt="a photo of a red circle", generator=seeds(0), top_k=1, output_type="pt").images
    assert images.dtype == torch.float32 and images.shape == expected.shape == (1, 3, 8, 8)
    assert torch.isfinite(images).all() and (images - expected).abs().mean() < 0.1


def test_load_pipeline_takes_a_dtype(text_folder):
    pipe, _ = load_pipeline(text_folder, "cpu", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16


# -- callbacks, latents, progress -------------------------------------------------------------------------------


def test_callback_sees_every_scale_and_may_replace_the_tokens():
    pipe = tiny()
    calls = []

    def record(p, step_index, timestep, kwargs):
        assert p is pipe and set(kwargs) == {"idx_Bl", "f_hat", "logits_BlV"}
        calls.append((step_index, timestep, tuple(kwargs["idx_Bl"].shape), tuple(kwargs["f_hat"].shape),
                      tuple(kwargs["logits_BlV"].shape), kwargs["logits_BlV"].dtype))
        return kwargs

    pipe(class_labels=[0, 2], generator=seeds(0, 1), callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["idx_Bl", "f_hat", "logits_BlV"])
    assert calls == [(si, pn, (2, pn * pn), (2, 8, 4, 4), (2, pn * pn, 64), torch.float32)
                     for si, pn in enumerate(PATCH_NUMS)]
    assert pipe.num_timesteps == len(PATCH_NUMS)

    def sevens(p, step_index, timestep, kwargs):
        return {"idx_Bl": torch.full_like(kwargs["idx_Bl"], 7)}

    latents = pipe(class_labels=[0, 2], generator=seeds(0, 1), callback_on_step_end=sevens,
                   output_type="latent").images
    assert torch.equal(latents, torch.full((2, LENGTH), 7))
    images = pipe(class_labels=[0, 2], generator=seeds(0, 1), callback_on_step_end=sevens, output_type="pt").images
    assert torch.allclose(images, pipe.decode_latents(latents, output_type="pt").images, atol=1e-6)


def test_callback_rules():
    pipe = tiny()
    keep = lambda p, i, t, kwargs: kwargs  # noqa: E731
    with pytest.raises(UserError, match="'latents' not available in VARPipeline; its step tensors: idx_Bl, f_hat"):
        pipe(class_labels=[0], callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    with pytest.raises(UserError, match="'f_hat' is read-only .* may replace: idx_Bl"):
        pipe(class_labels=[0], callback_on_step_end_tensor_inputs=["f_hat"],
             callback_on_step_end=lambda p, i, t, kw: {"f_hat": kw["f_hat"] * 0})
    with pytest.raises(UserError, match="must keep the shape"):
        pipe(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: {"idx_Bl": kw["idx_Bl"][:, :0]})
    with pytest.raises(UserError, match=r"token ids outside \[0, 64\)"):
        pipe(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: {"idx_Bl": kw["idx_Bl"] + 64})


def test_interrupt_stops_after_the_step_and_keeps_what_was_made():
    pipe = tiny()

    stop_after_two = interrupt_after(1)
    latents = pipe(class_labels=[1], generator=seeds(3), callback_on_step_end=stop_after_two,
                   output_type="latent").images
    full = pipe(class_labels=[1], generator=seeds(3), output_type="latent").images
    assert latents.shape == (1, 1 + 4) and torch.equal(latents, full[:, :5]) and not pipe.interrupt
    assert pipe.decode_latents(latents, output_type="pt").images.shape == (1, 3, 8, 8)


def test_diffusers_pipeline_callback_objects_work():
    from diffusers.callbacks import PipelineCallback

    class CountSteps(PipelineCallback):
        tensor_inputs = ["idx_Bl"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.seen = getattr(self, "seen", 0) + 1
            return callback_kwargs

    counter = CountSteps(cutoff_step_ratio=1.0)
    tiny()(class_labels=[0], callback_on_step_end=counter)
    assert counter.seen == len(PATCH_NUMS)


def test_latent_output_round_trips_and_bad_latents_are_refused():
    pipe = tiny()
    latents = pipe(class_labels=[0, 1], generator=seeds(5, 6), output_type="latent").images
    assert latents.dtype == torch.int64 and latents.shape == (2, LENGTH)
    images = pipe(class_labels=[0, 1], generator=seeds(5, 6), output_type="pt").images
    assert torch.allclose(pipe.decode_latents(latents, output_type="pt").images, images, atol=1e-6)
    assert len(pipe.decode_latents(latents).images) == 2  # PIL by default
    with pytest.raises(UserError, match=r"whole scales \(L one of 1, 5, 21\)"):
        pipe.decode_latents(latents[:, :7])
    with pytest.raises(UserError, match="output_type must be one of pil, np, pt, latent"):
        pipe(class_labels=[0], output_type="latents")


def test_var_latent_output_decodes_nothing_and_images_come_from_f_hat(monkeypatch):
    pipe = tiny()
    images = pipe(class_labels=[0], generator=seeds(4), output_type="pt").images

    def no_decoding(*args, **kwargs):
        raise AssertionError("latent output decoded")

    with monkeypatch.context() as patch:
        patch.setattr(pipe.vqvae, "fhat_to_img", no_decoding)
        latents = pipe(class_labels=[0], generator=seeds(4), output_type="latent").images
    assert latents.shape == (1, LENGTH)
    # the images are the summed features decoded; without more_smooth that is the ids' decoding
    assert torch.allclose(images, pipe.decode_latents(latents, output_type="pt").images, atol=1e-6)


def test_progress_bar_config_is_honoured():
    pipe = tiny()
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, desc="scales", disable=False)
    pipe(class_labels=[0], generator=seeds(0))
    assert f"scales: 100%" in stream.getvalue() and f"{len(PATCH_NUMS)}/{len(PATCH_NUMS)}" in stream.getvalue()


# -- seeds ---------------------------------------------------------------------------------------------------


def test_one_generator_seeded_s_gives_image_i_seed_s_plus_i_and_continues():
    pipe = tiny()
    generator = torch.Generator().manual_seed(10)
    first = pipe(class_labels=[0, 1], num_images_per_prompt=2, generator=generator, output_type="latent").images
    listed = pipe(class_labels=[0, 1], num_images_per_prompt=2, generator=seeds(10, 11, 12, 13),
                  output_type="latent").images
    assert torch.equal(first, listed)
    assert generator.initial_seed() == 14  # left at manual_seed(s + B): the next call goes on with 14, 15, ...
    second = pipe(class_labels=[0], generator=generator, output_type="latent").images
    assert torch.equal(second, pipe(class_labels=[0], generator=seeds(14), output_type="latent").images)
    # a single image: one generator and a list of it are the same image
    one = pipe(class_labels=[2], generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(one, pipe(class_labels=[2], generator=seeds(0), output_type="latent").images)


def test_a_used_generator_draws_its_starting_seed():
    from vgen.samplers.seeding import per_sample_generators

    used = torch.Generator().manual_seed(3)
    torch.rand(2, generator=used)
    twin = torch.Generator().manual_seed(3)
    torch.rand(2, generator=twin)
    start = int(torch.randint(0, 2**62, (), generator=twin))
    assert [g.initial_seed() for g in per_sample_generators(used, 3)] == [start, start + 1, start + 2]
    assert used.initial_seed() == start + 3


# -- saving -------------------------------------------------------------------------------------------------


def float_dtypes(path):
    return {v.dtype for v in load_file(str(path)).values() if v.is_floating_point()}


def test_save_keeps_fp16_weights_loaded_from_fp16_and_writes_fp32_once_changed(tmp_path):
    tiny().to(torch.float16).save_pretrained(tmp_path / "fp16")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    pipe = VARPipeline.from_pretrained(tmp_path / "fp16")
    assert pipe.transformer.dtype == torch.float32  # diffusers upcasts on load
    pipe.save_pretrained(tmp_path / "again")
    assert float_dtypes(tmp_path / "again" / weights) == {torch.float16}
    assert (tmp_path / "again" / weights).stat().st_size == (tmp_path / "fp16" / weights).stat().st_size
    with torch.no_grad():
        pipe.transformer.head.bias.add_(1e-4)  # no longer an fp16 number: writing fp16 would lose it
    pipe.save_pretrained(tmp_path / "changed")
    assert float_dtypes(tmp_path / "changed" / weights) == {torch.float32}
    pipe.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert float_dtypes(tmp_path / "bf16" / weights) == {torch.bfloat16}
    assert pipe.transformer.dtype == torch.float32  # the pipeline in memory is untouched


def test_variant_fp16_names_the_files_and_loads(tmp_path):
    pipe = tiny()
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    path = tmp_path / "v" / "transformer" / "diffusion_pytorch_model.fp16.safetensors"
    assert path.is_file() and float_dtypes(path) == {torch.float16}
    assert pipe.transformer.dtype == torch.float32
    expected = {k: v.half().float() for k, v in pipe.transformer.state_dict().items()}
    for loaded in (VARPipeline.from_pretrained(tmp_path / "v", variant="fp16"),
                   VARPipeline.from_pretrained(tmp_path / "v"), load_pipeline(tmp_path / "v", "cpu")[0]):
        assert all(torch.equal(v, expected[k]) for k, v in loaded.transformer.state_dict().items())


# -- model cards ----------------------------------------------------------------------------------------------


def test_save_pretrained_writes_a_model_card_that_survives_load_and_save(text_folder, tmp_path):
    card = (text_folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "other" and meta["license_name"] == "not-stated"
    for section in ("## What it is", "## How it was trained", "## Measured scores", "## Licence of the weights",
                    "## How to load it"):
        assert section in card
    assert "text-to-image (prompts)" in card and "| `text_encoder` |" in card and "float32" in card
    pipe = VARPipeline.from_pretrained(text_folder)
    pipe.model_card.license = "apache-2.0"
    pipe.model_card.scores.append(Score("Shapes-GenEval overall", 0.5, "24 prompts"))
    pipe.save_pretrained(tmp_path / "again")
    again = VARPipeline.from_pretrained(tmp_path / "again")
    assert again.model_card.license == "apache-2.0" and again.model_card.scores == [
        Score("Shapes-GenEval overall", 0.5, "24 prompts")]
    assert "| Shapes-GenEval overall | 0.5 | 24 prompts |" in (tmp_path / "again" / "README.md").read_text()


def test_the_shipped_model_has_its_card_and_keeps_its_size_through_load_and_save(tmp_path):
    from vgen.pipelines import DEFAULT_MODEL_DIR

    info = read_card_info(DEFAULT_MODEL_DIR)
    assert info.license == "apache-2.0" and {s.name: s.value for s in info.scores}["Shapes-GenEval overall"] == 0.699
    assert "float16" in (DEFAULT_MODEL_DIR / "README.md").read_text()
    pipe, _ = load_pipeline(None, "cpu")
    assert pipe.transformer.dtype == torch.float32
    pipe.save_pretrained(tmp_path / "copy")
    sizes = {p.relative_to(DEFAULT_MODEL_DIR): p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*.safetensors")}
    assert {p.relative_to(tmp_path / "copy"): p.stat().st_size for p in (tmp_path / "copy").rglob("*.safetensors")
            } == sizes and sum(sizes.values()) < 25 * 10**6
    assert read_card_info(tmp_path / "copy") == info


def test_convert_writes_a_card_with_the_official_licence(tmp_path):
    from test_var_cli import official_var_state_dict, tiny_vqvae

    torch.save(official_var_state_dict(), tmp_path / "var_d2.pth")
    torch.save(tiny_vqvae().state_dict(), tmp_path / "vae.pth")
    from vgen.cli import main

    assert main(["convert", "var-official", "--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "var_d2.pth"),
                 "--out", str(tmp_path / "out")]) == 0
    info = read_card_info(tmp_path / "out")
    assert info.license == "mit" and "var_d2.pth" in info.source and "FoundationVision/VAR" in info.training
    assert "class-conditional (10 classes)" in (tmp_path / "out" / "README.md").read_text()


def test_training_export_and_ship_script_write_cards(tokenizer_dir, tmp_path):
    from vgen.train.loop import TrainConfig, train
    from vgen.train.var_task import VARTask

    cfg = TrainConfig(steps=2, batch_size=4, lr=3e-3, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "run"))
    train(VARTask(tiny_cfg(tokenizer_dir)), cfg, progress=False)
    exported = read_card_info(tmp_path / "run" / "final")
    assert "Trained with `vgen train var` on the `shapes` data world at 32 px" in exported.training
    assert "steps 2, batch_size 4" in exported.training and "Last logged training metrics (step 2)" in exported.training
    assert str(tmp_path) not in (tmp_path / "run" / "final" / "README.md").read_text()
    assert _ship_script().main([str(tmp_path / "run" / "final"), "--out", str(tmp_path / "shipped")]) == 0
    shipped = read_card_info(tmp_path / "shipped")
    assert shipped.license == "apache-2.0" and shipped.scores and "train_default_model.sh" in shipped.training
    text = (tmp_path / "shipped" / "README.md").read_text()
    assert "float16" in text and str(tmp_path) not in text
    assert json.loads((tmp_path / "shipped" / "model_index.json").read_text())["_class_name"] == "VARPipeline"
