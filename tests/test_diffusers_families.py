"""The diffusers conventions of RasterARPipeline, FlowARPipeline and NFIG (VAR's are in test_diffusers_conventions.py,
xAR's in test_xar_pipeline.py, video's in test_video_pipeline.py): a step callback per unit (raster code /
Token-Shuffle window), per scale (FlowAR) or per frequency band (NFIG), replacing a step's tokens as teacher forcing
them would, interruption after a step, latent output that decode_latents turns into the same images (and that decodes
nothing itself), one clear error for a bad tensor name, and FlowAR's unconditional images. Tiny random components of
test_raster_ar_pipeline.py, test_flowar_pipeline.py and test_nfig.py."""

import io

import pytest
import torch

from vgen.errors import UserError
from vgen.pipelines.flowar import FlowARPipeline
from vgen.pipelines.raster_ar import guidance_schedule_named
from vgen.samplers.flow_grids import flowar_time_grid
from vgen.samplers.flow_transitions import EulerODE
from vgen.samplers.flow_units import generate_flow_units
from vgen.samplers.guidance import WeightRampCFG
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.next_token import generate_next_token

from test_flowar_pipeline import tiny_flowar, tiny_vae
from test_nfig import PATCH_NUMS as BANDS
from test_nfig import PROMPT, tiny_nfig_pipeline
from test_raster_ar_pipeline import tiny_pipe
from step_callbacks import interrupt_after, seeds

GRID = 4  # the tiny raster model's 4x4 code grid (16 px images)
SCALES = (1, 2, 4)  # the tiny FlowAR's scales (patch size 1, 4 latent channels: 8 px images)


def raster(window=1):
    pipe = tiny_pipe(window)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flowar():
    pipe = FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar(), default_guidance_scale=3.0, default_num_steps=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- raster AR --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2])
def test_raster_callback_sees_every_unit_with_the_declared_tensors(window):
    pipe = raster(window)
    k, units = window * window, (GRID // window) ** 2
    calls = []

    def record(p, step_index, timestep, kwargs):
        assert p is pipe and set(kwargs) == {"unit_Bk", "logits_BkV"}
        calls.append((step_index, timestep, tuple(kwargs["unit_Bk"].shape), kwargs["unit_Bk"].dtype,
                      tuple(kwargs["logits_BkV"].shape), kwargs["logits_BkV"].dtype))
        return kwargs

    pipe(class_labels=[1, 3], generator=seeds(0, 1), callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["unit_Bk", "logits_BkV"], output_type="latent")
    assert calls == [(i, i, (2, k), torch.int64, (2, k, 64), torch.float32) for i in range(units)]
    assert pipe.num_timesteps == units
    seen = []
    pipe(class_labels=[1], generator=seeds(0), callback_on_step_end=lambda p, i, t, kw: seen.append(set(kw)))
    assert seen == [{"unit_Bk"}] * units  # the default tensor inputs; returning None keeps the step


@pytest.mark.parametrize("window", [1, 2])
def test_replacing_units_is_teacher_forcing_them(window):
    """Units replaced in the callback are what the later steps condition on: the codes equal a run of the loop with
    those units teacher-forced, and the images are their decoding."""
    pipe = raster(window)
    k = window * window
    forced_BMk = torch.tensor([[[5] * k, [9] * k], [[17] * k, [3] * k]])  # the first two units of two images

    def replace_first_two(p, step_index, timestep, kwargs):
        return {"unit_Bk": forced_BMk[:, step_index]} if step_index < 2 else kwargs

    def call(output_type):  # fresh generators each time: a used generator would give other noise
        return pipe(class_labels=[0, 4], generator=seeds(7, 8), callback_on_step_end=replace_first_two,
                    output_type=output_type).images

    latents = call("latent")
    cond, _ = pipe.encode_condition(None, [0, 4], 1)
    forced = generate_next_token(pipe.transformer, cond, 2, guidance_scale=2.0,
                                 guidance_schedule=guidance_schedule_named("constant"),
                                 sampling=TokenSampling(top_k=0, top_p=1.0, temperature=1.0), generators=seeds(7, 8),
                                 forced_units_BMk=forced_BMk)
    assert latents.shape == (2, GRID * GRID) and latents.dtype == torch.int64
    assert torch.equal(latents, forced.tokens_BL)
    assert torch.equal(pipe.transformer.to_units(latents)[:, :2], forced_BMk)
    free = pipe(class_labels=[0, 4], generator=seeds(7, 8), output_type="latent").images
    assert not torch.equal(pipe.transformer.to_units(free)[:, 2:], forced.units_BNk[:, 2:])  # the forcing mattered
    images = call("pt")
    assert torch.allclose(images, pipe.decode_latents(latents, output_type="pt").images, atol=1e-6)


def test_raster_interrupt_stops_after_the_step():
    pipe = raster(2)  # four 2x2 windows

    stop_after_two = interrupt_after(1)
    latents = pipe(class_labels=[2], generator=seeds(3), callback_on_step_end=stop_after_two,
                   output_type="latent").images
    full = pipe(class_labels=[2], generator=seeds(3), output_type="latent").images
    made = pipe.transformer.to_units(latents)
    assert torch.equal(made[:, :2], pipe.transformer.to_units(full)[:, :2]) and (made[:, 2:] == -1).all()
    assert not pipe.interrupt  # the next call starts afresh
    images = pipe(class_labels=[2], generator=seeds(3), callback_on_step_end=stop_after_two, output_type="pt").images
    assert images.shape == (1, 3, 16, 16)
    assert torch.allclose(images, pipe.decode_latents(latents, output_type="pt").images, atol=1e-6)
    assert (images[:, :, 8:] == 0).all() and images[:, :, :8].abs().sum() > 0  # the windows not made are black


def test_raster_latent_output_round_trips_and_bad_input_is_one_clear_error():
    pipe = raster(1)
    latents = pipe(class_labels=[1, 2], generator=seeds(5, 6), output_type="latent").images
    assert latents.shape == (2, GRID * GRID) and latents.dtype == torch.int64 and (latents >= 0).all()
    images = pipe(class_labels=[1, 2], generator=seeds(5, 6), output_type="pt").images
    assert torch.allclose(pipe.decode_latents(latents, output_type="pt").images, images, atol=1e-6)
    assert len(pipe.decode_latents(latents).images) == 2
    assert pipe(class_labels=[1], generator=seeds(5), output_type="latent", return_dict=False)[0].shape == (1, 16)
    with pytest.raises(UserError, match=r"latents must be code ids \(B, 16\) in raster order"):
        pipe.decode_latents(latents[:, :7])
    keep = lambda p, i, t, kwargs: kwargs  # noqa: E731
    with pytest.raises(UserError, match="'latents' not available in RasterARPipeline; its step tensors: unit_Bk, "
                                        "logits_BkV"):
        pipe(class_labels=[0], callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    with pytest.raises(UserError, match="'logits_BkV' is read-only .* may replace: unit_Bk"):
        pipe(class_labels=[0], callback_on_step_end_tensor_inputs=["logits_BkV"],
             callback_on_step_end=lambda p, i, t, kw: {"logits_BkV": kw["logits_BkV"] * 0})
    with pytest.raises(UserError, match=r"replacement unit_Bk holds token ids outside \[0, 64\)"):
        pipe(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: {"unit_Bk": kw["unit_Bk"] + 64})
    with pytest.raises(UserError, match="callback_on_step_end works with plain next-token sampling"):
        pipe(class_labels=[0], speculative="sjd", callback_on_step_end=keep)


def test_raster_progress_bar_counts_the_units():
    pipe = raster(2)
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, desc="units", disable=False)
    pipe(class_labels=[0], generator=seeds(0))
    assert "units: 100%" in stream.getvalue() and "4/4" in stream.getvalue()


# -- FlowAR -----------------------------------------------------------------------------------------------------


def test_flowar_callback_sees_every_scale_with_the_declared_tensors(flowar):
    calls = []

    def record(p, step_index, timestep, kwargs):
        assert p is flowar and set(kwargs) == {"x_clean", "velocity"}
        calls.append((step_index, timestep, tuple(kwargs["x_clean"].shape), tuple(kwargs["velocity"].shape),
                      kwargs["velocity"].dtype, bool(torch.isfinite(kwargs["velocity"]).all())))
        return kwargs

    flowar(class_labels=[1, 2], generator=seeds(0, 1), callback_on_step_end=record,
           callback_on_step_end_tensor_inputs=["x_clean", "velocity"], output_type="latent")
    assert calls == [(i, i, (2, s * s, 4), (2, s * s, 4), torch.float32, True) for i, s in enumerate(SCALES)]
    assert flowar.num_timesteps == len(SCALES)


def test_replacing_a_scale_is_what_the_later_scales_condition_on(flowar):
    """A scale replaced in the callback is committed in place of the generated one: the same as the loop's own
    replacement hook (on_unit), and the latents differ from an unreplaced run."""
    fixed = torch.linspace(-1, 1, 2 * 4 * 4).view(2, 4, 4)  # scale 1: 2x2 tokens of 4 channels, two images

    def replace_scale_one(p, step_index, timestep, kwargs):
        return {"x_clean": fixed} if step_index == 1 else kwargs

    def call(output_type):
        return flowar(class_labels=[3, 5], generator=seeds(2, 4), callback_on_step_end=replace_scale_one,
                      output_type=output_type).images

    latents = call("latent")
    cond, _ = flowar.encode_condition(None, [3, 5], 1)
    out = generate_flow_units(flowar.transformer, cond, 2, time_grid=flowar_time_grid(2), integrator=EulerODE(),
                              guidance_scale=3.0, guidance_schedule=WeightRampCFG(), guidance_interval=(0.0, 0.9),
                              generators=seeds(2, 4), on_unit=lambda k, x: fixed if k == 1 else None)
    assert torch.equal(out.units[1], fixed)
    assert latents.shape == (2, 4, 4, 4)
    assert torch.allclose(latents, flowar.transformer.tokens_to_latents(out.units[-1]), atol=1e-6)
    free = flowar(class_labels=[3, 5], generator=seeds(2, 4), output_type="latent").images
    assert (free - latents).abs().max() > 1e-3
    images = call("pt")
    assert torch.allclose(images, flowar.decode_latents(latents, output_type="pt").images, atol=1e-6)
    with pytest.raises(UserError, match="'velocity' is read-only .* may replace: x_clean"):
        flowar(class_labels=[0], callback_on_step_end_tensor_inputs=["velocity"],
               callback_on_step_end=lambda p, i, t, kw: {"velocity": kw["velocity"] * 0})
    with pytest.raises(UserError, match="'latents' not available in FlowARPipeline; its step tensors: x_clean, "
                                        "velocity"):
        flowar(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: kw,
               callback_on_step_end_tensor_inputs=["latents"])


def test_flowar_interrupt_stops_after_the_scale(flowar):
    stop_after_two = interrupt_after(1, record="x_clean")
    scales = stop_after_two.seen
    latents = flowar(class_labels=[4], generator=seeds(9), callback_on_step_end=stop_after_two,
                     output_type="latent").images
    assert len(scales) == 2 and latents.shape == (1, 4, 2, 2)
    assert torch.equal(latents, flowar.transformer.unpatchify(scales[1]))
    full = []
    flowar(class_labels=[4], generator=seeds(9), output_type="latent",
           callback_on_step_end=lambda p, i, t, kw: full.append(kw["x_clean"]))
    assert len(full) == 3 and torch.allclose(full[1], scales[1], atol=1e-6) and not flowar.interrupt
    images = flowar(class_labels=[4], generator=seeds(9), callback_on_step_end=stop_after_two, output_type="pt").images
    assert images.shape == (1, 3, 8, 8)
    assert torch.allclose(images, flowar.decode_latents(latents, output_type="pt").images, atol=1e-6)


def test_flowar_latent_output_round_trips(flowar):
    latents = flowar(class_labels=[1, 2], generator=seeds(5, 6), output_type="latent").images
    assert latents.shape == (2, 4, 4, 4) and latents.dtype == torch.float32
    images = flowar(class_labels=[1, 2], generator=seeds(5, 6), output_type="pt").images
    assert torch.allclose(flowar.decode_latents(latents, output_type="pt").images, images, atol=1e-6)
    bare = flowar(class_labels=[1, 2], generator=seeds(5, 6), return_latents=True)
    assert torch.equal(bare, latents)
    with pytest.raises(UserError, match=r"latents must be \(B, 4, h, h\) with h one of the scales' sides 1, 2, 4"):
        flowar.decode_latents(latents[:, :, :3, :3])


def test_flowar_unconditional_images(flowar):
    images = flowar(unconditional=True, num_images_per_prompt=2, generator=seeds(0, 1), output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    # the null class through the loop directly: the same images
    out = generate_flow_units(flowar.transformer, flowar.transformer.null_condition(2), 2,
                              time_grid=flowar_time_grid(2), integrator=EulerODE(), guidance_scale=3.0,
                              guidance_schedule=WeightRampCFG(), guidance_interval=(0.0, 0.9), generators=seeds(0, 1))
    expected = flowar.latents_to_images(flowar.transformer.tokens_to_latents(out.units[-1]))
    assert torch.allclose(images, expected, atol=1e-6)
    labelled = flowar(class_labels=[0, 0], generator=seeds(0, 1), output_type="pt").images
    assert (labelled - images).abs().max() > 1e-4
    with pytest.raises(UserError, match="unconditional images take no prompt and no class labels"):
        flowar(unconditional=True, class_labels=[1])


def test_vgen_generate_unconditional_with_a_flowar_folder(flowar, tmp_path):
    from vgen.cli import main

    flowar.save_pretrained(tmp_path / "flowar")
    assert main(["generate", "--model", str(tmp_path / "flowar"), "--unconditional", "--n", "2", "--seed", "0",
                 "--out-dir", str(tmp_path / "out")]) == 0
    assert len(sorted((tmp_path / "out").glob("*.png"))) == 2


# -- NFIG (VARPipeline over the FR-VAE's frequency bands) ---------------------------------------------------------


@pytest.fixture(scope="module")
def nfig():
    pipe = tiny_nfig_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_nfig_callback_sees_every_band_and_interrupt_keeps_the_lower_bands(nfig):
    calls = []

    def record_and_stop(p, step_index, timestep, kwargs):
        calls.append((step_index, timestep, tuple(kwargs["idx_Bl"].shape), tuple(kwargs["f_hat"].shape)))
        if step_index == 1:
            p._interrupt = True
        return kwargs

    latents = nfig(prompt=PROMPT, generator=seeds(0), callback_on_step_end=record_and_stop,
                   callback_on_step_end_tensor_inputs=["idx_Bl", "f_hat"], output_type="latent").images
    assert calls == [(0, 1, (1, 1), (1, 16, 8, 8)), (1, 2, (1, 4), (1, 16, 8, 8))]  # bands 1x1, 2x2 of 1, 2, 4, 8
    full = nfig(prompt=PROMPT, generator=seeds(0), output_type="latent").images
    assert full.shape == (1, sum(pn * pn for pn in BANDS)) and torch.equal(latents, full[:, :5])
    images = nfig(prompt=PROMPT, generator=seeds(0), callback_on_step_end=record_and_stop,
                  callback_on_step_end_tensor_inputs=["idx_Bl", "f_hat"], output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and len(calls) == 4
    # the image of the two lowest bands is the decoding of their codes
    assert torch.allclose(images, nfig.decode_latents(latents, output_type="pt").images, atol=1e-5)
    finished = nfig(prompt=PROMPT, generator=seeds(0), output_type="pt").images
    assert torch.allclose(finished, nfig.decode_latents(full, output_type="pt").images, atol=1e-5)
    assert (finished - images).abs().max() > 1e-3


# -- the shared end of __call__ --------------------------------------------------------------------------------


def test_latent_output_decodes_nothing(flowar, monkeypatch):
    """``output_type="latent"`` and ``return_latents`` return before any decoding (VGenPipeline.call_output)."""
    pipe = raster(1)

    def no_decoding(latents):
        raise AssertionError("latent output decoded its latents")

    for p, condition in ((pipe, [1]), (flowar, [1])):
        monkeypatch.setattr(p, "latents_to_images", no_decoding)
        latents = p(class_labels=condition, generator=seeds(0), output_type="latent").images
        assert latents.shape[0] == 1
        assert p(class_labels=condition, generator=seeds(0), output_type="latent", return_dict=False)[0].shape == \
            latents.shape
    assert torch.equal(flowar(class_labels=[1], generator=seeds(0), return_latents=True),
                       flowar(class_labels=[1], generator=seeds(0), output_type="latent").images)
