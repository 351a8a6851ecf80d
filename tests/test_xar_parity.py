"""Number-for-number parity with official xAR (OliverRensu/xAR @ 121e9c9) on the tiny random fixture ``xar_tiny_*``
(2 + 2 blocks of width 64, 2 heads, 16 x 16 grid in 2 x 2 cells of 8 x 8 tokens, 1001 classes).

Measured on CPU in float32 (max abs error): teacher-forced velocity of all 256 tokens 3.6e-7 (loss equal), every
recorded ``sample_inference`` call (including the two-cell refresh pass) 2.4e-7, each cell integrated by the shared
Euler-Maruyama sampler from the recorded clean cells <= 7.2e-7, the whole seeded sample 7.2e-7. The tolerance below
(1e-5) sits an order above what is measured and one (velocity: 1e-4) or two (sample: 1e-3) below the issue's bounds.
"""

import pytest
import torch
from flow_parity import replay_xar_cell
from vgen.samplers.flow_grids import xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE
from vgen.samplers.flow_units import UnitNoise, generate_flow_units
from vgen.samplers.guidance import WeightRampCFG

from vgen.errors import UserError
from vgen.models.xar_official import load_official_xar

TOL = 1e-5


@pytest.fixture
def fixture(parity_dir):
    io = torch.load(parity_dir / "xar_tiny_io.pt", weights_only=True)
    sd = torch.load(parity_dir / "xar_tiny_model.pth", weights_only=True)
    return io, sd, load_official_xar(parity_dir / "xar_tiny_model.pth")


def official_cells(latents):
    """The fixture README's statement of the official cell order: (B, 4, 64, C)."""
    B, C = latents.shape[:2]
    return latents.reshape(B, C, 2, 8, 2, 8).permute(0, 2, 4, 3, 5, 1).reshape(B, 4, 64, C)


def test_config_and_recomputed_buffers_are_official(fixture):
    _, sd, model = fixture
    cfg = model.config
    assert (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads) == (64, 2, 2)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (64, 2, 2)
    assert (cfg.grid_size, cfg.entity, cfg.entity_size, cfg.num_classes) == (16, "cell", 8, 1000)
    assert model.unit_shapes == [(64, 16)] * 4 and not model.training
    assert torch.equal(model.attn_mask[0, 0], sd["mask"][0, 0] == 0)
    # the RoPE table re-ordered into cell order is the official one, in every layer
    for key in (k for k in sd if k.endswith("rope.freqs_cos")):
        assert torch.equal(model.rope_cos, sd[key]), key
        assert torch.equal(model.rope_sin, sd[key.replace("_cos", "_sin")]), key


def test_cell_order_round_trips_and_matches_the_fixture(fixture):
    io, _, model = fixture
    latents = io["teacher_forcing"]["latents"]
    seq = model.latents_to_sequence(latents)
    assert torch.equal(seq, official_cells(latents).reshape(2, 256, 16))
    assert torch.equal(model.sequence_to_latents(seq), latents)
    assert torch.equal(model.units_to_latents(list(official_cells(latents).unbind(1))), latents)


def test_noisy_context_training_pass_matches_official(fixture):
    io, _, model = fixture
    tf = io["teacher_forcing"]
    t_BU = tf["t"].view(4, 2).T  # official: cell-major, t[2c + b]
    noise = tf["noise"].permute(1, 0, 2, 3).reshape(2, 256, 16)
    with torch.no_grad():
        out = model(tf["latents"], tf["labels"], t_BU=t_BU, noise_BLC=noise)
    t_BL1 = t_BU[:, model.unit_index, None]
    assert torch.equal((1 - t_BL1) * model.latents_to_sequence(tf["latents"]) + t_BL1 * noise, tf["x_t"])
    err = (out.v - tf["v"]).abs().max().item()
    assert out.v.shape == (2, 256, 16) and err < TOL, err
    assert abs(out.loss.item() - tf["loss"].item()) < TOL


def test_every_recorded_model_call_matches(fixture):
    """Steps 0 and 1 of cells 0 and 1 of the official CFG batch. At step 0 of cell 1 official feeds [clean cell 0,
    noisy cell 1] in one pass; here the clean cell is committed first, then the noisy cell attends to the cache."""
    io, _, model = fixture
    sample = io["sample"]
    with torch.no_grad():
        cond = model.concat_conditions(model.class_condition(sample["labels"]), model.null_condition(2))
        state, _ = model.prefill(cond)
        for call in sample["calls"]:
            assert torch.equal(call["y"], torch.tensor([*sample["labels"].tolist(), 1000, 1000]))
            if call["cell"] == 1 and call["step"] == 0:
                assert torch.equal(call["t"][:4], torch.zeros(4, dtype=torch.float64))
                model.commit(0, call["x"][:, :64], state)
            v = model.velocity(call["cell"], call["x"][:, -64:], call["t"][-4:].float(), state)
            err = (v - call["out"]).abs().max().item()
            assert err < TOL, (call["cell"], call["step"], err)


def test_each_cell_integrates_as_official(fixture):
    io, _, model = fixture
    sample = io["sample"]
    with torch.no_grad():
        cond = model.concat_conditions(model.class_condition(sample["labels"]), model.null_condition(2))
        for k in range(4):
            state, _ = model.prefill(cond)
            for j in range(k):
                clean = sample["cell_out"][j]
                model.commit(j, torch.cat([clean, clean]), state)
            replay = replay_xar_cell(lambda x, t, k=k, state=state: model.velocity(k, x, t, state), sample, k)
            assert (replay.out - sample["cell_out"][k]).abs().max().item() < TOL, k


def _official_sample(model, sample, **kwargs):
    return generate_flow_units(
        model, model.class_condition(sample["labels"]), 2, time_grid=xar_time_grid(sample["num_steps"]),
        integrator=EulerMaruyamaSDE(), guidance_scale=sample["cfg"], guidance_schedule=WeightRampCFG(), **kwargs)


def test_sample_from_the_recorded_noise_matches_official(fixture):
    io, _, model = fixture
    sample = io["sample"]
    noises = [UnitNoise(initial=sample["noise"][k], step_noise=list(sample["eps"][k])) for k in range(4)]
    with torch.no_grad():
        out = _official_sample(model, sample, noises=noises)
    for k in range(4):
        assert (out.units[k] - sample["cell_out"][k]).abs().max().item() < TOL
    assert (model.units_to_latents(out.units) - sample["tokens"]).abs().max().item() < TOL


def test_official_seed_draws_the_official_noise(fixture):
    """Seeded as the official run (torch.manual_seed(3)): the loop draws each cell's initial noise and its five SDE
    eps in the official order and ends at the official tokens (measured 7.2e-7; the issue asks 1e-3)."""
    io, _, model = fixture
    sample = io["sample"]
    torch.manual_seed(sample["seed"])
    with torch.no_grad():
        out = _official_sample(model, sample, record=True)
    for k, noise in enumerate(out.noises):
        assert torch.equal(noise.initial, sample["noise"][k])
        assert torch.equal(torch.stack(noise.step_noise), sample["eps"][k])
    err = (model.units_to_latents(out.units) - sample["tokens"]).abs().max().item()
    assert err < TOL, err


def test_mismatched_checkpoint_is_one_line(parity_dir, tmp_path):
    sd = torch.load(parity_dir / "xar_tiny_model.pth", weights_only=True)
    del sd["pred.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UserError) as err:
        load_official_xar(path)
    msg = str(err.value)
    assert "\n" not in msg and "missing key(s): pred.bias" in msg and "unexpected key(s): extra.weight" in msg
    with pytest.raises(UserError, match="not found"):
        load_official_xar(tmp_path / "absent.pth")


def test_checkpoint_without_buffers_loads_and_foreign_rope_is_refused(parity_dir):
    sd = torch.load(parity_dir / "xar_tiny_model.pth", weights_only=True)
    tf = torch.load(parity_dir / "xar_tiny_io.pt", weights_only=True)["teacher_forcing"]
    params = {k: v for k, v in sd.items() if k != "mask" and ".rope." not in k}
    with pytest.raises(UserError, match="cannot tell the number of heads"):
        load_official_xar(params)
    model = load_official_xar(params, encoder_num_heads=2, decoder_num_heads=2)
    with torch.no_grad():
        out = model(tf["latents"], tf["labels"], t_BU=tf["t"].view(4, 2).T,
                    noise_BLC=tf["noise"].permute(1, 0, 2, 3).reshape(2, 256, 16))
    assert (out.v - tf["v"]).abs().max().item() < TOL
    foreign = dict(sd)
    foreign["decoder_blocks.1.attn.rope.freqs"] = sd["decoder_blocks.1.attn.rope.freqs"] * 2
    with pytest.raises(UserError, match="not the official RoPE"):
        load_official_xar(foreign)
