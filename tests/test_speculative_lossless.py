"""Lossless means proven: exact speculative sampling and speculative Jacobi decoding against the exact target
distribution of a tiny model, computed by enumeration.

The model: a random RasterAR over a 2x2 grid (4 positions) with a vocabulary of 4 (256 outcomes), class-conditional,
sampled with CFG (and, in one configuration each, temperature and top-k). The target's joint distribution under CFG
and the filters is the product of the guided, filtered conditionals of the teacher-forced forward pass over all 256
sequences. Each configuration draws 20 000 images in one batch, one ``torch.Generator`` per image (seed = image
index + an offset per configuration), and runs Pearson's chi-square test on the 256 counts (cells with an expected
count below 5 pooled into one). Significance level ``ALPHA = 1e-3`` per configuration.

Batch size: every image draws its own noise, a fixed amount per round, from its own generator, and every round
drafts the same number of units whatever the other images do, so an image's tokens do not depend on the batch it is
drawn in (``test_images_do_not_depend_on_the_batch`` checks rows of a batch against the same generators at batch
sizes 1 and 4). The 20 000 images of a batch are therefore the images 20 000 calls at batch size 1, or 5000 at
batch size 4, would give, and the test covers both.

Power: the same test must reject deliberately broken verifiers, accepting drafts without the ratio test and
resampling rejected drafts from ``p`` instead of the residual; they are required to fail with a p-value below
``1e-9`` (six orders of magnitude past ALPHA).
"""

import itertools
from dataclasses import dataclass

import pytest
import torch
from scipy import stats
from vgen.models.raster_ar import RasterAR
from vgen.samplers.jacobi import generate_jacobi
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.speculative_core import ExactVerifier, token_probs, verify_drafts
from vgen.samplers.speculative_exact import generate_speculative_exact

from speculative_mocks import TableModel

ALPHA = 1e-3
BROKEN_P = 1e-9
SAMPLES = 20_000
V, GRID = 4, 2
LABEL = 1


def tiny_model(seed: int) -> RasterAR:
    torch.manual_seed(seed)
    model = RasterAR(vocab_size=V, grid_size=GRID, depth=1, embed_dim=8, num_heads=1, ffn_hidden_dim=8,
                     num_classes=3, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.output.weight.copy_(torch.randn_like(model.output.weight) * 0.5)
    return model


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def drafter():
    return tiny_model(1)


def exact_joint(model, guidance_scale: float, sampling: TokenSampling):
    """Every outcome as raster codes (S, L) and its probability (S,) float64 under CFG + filters."""
    if isinstance(model, TableModel):
        outcomes, cond, uncond = model.joint_logits(LABEL)
        seqs = outcomes.flatten(1)
    else:
        seqs = torch.tensor(list(itertools.product(range(V), repeat=GRID * GRID)))
        S = seqs.shape[0]
        with torch.no_grad():
            cond = model(seqs, cond=model.class_condition(torch.full((S,), LABEL)))
            uncond = model(seqs, cond=model.null_condition(S))
        outcomes = model.to_units(seqs)
    probs = token_probs(uncond + guidance_scale * (cond - uncond), sampling).double()
    return seqs, probs.gather(-1, outcomes[..., None]).squeeze(-1).flatten(1).prod(-1)


def chi_square(seqs, joint, tokens_BL, vocab: int = V):
    """Pearson's statistic, degrees of freedom and p-value of the outcome counts against ``joint``."""
    L = seqs.shape[1]
    place = vocab ** torch.arange(L - 1, -1, -1)
    order = torch.argsort((seqs * place).sum(1))  # cells indexed by the outcome's base-V number
    counts = torch.bincount((tokens_BL * place).sum(1), minlength=vocab**L).double()
    expected = joint[order] * counts.sum()
    big = expected >= 5
    observed = torch.cat((counts[big], counts[~big].sum()[None]))
    expected = torch.cat((expected[big], expected[~big].sum()[None]))
    if expected[-1] < 5:  # the pooled cell is itself too small: merge it into the smallest big one
        i = int(expected[:-1].argmin())
        observed[i] += observed[-1]
        expected[i] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = observed.numel() - 1
    return statistic, df, float(stats.chi2.sf(statistic, df))


class AcceptAll(ExactVerifier):
    """Broken: accepts every draft (no ratio test)."""

    def accept_probability(self, p_BnkV, q_BnkV, x_Bnk):
        return torch.ones_like(x_Bnk, dtype=p_BnkV.dtype)


class ResampleFromTarget(ExactVerifier):
    """Broken: resamples a rejected draft from p instead of max(0, p - q)."""

    def residual(self, p_BkV, q_BkV, x_Bk):
        return p_BkV


def generators(offset: int, n: int = SAMPLES):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def condition(model, n):
    labels = torch.full((n,), LABEL)
    return labels if isinstance(model, TableModel) else model.class_condition(labels)


def sample(case, target, drafter, verifier=None, offset=None, n=SAMPLES):
    offset = case.offset if offset is None else offset
    kwargs = dict(guidance_scale=case.guidance_scale, sampling=case.sampling, generators=generators(offset, n),
                  verifier=verifier)
    if case.method == "exact":
        return generate_speculative_exact(target, drafter, condition(target, n), condition(drafter, n), n,
                                          gamma=case.size, **kwargs)
    return generate_jacobi(target, condition(target, n), n, window=case.size, **kwargs)


@dataclass(frozen=True)
class Case:
    method: str  # "exact" or "sjd"
    guidance_scale: float
    sampling: TokenSampling
    size: int  # gamma / window
    offset: int  # generator seeds: offset + image index
    model: str = "raster"  # "raster": the tiny RasterAR; "windows": the table model with 2-code units


CASES = {
    "exact-cfg2-gamma2": Case("exact", 2.0, TokenSampling(), 2, 0),
    "exact-cfg1.5-gamma3-topk3-t0.8": Case("exact", 1.5, TokenSampling(top_k=3, temperature=0.8), 3, 10**6),
    "sjd-cfg2-window3": Case("sjd", 2.0, TokenSampling(), 3, 2 * 10**6),
    "sjd-cfg1.5-window2-topk3": Case("sjd", 1.5, TokenSampling(top_k=3), 2, 3 * 10**6),
    "exact-windows-cfg2-gamma2": Case("exact", 2.0, TokenSampling(), 2, 4 * 10**6, "windows"),
    "sjd-windows-cfg2-window2": Case("sjd", 2.0, TokenSampling(), 2, 5 * 10**6, "windows"),
}


@pytest.fixture(scope="module")
def models(target, drafter):
    return {"raster": (target, drafter),
            "windows": (TableModel(0, V=3, N=3, k=2, scale=0.7), TableModel(1, V=3, N=3, k=2, scale=0.7))}


def run_case(name, models, verifier=None):
    case = CASES[name]
    target, drafter = models[case.model]
    seqs, joint = exact_joint(target, case.guidance_scale, case.sampling)
    out = sample(case, target, drafter, verifier=verifier)
    return out, chi_square(seqs, joint, out.tokens_BL, int(target.vocab_size))


@pytest.mark.parametrize("name", list(CASES))
def test_speculative_sampling_is_lossless(name, models):
    out, (statistic, df, p_value) = run_case(name, models)
    assert df >= 40, f"too few cells for a meaningful test ({df + 1})"
    assert p_value > ALPHA, f"{name}: chi2 = {statistic:.1f} on {df} df, p = {p_value:.2e}"
    summary = out.stats.summary()
    assert 0.05 < summary["acceptance_rate"] < 0.95  # both branches of the rule were exercised
    assert summary["target_forwards_per_image"] < out.units_BNk.shape[1]  # it saved target passes


@pytest.mark.parametrize("name", ["exact-cfg2-gamma2", "sjd-cfg2-window3", "exact-windows-cfg2-gamma2"])
@pytest.mark.parametrize("broken", [AcceptAll, ResampleFromTarget])
def test_broken_verifiers_fail_the_same_test(name, broken, models):
    _, (statistic, df, p_value) = run_case(name, models, verifier=broken())
    assert p_value < BROKEN_P, f"{broken.__name__} passed: chi2 = {statistic:.1f} on {df} df, p = {p_value:.2e}"


def test_sjd_with_the_wrong_proposal_fails(models, monkeypatch):
    """Broken SJD: new drafts are sampled from the pass's p, but the verifier is told they came from the uniform
    initialisation (the proposal of another iteration)."""
    import vgen.samplers.jacobi as jacobi

    refill = jacobi.refill_window

    def wrong_q(p_BmkV, accepted_B, u_Bwk):
        drafts, q = refill(p_BmkV, accepted_B, u_Bwk)
        return drafts, torch.full_like(q, 1.0 / q.shape[-1])

    monkeypatch.setattr(jacobi, "refill_window", wrong_q)
    _, (statistic, df, p_value) = run_case("sjd-cfg2-window3", models)
    assert p_value < BROKEN_P, f"wrong proposal passed: chi2 = {statistic:.1f} on {df} df, p = {p_value:.2e}"


@pytest.mark.parametrize("method", ["exact", "sjd"])
def test_images_do_not_depend_on_the_batch(method, models):
    case = CASES["exact-cfg2-gamma2" if method == "exact" else "sjd-cfg2-window3"]
    target, drafter = models["raster"]
    n = 8
    batch = sample(case, target, drafter, offset=77, n=n).tokens_BL
    for size in (1, 4):
        for start in range(0, n, size):
            part = sample(case, target, drafter, offset=77 + start, n=size).tokens_BL
            assert torch.equal(part, batch[start : start + size]), (method, size, start)


# ---------------------------------------------------------------------------------------------- the rule itself


def random_pairs():
    g = torch.Generator().manual_seed(0)
    V = 7
    pairs = []
    p = torch.rand(V, generator=g)
    q = torch.rand(V, generator=g)
    pairs.append((p / p.sum(), q / q.sum()))  # random
    pairs.append((p / p.sum(), p / p.sum()))  # p == q
    pairs.append((torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0.0]), torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25, 0.0])))
    pairs.append((p / p.sum(), torch.eye(V)[3]))  # one-hot q
    top = torch.where(p >= p.sort().values[-3], p, 0.0)
    pairs.append((top / top.sum(), q / q.sum()))  # top-k truncated p, q = 0 nowhere
    return pairs


@pytest.mark.parametrize("pair", range(5))
def test_one_step_output_distribution_is_p_analytically(pair):
    """For one drafted code, P(out = y) = sum_x q(x) [a(x) 1{y = x} + (1 - a(x)) r_x(y)] must equal p(y): computed
    through verify_drafts with every draft x and the acceptance uniform integrated out exactly (a(x) is the
    acceptance probability, r_x the residual)."""
    p, q = random_pairs()[pair]
    Vp = p.numel()
    x = torch.arange(Vp)[:, None, None]  # every possible draft, one row each
    P = p.expand(Vp, 2, 1, Vp).clone()  # (rows, drafted position + bonus, k, V)
    Q = q.expand(Vp, 1, 1, Vp).clone()
    verifier = ExactVerifier()
    accept_x = verifier.accept_probability(P[:, :1], Q, x)[:, 0, 0].double()
    residual = verifier.residual(P[:, 0], Q[:, 0], x[:, 0])[:, 0].double()
    residual = residual / residual.sum(-1, keepdim=True)
    out = (q.double() * accept_x) @ torch.eye(Vp, dtype=torch.float64) + (q.double() * (1 - accept_x)) @ residual
    assert torch.allclose(out, p.double(), atol=1e-6)
    # and verify_drafts rejects exactly when u >= a(x): u just below / above the acceptance probability
    for b in range(Vp):
        if 0 < accept_x[b] < 1:
            for u, accepted in ((accept_x[b] - 1e-4, 1), (accept_x[b] + 1e-4, 0)):
                ver = verify_drafts(P[b : b + 1], Q[b : b + 1], x[b : b + 1],
                                    torch.tensor([[[float(u)]]]), torch.tensor([[0.5]]), verifier)
                assert int(ver.accepted_B) == accepted
