"""Flow integrators, grids, Gaussian transitions, per-image noise and velocity CFG against closed forms."""

import math

import pytest
import torch
from scipy import stats
from vgen.samplers.flow_cfg import FlowGuidance, model_time, velocity_field
from vgen.samplers.flow_grids import check_time_grid, flowar_time_grid, uniform_time_grid, xar_time_grid
from vgen.samplers.flow_integrate import integrate_flow, path_log_density
from vgen.samplers.flow_transitions import (
    EulerMaruyamaSDE,
    EulerODE,
    gaussian_log_density,
    score_from_velocity,
)
from vgen.samplers.guidance import WeightRampCFG, combine_cfg_difference, guidance_is_off
from vgen.samplers.noise import per_sample_normal

# ------------------------------------------------------------------------------------------------ grids


def test_flowar_grid_is_two_linspaces_with_24_steps():
    grid = flowar_time_grid(25)
    assert grid.dtype == torch.float64 and grid.numel() == 25
    assert torch.equal(grid[:12], torch.linspace(1, 0.3, 12, dtype=torch.float64))
    assert torch.equal(grid[12:], torch.linspace(0.25, 0, 13, dtype=torch.float64))
    assert torch.equal(flowar_time_grid(50), torch.linspace(1, 0, 51, dtype=torch.float64))
    assert flowar_time_grid(20).numel() == 21


def test_xar_and_uniform_grids():
    grid = xar_time_grid(6)
    assert grid.tolist() == pytest.approx([1.0, 0.808, 0.616, 0.424, 0.232, 0.04, 0.0], abs=1e-15)
    assert grid[-1] == 0 and grid.dtype == torch.float64
    assert uniform_time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_time_grid(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        check_time_grid(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        flowar_time_grid(1)


# ------------------------------------------------------------------------------------------------ closed forms

MU, S = 0.7, 0.5  # Gaussian target N(MU, S^2) per dimension


def gaussian_target_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps."""
    a, b = 1 - t, t
    return (b - a * S * S) * (x - a * MU) / (a * a * S * S + b * b) - MU


def test_euler_is_exact_on_straight_flows():
    # Point-mass target c: v = (x - c) / t; every path is a straight line x_t = c + t (x_1 - c).
    c = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    x1 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for grid in (flowar_time_grid(25), uniform_time_grid(7)):
        result = integrate_flow(lambda x, t: (x - c) / t, x1, grid, EulerODE(), record=True)
        for t_i, x_i in zip(grid, result.trajectory.x):
            torch.testing.assert_close(x_i, c + t_i * (x1 - c), rtol=0, atol=1e-14)
    # Constant velocity: x_0 = x_1 - v.
    v = torch.tensor([1.5, -0.25, 4.0], dtype=torch.float64)
    out = integrate_flow(lambda x, t: v.expand_as(x), x1, flowar_time_grid(25), EulerODE()).x
    torch.testing.assert_close(out, x1 - v, rtol=0, atol=1e-14)


def test_score_from_velocity_is_the_gaussian_score():
    x = torch.randn(64, 4, dtype=torch.float64)
    for t in (0.04, 0.3, 0.9, 1.0):
        t = torch.tensor(t, dtype=torch.float64)
        a, b = 1 - t, t
        exact = -(x - a * MU) / (a * a * S * S + b * b)
        torch.testing.assert_close(score_from_velocity(gaussian_target_velocity(x, t), x, t), exact)


def test_euler_maruyama_transition_formula():
    x, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t_cur, t_next = torch.tensor(0.616, dtype=torch.float64), torch.tensor(0.424, dtype=torch.float64)
    tr = EulerMaruyamaSDE().transition(x, v, t_cur, t_next, 2, 6)
    dt = t_next - t_cur
    # drift v - w/2 * score with w = 2t and score = ((t - 1) v - x) / t reduces to (2 - t) v + x.
    torch.testing.assert_close(tr.mean, x + dt * ((2 - t_cur) * v + x))
    assert tr.std.item() == pytest.approx(math.sqrt(2 * 0.616 * 0.192))
    last = EulerMaruyamaSDE().transition(x, v, t_cur, t_next, 5, 6)
    assert not last.stochastic and last.std.item() == 0 and torch.equal(last.sample(None), last.mean)


def _law_of_discrete_chain(grid: torch.Tensor) -> tuple[float, float]:
    """Exact mean and variance of the Euler-Maruyama chain for the Gaussian target (the field is affine in x)."""
    mean, var = 0.0, 1.0
    steps = grid.numel() - 1
    for i in range(steps):
        t, dt = float(grid[i]), float(grid[i + 1] - grid[i])
        a, b = 1 - t, t
        alpha = (b - a * S * S) / (a * a * S * S + b * b)
        beta = -alpha * a * MU - MU
        gain = 1 + dt * ((2 - t) * alpha + 1)  # x_next = gain x + dt (2 - t) beta + noise
        mean = gain * mean + dt * (2 - t) * beta
        var = gain * gain * var + (2 * t * abs(dt) if i < steps - 1 else 0.0)
    return mean, var


def _assert_gaussian_sample(x: torch.Tensor, mean: float, var: float) -> None:
    """Mean and variance within 4 standard errors; KS statistic below its 0.1% critical value 1.95 / sqrt(N)."""
    n = x.numel()
    x = x.flatten().double()
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2 / (n - 1))
    ks = stats.kstest(x.numpy(), stats.norm(loc=mean, scale=math.sqrt(var)).cdf).statistic
    assert ks < 1.95 / math.sqrt(n)


N_SAMPLES = 20_000


def test_euler_maruyama_on_xar_grid_has_the_exact_discrete_law():
    grid = xar_time_grid(6)
    x1 = torch.randn(N_SAMPLES, 1, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the global RNG draws the step noise, as official code does
    x0 = integrate_flow(gaussian_target_velocity, x1, grid, EulerMaruyamaSDE()).x
    mean, var = _law_of_discrete_chain(grid)
    assert abs(var - S * S) > 0.01  # 6 steps are coarse: the law is not the target's, and the check tells them apart
    _assert_gaussian_sample(x0, mean, var)


def test_euler_maruyama_marginal_matches_the_gaussian_target():
    # 400 steps: the exact discretisation bias of the variance is -5.2e-4, 0.2 standard errors at N = 20 000.
    grid = xar_time_grid(400, t_min=1 / 400)
    mean, var = _law_of_discrete_chain(grid)
    assert abs(mean - MU) < 1e-12 and abs(var - S * S) < 6e-4
    x1 = torch.randn(N_SAMPLES, 1, generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(4)]
    x0 = integrate_flow(gaussian_target_velocity, x1.T, grid, EulerMaruyamaSDE(), generators=gens).x
    _assert_gaussian_sample(x0, MU, S * S)


# ------------------------------------------------------------------------------------------------ densities


def test_transition_log_density_equals_torch_normal():
    x = torch.randn(4, 8, 3, dtype=torch.float64)
    v = torch.randn(4, 8, 3, dtype=torch.float64)
    t_cur, t_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    tr = EulerMaruyamaSDE().transition(x, v, t_cur, t_next, 1, 6)
    x_next = tr.sample(torch.randn(4, 8, 3, dtype=torch.float64))
    expected = torch.distributions.Normal(tr.mean, tr.std).log_prob(x_next).sum(dim=(1, 2))
    torch.testing.assert_close(tr.log_density(x_next), expected, rtol=1e-13, atol=1e-10)
    per_row_std = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64).view(4, 1, 1)
    expected = torch.distributions.Normal(tr.mean, per_row_std).log_prob(x_next).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_density(x_next, tr.mean, per_row_std), expected, rtol=1e-13, atol=1e-10)
    # Far in the tail float64 log space stays finite where a density itself underflows to 0.
    far = gaussian_log_density(torch.full((1, 1000), 50.0), torch.zeros(1, 1000), 1.0)
    assert torch.isfinite(far).all() and far.item() == pytest.approx(-1000 * (1250 + 0.5 * math.log(2 * math.pi)))
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_log_density(x, x, 0.0)


def test_path_log_density_of_a_trajectory_under_itself_and_another_model():
    grid = xar_time_grid(6)
    x1 = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    drafted = integrate_flow(gaussian_target_velocity, x1, grid, EulerMaruyamaSDE(), generators=gens, record=True)
    traj = drafted.trajectory
    own, _ = path_log_density(gaussian_target_velocity, traj, EulerMaruyamaSDE())
    torch.testing.assert_close(own, traj.log_density(), rtol=0, atol=0)
    manual = sum(
        torch.distributions.Normal(tr.mean, tr.std).log_prob(x_next).sum(dim=(1, 2))
        for tr, x_next in zip(traj.transitions[:-1], traj.x[1:-1])
    )
    torch.testing.assert_close(own, manual, rtol=1e-12, atol=1e-9)

    def other(x, t):
        return gaussian_target_velocity(x, t) + 0.3

    under_other, transitions = path_log_density(other, traj, EulerMaruyamaSDE())
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(5):  # the other model's Gaussian step at the path's own states
        t, dt = grid[i], grid[i + 1] - grid[i]
        mean = traj.x[i] + dt * ((2 - t) * other(traj.x[i], t) + traj.x[i])
        std = torch.sqrt(2 * t * -dt)
        expected += torch.distributions.Normal(mean, std).log_prob(traj.x[i + 1]).sum(dim=(1, 2))
    assert len(transitions) == 6
    torch.testing.assert_close(under_other, expected, rtol=1e-12, atol=1e-9)
    assert not torch.allclose(under_other, own)


# ------------------------------------------------------------------------------------------------ noise


def test_per_sample_normal_is_independent_of_the_batch():
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    one = per_sample_normal((1, 6, 2), gens([12]), "cpu", torch.float64)
    four = per_sample_normal((4, 6, 2), gens([10, 11, 12, 13]), "cpu", torch.float64)
    assert torch.equal(four[2], one[0])
    # Two rows per image (an unconditional half with its own x): rows b and B + b come from generator b, in order.
    doubled = per_sample_normal((4, 3), gens([5, 6]), "cpu")
    g5 = torch.Generator().manual_seed(5)
    assert torch.equal(doubled[0], torch.randn(3, generator=g5))
    assert torch.equal(doubled[2], torch.randn(3, generator=g5))
    with pytest.raises(ValueError, match="one generator per image"):
        per_sample_normal((3, 2), gens([1, 2]), "cpu")


def test_global_rng_draws_like_torch_randn():
    torch.manual_seed(7)
    expected = torch.randn(4, 5, 16)
    torch.manual_seed(7)
    assert torch.equal(per_sample_normal((4, 5, 16), None, "cpu"), expected)


def test_prescribed_noise_replays_the_trajectory_exactly():
    grid = xar_time_grid(8)
    x1 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    first = integrate_flow(gaussian_target_velocity, x1, grid, EulerMaruyamaSDE(), generators=gens, record=True)
    assert len(first.step_noise) == 7 and all(eps.dtype == torch.float64 for eps in first.step_noise)
    replay = integrate_flow(
        gaussian_target_velocity, x1, grid, EulerMaruyamaSDE(), step_noise=first.step_noise, record=True
    )
    assert torch.equal(replay.x, first.x)
    assert all(torch.equal(a, b) for a, b in zip(replay.trajectory.x, first.trajectory.x))
    other = integrate_flow(gaussian_target_velocity, x1, grid, EulerMaruyamaSDE(), generators=None)
    assert not torch.allclose(other.x, first.x)
    with pytest.raises(ValueError, match="prescribed step noises"):
        integrate_flow(gaussian_target_velocity, x1, grid, EulerMaruyamaSDE(), step_noise=first.step_noise[:3])


def test_on_step_sees_every_step_and_may_replace_the_state():
    seen = []

    def on_step(i, t, x):
        seen.append((i, t))
        return torch.zeros_like(x) if i == 10 else None

    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    grid = flowar_time_grid(25)
    out = integrate_flow(lambda x, t: (x - c) / t, torch.randn(3, 2), grid, EulerODE(), on_step=on_step).x
    assert [i for i, _ in seen] == list(range(24)) and [t for _, t in seen] == grid[1:].tolist()
    torch.testing.assert_close(out, c.expand(3, 2), rtol=0, atol=1e-14)  # the flow from 0 still ends at c


# ------------------------------------------------------------------------------------------------ CFG


def test_weight_ramp_is_flowar_and_xar_cfg():
    ramp = WeightRampCFG()
    assert [ramp.weight(2.4, k, 5) for k in range(5)] == pytest.approx([1, 1.35, 1.7, 2.05, 2.4], abs=1e-15)
    assert [ramp.weight(2.7, k, 4) for k in range(4)] == pytest.approx([1, 1.5667, 2.1333, 2.7], abs=1e-4)
    assert [ramp.weight(2.7, k, 4) for k in range(4)] == [(2.7 - 1) * k / 3.0 + 1 for k in range(4)]
    assert ramp.weight(3.0, 0, 1) == 3.0
    assert guidance_is_off(ramp, 1.0, 5) and not guidance_is_off(ramp, 2.4, 5)
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert combine_cfg_difference(c, u, 1.5).item() == 2.5 and combine_cfg_difference(c, u, 1.0) is c


class RecordingVelocity:
    """``v = 2x + 1`` on the conditional half of the rows, ``-x`` on the unconditional half; records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t_R):
        self.calls.append((x_t.clone(), t_R.clone()))
        R = x_t.shape[0]
        v = x_t.clone()
        v[: R // 2] = 2 * x_t[: R // 2] + 1
        v[R // 2 :] = -x_t[R // 2 :]
        return v


def test_velocity_field_shared_x_guides_inside_the_interval_only():
    vel = RecordingVelocity()
    field = velocity_field(vel, cfg_doubled=True, guidance=FlowGuidance(weight=3.0, t_high=0.9))
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    guided = field(x, torch.tensor(0.5, dtype=torch.float64))
    x_in, t_in = vel.calls[-1]
    assert x_in.dtype == torch.float32 and torch.equal(x_in, torch.cat([x, x]).float())
    assert t_in.dtype == torch.float32 and t_in.tolist() == [0.5] * 4
    torch.testing.assert_close(guided, -x + 3.0 * (2 * x + 1 + x))
    unguided = field(x, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(unguided, 2 * x + 1)  # t > t_high: the conditional velocity


def test_velocity_field_own_x_is_flowar_official():
    vel = RecordingVelocity()
    field = velocity_field(vel, cfg_doubled=True, guidance=FlowGuidance(weight=2.0, t_high=0.9, uncond_own_x=True))
    x = torch.tensor([[1.0], [5.0]], dtype=torch.float64)  # row 0 conditional, row 1 its unconditional twin
    out = field(x, torch.tensor(0.95, dtype=torch.float64))  # unguided: each half on its own x
    assert torch.equal(vel.calls[-1][0], x.float())
    torch.testing.assert_close(out, torch.tensor([[3.0], [-5.0]], dtype=torch.float64))
    out = field(x, torch.tensor(0.9, dtype=torch.float64))  # guided (t <= 0.9): both halves see x_c
    assert torch.equal(vel.calls[-1][0], torch.tensor([[1.0], [1.0]]))
    torch.testing.assert_close(out, torch.tensor([[7.0], [7.0]], dtype=torch.float64))  # -1 + 2 * (3 + 1)
    # Weight 1 (FlowAR's first scale): never guided, each half on its own x.
    field1 = velocity_field(vel, cfg_doubled=True, guidance=FlowGuidance(weight=1.0, uncond_own_x=True))
    field1(x, torch.tensor(0.5, dtype=torch.float64))
    assert torch.equal(vel.calls[-1][0], x.float())


def test_velocity_field_without_cfg_and_model_time():
    vel = RecordingVelocity()
    x = torch.randn(3, 2, dtype=torch.float64)
    velocity_field(vel, cfg_doubled=False)(x, torch.tensor(0.25, dtype=torch.float64))
    assert torch.equal(vel.calls[-1][0], x.float())
    t = model_time(flowar_time_grid(25)[3], 4, torch.device("cpu"))
    assert t.dtype == torch.float32 and torch.equal(t, flowar_time_grid(25)[3].float().expand(4))
