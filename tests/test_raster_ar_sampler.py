"""The next-token loop against a mock NextTokenModel with known logits, and against a tiny RasterAR: CFG schedules
(constant, LlamaGen's interval, the ramp over tokens), dropping the unconditional rows, filters, per-image
generators, forced units, Token-Shuffle windows."""

from dataclasses import dataclass, field

import pytest
import torch
from vgen.samplers.guidance import (
    ConstantCFG,
    FirstStepsCFG,
    WeightRampCFG,
    combine_cfg_difference,
    guidance_is_off,
    llamagen_cfg_interval,
)
from vgen.samplers.interfaces import NextTokenModel
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.next_token import generate_next_token, guidance_weights

from test_raster_ar_model import condition, tiny

V = 6


@dataclass
class MockCache:
    commits: int = 0

    def commit(self, keep_B=None):
        self.commits += 1


@dataclass
class MockState:
    cache: MockCache
    rows: list[int]
    history: list[torch.Tensor] = field(default_factory=list)

    def select(self, index_B):
        self.rows = [self.rows[i] for i in index_B.tolist()]


class MockModel:
    """Row r's logits favour code ``(cond_r + sum of its codes so far + step) % V`` (conditional rows) or code 0
    (unconditional rows); records the batch of every decode."""

    def __init__(self, N=5, k=1):
        self.sequence_length, self.tokens_per_step, self.vocab_size = N, k, V
        self.decode_rows: list[int] = []

    def concat_conditions(self, cond, uncond):
        return torch.cat((cond, uncond))

    def null_condition(self, batch_size):
        return torch.full((batch_size,), -1)

    def _logits(self, state):
        out = torch.zeros(len(state.rows), self.tokens_per_step, V)
        for i, r in enumerate(state.rows):
            c = int(state.cond[r])
            if c < 0:
                out[i, :, 0] = 3.0
            else:
                total = sum(int(h[i].sum()) for h in state.history)
                out[i, torch.arange(self.tokens_per_step), (c + total + len(state.history)) % V] = 2.0
        return out

    def prefill(self, cond):
        state = MockState(MockCache(), list(range(len(cond))))
        state.cond = cond
        return state, self._logits(state)

    def decode(self, units_Bnk, state):
        self.decode_rows.append(units_Bnk.shape[0])
        state.history.append(units_Bnk[:, 0])
        return self._logits(state)[:, None]

    def to_raster(self, units_BNk):
        return units_BNk.flatten(1)


def test_mock_satisfies_the_interface_and_tiny_model_too():
    assert isinstance(MockModel(), NextTokenModel)
    assert isinstance(tiny(), NextTokenModel)


def test_greedy_without_guidance_follows_the_conditional_logits():
    model = MockModel(N=4)
    out = generate_next_token(model, torch.tensor([1, 2]), 2, guidance_scale=1.0, sampling=TokenSampling(top_k=1))
    # code_j = (c + sum(previous) + j) % V
    expected = []
    for c in (1, 2):
        codes = []
        for j in range(4):
            codes.append((c + sum(codes) + j) % V)
        expected.append(codes)
    assert out.tokens_BL.tolist() == expected
    assert model.decode_rows == [2, 2, 2]  # no unconditional rows at all


def test_cfg_rows_are_dropped_after_the_last_guided_step():
    model = MockModel(N=6)
    guided = generate_next_token(model, torch.tensor([1, 2]), 2, guidance_scale=3.0,
                                 guidance_schedule=FirstStepsCFG(ConstantCFG(), 2), sampling=TokenSampling(top_k=1),
                                 keep_logits=True)
    assert model.decode_rows == [4, 2, 2, 2, 2]  # steps 0-1 guided: decode 0 still feeds both halves
    # the guided steps combine cond and uncond with w = 3; the rest are the conditional logits
    cond_logit = torch.zeros(V)
    cond_logit[1] = 2.0
    uncond_logit = torch.zeros(V)
    uncond_logit[0] = 3.0
    assert torch.allclose(guided.logits_BNkV[0, 0, 0], combine_cfg_difference(cond_logit, uncond_logit, 3.0))
    assert guided.logits_BNkV[0, 3, 0].max() == 2.0


def test_schedules_over_steps():
    assert guidance_weights(WeightRampCFG(), 3.0, 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guidance_weights(ConstantCFG(), 2.0, 3) == [2.0, 2.0, 2.0]
    # LlamaGen's cfg_interval = c guides its first token and decode steps 0..c: the first c + 2 tokens
    assert guidance_weights(llamagen_cfg_interval(ConstantCFG(), 1), 2.0, 5) == [2.0, 2.0, 2.0, 1.0, 1.0]
    assert llamagen_cfg_interval(ConstantCFG(), -1) == ConstantCFG()
    assert guidance_is_off(WeightRampCFG(), 1.0, 10) and not guidance_is_off(WeightRampCFG(), 1.5, 10)
    with pytest.raises(ValueError, match="cfg_interval must be -1"):
        llamagen_cfg_interval(ConstantCFG(), -2)


def test_forced_units_replace_sampling():
    model = MockModel(N=4, k=2)
    forced = torch.tensor([[[5, 4], [3, 3]]])
    out = generate_next_token(model, torch.tensor([1]), 1, forced_units_BMk=forced, sampling=TokenSampling(top_k=1))
    assert out.units_BNk[:, :2].tolist() == forced.tolist()
    assert out.units_BNk.shape == (1, 4, 2)
    with pytest.raises(ValueError, match="forced units must be"):
        generate_next_token(model, torch.tensor([1]), 1, forced_units_BMk=torch.zeros(1, 5, 2, dtype=torch.long))


def test_more_smooth_is_refused():
    with pytest.raises(ValueError, match="more_smooth"):
        generate_next_token(MockModel(), torch.tensor([1]), 1, sampling=TokenSampling(more_smooth=True))


# ---------------------------------------------------------------------------------------------- tiny RasterAR


def test_dropping_uncond_rows_changes_nothing_but_the_batch():
    model = tiny(shuffle_window=2)
    cond = condition(model, 2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    full = generate_next_token(model, cond, 2, guidance_scale=2.0, sampling=TokenSampling(top_k=4),
                               generators=gens(), keep_logits=True)
    # the same weights, but with w = 1 + 1e-12 after step 1, so both halves run to the end
    class AlmostOff:
        def weight(self, g, step, n):
            return 2.0 if step < 2 else 1.0 + 1e-12

    early = generate_next_token(model, cond, 2, guidance_scale=2.0, guidance_schedule=FirstStepsCFG(ConstantCFG(), 2),
                                sampling=TokenSampling(top_k=4), generators=gens(), keep_logits=True)
    late = generate_next_token(model, cond, 2, guidance_scale=2.0, guidance_schedule=AlmostOff(),
                               sampling=TokenSampling(top_k=4), generators=gens(), keep_logits=True)
    assert (early.logits_BNkV - late.logits_BNkV).abs().max() < 1e-5
    assert torch.equal(full.logits_BNkV[:, :2], early.logits_BNkV[:, :2])
    assert early.tokens_BL.shape == (2, 16)


def test_per_image_generators_make_images_independent_of_the_batch():
    model = tiny()
    cond = condition(model, 3)
    sampling = TokenSampling(top_k=0, top_p=0.9, temperature=1.3)
    batch = generate_next_token(model, cond, 3, guidance_scale=1.5, sampling=sampling,
                                generators=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = generate_next_token(model, cond.rows(1, 2), 1, guidance_scale=1.5, sampling=sampling,
                                generators=[torch.Generator().manual_seed(11)])
    assert torch.equal(batch.tokens_BL[1:2], alone.tokens_BL)
    other = generate_next_token(model, cond.rows(1, 2), 1, guidance_scale=1.5, sampling=sampling,
                                generators=[torch.Generator().manual_seed(99)])
    assert not torch.equal(other.tokens_BL, alone.tokens_BL)


def test_top_p_one_is_off_and_top_k_one_is_greedy():
    model = tiny()
    cond = condition(model, 2)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    off = generate_next_token(model, cond, 2, sampling=TokenSampling(top_p=1.0), generators=seeds())
    zero = generate_next_token(model, cond, 2, sampling=TokenSampling(top_p=0.0), generators=seeds())
    assert torch.equal(off.tokens_BL, zero.tokens_BL)
    greedy = generate_next_token(model, cond, 2, sampling=TokenSampling(top_k=1), keep_logits=True)
    # greedy codes are the argmax of the logits the loop saw (teacher forcing them gives the same logits)
    with torch.no_grad():
        forced = model(greedy.tokens_BL, cond=cond)
    assert torch.equal(forced.argmax(-1), greedy.units_BNk)
    assert (forced - greedy.logits_BNkV).abs().max() < 1e-5


def test_token_shuffle_sample_comes_out_in_raster_order():
    model = tiny(shuffle_window=2)
    cond = condition(model, 2)
    out = generate_next_token(model, cond, 2, sampling=TokenSampling(top_k=1), keep_logits=True)
    assert out.units_BNk.shape == (2, 4, 4) and out.tokens_BL.shape == (2, 16)
    assert torch.equal(model.to_units(out.tokens_BL), out.units_BNk)
    assert torch.equal(out.tokens_BL.view(2, 4, 4)[:, :2, :2].flatten(1), out.units_BNk[:, 0])
    assert torch.equal(out.tokens_BL.view(2, 4, 4)[:, 2:, 2:].flatten(1), out.units_BNk[:, 3])
