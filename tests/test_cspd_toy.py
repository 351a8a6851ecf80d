"""How far CSpD's output is from target-only sampling, on toy AR models with exact flows (tests/cspd_toys.py): a
two-mode 2-d target with a mismatched draft (3 units) and a 1-d Gaussian with a mismatched draft (4 units), both
on the Euler-Maruyama SDE (11 stochastic steps + the final drift step per unit).

The check (:func:`close_to_target`) is an energy-distance permutation test of CSpD's samples (all units of an image
as one vector) against target-only samples, with a bound set from the measured target-vs-target noise floor
(1000 vs 1000 samples, 5 seeds: two-mode 0.0035-0.0189, Gaussian 0.0023-0.0040; CSpD measured 0.0063-0.0086 and
0.0024-0.0050, all permutation p > 0.2). The same check must reject CSpD with the ratio's sign flipped (measured
0.16-0.23 and 1.47-1.58, p = 0.005, the smallest possible with 200 permutations). ``python tests/test_cspd_toy.py``
prints the table (about a minute on one thread)."""

import math

import pytest
import torch
from vgen.eval.two_sample import energy_permutation_test
from vgen.samplers.cspd import CSpDSettings, generate_cspd, last_step_log_ratio, surrogate_log_ratio
from vgen.samplers.flow_grids import xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE
from vgen.samplers.flow_units import generate_flow_units

from cspd_toys import ToyMixtureFlow, mismatched_draft, two_mode_target

N = 1000
GRID = xar_time_grid(12, t_min=0.04)
CASES = {
    # name: (target, draft, energy-distance bound: above every measured noise floor of the case)
    "two-mode-2d": (two_mode_target, mismatched_draft, 0.025),
    "gaussian-1d": (lambda: ToyMixtureFlow(4, [[0.5]], [0.7], [1.0], coupling=0.6),
                    lambda: ToyMixtureFlow(4, [[0.0]], [1.0], [1.0], coupling=0.3), 0.01),
}


def flat(units):
    return torch.cat([u.reshape(u.shape[0], -1) for u in units], dim=1)


def generators(offset):
    return [torch.Generator().manual_seed(offset + i) for i in range(N)]


def close_to_target(samples, reference, bound):
    """(passed, energy distance, p-value): within the bound and not rejected at the 1 % level."""
    distance, p_value = energy_permutation_test(samples, reference, 200, torch.Generator().manual_seed(0))
    return distance <= bound and p_value > 0.01, distance, p_value


def flipped_ratio(draft, target, state, f):
    return -surrogate_log_ratio(draft, target, state, f)


SETTINGS = CSpDSettings(gamma=2, prefill_fraction=0.0)


def measure(case, seed):
    """Energy distances and p-values (floor: target vs target; CSpD vs target; flipped ratio vs target) and the
    acceptance rate for one seed (``python tests/test_cspd_toy.py`` prints them for seeds 0-4)."""
    make_target, make_draft, _ = CASES[case]
    target, draft, cond, offset = make_target(), make_draft(), torch.ones(N), seed * 10**5
    reference = flat(generate_flow_units(target, cond, N, GRID, EulerMaruyamaSDE(), generators=generators(offset)).units)
    other = flat(generate_flow_units(target, cond, N, GRID, EulerMaruyamaSDE(),
                                     generators=generators(offset + N)).units)
    out = generate_cspd(target, draft, cond, cond, N, GRID, settings=SETTINGS, generators=generators(offset + 2 * N))
    broken = generate_cspd(target, draft, cond, cond, N, GRID, settings=SETTINGS,
                           generators=generators(offset + 2 * N), log_ratio=flipped_ratio)
    g = torch.Generator().manual_seed(0)
    return {"floor": energy_permutation_test(other, reference, 200, g),
            "cspd": energy_permutation_test(flat(out.units), reference, 200, g),
            "flipped": energy_permutation_test(flat(broken.units), reference, 200, g),
            "acceptance": out.stats.summary()["acceptance_rate"]}


@pytest.mark.parametrize("case", list(CASES))
def test_cspd_matches_target_only_and_a_flipped_ratio_does_not(case):
    make_target, make_draft, bound = CASES[case]
    target, draft = make_target(), make_draft()
    cond = torch.ones(N)
    reference = flat(generate_flow_units(target, cond, N, GRID, EulerMaruyamaSDE(), generators=generators(0)).units)
    settings = SETTINGS
    out = generate_cspd(target, draft, cond, cond, N, GRID, settings=settings, generators=generators(2 * N))
    passed, distance, p_value = close_to_target(flat(out.units), reference, bound)
    assert passed, f"CSpD vs target-only: energy distance {distance:.4f} (bound {bound}), p = {p_value:.3f}"
    summary = out.stats.summary()
    assert 0.03 < summary["acceptance_rate"] < 0.5  # a mismatched draft: mixed outcomes, measured 0.07-0.15
    assert summary["fallbacks_per_image"] == 0.0

    broken = generate_cspd(target, draft, cond, cond, N, GRID, settings=settings, generators=generators(2 * N),
                           log_ratio=flipped_ratio)
    passed, distance, p_value = close_to_target(flat(broken.units), reference, bound)
    assert not passed and distance > 4 * bound and p_value < 0.01


if __name__ == "__main__":
    for name in CASES:
        for seed in range(5):
            m = measure(name, seed)
            print(f"{name} seed {seed}: floor {m['floor'][0]:.4f} (p {m['floor'][1]:.3f})  cspd {m['cspd'][0]:.4f} "
                  f"(p {m['cspd'][1]:.3f})  flipped {m['flipped'][0]:.4f} (p {m['flipped'][1]:.3f})  "
                  f"acceptance {m['acceptance']:.3f}")


def test_model_dependent_stds_the_paper_factor_over_accepts_the_last_step_ratio_stays_exact():
    """The draft on Euler-Maruyama with 1.5 x the diffusion (transition stds sqrt(1.5) x the target's, like learned
    variances): the paper's determinant factor D = prod (std_q / std_p)^d > 1 inflates acceptance (measured 0.39
    against 0.16 without it, two-mode case, seed 0) and moved the samples (energy distance 0.0133, p = 0.07, against
    0.0069, p = 0.47 without it). The ratio without the factor stays within the bound."""
    make_target, make_draft, bound = CASES["two-mode-2d"]
    target, draft, cond = make_target(), make_draft(), torch.ones(N)
    reference = flat(generate_flow_units(target, cond, N, GRID, EulerMaruyamaSDE(), generators=generators(0)).units)
    runs = {name: generate_cspd(target, draft, cond, cond, N, GRID, settings=SETTINGS, generators=generators(2 * N),
                                log_ratio=ratio, draft_integrator=EulerMaruyamaSDE(diffusion_scale=1.5))
            for name, ratio in (("paper", surrogate_log_ratio), ("last_step", last_step_log_ratio))}
    paper, exact = (runs[n].stats.summary()["acceptance_rate"] for n in ("paper", "last_step"))
    assert paper > 2 * exact > 0.2
    passed, distance, p_value = close_to_target(flat(runs["last_step"].units), reference, bound)
    assert passed, f"last-step ratio: energy distance {distance:.4f} (bound {bound}), p = {p_value:.3f}"
    # the first drafted unit has the same prefix in both runs: the ratios differ by log D = d f log sqrt(1.5)
    gap = runs["paper"].log_ratio_BK[:, 0] - runs["last_step"].log_ratio_BK[:, 0]
    torch.testing.assert_close(gap, torch.full((N,), 2 * 10 * 0.5 * math.log(1.5), dtype=torch.float64))
