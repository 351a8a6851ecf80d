"""CSpD (vgen.samplers.cspd) mechanics on toy velocity models and tiny random FlowARs: a draft equal to the target
accepts every unit under aligned noise (with and without CFG), rejection never leaves a unit unset (bounded rounds,
the fallback counted), mixed per-row outcomes leave both caches holding exactly each row's committed units (the
same keys/values as a fresh target-only commit of those units), per-image random streams, and bad settings."""

import math

import pytest
import torch
from vgen.samplers.cspd import (
    ACCEPTED,
    FALLBACK,
    PREFILLED,
    RESAMPLED,
    CSpDSettings,
    final_stochastic_step,
    generate_cspd,
)
from vgen.samplers.flow_grids import xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE, EulerODE

from cspd_toys import ToyMixtureFlow, mismatched_draft, two_mode_target
from test_flowar_pipeline import tiny_flowar

GRID = xar_time_grid(6, t_min=0.05)


def gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_a_draft_equal_to_the_target_accepts_every_unit(guidance_scale):
    B, toy = 5, two_mode_target(num_units=4)
    cond = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    out = generate_cspd(toy, two_mode_target(num_units=4), cond, cond, B, GRID, guidance_scale=guidance_scale,
                        settings=CSpDSettings(gamma=3, prefill_fraction=0.25), generators=gens(B))
    assert out.source_BK[:, 0].eq(PREFILLED).all() and out.source_BK[:, 1:].eq(ACCEPTED).all()
    assert torch.equal(out.log_ratio_BK[:, 1:], torch.zeros(B, 3, dtype=torch.float64))
    assert out.stats.summary()["acceptance_rate"] == 1.0 and int(out.stats.drafted.sum()) == 3 * B


def test_flowar_draft_equal_to_target_accepts_everything_under_cfg():
    target, draft = tiny_flowar(), tiny_flowar()  # two identical models (same seed)
    labels = torch.tensor([1, 3])
    out = generate_cspd(target, draft, target.class_condition(labels), draft.class_condition(labels), 2, GRID,
                        guidance_scale=2.0, guidance_interval=(0.0, 0.9),
                        settings=CSpDSettings(gamma=2, prefill_fraction=0.0), generators=gens(2))
    assert out.source_BK.eq(ACCEPTED).all()
    assert out.log_ratio_BK.abs().max() == 0.0
    assert [tuple(u.shape) for u in out.units] == [(2, 1, 4), (2, 4, 4), (2, 16, 4)]


def test_rejection_never_leaves_a_unit_unset():
    B = 64
    target = two_mode_target()
    far = ToyMixtureFlow(3, [[6.0, 6.0], [7.0, -6.0]], [0.2, 0.2], [0.5, 0.5])  # almost never accepted
    out = generate_cspd(target, far, torch.ones(B), torch.ones(B), B, GRID,
                        settings=CSpDSettings(gamma=3, prefill_fraction=0.0, rejection_rounds=1), generators=gens(B))
    stats = out.stats
    rejected = out.source_BK.eq(RESAMPLED) | out.source_BK.eq(FALLBACK)
    assert rejected.sum() > 0.9 * rejected.numel()
    assert torch.equal(stats.resampled + stats.fallbacks, rejected.sum(1))
    assert torch.equal(stats.rejection_trials, rejected.sum(1))  # one round each
    for k, unit in enumerate(out.units):  # every unit set: finite, no all-zero unit
        assert torch.isfinite(unit).all() and unit.abs().amax(dim=(1, 2)).gt(0).all()
        # rejected units come from the target (second coordinate near 0-1), not the draft's modes (+-6)
        assert unit[rejected[:, k]][..., 1].abs().amax() < 4.0


def test_fallback_is_a_target_sample_when_every_proposal_fails():
    B = 32
    target = two_mode_target()
    # a draft identical to the target, every draft rejected by the ratio: the residual max(0, p - q) is empty, so
    # every proposal fails (alpha = 0) and each unit falls back to the target's own proposal after 2 rounds
    same = ToyMixtureFlow(3, target.means, [0.4, 0.4], [0.5, 0.5], coupling=0.5)
    out = generate_cspd(target, same, torch.ones(B), torch.ones(B), B, GRID,
                        settings=CSpDSettings(gamma=1, prefill_fraction=0.0, rejection_rounds=2), generators=gens(B),
                        log_ratio=lambda d, t, s, f: torch.full((s.shape[0],), -math.inf, dtype=torch.float64))
    assert out.source_BK.eq(FALLBACK).all()
    assert out.stats.rejection_trials.tolist() == [2 * 3] * B and out.stats.fallbacks.tolist() == [3] * B
    assert out.stats.summary()["fallbacks_per_image"] == 3.0
    for unit in out.units:
        assert torch.isfinite(unit).all() and unit.abs().amax(dim=(1, 2)).gt(0).all()


def pattern_ratio(pattern_BK):
    """A log-ratio that accepts (+inf) or rejects (-inf) row b's unit k by ``pattern_BK[b, k]``."""
    calls = {"k": 0}

    def ratio(draft, target, state, f):
        k = calls["k"]
        calls["k"] += 1
        return torch.where(pattern_BK[:, k], math.inf, -math.inf).to(torch.float64)

    return ratio


def expected_cache(model, cond, units, guidance):
    """The cache of a fresh prefill followed by commits of ``units`` (units 0..K-2)."""
    state, _ = model.prefill(cond)
    for k, unit in enumerate(units[:-1]):
        model.commit(k, torch.cat([unit, unit]) if guidance else unit, state)
    return state.cache


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_mixed_per_row_outcomes_leave_each_rows_caches_consistent(guidance_scale):
    torch.manual_seed(3)
    target = tiny_flowar(scales=(1, 2, 3, 4))
    draft = tiny_flowar(scales=(1, 2, 3, 4), decoder_embed_dim=16, flow_width=16, encoder_embed_dim=16)
    with torch.no_grad():  # another random draft, not a copy of the target
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pattern = torch.tensor([[True, False, True, True], [False, True, False, True], [True, True, True, True]])
    labels = torch.tensor([2, 5, 7])
    guided = guidance_scale != 1.0
    out = generate_cspd(target, draft, target.class_condition(labels), draft.class_condition(labels), 3, GRID,
                        guidance_scale=guidance_scale, settings=CSpDSettings(gamma=2, prefill_fraction=0.0),
                        generators=gens(3), log_ratio=pattern_ratio(pattern))
    assert torch.equal(out.source_BK == ACCEPTED, pattern)
    assert torch.equal(out.stats.accepted, pattern.sum(1))
    assert_caches_hold_the_committed_units(out, target, draft, labels, guided)


def assert_caches_hold_the_committed_units(out, target, draft, labels, guided):
    """Both models' caches after CSpD hold each row's committed units: the keys/values of a fresh target-only
    prefill and commit of ``out.units``."""
    for model, state, cond in ((target, out.target_state, target.class_condition(labels)),
                               (draft, out.draft_state, draft.class_condition(labels))):
        if guided:
            cond = model.concat_conditions(cond, model.null_condition(len(labels)))
        want = expected_cache(model, cond, out.units, guided)
        assert torch.equal(state.cache.lengths_B, want.lengths_B)
        for b, length in enumerate(want.lengths_B.tolist()):
            torch.testing.assert_close(state.cache.k[:, b, :, :length], want.k[:, b, :, :length], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(state.cache.v[:, b, :, :length], want.v[:, b, :, :length], atol=1e-5, rtol=1e-5)


def test_an_images_result_does_not_depend_on_its_batch():
    target, draft = two_mode_target(), mismatched_draft()
    settings = CSpDSettings(gamma=2, prefill_fraction=0.3)
    alone = generate_cspd(target, draft, torch.ones(1), torch.ones(1), 1, GRID, settings=settings,
                          generators=gens(1, offset=7))
    batch = generate_cspd(target, draft, torch.ones(4), torch.ones(4), 4, GRID, settings=settings,
                          generators=[*gens(1, offset=7), *gens(3, offset=100)])
    assert torch.equal(alone.source_BK[0], batch.source_BK[0])
    for a, b in zip(alone.units, batch.units):
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)


def test_prefill_units_and_forward_counts():
    target, draft = two_mode_target(num_units=10), mismatched_draft(num_units=10)
    settings = CSpDSettings(gamma=4, prefill_fraction=0.05)
    assert settings.prefill_units(10) == 1 and CSpDSettings(prefill_fraction=0.0).prefill_units(10) == 0
    assert CSpDSettings(prefill_fraction=0.3).prefill_units(10) == 3
    out = generate_cspd(target, draft, torch.ones(2), torch.ones(2), 2, GRID, settings=settings)
    assert out.source_BK[:, 0].eq(PREFILLED).all() and out.source_BK[:, 1:].ne(PREFILLED).all()
    steps = GRID.numel() - 1
    # the target: prefill, every unit's full trajectory (aligned re-run + final step), 9 commits = target-only's count
    assert out.stats.target_forwards.tolist() == [1 + 10 * steps + 9] * 2
    # the draft: prefill, 1 pre-filled commit, 9 drafted trajectories, commits inside the 3 windows (3 + 3 + 0)
    # and the re-commits of the committed units (4 + 4 + 0: the last unit is never committed)
    assert out.stats.drafter_forwards.tolist() == [1 + 1 + 9 * steps + 6 + 8] * 2
    assert out.stats.rounds.tolist() == [3, 3]


def test_bad_settings_and_models_are_refused():
    with pytest.raises(ValueError, match="gamma"):
        CSpDSettings(gamma=0)
    with pytest.raises(ValueError, match="prefill_fraction"):
        CSpDSettings(prefill_fraction=1.5)
    with pytest.raises(ValueError, match="rejection_rounds"):
        CSpDSettings(rejection_rounds=0)
    with pytest.raises(ValueError, match="stochastic integrator"):
        final_stochastic_step(EulerODE(), 5)
    assert final_stochastic_step(EulerMaruyamaSDE(), 6) == 4
    with pytest.raises(ValueError, match="draft's units"):
        generate_cspd(two_mode_target(), two_mode_target(num_units=2), torch.ones(1), torch.ones(1), 1, GRID)
    with pytest.raises(ValueError, match="stochastic integrator"):
        generate_cspd(two_mode_target(), mismatched_draft(), torch.ones(1), torch.ones(1), 1, GRID,
                      integrator=EulerODE())
    with pytest.raises(ValueError, match="same stochastic steps"):
        generate_cspd(two_mode_target(), mismatched_draft(), torch.ones(1), torch.ones(1), 1, GRID,
                      draft_integrator=EulerODE())
