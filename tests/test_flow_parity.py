"""vgen's flow sampling against the sampling records of the official FlowAR and xAR code (parity fixtures).

The generators themselves are not needed: grids, CFG weights, the times given to the model, the order and shape of
every random draw, and single SDE steps replayed from recorded velocities are checked here; the whole-unit replays
(``flow_parity.replay_*``) are checked against restatements of the official samplers with mock velocities, and the
FlowAR / xAR tests call them with the real models.
"""

import pytest
import torch
from flow_parity import (
    official_flowar_euler_unit,
    official_xar_euler_maruyama_unit,
    replay_flowar_scale,
    replay_xar_cell,
)
from vgen.samplers.flow_cfg import FlowGuidance, velocity_field
from vgen.samplers.flow_grids import flowar_time_grid, xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE, EulerODE
from vgen.samplers.flow_units import generate_flow_units
from vgen.samplers.guidance import WeightRampCFG


@pytest.fixture
def flowar_sample(parity_dir):
    return torch.load(parity_dir / "flowar_tiny_io.pt", weights_only=True)["sample"]


@pytest.fixture
def xar_sample(parity_dir):
    return torch.load(parity_dir / "xar_tiny_io.pt", weights_only=True)["sample"]


def mock_flow_head(x_t, t, cond):
    """A nonlinear stand-in for FlowAR's flow head: depends on x, t and the condition of every token."""
    return torch.tanh(x_t) * (1 + t.view(-1, 1, 1)) - cond[..., : x_t.shape[-1]]


class ShapesOnlyModel:
    """Velocity model with the fixture's unit shapes and a fixed nonlinear field; draws no random numbers."""

    def __init__(self, unit_shapes):
        self.unit_shapes = unit_shapes
        self.device = torch.device("cpu")

    def concat_conditions(self, cond, uncond):
        return torch.cat([cond, uncond])

    def null_condition(self, batch_size):
        return torch.full((batch_size,), 1000)

    def prefill(self, cond):
        return None, cond

    def velocity(self, k, x_t, t, unit_cond):
        return torch.tanh(x_t) * t.view(-1, *[1] * (x_t.ndim - 1)) + 0.1 * k

    def commit(self, k, x_clean, state):
        return None


def test_flowar_grid_weights_and_model_times(flowar_sample):
    assert flowar_sample["cfg_per_scale"] == [WeightRampCFG().weight(flowar_sample["cfg"], k, 5) for k in range(5)]
    grid = flowar_time_grid(flowar_sample["num_steps"])
    for k in range(5):
        assert torch.equal(grid[:-1].float(), flowar_sample["flow_t"][k])
        replay = replay_flowar_scale(mock_flow_head, flowar_sample, k)
        assert len(replay.times) == 24
        assert torch.equal(torch.stack(replay.times), flowar_sample["flow_t"][k].unsqueeze(1).expand(24, 4))


def test_flowar_replay_helper_is_the_official_sampler(flowar_sample):
    for k in range(5):
        replay = replay_flowar_scale(mock_flow_head, flowar_sample, k)
        expected = official_flowar_euler_unit(
            lambda x, t, k=k: mock_flow_head(x, t, flowar_sample["ar_cond"][k]),
            flowar_sample["noise"][k],
            flowar_sample["cfg_per_scale"][k],
            flowar_sample["guidance"],
            flowar_sample["num_steps"],
        )
        assert replay.out.shape == flowar_sample["scale_out"][k].shape and torch.equal(replay.out, expected)


def test_flowar_loop_draws_the_official_noise(flowar_sample):
    """With the global RNG seeded as the fixture was, the loop draws exactly the recorded 4-row noise of every scale
    (FlowAR's flow head and AR transformer draw nothing in eval mode)."""
    model = ShapesOnlyModel([(s * s, 16) for s in (1, 2, 4, 8, 16)])
    torch.manual_seed(flowar_sample["seed"])
    out = generate_flow_units(
        model,
        flowar_sample["labels"],
        2,
        flowar_time_grid(25),
        EulerODE(),
        guidance_scale=flowar_sample["cfg"],
        guidance_interval=(0.0, flowar_sample["guidance"]),
        uncond_own_x=True,
        record=True,
    )
    for k in range(5):
        assert torch.equal(out.noises[k].initial, flowar_sample["noise"][k])


def test_xar_weights_and_loop_draws_the_official_noise(xar_sample):
    assert xar_sample["cell_cfg"] == [WeightRampCFG().weight(xar_sample["cfg"], c, 4) for c in range(4)]
    torch.manual_seed(xar_sample["seed"])
    out = generate_flow_units(
        ShapesOnlyModel([(64, 16)] * 4),
        xar_sample["labels"],
        2,
        xar_time_grid(xar_sample["num_steps"]),
        EulerMaruyamaSDE(),
        guidance_scale=xar_sample["cfg"],
        record=True,
    )
    for c in range(4):
        assert torch.equal(out.noises[c].initial, xar_sample["noise"][c])
        assert len(out.noises[c].step_noise) == 5
        for i in range(5):
            assert torch.equal(out.noises[c].step_noise[i], xar_sample["eps"][c, i])


@pytest.mark.parametrize("cell,first_call", [(0, 0), (1, 2)])
def test_xar_first_sde_step_from_the_recorded_velocity(xar_sample, cell, first_call):
    """Step 0 of cells 0 (unguided) and 1 (guided, w = 1.567) from the recorded noise, velocity and eps gives the
    recorded model input of step 1 bit for bit (both halves), at the recorded time."""
    step0, step1 = xar_sample["calls"][first_call], xar_sample["calls"][first_call + 1]
    grid = xar_time_grid(xar_sample["num_steps"])
    seen = {}

    def recorded_velocity(x_t, t_R):
        seen["x"], seen["t"] = x_t, t_R
        return step0["out"]

    guidance = FlowGuidance(weight=xar_sample["cell_cfg"][cell])
    field = velocity_field(recorded_velocity, cfg_doubled=True, guidance=guidance)
    x0 = xar_sample["noise"][cell].double()
    transition = EulerMaruyamaSDE().transition(x0, field(x0, grid[0]), grid[0], grid[1], 0, xar_sample["num_steps"])
    x1 = transition.sample(xar_sample["eps"][cell, 0]).float()
    assert torch.equal(seen["x"], step0["x"][:, -64:])  # at cell > 0 the model also reads the clean previous cell
    assert torch.equal(seen["t"], step0["t"][-4:].float())
    assert torch.equal(torch.cat([x1, x1]), step1["x"])
    assert torch.equal(grid[1].float().expand(4), step1["t"])


def test_xar_replay_helper_is_the_official_sampler(xar_sample):
    for c in range(4):

        def velocity(x, t, c=c):
            return torch.tanh(x) * (1 + t.view(-1, 1, 1)) - 0.2 * c

        replay = replay_xar_cell(velocity, xar_sample, c)
        expected = official_xar_euler_maruyama_unit(
            velocity,
            xar_sample["noise"][c],
            xar_sample["cell_cfg"][c],
            xar_sample["num_steps"],
            eps=xar_sample["eps"][c],
        )
        assert replay.out.shape == xar_sample["cell_out"][c].shape
        torch.testing.assert_close(replay.out, expected, rtol=0, atol=1e-6)
        assert torch.equal(torch.stack(replay.times)[:, 0], xar_time_grid(6)[:-1].float())
