"""RasterARPipeline on tiny random components: save / load through the registry, saved sampling defaults, images
of the right size for any Token-Shuffle window, guidance schedules, and mismatched components in one line."""

import json

import pytest
import torch
from vgen.data import PROMPT_VOCABULARY
from vgen.errors import UserError
from vgen.models.raster_ar import RasterAR
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.pipelines import load_pipeline
from vgen.pipelines.raster_ar import RasterARPipeline, guidance_schedule_named
from vgen.samplers.guidance import ConstantCFG, FirstStepsCFG, WeightRampCFG
from vgen.tokenizers.single_scale_vq import SingleScaleVQModel


def tiny_vq(vocab_size=64):
    torch.manual_seed(0)
    # downsampling 4: 16 px images have a 4x4 token grid
    return SingleScaleVQModel(vocab_size=vocab_size, codebook_dim=8, z_channels=32, ch=32, ch_mult=(1, 1, 1),
                              num_res_blocks=1, using_sa=False, using_mid_sa=False).eval()


def tiny_pipe(window=1, conditioning="class", vocab_size=64, **defaults):
    kw = dict(conditioning=conditioning, num_classes=5)
    text_encoder = None
    if conditioning == "text":
        kw["text_embed_dim"] = 16
        text_encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16, depth=1, num_heads=2).eval()
    torch.manual_seed(1)
    transformer = RasterAR(vocab_size=vocab_size, grid_size=4, depth=2, embed_dim=32, num_heads=2,
                           shuffle_window=window, **kw).eval()
    with torch.no_grad():
        transformer.output.weight.normal_(0, 0.5)  # LlamaGen zero-inits the head: make samples depend on the seed
    return RasterARPipeline(vqvae=tiny_vq(), transformer=transformer, text_encoder=text_encoder, **defaults)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_images_for_any_window(window):
    pipe = tiny_pipe(window)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 3], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (4, 3, 16, 16) and pipe.resolution == 16
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_text_pipeline_and_seeds():
    pipe = tiny_pipe(2, conditioning="text")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    gens = lambda s: [torch.Generator().manual_seed(s + i) for i in range(2)]  # noqa: E731
    a = pipe(prompt=prompts, generator=gens(0), output_type="pt").images
    b = pipe(prompt=prompts, generator=gens(0), output_type="pt").images
    c = pipe(prompt=prompts, generator=gens(5), output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="text-conditional: pass a prompt"):
        pipe(class_labels=[0])


def test_save_load_keeps_sampling_defaults(tmp_path):
    pipe = tiny_pipe(2, default_guidance_scale=3.5, default_top_k=7, default_guidance_schedule="ramp",
                     default_cfg_interval=1)
    pipe.save_pretrained(str(tmp_path / "p"))
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "RasterARPipeline"
    assert (index["default_guidance_scale"], index["default_top_k"], index["default_guidance_schedule"],
            index["default_cfg_interval"]) == (3.5, 7, "ramp", 1)
    loaded, _ = load_pipeline(tmp_path / "p", "cpu")
    assert isinstance(loaded, RasterARPipeline) and loaded.transformer.config.shuffle_window == 2
    resolved = loaded.resolve_sampling(top_k=3)
    assert {k: resolved[k] for k in ("guidance_scale", "top_k", "top_p", "temperature", "guidance_schedule",
                                     "cfg_interval")} == {"guidance_scale": 3.5, "top_k": 3, "top_p": 1.0,
                                                          "temperature": 1.0, "guidance_schedule": "ramp",
                                                          "cfg_interval": 1}
    assert resolved["speculative"] == "none"  # speculative decoding is off unless asked for
    loaded.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(4)]
    a = loaded(class_labels=[2], generator=gens, output_type="pt").images
    b = pipe(class_labels=[2], generator=[torch.Generator().manual_seed(4)], output_type="pt").images
    assert torch.allclose(a, b)


def test_guidance_schedules_by_name():
    assert guidance_schedule_named("constant") == ConstantCFG()
    assert guidance_schedule_named("ramp", 3) == FirstStepsCFG(WeightRampCFG(), 5)
    with pytest.raises(UserError, match="unknown guidance schedule 'cosine'"):
        guidance_schedule_named("cosine")
    pipe = tiny_pipe()
    with pytest.raises(UserError, match="guidance_schedule must be 'constant' or 'ramp', got 'cosine'"):
        pipe(class_labels=[0], guidance_schedule="cosine")
    with pytest.raises(UserError, match=r"cfg_interval must be -1 \(every step\) or >= 0, got -3"):
        pipe(class_labels=[0], cfg_interval=-3)
    with pytest.raises(UserError, match="has no sampling option guidance_profile"):
        pipe.resolve_sampling(guidance_profile="ramp")


def test_mismatched_tokenizer_and_generator_vocabularies_are_one_line():
    transformer = RasterAR(vocab_size=128, grid_size=4, depth=1, embed_dim=32, num_heads=2, num_classes=5)
    with pytest.raises(UserError) as err:
        RasterARPipeline(vqvae=tiny_vq(64), transformer=transformer)
    assert str(err.value) == ("the tokenizer has 64 codes but the transformer predicts 128; pair the transformer "
                              "with the tokenizer it was trained on")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_on_cpu(dtype):
    pipe = tiny_pipe(2, conditioning="text")
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    ref = pipe(prompt=prompts, generator=gens(), top_k=1, output_type="pt").images
    pipe.to(dtype)
    cond = pipe.transformer.text_condition(*pipe.text_encoder(*pipe.text_encoder.tokenize(prompts)),
                                           pipe.text_encoder.tokenize(prompts)[1])
    state, logits = pipe.transformer.prefill(cond)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert state.cache.k.dtype == dtype
    images = pipe(prompt=prompts, generator=gens(), top_k=1, output_type="pt").images
    assert images.shape == ref.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
