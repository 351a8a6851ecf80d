"""The unit-wise flow loop against mock velocity models (known velocities, no generator weights)."""

import pytest
import torch
from flow_parity import official_flowar_euler_unit, official_xar_euler_maruyama_unit
from vgen.samplers.flow_grids import flowar_time_grid, uniform_time_grid, xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE
from vgen.samplers.flow_units import UnitNoise, generate_flow_units
from vgen.samplers.guidance import ConstantCFG
from vgen.samplers.interfaces import VelocityModel


class MockState:
    def __init__(self):
        self.committed = []


class MockFlowModel:
    """Units of shapes ``unit_shapes``; condition = float labels (B,), null label 0.

    Unit k's target for a row is ``label`` for k = 0, then ``0.5 * mean(committed unit k-1 of that row) + label + k``.
    ``straight=True``: ``v = (x - target) / t``, so Euler lands exactly on the target (guided: on
    ``target_u + w (target_c - target_u)``). ``straight=False``: a nonlinear field ``tanh(x) (1 + t) - target``.
    """

    def __init__(self, unit_shapes, straight=True):
        self.unit_shapes = unit_shapes
        self.device = torch.device("cpu")
        self.straight = straight
        self.velocity_calls = []
        self.commits = []

    def concat_conditions(self, cond, uncond):
        return torch.cat([cond, uncond])

    def null_condition(self, batch_size):
        return torch.zeros(batch_size)

    def _target(self, k, labels, previous):
        shape = (labels.shape[0], *self.unit_shapes[k])
        if previous is None:
            return labels.view(-1, *[1] * len(self.unit_shapes[k])).expand(shape)
        prev_mean = previous.flatten(1).mean(dim=1)
        return (0.5 * prev_mean + labels + k).view(-1, *[1] * len(self.unit_shapes[k])).expand(shape)

    def prefill(self, cond):
        return MockState(), {"labels": cond, "target": self._target(0, cond, None)}

    def velocity(self, k, x_t, t, unit_cond):
        self.velocity_calls.append((k, x_t.shape[0], x_t.dtype, t.clone()))
        target = unit_cond["target"].to(x_t.dtype)
        t_ = t.view(-1, *[1] * (x_t.ndim - 1))
        if self.straight:
            return (x_t - target) / t_
        return torch.tanh(x_t) * (1 + t_) - target

    def commit(self, k, x_clean, state):
        self.commits.append((k, x_clean.clone()))
        state.committed.append(x_clean)
        labels = self.concat_labels
        return {"labels": labels, "target": self._target(k + 1, labels, x_clean)}


def make_model(unit_shapes, labels, straight=True, cfg=True):
    model = MockFlowModel(unit_shapes, straight)
    model.concat_labels = torch.cat([labels, torch.zeros_like(labels)]) if cfg else labels
    return model


UNITS = [(1, 2), (4, 2), (16, 2)]


def test_mock_is_a_velocity_model():
    assert isinstance(MockFlowModel(UNITS), VelocityModel)


def test_units_follow_the_committed_condition_without_cfg():
    labels = torch.tensor([1.0, -2.0, 3.0])
    model = make_model(UNITS, labels, cfg=False)
    out = generate_flow_units(model, labels, 3, flowar_time_grid(25), guidance_scale=1.0)
    expected, prev = [], None
    for k in range(3):
        target = model._target(k, labels, prev)
        expected.append(target)
        prev = target
    for unit, target in zip(out.units, expected):
        assert unit.dtype == torch.float32 and unit.shape == target.shape
        torch.testing.assert_close(unit, target, rtol=0, atol=1e-6)
    # 24 velocity calls per unit on the B rows, with the float32 grid times; one commit per unit but the last.
    assert [c[0] for c in model.velocity_calls] == [k for k in range(3) for _ in range(24)]
    assert all(rows == 3 and dtype == torch.float32 for _, rows, dtype, _ in model.velocity_calls)
    assert torch.equal(torch.stack([c[3][0] for c in model.velocity_calls[:24]]), flowar_time_grid(25)[:-1].float())
    assert [k for k, _ in model.commits] == [0, 1]


def test_guided_units_land_on_the_guided_target_and_commit_both_halves():
    labels = torch.tensor([1.0, 2.0])
    model = make_model(UNITS, labels)
    out = generate_flow_units(
        model, labels, 2, uniform_time_grid(10), guidance_scale=3.0, guidance_schedule=ConstantCFG()
    )
    prev = None
    for k, unit in enumerate(out.units):
        both = model._target(k, model.concat_labels, None if prev is None else torch.cat([prev, prev]))
        target_c, target_u = both[:2], both[2:]
        guided = target_u + 3.0 * (target_c - target_u)
        torch.testing.assert_close(unit, guided, rtol=0, atol=1e-5)
        prev = unit
    assert all(rows == 4 for _, rows, _, _ in model.velocity_calls)
    for k, x_clean in model.commits:  # the conditional result, repeated for the unconditional half
        assert torch.equal(x_clean, torch.cat([out.units[k], out.units[k]]))


def _official_loop(model, labels, unit_fn):
    """Official sample loop around a per-unit sampler: cond/uncond doubled, commit the conditional result twice."""
    B = labels.shape[0]
    _, unit_cond = model.prefill(torch.cat([labels, torch.zeros_like(labels)]))
    units, raw = [], []
    for k in range(len(model.unit_shapes)):
        out = unit_fn(k, lambda x, t, unit_cond=unit_cond, k=k: model.velocity(k, x, t, unit_cond))
        raw.append(out)
        units.append(out[:B])
        if k + 1 < len(model.unit_shapes):
            unit_cond = model.commit(k, torch.cat([out[:B], out[:B]]), MockState())
    return units, raw


def test_own_x_loop_is_official_flowar_bit_for_bit():
    labels = torch.tensor([0.5, -1.5])
    shapes = [(1, 3), (4, 3), (16, 3)]
    ramp = [(2.4 - 1) * k / 2 + 1 for k in range(3)]  # official: (cfg - 1) * k / (K - 1) + 1

    def flowar_unit(k, velocity):
        noise = torch.randn(4, *shapes[k])
        return official_flowar_euler_unit(velocity, noise, ramp[k], 0.9, 25)

    torch.manual_seed(3)
    ref_units, ref_raw = _official_loop(make_model(shapes, labels, straight=False), labels, flowar_unit)
    torch.manual_seed(3)
    model = make_model(shapes, labels, straight=False)
    out = generate_flow_units(
        model,
        labels,
        2,
        flowar_time_grid(25),
        guidance_scale=2.4,
        guidance_interval=(0.0, 0.9),
        uncond_own_x=True,
        record=True,
    )
    for k in range(3):
        assert torch.equal(out.units[k], ref_units[k])
        assert torch.equal(out.trajectories[k].x[-1].float(), ref_raw[k])  # the unconditional rows too
    # The shared-x mode gives the same conditional units from the same conditional noise.
    shared = generate_flow_units(
        make_model(shapes, labels, straight=False),
        labels,
        2,
        flowar_time_grid(25),
        guidance_scale=2.4,
        guidance_interval=(0.0, 0.9),
        noises=[UnitNoise(initial=n.initial[:2]) for n in out.noises],
    )
    for a, b in zip(shared.units, out.units):
        assert torch.equal(a, b)


def test_sde_loop_is_official_xar():
    labels = torch.tensor([0.5, -1.5, 2.0])
    shapes = [(8, 2)] * 4
    ramp = [(2.7 - 1) * k / 3 + 1 for k in range(4)]

    def xar_unit(k, velocity):
        return official_xar_euler_maruyama_unit(velocity, torch.randn(3, *shapes[k]), ramp[k], 6)

    torch.manual_seed(5)
    ref_units, _ = _official_loop(make_model(shapes, labels, straight=False), labels, xar_unit)
    torch.manual_seed(5)
    out = generate_flow_units(
        make_model(shapes, labels, straight=False), labels, 3, xar_time_grid(6), EulerMaruyamaSDE(), guidance_scale=2.7
    )
    for unit, ref in zip(out.units, ref_units):
        # vgen guides the velocity, official xAR the drift: equal up to float64 rounding before the float32 cast.
        torch.testing.assert_close(unit, ref, rtol=0, atol=1e-6)


def test_per_image_generators_make_images_independent_of_the_batch():
    shapes = [(8, 2)] * 3
    labels = torch.tensor([0.5, -1.5, 2.0, 1.0])

    def run(idx):
        gens = [torch.Generator().manual_seed(100 + i) for i in idx]
        return generate_flow_units(
            make_model(shapes, labels[idx], straight=False),
            labels[idx],
            len(idx),
            xar_time_grid(6),
            EulerMaruyamaSDE(),
            guidance_scale=2.7,
            generators=gens,
            record=True,
        )

    four, one = run([0, 1, 2, 3]), run([2])
    for k in range(3):
        assert torch.equal(four.noises[k].initial[2], one.noises[k].initial[0])
        assert all(torch.equal(a[2], b[0]) for a, b in zip(four.noises[k].step_noise, one.noises[k].step_noise))
        torch.testing.assert_close(four.units[k][2:3], one.units[k], rtol=0, atol=1e-6)


def test_recorded_noise_replays_every_unit_exactly():
    shapes = [(4, 2)] * 3
    labels = torch.tensor([0.5, -1.5])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    first = generate_flow_units(
        make_model(shapes, labels, straight=False),
        labels,
        2,
        xar_time_grid(6),
        EulerMaruyamaSDE(),
        guidance_scale=2.0,
        generators=gens,
        record=True,
    )
    assert [len(n.step_noise) for n in first.noises] == [5, 5, 5]
    replay = generate_flow_units(
        make_model(shapes, labels, straight=False),
        labels,
        2,
        xar_time_grid(6),
        EulerMaruyamaSDE(),
        guidance_scale=2.0,
        noises=first.noises,
    )
    assert all(torch.equal(a, b) for a, b in zip(first.units, replay.units))
    with pytest.raises(ValueError, match="prescribed noise for 2 units"):
        generate_flow_units(
            make_model(shapes, labels), labels, 2, xar_time_grid(6), EulerMaruyamaSDE(), noises=first.noises[:2]
        )


def test_callbacks_progress_and_unit_replacement():
    labels = torch.tensor([1.0, 2.0])
    model = make_model(UNITS, labels, cfg=False)
    steps, wrapped = [], []

    def on_step(k, i, t, x):
        steps.append((k, i, t, x.shape))

    def on_unit(k, x_clean):
        return torch.zeros_like(x_clean) if k == 0 else None

    def progress(it):
        wrapped.append(True)
        return it

    grids = [uniform_time_grid(4), uniform_time_grid(2), flowar_time_grid(25)]  # one grid per unit
    out = generate_flow_units(model, labels, 2, grids, on_step=on_step, on_unit=on_unit, progress=progress)
    assert wrapped == [True]
    assert [(k, i) for k, i, _, _ in steps] == [(0, i) for i in range(4)] + [(1, i) for i in range(2)] + [
        (2, i) for i in range(24)
    ]
    assert steps[0][2] == 0.75 and steps[0][3] == (2, 1, 2)
    assert torch.equal(out.units[0], torch.zeros(2, 1, 2))
    # unit 1's target is built from the replaced (zero) unit 0: 0.5 * 0 + label + 1
    torch.testing.assert_close(out.units[1], (labels + 1).view(2, 1, 1).expand(2, 4, 2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 units"):
        generate_flow_units(model, labels, 2, grids[:2])
