"""The block-causal loop, VideoPipeline (generation, streaming, cache modes, saved options) and the video CLI, on a
tiny random autoencoder + transformer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vgen.data.moving_shapes import MOTION_VOCABULARY
from vgen.errors import UserError
from vgen.models.forcing_kv import HeadProfile, model_fingerprint
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.samplers.block_causal import BlockCausalSampler, BlockSampling, generate_blocks
from vgen.samplers.flow_grids import shifted_time_grid
from vgen.samplers.flow_transitions import DenoiseRenoise, EulerODE

from test_video_model import text_condition, tiny_model
from step_callbacks import interrupt_after, seeds

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right"


def tiny_pipeline(**defaults):
    from vgen.pipelines.video import VideoPipeline
    from vgen.tokenizers.kl_autoencoder import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(z_channels=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=4,
                                encoder_attn_levels=(), scale_factor=1.0).eval()
    text_encoder = ShapesTextEncoder(vocabulary=list(MOTION_VOCABULARY), embed_dim=16, depth=1, num_heads=2)
    transformer = tiny_model(frames_per_block=2, max_frames=8)
    pipe = VideoPipeline(autoencoder=autoencoder, transformer=transformer, text_encoder=text_encoder,
                         **{f"default_{k}": v for k, v in defaults.items()})
    pipe.set_progress_bar_config(disable=True)
    pipe.head_profile = HeadProfile([[0.9, 0.1], [0.2, 0.95]], fingerprint=model_fingerprint(transformer))
    return pipe


# -- the loop ---------------------------------------------------------------------------------------------------------


def test_denoise_renoise_predicts_then_renoises():
    x, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t_cur, t_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    step = DenoiseRenoise().transition(x, v, t_cur, t_next, 0, 3)
    x0 = x - 0.8 * v
    torch.testing.assert_close(step.mean, 0.5 * x0)
    assert float(step.std) == 0.5 and step.stochastic
    eps = torch.randn_like(x)
    torch.testing.assert_close(step.sample(eps), 0.5 * x0 + 0.5 * eps)
    last = DenoiseRenoise().transition(x, v, t_cur, torch.tensor(0.0, dtype=torch.float64), 2, 3)
    assert not last.stochastic and torch.equal(last.mean, x0)
    grid = shifted_time_grid(4, 5.0)
    torch.testing.assert_close(grid, torch.tensor([1, 0.9375, 5 / 6, 0.625, 0], dtype=torch.float64))


class _MeanFlow:
    """A mock BlockCausalModel whose velocity makes every block converge to ``mean`` (the cache is not read); it
    records the calls the loop makes."""

    frames_per_block, block_shape, device = 2, (2, 1, 2, 2), torch.device("cpu")

    def __init__(self, mean):
        self.mean, self.calls = mean, []

    def concat_conditions(self, cond, uncond):
        return torch.cat([cond, uncond])

    def null_condition(self, batch):
        return torch.zeros(batch)

    def start(self, cond, cache=None, max_frames=None):
        from types import SimpleNamespace

        return SimpleNamespace(cache=None, cond=cond, frame=0)

    def switch_condition(self, state, cond):
        state.cond = cond

    def block_velocity(self, x_t, t_R, state):
        self.calls.append(("velocity", x_t.shape[0], state.frame))
        target = self.mean * state.cond.view(-1, 1, 1, 1, 1)  # the condition scales the block's clean value
        return (x_t - target) / t_R.view(-1, 1, 1, 1, 1)  # the exact flow velocity towards target

    def commit_block(self, x_clean, state):
        self.calls.append(("commit", x_clean.shape[0], state.frame))
        state.frame += self.frames_per_block


@pytest.mark.parametrize("integrator", [EulerODE(), DenoiseRenoise()])
def test_block_loop_reaches_the_clean_block_and_commits_each_block_once(integrator):
    model = _MeanFlow(mean=2.0)
    sampling = BlockSampling(shifted_time_grid(3, 2.0), integrator)
    sampler = BlockCausalSampler(model, torch.ones(2), 2, sampling, [torch.Generator().manual_seed(i)
                                                                        for i in range(2)])
    blocks = list(sampler.blocks(3))
    assert [b.index for b in blocks] == [0, 1, 2] and [b.first_frame for b in blocks] == [0, 2, 4]
    for b in blocks:
        torch.testing.assert_close(b.latents, torch.full((2, 2, 1, 2, 2), 2.0), atol=1e-5, rtol=0)
        assert b.timings.denoise >= 0 and b.timings.commit >= 0
    commits = [c for c in model.calls if c[0] == "commit"]
    assert commits == [("commit", 2, 0), ("commit", 2, 2)]  # the last block is not committed: nothing reads it
    assert sum(c[0] == "velocity" for c in model.calls) == 3 * 3


def test_block_loop_cfg_doubles_rows_and_switches_prompts():
    model = _MeanFlow(mean=1.0)
    sampler = BlockCausalSampler(model, torch.ones(1), 1, BlockSampling(shifted_time_grid(2), EulerODE(), 2.0))
    first = sampler.step()
    sampler.set_condition(torch.full((1,), 3.0))
    second = sampler.step()
    assert {c[1] for c in model.calls} == {2}  # conditional and unconditional rows together
    # guided v = v_u + 2 (v_c - v_u): the clean block goes to 2 * target(cond) - target(null) = 2 * cond
    torch.testing.assert_close(first.latents, torch.full_like(first.latents, 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(second.latents, torch.full_like(second.latents, 6.0), atol=1e-5, rtol=0)


def test_noise_is_per_video_so_batches_do_not_matter():
    model = tiny_model()
    sampling = BlockSampling(shifted_time_grid(2, 2.0), DenoiseRenoise())
    cond = text_condition(model, 3)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    with torch.no_grad():
        batch = generate_blocks(model, cond, 3, 2, sampling, gens([5, 6, 7]))
        alone = generate_blocks(model, cond.rows(1, 2), 1, 2, sampling, gens([6]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)


# -- the pipeline -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["full", "sink_window", "forcing_kv"])
def test_pipeline_generates_every_cache_mode_past_the_training_length(cache):
    pipe = tiny_pipeline()
    out = pipe(PROMPT, num_frames=12, generator=torch.Generator().manual_seed(0), cache=cache, window_frames=3,
               segments_per_frame=2, dynamic_segments=1)
    frames = out.frames
    assert frames.shape == (1, 12, 32, 32, 3) and frames.dtype == np.float32
    assert 0 <= frames.min() and frames.max() <= 1 and out.prompts == [PROMPT]


def test_stream_yields_blocks_and_switches_prompt():
    pipe = tiny_pipeline()
    stream = pipe.stream(PROMPT, num_frames=8, generator=torch.Generator().manual_seed(1), cache="sink_window")
    blocks = []
    for block in stream:
        blocks.append(block)
        if block.index == 1:
            stream.set_prompt("a blue square moving up")
    assert [b.first_frame for b in blocks] == [0, 2, 4, 6]
    assert blocks[0].frames.shape == (1, 2, 32, 32, 3) and blocks[0].frames.dtype == np.uint8
    assert all(b.elapsed > 0 and b.decode_seconds >= 0 for b in blocks)
    assert blocks[-1].elapsed >= blocks[0].elapsed
    full = pipe(PROMPT, num_frames=8, generator=torch.Generator().manual_seed(1), cache="sink_window",
                output_type="latent").frames
    streamed = torch.cat([b.latents for b in blocks], 1)
    torch.testing.assert_close(streamed[:, :4], full[:, :4])  # same prompt, same noise until the switch
    assert not torch.allclose(streamed[:, 4:], full[:, 4:])  # the new prompt changes the later blocks


def test_saved_defaults_and_head_profile_round_trip(tmp_path):
    from vgen.pipelines.video import VideoPipeline

    pipe = tiny_pipeline(cache="forcing_kv", num_steps=3, sampler="euler", guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "head_profile.json").is_file()
    again = VideoPipeline.from_pretrained(tmp_path)
    assert again.resolve_sampling()["cache"] == "forcing_kv" and again.resolve_sampling()["num_steps"] == 3
    assert again.head_profile.static_mask().tolist() == pipe.head_profile.static_mask().tolist()
    a = pipe(PROMPT, num_frames=4, generator=torch.Generator().manual_seed(2), output_type="latent").frames
    b = again(PROMPT, num_frames=4, generator=torch.Generator().manual_seed(2), output_type="latent").frames
    torch.testing.assert_close(a, b)


def test_pipeline_bad_inputs_are_one_line_errors():
    pipe = tiny_pipeline()
    with pytest.raises(UserError, match="multiple of this model's block size"):
        pipe(PROMPT, num_frames=7)
    with pytest.raises(UserError, match="cache 'ring' is not valid"):
        pipe(PROMPT, cache="ring")
    with pytest.raises(UserError, match="unknown word"):
        pipe("a red circle moving sideways")
    pipe.head_profile = HeadProfile([[0.9, 0.1], [0.2, 0.95]], fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match="made for another model"):
        pipe(PROMPT, cache="forcing_kv")
    pipe.head_profile = None
    with pytest.raises(UserError, match="needs a head profile"):
        pipe(PROMPT, cache="forcing_kv")


# -- the command line (subprocesses) ------------------------------------------------------------------------------


def _vgen(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vgen", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.slow
def test_generate_video_and_profile_heads_in_subprocesses(tmp_path):
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    (model / "head_profile.json").unlink()
    done = _vgen("profile-heads", "--model", str(model), "--clips", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["static"] + json.loads(done.stdout)["dynamic"] == 4
    assert (model / "head_profile.json").is_file()
    for out in ("clip.gif", "strip.png"):
        done = _vgen("generate-video", PROMPT, "--model", str(model), "--frames", "6", "--cache", "forcing_kv",
                     "--switch-at", "4", "a blue square moving up", "--out", str(tmp_path / out), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / out).stat().st_size > 0
    settings = json.loads((tmp_path / "strip.json").read_text())
    assert settings["frames"] == 6 and settings["cache"] == "forcing_kv" and settings["switch_at"] == {
        "4": "a blue square moving up"}
    bad = _vgen("generate-video", PROMPT, "--model", str(model), "--frames", "5", "--out", "x.gif", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "multiple of this model's block size" in bad.stderr
    bad = _vgen("generate-video", PROMPT, "--model", str(model), "--out", "x.avi", cwd=tmp_path)
    assert bad.returncode == 2 and "must end in .mp4, .gif, .png" in bad.stderr


def test_mp4_needs_the_video_extra_or_writes_h264(tmp_path, monkeypatch):
    from vgen.video_io import MP4_MISSING, save_video

    video = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install 'vgen\\[video\\]'"):
            save_video([video], tmp_path / "a.mp4")
        return
    path = save_video([video, video], tmp_path / "a.mp4", scale=2)
    import imageio.v2 as imageio

    frames = imageio.mimread(str(path))
    assert len(frames) == 6 and frames[0].shape == (64, 130, 3)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if the extra were missing
    with pytest.raises(UserError) as err:
        save_video([video], tmp_path / "b.mp4")
    assert str(err.value) == MP4_MISSING


def test_ship_script_writes_fp16_weights_with_a_valid_head_profile(tmp_path):
    import importlib.util

    from vgen.pipelines.video import VideoPipeline

    spec = importlib.util.spec_from_file_location("ship_video_model",
                                                  REPO / "configs" / "moving_shapes" / "ship_video_model.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    from vgen.eval.video_eval import evaluate_video_model

    trained = tmp_path / "final"
    tiny_pipeline().save_pretrained(trained)
    report = evaluate_video_model(VideoPipeline.from_pretrained(trained), videos=2, lengths=(1,),
                                  modes=("full", "forcing_kv"),
                                  batch_size=2, workers=1, log=lambda line: None)
    assert report["settings"]["model"] == str(trained.resolve())
    (tmp_path / "eval.json").write_text(json.dumps(report))
    out = tmp_path / "shipped"
    assert ship.main([str(trained), "--eval", str(tmp_path / "eval.json"), "--out", str(out),
                      "--cache", "forcing_kv"]) == 0
    card = (out / "README.md").read_text()
    kv = next(row for row in report["results"] if row["mode"] == "forcing_kv")  # the shipped default cache
    assert f"| caption adherence, forcing_kv cache | {round(kv['caption_adherence'], 4):g} |" in card
    assert "full cache" not in card
    assert "--model shipped " in card and ".tmp" not in card
    assert "per-frame Shapes-FID, real renders of the same captions (ceiling)" in card
    from safetensors.torch import load_file

    weights = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert all(t.dtype == torch.float16 for t in weights.values() if t.is_floating_point())
    shipped = VideoPipeline.from_pretrained(out)
    assert shipped.resolve_sampling()["cache"] == "forcing_kv"
    shipped.head_profile.check_model(shipped.transformer)  # the fp32 profile fits the fp16 copy
    assert "final" not in json.loads((out / "model_index.json").read_text())["_name_or_path"]
    other = tmp_path / "other"
    tiny_pipeline().save_pretrained(other)  # a report of another folder is refused
    assert ship.main([str(other), "--eval", str(tmp_path / "eval.json"), "--out", str(tmp_path / "again")]) == 2
    (trained / "head_profile.json").unlink()
    assert ship.main([str(trained), "--eval", str(tmp_path / "eval.json"), "--out", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()


def test_image_commands_refuse_a_video_model_in_one_line(tmp_path):
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    done = _vgen("generate", PROMPT, "--model", str(model), "--out", str(tmp_path / "g.png"), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "vgen generate-video" in done.stderr


# -- diffusers conventions: a step callback per block, interruption, latent output ----------------------------------


class _Hook:
    """A :class:`vgen.samplers.step_end.StepEnd` hook: records the tensors, replaces ``x_clean`` of the blocks in
    ``replace`` and is interrupted after block ``stop_after``."""

    def __init__(self, replace=None, stop_after=None):
        self.replace, self.stop_after, self.seen, self.interrupted = replace or {}, stop_after, [], False

    def __call__(self, step_index, timestep, tensors):
        self.seen.append((step_index, timestep, {k: v.clone() for k, v in tensors.items()}))
        self.interrupted = step_index == self.stop_after
        if step_index in self.replace:
            return {**tensors, "x_clean": self.replace[step_index]}
        return tensors


class _RecordingMeanFlow(_MeanFlow):
    def commit_block(self, x_clean, state):
        self.committed = getattr(self, "committed", []) + [x_clean.clone()]
        super().commit_block(x_clean, state)


def test_block_loop_hook_replaces_what_is_committed_and_stops_after_the_block():
    model = _RecordingMeanFlow(mean=2.0)
    sampling = BlockSampling(shifted_time_grid(3, 2.0), EulerODE())
    fixed = torch.full((1, 2, 1, 2, 2), -5.0)
    hook = _Hook(replace={1: fixed}, stop_after=2)
    blocks = list(BlockCausalSampler(model, torch.ones(1), 1, sampling, seeds(0)).blocks(4, on_step_end=hook))
    assert [b.index for b in blocks] == [0, 1, 2]  # stopped after block 2 of 4
    assert [(i, t, sorted(kw)) for i, t, kw in hook.seen] == [(i, i, ["noise", "x_clean"]) for i in range(3)]
    assert torch.equal(blocks[1].latents, fixed) and torch.equal(model.committed[1], fixed)
    assert len(model.committed) == 2  # the interrupted block is not committed: nothing reads it
    torch.testing.assert_close(hook.seen[0][2]["noise"], torch.randn((1, 2, 1, 2, 2), generator=seeds(0)[0]))
    plain = list(BlockCausalSampler(_MeanFlow(mean=2.0), torch.ones(1), 1, sampling, seeds(0)).blocks(3))
    torch.testing.assert_close(blocks[0].latents, plain[0].latents, atol=0, rtol=0)  # a hook alone changes nothing


def test_video_callback_sees_every_block_with_the_declared_tensors():
    pipe = tiny_pipeline()
    calls = []

    def record(p, step_index, timestep, kwargs):
        assert p is pipe and set(kwargs) == {"x_clean", "noise"}
        calls.append((step_index, timestep, tuple(kwargs["x_clean"].shape), kwargs["x_clean"].dtype,
                      tuple(kwargs["noise"].shape), kwargs["noise"].dtype))
        return kwargs

    latents = pipe(PROMPT, num_frames=8, num_videos_per_prompt=2, generator=seeds(0, 1), output_type="latent",
                   callback_on_step_end=record, callback_on_step_end_tensor_inputs=["x_clean", "noise"]).frames
    block = (2, *pipe.transformer.block_shape)
    assert calls == [(i, i, block, torch.float32, block, torch.float32) for i in range(4)]
    assert pipe.num_timesteps == 4 and latents.shape == (2, 8, *pipe.transformer.block_shape[1:])
    seen = []
    pipe(PROMPT, num_frames=4, generator=seeds(0), callback_on_step_end=lambda p, i, t, kw: seen.append(set(kw)))
    assert seen == [{"x_clean"}] * 2  # the default tensor inputs; returning None keeps the block


def test_replacing_a_block_is_what_the_later_blocks_condition_on():
    """A block replaced in the callback is the video's block and what the KV cache stores: the later blocks equal
    the loop's own split (denoise, then commit the replacement), and differ from an unreplaced run."""
    pipe = tiny_pipeline(num_steps=2)
    fixed = torch.linspace(-1, 1, 2 * 4 * 8 * 8).view(1, 2, 4, 8, 8)
    assert tuple(fixed.shape[1:]) == tuple(pipe.transformer.block_shape)

    def replace_block_one(p, step_index, timestep, kwargs):
        return {"x_clean": fixed} if step_index == 1 else kwargs

    def call(output_type):
        return pipe(PROMPT, num_frames=8, generator=seeds(3), output_type=output_type,
                    callback_on_step_end=replace_block_one).frames

    latents = call("latent")
    sampler, _ = pipe._sampler(PROMPT, 1, seeds(3), 8, {})
    expected = []
    for index in range(4):
        block = sampler.denoise()
        block = fixed if index == 1 else block
        expected.append(block)
        sampler.commit(block)
    assert torch.equal(latents[:, 2:4], fixed)
    torch.testing.assert_close(latents, torch.cat(expected, 1), atol=1e-6, rtol=0)
    free = pipe(PROMPT, num_frames=8, generator=seeds(3), output_type="latent").frames
    torch.testing.assert_close(free[:, :2], latents[:, :2], atol=0, rtol=0)  # the block before it did not change
    assert (free[:, 4:] - latents[:, 4:]).abs().max() > 1e-3  # the later blocks saw the replacement
    frames = call("np")
    np.testing.assert_allclose(frames, pipe.decode_latents(latents).frames, atol=1e-6)
    with pytest.raises(UserError, match="'noise' is read-only .* may replace: x_clean"):
        pipe(PROMPT, num_frames=4, callback_on_step_end_tensor_inputs=["noise"],
             callback_on_step_end=lambda p, i, t, kw: {"noise": kw["noise"] * 0})
    with pytest.raises(UserError, match="'latents' not available in VideoPipeline; its step tensors: x_clean, noise"):
        pipe(PROMPT, num_frames=4, callback_on_step_end=lambda p, i, t, kw: kw,
             callback_on_step_end_tensor_inputs=["latents"])


def test_video_interrupt_stops_after_the_block_with_the_frames_made_so_far():
    pipe = tiny_pipeline()

    stop_after_two = interrupt_after(1)
    out = pipe(PROMPT, num_frames=8, generator=seeds(4), callback_on_step_end=stop_after_two, output_type="latent")
    full = pipe(PROMPT, num_frames=8, generator=seeds(4), output_type="latent").frames
    assert out.frames.shape == (1, 4, 4, 8, 8) and out.prompts == [PROMPT] and not pipe.interrupt
    torch.testing.assert_close(out.frames, full[:, :4], atol=0, rtol=0)
    frames = pipe(PROMPT, num_frames=8, generator=seeds(4), callback_on_step_end=stop_after_two).frames
    assert frames.shape == (1, 4, 32, 32, 3)
    np.testing.assert_allclose(frames, pipe.decode_latents(out.frames).frames, atol=1e-6)


def test_video_latent_output_round_trips_through_decode_latents():
    pipe = tiny_pipeline()
    latents = pipe(PROMPT, num_frames=4, num_videos_per_prompt=2, generator=seeds(5, 6), output_type="latent").frames
    assert latents.shape == (2, 4, 4, 8, 8) and latents.dtype == torch.float32
    for output_type in ("np", "pt"):
        made = pipe(PROMPT, num_frames=4, num_videos_per_prompt=2, generator=seeds(5, 6),
                    output_type=output_type).frames
        decoded = pipe.decode_latents(latents, output_type=output_type)
        assert decoded.prompts == [] and type(decoded.frames) is type(made)
        np.testing.assert_allclose(np.asarray(decoded.frames), np.asarray(made), atol=1e-6)
    clips = pipe.decode_latents(latents, output_type="pil").frames
    assert len(clips) == 2 and len(clips[0]) == 4 and clips[0][0].size == (32, 32)
    assert pipe.decode_latents(latents, return_dict=False)[0].shape == (2, 4, 32, 32, 3)
    with pytest.raises(UserError, match=r"latents must be latent frames \(B, F, 4, 8, 8\) float"):
        pipe.decode_latents(latents[:, :, :3])
    with pytest.raises(UserError, match="decode_latents turns latents into frames"):
        pipe.decode_latents(latents, output_type="latent")


def test_video_card_and_progress_bar(tmp_path):
    import io

    from vgen.pipelines.video import VideoPipeline

    pipe = tiny_pipeline()
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, desc="blocks", disable=False)
    pipe(PROMPT, num_frames=6, generator=seeds(0))
    assert "blocks: 100%" in stream.getvalue() and "3/3" in stream.getvalue()
    pipe.save_pretrained(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert f'`output_type="latent"` returns {VideoPipeline.latent_description}' in card
    assert ".frames" in card and ".images" not in card and "text-to-video" in card
    assert f'frames = pipe(prompt="{PROMPT}", generator=torch.Generator().manual_seed(0)).frames' in card
    assert f'vgen generate-video "{PROMPT}" --model p --seed 0 --out clip.gif' in card
