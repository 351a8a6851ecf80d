"""MuLo-SD: neighbourhood expansion and island labelling on hand-made masks, the pooled acceptance rule, and the two
limits of tau on tiny random RasterARs (tau = 0 keeps the up-sampled draft; tau > 1 is target-only sampling for the
same generator states)."""

import pytest
import torch
from vgen.models.raster_ar import RasterAR
from vgen.samplers.mulo_sd import (
    expand_rejections,
    generate_mulo_sd,
    island_waves,
    label_islands,
    pooled_probability,
)
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.next_token import generate_next_token


def mask(rows: list[str]) -> torch.Tensor:
    """``["..x", "x.."]`` -> bool (1, H, W)."""
    return torch.tensor([[ch == "x" for ch in row] for row in rows])[None]


def draw(m: torch.Tensor) -> list[str]:
    return ["".join("x" if v else "." for v in row) for row in m[0].tolist()]


# ---------------------------------------------------------------------------------------------- masks


def test_expansion_grows_each_rejection_by_the_radius_from_the_first_one_on():
    rejected = mask(["......",
                     "..x...",
                     "......",
                     ".....x"])
    assert draw(expand_rejections(rejected, 1)) == ["......",
                                                   "..xx..",  # row 0 and (1, 1) come before the first rejection
                                                   ".xxxxx",
                                                   "....xx"]
    assert draw(expand_rejections(rejected, 0)) == draw(rejected)
    assert draw(expand_rejections(rejected, 2)) == ["......",
                                                   "..xxxx",
                                                   "xxxxxx",
                                                   "xxxxxx"]


def test_expansion_is_per_image_and_empty_without_rejections():
    rejected = torch.cat((mask(["....", ".x..", "...."]), mask(["....", "....", "...."]),
                          mask(["x...", "....", "...x"])))
    grown = expand_rejections(rejected, 1)
    assert draw(grown[0:1]) == ["....", ".xx.", "xxx."]
    assert not grown[1].any()
    assert draw(grown[2:3]) == ["xx..", "xxxx", "..xx"]


def test_islands_are_8_connected_and_labelled_in_raster_order():
    m = mask(["xx....x.",
              "..x...x.",
              "...x....",
              "x......x"])
    labels = label_islands(m)
    # diagonal steps connect (0,1)-(1,2)-(2,3); (0,6)-(1,6) is a second island; (3,0) and (3,7) are alone
    assert labels[0].tolist() == [[1, 1, 0, 0, 0, 0, 7, 0],
                                  [0, 0, 1, 0, 0, 0, 7, 0],
                                  [0, 0, 0, 1, 0, 0, 0, 0],
                                  [25, 0, 0, 0, 0, 0, 0, 32]]
    waves = island_waves(labels.view(1, -1)).view(4, 8)
    assert waves.tolist() == [[0, 1, -1, -1, -1, -1, 0, -1],
                              [-1, -1, 2, -1, -1, -1, 1, -1],
                              [-1, -1, -1, 3, -1, -1, -1, -1],
                              [0, -1, -1, -1, -1, -1, -1, 0]]


def test_zipar_style_waves_move_an_islands_rows_together():
    m = mask(["..xxxx..",
              ".xxxx...",
              "......x."])
    labels = label_islands(m).view(1, -1)
    raster = island_waves(labels).view(3, 8)
    assert raster[0, 2:6].tolist() == [0, 1, 2, 3] and raster[1, 1:5].tolist() == [4, 5, 6, 7]
    lag1 = island_waves(labels, lag=1, width=8).view(3, 8)
    assert lag1[0, 2:6].tolist() == [0, 1, 2, 3] and lag1[1, 1:5].tolist() == [1, 2, 3, 4]
    assert lag1[2, 6] == 0  # an island of its own starts at once
    lag2 = island_waves(labels, lag=2, width=8).view(3, 8)
    assert lag2[1, 1:5].tolist() == [2, 3, 4, 5]
    assert ((lag1 >= 0) == m[0]).all()
    with pytest.raises(ValueError, match="need the grid width"):
        island_waves(labels, lag=1)


def test_a_ring_is_one_island_and_images_are_labelled_apart():
    ring = mask(["xxxx",
                 "x..x",
                 "xxxx"])
    other = mask(["x..x",
                  "....",
                  ".xx."])
    labels = label_islands(torch.cat((ring, other)))
    assert set(labels[0][ring[0]].tolist()) == {1}
    assert labels[1].tolist() == [[1, 0, 0, 4], [0, 0, 0, 0], [0, 10, 10, 0]]


def test_pooled_probability_sums_the_nearest_codes():
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]])
    table = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [2, 3, 1, 0], [3, 2, 1, 0]])
    draft = torch.tensor([[2, 0]])
    assert torch.allclose(pooled_probability(p, draft, table, 0), torch.tensor([[0.3, 0.25]]))
    assert torch.allclose(pooled_probability(p, draft, table, 1), torch.tensor([[0.7, 0.5]]))


# ---------------------------------------------------------------------------------------------- the loop


def tiny(seed: int, grid: int) -> RasterAR:
    torch.manual_seed(seed)
    model = RasterAR(vocab_size=16, grid_size=grid, depth=1, embed_dim=16, num_heads=2, ffn_hidden_dim=16,
                     num_classes=3, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def nearest_upsample(low_BhW: torch.Tensor) -> torch.Tensor:
    """Every low-resolution code repeated over a 2 x 2 block."""
    return low_BhW.repeat_interleave(2, 1).repeat_interleave(2, 2)


NEIGHBOURS = torch.stack([torch.roll(torch.arange(16), -v) for v in range(16)])  # code v, then v + 1, v + 2, ...


@pytest.fixture(scope="module")
def models():
    return tiny(0, 8), tiny(1, 4)


def run(models, B, seeds, **kw):
    target, drafter = models
    labels = torch.arange(B) % 3
    return generate_mulo_sd(target, drafter, target.class_condition(labels), drafter.class_condition(labels), B,
                            nearest_upsample, NEIGHBOURS, generators=[torch.Generator().manual_seed(s) for s in seeds],
                            **kw)


@pytest.mark.parametrize("draft_rows", [1, 2])
def test_tau_zero_returns_the_upsampled_draft_unchanged(models, draft_rows):
    out = run(models, 3, [5, 6, 7], tau=0.0, guidance_scale=2.0, draft_rows=draft_rows)
    low = out.drafter_tokens_BL.view(3, 4, 4)
    assert torch.equal(out.tokens_BL, nearest_upsample(low).reshape(3, 64))
    rounds = 4 // draft_rows
    assert out.stats.target_forwards.tolist() == [1 + rounds] * 3  # prefill + one scoring pass per round
    assert out.stats.summary()["acceptance_rate"] == 1.0


@pytest.mark.parametrize("sampling,w", [(TokenSampling(), 2.0), (TokenSampling(top_k=5, temperature=0.9), 1.5)])
def test_tau_above_one_is_target_only_sampling(models, sampling, w):
    target, _ = models
    labels = torch.arange(3) % 3
    seeds = [11, 12, 13]
    plain = generate_next_token(target, target.class_condition(labels), 3, guidance_scale=w, sampling=sampling,
                                generators=[torch.Generator().manual_seed(s) for s in seeds])
    out = run(models, 3, seeds, tau=1.01, guidance_scale=w, sampling=sampling)
    assert torch.equal(out.tokens_BL, plain.tokens_BL)
    assert out.stats.summary()["acceptance_rate"] == 0.0


def test_intermediate_tau_costs_one_pass_plus_the_largest_island_per_round(models):
    out = run(models, 2, [3, 4], tau=0.1, neighbours=2, guidance_scale=2.0)
    stats = out.stats
    assert (stats.rounds == 4).all() and (stats.drafter_forwards == 16).all()
    assert 1 + 4 < int(stats.target_forwards[0]) < 64  # some islands, fewer passes than target-only
    assert 0.0 < out.stats.summary()["acceptance_rate"] < 1.0
    assert out.tokens_BL.shape == (2, 64) and int(out.tokens_BL.max()) < 16


def test_zipar_style_islands_take_fewer_passes(models):
    raster = run(models, 2, [3, 4], tau=0.2, neighbours=2, guidance_scale=2.0)
    zipar = run(models, 2, [3, 4], tau=0.2, neighbours=2, guidance_scale=2.0, island_lag=1)
    assert int(zipar.stats.target_forwards.max()) < int(raster.stats.target_forwards.max())
    assert torch.equal(zipar.drafter_tokens_BL, raster.drafter_tokens_BL)  # the same drafts (the drafter's own rows)


def test_models_that_do_not_fit_are_refused(models):
    target, _ = models
    with pytest.raises(ValueError, match="multiple of the drafter's"):
        generate_mulo_sd(target, tiny(2, 3), target.class_condition(torch.tensor([0])), None, 1, nearest_upsample,
                         NEIGHBOURS)
    with pytest.raises(ValueError, match="one code per unit"):
        generate_mulo_sd(target, tiny(2, 4).__class__(vocab_size=16, grid_size=4, depth=1, embed_dim=16,
                                                       num_heads=2, shuffle_window=2), None, None, 1,
                         nearest_upsample, NEIGHBOURS)
