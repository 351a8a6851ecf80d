"""Number-for-number parity with official FlowAR (OliverRensu/FlowAR @ 21835c0, read from the fork
wangqiang9/FlowAR) on the tiny random fixtures: ``flowar_tiny_*`` (Block_v1 spatial-AdaLN head, as FlowAR-S) and
``flowar_tiny_cross_*`` (Block_v2 cross-attention head, as FlowAR-L/H).

Measured on CPU in float32 (max abs error): teacher-forced AR condition <= 7.2e-7, head velocity <= 8.4e-7, loss
terms <= 1.8e-7, KV-cached AR condition of the sampling record <= 9.6e-7, each scale integrated by the shared Euler
sampler <= 4.8e-7, the whole deterministic sample <= 6.0e-7. The tolerance below (1e-5) sits an order above what is
measured and one (AR condition, velocity: 1e-4) or two (sample: 1e-3) below the issue's bounds.
"""

import pytest
import torch
from flow_parity import replay_flowar_scale
from vgen.samplers.flow_grids import flowar_time_grid
from vgen.samplers.flow_transitions import EulerODE
from vgen.samplers.flow_units import UnitNoise, generate_flow_units
from vgen.samplers.guidance import WeightRampCFG

from vgen.errors import UserError
from vgen.models.flowar_official import load_official_flowar

FIXTURES = ["flowar_tiny", "flowar_tiny_cross"]
TOL = 1e-5


def _load(parity_dir, name):
    io = torch.load(parity_dir / f"{name}_io.pt", weights_only=True)
    return io, load_official_flowar(parity_dir / f"{name}_model.pth")


@pytest.mark.parametrize("name", FIXTURES)
def test_config_is_read_from_the_tensors(parity_dir, name):
    io, model = _load(parity_dir, name)
    cfg, official = model.config, io["config"]
    assert tuple(cfg.scales) == tuple(official["scale"]) == (1, 2, 4, 8, 16)
    assert (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads) == (64, 1, 2)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (64, 1, 2)
    assert (cfg.flow_depth, cfg.flow_width, cfg.flow_num_heads) == (1, 128, official["flow_num_heads"])
    assert cfg.flow_head == ("cross_attention" if official["cross"] else "spatial_adaln")
    assert cfg.num_classes == 1000 and cfg.latent_channels == 16 and not model.training
    # the recomputed buffers are the official ones
    sd = torch.load(parity_dir / f"{name}_model.pth", weights_only=True)
    assert torch.equal(model.attn_mask[0, 0], sd["mask"][0, 0] == 0)
    for key, value in model.state_dict().items():
        if key.endswith("rope.freqs"):
            assert torch.allclose(value, sd[key], rtol=1e-6, atol=0), key


@pytest.mark.parametrize("name", FIXTURES)
def test_teacher_forced_ar_condition_matches_official(parity_dir, name):
    io, model = _load(parity_dir, name)
    tf = io["teacher_forcing"]
    with torch.no_grad():
        scale_latents = model.scale_latents(tf["latents"])
        ar_input = model.teacher_forcing_input(scale_latents)
        z = model.ar_condition(ar_input, model.class_condition(tf["labels"]))
    for k in range(5):
        assert torch.allclose(model.patchify(scale_latents[k]), tf["gt"][k], atol=1e-6, rtol=0)
    assert ar_input.shape == tf["ar_input"].shape == (2, 340, 16)
    assert (ar_input - tf["ar_input"]).abs().max().item() < 1e-6
    assert z.shape == tf["cond"].shape == (2, 341, 64)
    err = (z - tf["cond"]).abs().max().item()
    assert err < TOL, err


@pytest.mark.parametrize("name", FIXTURES)
def test_head_velocity_and_loss_match_official(parity_dir, name):
    io, model = _load(parity_dir, name)
    tf = io["teacher_forcing"]
    with torch.no_grad():
        for k, (start, end) in enumerate(model.begin_ends):
            v = model.flow_velocity(tf["x_t"][k], tf["t"][k], tf["cond"][:, start:end])
            err = (v - tf["v"][k]).abs().max().item()
            assert err < TOL, (k, err)
        out = model(tf["latents"], tf["labels"], t_per_scale=tf["t"], noise_per_scale=tf["noise"])
    for k in range(5):
        assert (out.v[k] - tf["v"][k]).abs().max().item() < TOL
        assert (out.loss_per_scale[k] - tf["loss_per_scale"][k]).abs().max().item() < TOL
    assert abs(out.loss.item() - tf["loss"].item()) < TOL


@pytest.mark.parametrize("name", FIXTURES)
def test_kv_cached_ar_condition_matches_the_sampling_record(parity_dir, name):
    """The step interface: prefill (scale 0 = the class token) and commit of each recorded clean scale (the
    conditional half repeated for both halves, as official) give the recorded AR conditions of the CFG batch."""
    io, model = _load(parity_dir, name)
    sample = io["sample"]
    with torch.no_grad():
        cond = model.concat_conditions(model.class_condition(sample["labels"]), model.null_condition(2))
        state, z = model.prefill(cond)
        errors = [(z - sample["ar_cond"][0]).abs().max().item()]
        for k in range(4):
            clean = sample["scale_out"][k][:2]
            z = model.commit(k, torch.cat([clean, clean]), state)
            errors.append((z - sample["ar_cond"][k + 1]).abs().max().item())
    assert max(errors) < TOL, errors
    assert state.cache.seq_len == 341


def test_flow_head_integrates_each_recorded_scale_as_official(parity_dir):
    """The head inside the shared Euler sampler (FlowAR's 24-step grid, CFG for t <= 0.9, the unconditional half on
    its own x) reproduces every recorded scale from its recorded noise and AR condition, and sees the same times."""
    io, model = _load(parity_dir, "flowar_tiny")
    sample = io["sample"]
    with torch.no_grad():
        for k in range(5):
            replay = replay_flowar_scale(model.flow_velocity, sample, k)
            assert (replay.out - sample["scale_out"][k]).abs().max().item() < TOL, k
            assert torch.equal(torch.stack([t[0] for t in replay.times]), sample["flow_t"][k])


def _official_sample(model, sample, noises=None):
    return generate_flow_units(
        model, model.class_condition(sample["labels"]), 2, time_grid=flowar_time_grid(sample["num_steps"]),
        integrator=EulerODE(), guidance_scale=sample["cfg"], guidance_schedule=WeightRampCFG(),
        guidance_interval=(0.0, sample["guidance"]), uncond_own_x=True, noises=noises, record=True,
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_deterministic_sample_matches_official(parity_dir, name):
    """The whole sample (5 scales, KV-cached AR steps, CFG ramp 1 -> 2.4, t-interval 0.9) from the recorded noise:
    measured <= 6e-7 against the official tokens (the issue asks 1e-3)."""
    io, model = _load(parity_dir, name)
    sample = io["sample"]
    with torch.no_grad():
        out = _official_sample(model, sample, noises=[UnitNoise(initial=n) for n in sample["noise"]])
    tokens = model.tokens_to_latents(out.units[-1])
    assert tokens.shape == sample["tokens"].shape == (2, 16, 16, 16)
    assert (tokens - sample["tokens"]).abs().max().item() < TOL
    for k in range(5):
        assert (out.units[k] - sample["scale_out"][k][:2]).abs().max().item() < TOL


def test_official_seed_draws_the_official_noise(parity_dir):
    """With the global RNG seeded as the official run (torch.manual_seed(3)), the loop draws the same noise in the
    same order (one randn of the CFG-doubled batch per scale) and ends at the official tokens."""
    io, model = _load(parity_dir, "flowar_tiny")
    sample = io["sample"]
    torch.manual_seed(sample["seed"])
    with torch.no_grad():
        out = _official_sample(model, sample)
    assert all(torch.equal(n.initial, ref) for n, ref in zip(out.noises, sample["noise"]))
    assert (model.tokens_to_latents(out.units[-1]) - sample["tokens"]).abs().max().item() < TOL


def test_mismatched_checkpoint_is_one_line(parity_dir, tmp_path):
    sd = torch.load(parity_dir / "flowar_tiny_model.pth", weights_only=True)
    del sd["z_proj.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UserError) as err:
        load_official_flowar(path)
    msg = str(err.value)
    assert "\n" not in msg and "missing key(s): z_proj.bias" in msg and "unexpected key(s): extra.weight" in msg


def test_checkpoint_without_buffers_loads_and_foreign_rope_is_refused(parity_dir):
    sd = torch.load(parity_dir / "flowar_tiny_model.pth", weights_only=True)
    tf = torch.load(parity_dir / "flowar_tiny_io.pt", weights_only=True)["teacher_forcing"]
    params = {k: v for k, v in sd.items() if k != "mask" and not k.endswith("rope.freqs")}
    with pytest.raises(UserError, match="cannot tell the number of heads"):
        load_official_flowar(params)  # width 64 is not an official one and no freqs say the head width
    model = load_official_flowar(params, encoder_num_heads=2, decoder_num_heads=2)
    with torch.no_grad():
        z = model.ar_condition(model.teacher_forcing_input(model.scale_latents(tf["latents"])),
                               model.class_condition(tf["labels"]))
    assert (z - tf["cond"]).abs().max().item() < TOL
    foreign = dict(sd)
    foreign["encoder_blocks.0.attn.rope.freqs"] = sd["encoder_blocks.0.attn.rope.freqs"] * 2
    with pytest.raises(UserError, match="not the official RoPE"):
        load_official_flowar(foreign)
