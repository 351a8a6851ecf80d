"""The sampling layer against hand-computed numbers and a mock next-scale model that returns fixed logits."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from vgen.samplers.guidance import (
    ConstantCFG,
    IntervalCFG,
    LinearRampCFG,
    ProfileCFG,
    apply_cfg,
    check_profile,
    combine_cfg,
    guidance_is_off,
    parse_guidance_profile,
    schedule_from_profile,
)
from vgen.samplers.interfaces import NextScaleModel, ResidualQuantizer, StepKVCache
from vgen.samplers.logits import (
    filter_top_k_top_p,
    gumbel_softmax,
    sample_categorical,
    sample_from_logits,
)
from vgen.samplers.next_scale import TokenSampling, generate_next_scale

from vgen.kv_cache import FullKVCache

# ------------------------------------------------------------------------------------------------ filtering


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[[1.0, 3.0, 2.0, 3.0, 0.5]]])
    out = filter_top_k_top_p(logits, top_k=2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[[False, True, False, True, False]]]))
    out3 = filter_top_k_top_p(logits, top_k=3)  # 3rd largest is 2.0 -> keeps 3.0, 3.0, 2.0
    assert torch.isfinite(out3).sum() == 3 and torch.isfinite(out3[0, 0, 2])
    assert torch.equal(out3[torch.isfinite(out3)], logits[torch.isfinite(out3)])


def test_top_p_hand_computed():
    # probs 0.5, 0.25, 0.15, 0.1 (ascending 0.1, 0.15, 0.25, 0.5; cumsum 0.1, 0.25, 0.5, 1.0).
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().view(1, 1, 4)
    # top_p=0.7: remove cumsum <= 0.3 -> 0.1 and 0.15 go, 0.25 and 0.5 stay
    keep = torch.isfinite(filter_top_k_top_p(logits, top_p=0.7)).view(-1)
    assert keep.tolist() == [True, True, False, False]
    # top_p=0.76: remove cumsum <= 0.24 -> only 0.1 goes
    keep = torch.isfinite(filter_top_k_top_p(logits, top_p=0.76)).view(-1)
    assert keep.tolist() == [True, True, True, False]
    # tiny top_p keeps only the largest token
    keep = torch.isfinite(filter_top_k_top_p(logits, top_p=1e-6)).view(-1)
    assert keep.tolist() == [True, False, False, False]


def test_top_k_then_top_p_order():
    """Inputs where the two orders keep different sets, so swapping them inside the filter fails this test."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().view(1, 1, 4)
    # top-k=2 renormalises to 4/7, 3/7; top-p=0.5 then drops 3/7 (cumsum 0.43 <= 0.5): only the largest stays
    keep = torch.isfinite(filter_top_k_top_p(logits, top_k=2, top_p=0.5)).view(-1)
    assert keep.tolist() == [True, False, False, False]
    # the other order: top-p on the full distribution drops 0.1 and 0.2 (cumsum 0.1, 0.3), top-k=2 keeps 0.4, 0.3
    p_then_k = filter_top_k_top_p(filter_top_k_top_p(logits, top_p=0.5), top_k=2)
    assert torch.isfinite(p_then_k).view(-1).tolist() == [True, True, False, False]
    keep = torch.isfinite(filter_top_k_top_p(logits, top_k=3, top_p=0.85)).view(-1)
    assert keep.tolist() == [True, True, True, False]


def test_filter_matches_official_in_place_helper():
    """Against a transcription of official ``sample_with_top_k_top_p_``'s filtering on random logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g)
    ref = logits.clone()
    top_k, top_p = 20, 0.8
    idx_to_remove = ref < ref.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
    ref.masked_fill_(idx_to_remove, -torch.inf)
    sorted_logits, sorted_idx = ref.sort(dim=-1, descending=False)
    rm = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    rm[..., -1:] = False
    ref.masked_fill_(rm.scatter(sorted_idx.ndim - 1, sorted_idx, rm), -torch.inf)
    out = filter_top_k_top_p(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(out, ref)
    assert not torch.equal(logits, ref)  # out of place: input untouched


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_categorical_frequencies_and_zero_mass():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3]).view(1, 1, 5).expand(1, 20000, 5)
    idx = sample_categorical(probs, [torch.Generator().manual_seed(1)])
    freq = torch.bincount(idx.view(-1), minlength=5).float() / idx.numel()
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq, torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3]), atol=0.015)


def test_greedy_top_k_1_is_argmax():
    logits = torch.randn(4, 9, 30, generator=torch.Generator().manual_seed(3))
    idx, _ = sample_from_logits(logits, [torch.Generator().manual_seed(i) for i in range(4)], top_k=1)
    assert torch.equal(idx, logits.argmax(-1))


def test_temperature_sharpens():
    logits = torch.tensor([0.0, 1.0]).view(1, 1, 2).expand(1, 20000, 2)
    gens = [torch.Generator().manual_seed(0)]
    p1 = sample_from_logits(logits, gens, temperature=1.0)[0].float().mean().item()
    p_low = sample_from_logits(logits, gens, temperature=0.25)[0].float().mean().item()
    assert abs(p1 - 1 / (1 + math.exp(-1))) < 0.015
    assert abs(p_low - 1 / (1 + math.exp(-4))) < 0.015
    with pytest.raises(ValueError, match="temperature"):
        sample_from_logits(logits, gens, temperature=0)


def test_per_sample_generators_independent_of_batch():
    logits = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(5))
    batch = sample_from_logits(logits, [torch.Generator().manual_seed(100 + i) for i in range(3)])[0]
    for i in range(3):
        alone = sample_from_logits(logits[i : i + 1], [torch.Generator().manual_seed(100 + i)])[0]
        assert torch.equal(alone[0], batch[i])
    with pytest.raises(ValueError, match="one per sample"):
        sample_from_logits(logits, [torch.Generator()])


def test_gumbel_softmax_rows_and_limit():
    logits = torch.tensor([[[0.0, 2.0, 1.0]]]).expand(2, 1, 3)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    w = gumbel_softmax(logits, tau=0.5, generators=gens)
    assert torch.allclose(w.sum(-1), torch.ones(2, 1))
    assert torch.equal(w[0], w[1])  # same seed, same noise
    # tau -> 0 gives one-hot at argmax(logits + gumbel); with huge logit gap always the max
    w_hard = gumbel_softmax(torch.tensor([[[0.0, 50.0, 0.0]]]), tau=1e-3, generators=gens[:1])
    assert torch.allclose(w_hard, torch.tensor([[[0.0, 1.0, 0.0]]]), atol=1e-6)


# ------------------------------------------------------------------------------------------------ guidance


def test_linear_ramp_weights_are_official_var():
    s = LinearRampCFG()
    assert s.weight(1.5, 0, 10) == 1.0
    assert s.weight(1.5, 9, 10) == 2.5
    assert math.isclose(s.weight(1.5, 3, 10), 1 + 1.5 * 3 / 9)
    c, u = torch.randn(2, 5), torch.randn(2, 5)
    t = 1.5 * 3 / 9
    out = apply_cfg(torch.cat((c, u)), s, 1.5, 3, 10)
    assert torch.allclose(out, (1 + t) * c - t * u)


def test_cfg_off_cases_equal_unguided():
    c, u = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.equal(apply_cfg(torch.cat((c, u)), LinearRampCFG(), 1.5, 0, 10), c)  # ratio 0
    assert torch.equal(apply_cfg(torch.cat((c, u)), LinearRampCFG(), 0.0, 7, 10), c)  # guidance 0
    assert torch.equal(apply_cfg(torch.cat((c, u)), ConstantCFG(), 1.0, 7, 10), c)  # diffusers w = 1
    assert guidance_is_off(LinearRampCFG(), 0.0, 10) and not guidance_is_off(LinearRampCFG(), 0.1, 10)
    assert guidance_is_off(ConstantCFG(), 1.0, 10) and not guidance_is_off(ConstantCFG(), 1.5, 10)


def test_constant_and_interval_schedules():
    assert ConstantCFG().weight(4.0, 3, 10) == 4.0
    s = IntervalCFG(ConstantCFG(), start=0.5, end=1.0)
    assert [s.weight(3.0, k, 5) for k in range(5)] == [1.0, 1.0, 3.0, 3.0, 3.0]
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert combine_cfg(c, u, 3.0).item() == 4.0  # u + 3 (c - u)


def test_profile_schedule_shares_the_scale_per_step():
    ramp = ProfileCFG(tuple(k / 6 for k in range(7)))
    assert all(math.isclose(ramp.weight(1.5, k, 7), LinearRampCFG().weight(1.5, k, 7)) for k in range(7))
    coarse = ProfileCFG((0.5, 0.75, 1, 1, 1, 0.75, 0.75))
    assert [coarse.weight(2.0, k, 7) for k in range(7)] == [2.0, 2.5, 3.0, 3.0, 3.0, 2.5, 2.5]
    assert guidance_is_off(ProfileCFG((0.0, 0.0)), 3.0, 2) and guidance_is_off(coarse, 0.0, 7)
    with pytest.raises(ValueError, match="has 7 entries but this model generates in 10 steps"):
        coarse.weight(2.0, 0, 10)
    with pytest.raises(ValueError, match="one entry >= 0 per step"):
        ProfileCFG((1.0, -0.5))
    assert isinstance(schedule_from_profile("ramp"), LinearRampCFG)
    assert schedule_from_profile([0.5, 1]).weight(2.0, 0, 2) == 2.0
    with pytest.raises(ValueError, match="unknown guidance profile 'linear'"):
        schedule_from_profile("linear")


def test_parse_guidance_profile():
    assert parse_guidance_profile(" ramp ") == "ramp"
    assert parse_guidance_profile("0.5,0.75,1") == [0.5, 0.75, 1.0]
    for bad in ("0.5;1", "nan,1", "1,inf", ""):
        with pytest.raises(ValueError, match="neither 'ramp' nor comma-separated finite numbers"):
            parse_guidance_profile(bad)
    with pytest.raises(ValueError, match="give 2 shares >= 0"):
        check_profile([float("nan"), 1.0], 2)


def test_check_profile_accepts_the_ramp_or_one_share_per_step():
    assert check_profile("ramp", 7) == "ramp"
    assert check_profile((1, 0.5), 2) == [1.0, 0.5]
    for bad in ((1.0,), (1.0, -0.5), "linear"):
        with pytest.raises(ValueError, match="does not fit: give 2 shares >= 0, one per generation step"):
            check_profile(bad, 2)


# ------------------------------------------------------------------------------------------------ mock loop


class MockQuantizer(torch.nn.Module):
    """Codebook = identity-ish; f_hat accumulates nearest-upsampled code maps, next input = area-down f_hat."""

    def __init__(self, V: int, Cvae: int, patch_nums):
        super().__init__()
        self.patch_nums = patch_nums
        self.embedding = torch.nn.Embedding(V, Cvae)
        torch.nn.init.normal_(self.embedding.weight, generator=torch.Generator().manual_seed(0))

    def get_next_autoregressive_input(self, si, SN, f_hat, h_BChw):
        HW = self.patch_nums[-1]
        f_hat = f_hat + F.interpolate(h_BChw, size=(HW, HW), mode="nearest")
        if si == SN - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")


@dataclass
class MockState:
    cache: FullKVCache


class MockNextScaleModel:
    """Returns fixed logits per (condition row, scale): logits = table[cond] + scale offset. Records calls."""

    def __init__(self, V=6, patch_nums=(1, 2, 3)):
        self.V, self._patch_nums = V, patch_nums
        self.table = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 3
        self.null = torch.zeros(V)
        self.calls: list[tuple[int, int]] = []

    @property
    def patch_nums(self):
        return self._patch_nums

    def concat_conditions(self, cond, uncond):
        return torch.cat((cond, uncond))

    def null_condition(self, batch_size):
        return self.null.expand(batch_size, -1)

    def prefill(self, cond):
        self.cond = cond
        cache = FullKVCache(batch=cond.shape[0], heads=1, head_dim=1, capacity=sum(p * p for p in self._patch_nums))
        return MockState(cache), torch.zeros(cond.shape[0], 1, 1)

    def logits_for_scale(self, si, token_map_BlC, state):
        B, l = token_map_BlC.shape[:2]
        assert l == self._patch_nums[si] ** 2
        self.calls.append((si, B))
        q = torch.zeros(B, 1, l, 1)
        state.cache.attend(0, q, q, q)
        return (self.cond[:, None, :] + si).expand(B, l, self.V).clone()

    def embed_scale_input(self, si, next_input_BCvhw):
        B, _, h, w = next_input_BCvhw.shape
        return torch.zeros(B, h * w, 1)


def test_mock_model_and_quantizer_satisfy_protocols():
    assert isinstance(MockNextScaleModel(), NextScaleModel)
    assert isinstance(MockQuantizer(6, 2, (1, 2, 3)), ResidualQuantizer)
    assert isinstance(FullKVCache(batch=1, heads=1, head_dim=1, capacity=1), StepKVCache)


def test_loop_greedy_with_cfg_matches_hand_computation():
    model, quant = MockNextScaleModel(), MockQuantizer(6, 2, (1, 2, 3))
    cond = model.table[[0, 2]]
    out = generate_next_scale(model, quant, cond, 2, guidance_scale=2.0, sampling=TokenSampling(top_k=1),
                              keep_logits=True)
    assert model.calls == [(0, 4), (1, 4), (2, 4)]  # CFG doubles the batch at every scale
    for si, pn in enumerate((1, 2, 3)):
        t = 2.0 * si / 2
        expected = (1 + t) * (cond + si) - t * (model.null + si)
        assert torch.allclose(out.logits_BlV[si], expected[:, None, :].expand(2, pn * pn, 6))
        assert torch.equal(out.idx_Bl[si], expected.argmax(-1)[:, None].expand(2, pn * pn))
    # f_hat is the sum of nearest-upsampled code maps of the chosen codes
    f = sum(F.interpolate(quant.embedding(i).transpose(1, 2).reshape(2, 2, pn, pn), size=(3, 3)) for i, pn in
            zip(out.idx_Bl, (1, 2, 3)))
    assert torch.allclose(out.f_hat, f)


def test_loop_skips_uncond_pass_when_guidance_off_and_forces_prefix():
    model, quant = MockNextScaleModel(), MockQuantizer(6, 2, (1, 2, 3))
    forced = [torch.tensor([[5], [4]])]
    out = generate_next_scale(model, quant, model.table[[1, 3]], 2, guidance_scale=0.0,
                              sampling=TokenSampling(top_k=1), forced_idx_Bl=forced)
    assert model.calls == [(0, 2), (1, 2), (2, 2)]
    assert torch.equal(out.idx_Bl[0], forced[0])
    assert torch.equal(out.idx_Bl[1], (model.table[[1, 3]] + 1).argmax(-1)[:, None].expand(2, 4))


def test_loop_seeded_images_independent_of_batch_size():
    model, quant = MockNextScaleModel(V=12), MockQuantizer(12, 2, (1, 2, 3))
    conds = model.table[[0, 1, 2]]
    sampling = TokenSampling(top_k=8, top_p=0.95, temperature=1.3)
    batch = generate_next_scale(model, quant, conds, 3, guidance_scale=1.0, sampling=sampling,
                                generators=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i in range(3):
        one = generate_next_scale(model, quant, conds[i : i + 1], 1, guidance_scale=1.0, sampling=sampling,
                                  generators=[torch.Generator().manual_seed(10 + i)])
        for si in range(3):
            assert torch.equal(one.idx_Bl[si][0], batch.idx_Bl[si][i])
        assert torch.allclose(one.f_hat[0], batch.f_hat[i])
    # different seeds give different draws somewhere (the distribution is not degenerate)
    other = generate_next_scale(model, quant, conds, 3, guidance_scale=1.0, sampling=sampling,
                                generators=[torch.Generator().manual_seed(99 + i) for i in range(3)])
    assert any(not torch.equal(a, b) for a, b in zip(other.idx_Bl, batch.idx_Bl))


def test_more_smooth_is_soft_codebook_mixture():
    model, quant = MockNextScaleModel(V=6), MockQuantizer(6, 2, (1, 2, 3))
    cond = model.table[[0, 2]]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    hard = generate_next_scale(model, quant, cond, 2, guidance_scale=0.0, sampling=TokenSampling(top_k=1),
                               generators=gens())
    # one token left after top-k=1, so the Gumbel-softmax weights are one-hot: same f_hat as the hard path
    smooth_k1 = generate_next_scale(model, quant, cond, 2, guidance_scale=0.0,
                                    sampling=TokenSampling(top_k=1, more_smooth=True), generators=gens())
    torch.testing.assert_close(smooth_k1.f_hat, hard.f_hat)
    # without filtering the embeddings are a mixture, so f_hat leaves the set of codebook sums
    smooth = generate_next_scale(model, quant, cond, 2, guidance_scale=0.0,
                                 sampling=TokenSampling(more_smooth=True), generators=gens())
    assert not torch.allclose(smooth.f_hat, hard.f_hat)


def test_on_scale_callback_replaces_tokens():
    model, quant = MockNextScaleModel(), MockQuantizer(6, 2, (1, 2, 3))
    seen = []

    def keep_known(si, idx_Bl, f_hat):
        seen.append((si, f_hat.abs().sum().item()))
        return torch.full_like(idx_Bl, 3) if si == 1 else None

    out = generate_next_scale(model, quant, model.table[[0, 1]], 2, guidance_scale=0.0,
                              sampling=TokenSampling(top_k=1), on_scale=keep_known)
    assert [si for si, _ in seen] == [0, 1, 2] and seen[0][1] == 0.0 and seen[1][1] > 0
    assert out.idx_Bl[1].eq(3).all()
    assert torch.equal(out.idx_Bl[2], (model.table[[0, 1]] + 2).argmax(-1)[:, None].expand(2, 9))
