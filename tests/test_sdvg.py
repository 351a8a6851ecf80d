"""SDVG quality routing (vgen.samplers.sdvg) on tiny random video models: tau = -inf accepts every drafted block after
the first, tau = +inf is target-only generation for the same seeds, the first block never comes from the drafter,
the chosen block reaches both caches, per-video decisions, the Moving Shapes scorer and the pipeline's SDVG stream."""

import math

import numpy as np
from PIL import Image
import pytest
import torch

from vgen.errors import UserError
from vgen.pipelines.video import SDVGOptions
from vgen.samplers.block_causal import BlockCausalSampler, BlockSampling
from vgen.samplers.flow_grids import shifted_time_grid
from vgen.samplers.sdvg import SDVGRouter, derived_generators

from test_video_model import text_condition, tiny_model
from test_video_pipeline import PROMPT, tiny_pipeline

INF = float("inf")


def constant_scorer(value):
    def score(frames, prompts):
        assert frames.dtype == np.uint8 and frames.ndim == 5 and len(prompts) == frames.shape[0]
        return np.full(frames.shape[:2], value)
    return score


def fake_decode(latents):
    """Latents -> uint8 'frames' (B, f, h, w, 3) without an autoencoder (the router only passes them on)."""
    x = latents[:, :, :3].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).numpy()


class CountingSampler(BlockCausalSampler):
    """A block sampler that records at which block each denoise / commit happened."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.denoised_at, self.committed_at = [], []

    def denoise(self, noise=None):
        self.denoised_at.append(self.index)
        return super().denoise(noise)

    def commit(self, x_clean):
        self.committed_at.append(self.index)
        self.last_committed = x_clean.clone()
        return super().commit(x_clean)


def samplers(batch=2, separate_drafter=True, seed=0):
    target_model = tiny_model(seed=0)
    cond = text_condition(target_model, batch)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    target = CountingSampler(target_model, cond, batch, BlockSampling(shifted_time_grid(4, 3.0)), gens, max_frames=8)
    if separate_drafter:
        draft_model = tiny_model(seed=1)
        drafter = CountingSampler(draft_model, text_condition(draft_model, batch), batch,
                                  BlockSampling(shifted_time_grid(1, 3.0)), derived_generators(gens), max_frames=8)
    else:
        drafter = target.sibling(BlockSampling(shifted_time_grid(1, 3.0)), derived_generators(gens))
    return target, drafter


def target_only(batch=2, seed=0, num_blocks=4):
    model = tiny_model(seed=0)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    sampler = BlockCausalSampler(model, text_condition(model, batch), batch, BlockSampling(shifted_time_grid(4, 3.0)),
                                 gens, max_frames=8)
    return [block.latents for block in sampler.blocks(num_blocks)]


def test_tau_minus_inf_accepts_every_drafted_block_after_the_first_and_commits_into_both_caches():
    target, drafter = samplers()
    router = SDVGRouter(target, drafter, fake_decode, constant_scorer(-1e9), -INF, [PROMPT] * 2)
    blocks = list(router.blocks(4))
    assert [b.decision.drafted for b in blocks] == [False, True, True, True]
    assert [b.decision.accepted_B for b in blocks] == [[False, False]] + [[True, True]] * 3
    assert router.stats.drafted == 6 and router.stats.accepted == 6 and router.stats.acceptance_rate == 1.0
    assert router.stats.target_blocks == 1 and target.denoised_at == [0]  # the target only made block 0
    assert drafter.denoised_at == [1, 2, 3]  # the drafter never proposes block 0
    # every committed block (all but the last) went into both caches, the same block in each
    assert target.committed_at == drafter.committed_at == [0, 1, 2]
    assert target.state.frame == drafter.state.frame == 6
    assert target.cache.lengths.tolist() == drafter.cache.lengths.tolist() == [6 * 16] * 2  # per head: 6 frames of 16 tokens
    torch.testing.assert_close(target.last_committed, drafter.last_committed, rtol=0, atol=0)
    torch.testing.assert_close(blocks[2].latents, target.last_committed, rtol=0, atol=0)
    # accepted blocks carry the frames they were scored on, for the consumer to reuse
    assert blocks[1].frames.shape == (2, 2, 8, 8, 3) and blocks[0].frames is None


@pytest.mark.parametrize("separate_drafter", [True, False])
def test_tau_plus_inf_equals_target_only_generation_for_the_same_seeds(separate_drafter):
    target, drafter = samplers(separate_drafter=separate_drafter)
    router = SDVGRouter(target, drafter, fake_decode, constant_scorer(1e9), INF, [PROMPT] * 2)
    routed = [b.latents for b in router.blocks(4)]
    expected = target_only()
    for got, want in zip(routed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert router.stats.accepted == 0 and router.stats.drafted == 6 and router.stats.target_blocks == 4


def test_the_first_block_is_never_the_drafters_even_when_its_draft_would_win():
    for tau in (-INF, 0.0, INF):
        target, drafter = samplers()
        router = SDVGRouter(target, drafter, fake_decode, constant_scorer(1.0), tau, [PROMPT] * 2)
        first = router.step()
        assert not first.decision.drafted and first.decision.score_B is None and drafter.denoised_at == []
        torch.testing.assert_close(first.latents, target_only(num_blocks=1)[0], rtol=0, atol=0)


def test_each_video_keeps_its_own_choice_by_its_worst_frame():
    target, drafter = samplers()

    def scorer(frames, prompts):  # video 0: frames score 0.9 and 0.6 (worst 0.6); video 1: 0.9 and 0.4
        return np.array([[0.9, 0.6], [0.9, 0.4]])

    router = SDVGRouter(target, drafter, fake_decode, scorer, 0.5, [PROMPT] * 2)
    router.step()
    drafts, targets = [], []
    drafter.denoise = lambda noise=None, _f=drafter.denoise: drafts.append(_f(noise)) or drafts[-1]
    target.denoise = lambda noise=None, _f=target.denoise: targets.append(_f(noise)) or targets[-1]
    block = router.step()
    assert block.decision.accepted_B == [True, False] and block.decision.score_B == [0.6, 0.4]
    assert block.frames is None  # a mixed block is decoded by the consumer
    torch.testing.assert_close(block.latents[0], drafts[0][0], rtol=0, atol=0)
    torch.testing.assert_close(block.latents[1], targets[0][1], rtol=0, atol=0)
    assert router.stats.acceptance_rate == 0.5 and router.stats.scores == [0.6, 0.4]


def test_shared_state_drafter_commits_once_and_scores_reach_the_threshold_exactly():
    target, drafter = samplers(separate_drafter=False)
    assert drafter.state is target.state
    router = SDVGRouter(target, drafter, fake_decode, constant_scorer(0.5), 0.5, [PROMPT] * 2)  # >= tau accepts
    list(router.blocks(3))
    assert target.committed_at == [0, 1] and router.stats.accepted == 4
    assert drafter.index == target.index == 3


def test_router_checks_its_inputs():
    target, drafter = samplers()
    with pytest.raises(ValueError, match="one prompt per video"):
        SDVGRouter(target, drafter, fake_decode, constant_scorer(0), 0.0, [PROMPT])
    with pytest.raises(ValueError, match="NaN"):
        SDVGRouter(target, drafter, fake_decode, constant_scorer(0), math.nan, [PROMPT] * 2)
    router = SDVGRouter(target, drafter, fake_decode, lambda f, p: np.zeros(3), 0.0, [PROMPT] * 2)
    router.step()
    with pytest.raises(ValueError, match=r"one score per frame, shape \(2, 2\)"):
        router.step()
    small = tiny_model(seed=2, frames_per_block=4)
    other = BlockCausalSampler(small, text_condition(small, 2), 2, BlockSampling(shifted_time_grid(1, 3.0)))
    with pytest.raises(ValueError, match="one latent space and block size"):
        SDVGRouter(target, other, fake_decode, constant_scorer(0), 0.0, [PROMPT] * 2)
    with pytest.raises(ValueError, match="CFG"):
        target.sibling(BlockSampling(shifted_time_grid(1, 3.0), guidance_scale=2.0))


def test_derived_generators_leave_the_targets_untouched_and_are_reproducible():
    gens = [torch.Generator().manual_seed(5)]
    before = gens[0].get_state()
    a, b = derived_generators(gens), derived_generators(gens)
    assert torch.equal(gens[0].get_state(), before)
    x, y = torch.randn(4, generator=a[0]), torch.randn(4, generator=b[0])
    assert torch.equal(x, y) and not torch.equal(x, torch.randn(4, generator=torch.Generator().manual_seed(5)))
    assert derived_generators(None) is None


# -- the Moving Shapes scorer -------------------------------------------------------------------------------------


def test_moving_shapes_scorer_reads_caption_adherence_per_frame():
    from vgen.eval.video_metrics import MIN_SCORE, real_videos
    from vgen.eval.video_scorers import MovingShapesFrameScorer, load_frame_scorer

    scorer = MovingShapesFrameScorer()
    (frames, caption), = real_videos(1, 4, 32, seed=3)
    good = scorer(frames[None], [caption])
    assert good.shape == (1, 4) and good.min() >= MIN_SCORE  # real renders show every captioned object
    shape = caption.split()[2]
    wrong = "a red hexagon moving up" if shape != "hexagon" else "a red star moving up"
    assert scorer(frames[None], [wrong]).max() < MIN_SCORE
    blank = np.zeros((1, 2, 32, 32, 3), np.uint8)
    assert scorer(blank, [caption]).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="uint8"):
        scorer(blank.astype(np.float32), [caption])
    with pytest.raises(UserError, match="cannot read the video prompt"):
        scorer(blank, ["a red circle left of a blue square"])
    assert isinstance(load_frame_scorer(None), MovingShapesFrameScorer)
    assert load_frame_scorer("test_sdvg:_scorer_factory")(blank, [caption]).shape == (1, 2)
    with pytest.raises(UserError, match="module:factory"):
        load_frame_scorer("no-colon")


def test_colour_scorer_reads_the_captioned_colours_whatever_the_outline():
    """``moving_shapes_colours``: the detector without shape fitting. The same blobs as the full detector, each scored
    by its colour part alone (so at least the full score), and a caption's shape no longer matters; its colours do."""
    from vgen.eval.shapes_detector import ShapesDetector
    from vgen.eval.video_metrics import MIN_SCORE, real_videos
    from vgen.eval.video_scorers import MovingShapesFrameScorer, load_frame_scorer

    colours = load_frame_scorer("moving_shapes_colours")
    assert isinstance(colours, MovingShapesFrameScorer) and not colours.shapes
    (frames, caption), = real_videos(1, 4, 32, seed=3)
    full = MovingShapesFrameScorer()(frames[None], [caption])
    by_colour = colours(frames[None], [caption])
    assert by_colour.min() >= MIN_SCORE and (by_colour >= full - 1e-12).all()
    words = caption.split()
    colour, shape = words[1], words[2]
    other_shape = "hexagon" if shape != "hexagon" else "star"
    wrong_shape = f"a {colour} {other_shape} moving up"
    assert MovingShapesFrameScorer()(frames[None], [wrong_shape]).max() < MIN_SCORE
    assert (colours(frames[None], [wrong_shape]) >= MIN_SCORE).all()
    other_colour = next(c for c in ("red", "blue", "green", "orange") if c not in words)
    assert colours(frames[None], [f"a {other_colour} {shape} moving up"]).max() < MIN_SCORE
    detector = ShapesDetector()
    image = Image.fromarray(frames[0])
    fitted, blobs = detector.detect(image), detector.detect(image, fit_shapes=False)
    assert sorted(d.color for d in fitted) == sorted(d.color for d in blobs) and {d.label for d in blobs} == {""}
    assert all(b.score >= f.score - 1e-12 for f, b in zip(sorted(fitted, key=lambda d: d.box),
                                                          sorted(blobs, key=lambda d: d.box)))


def _scorer_factory():
    return constant_scorer(0.25)


# -- the pipeline's SDVG stream --------------------------------------------------------------------------------------


def test_pipeline_sdvg_stream_routes_blocks_switches_prompts_and_plus_inf_is_the_plain_stream():
    pipe = tiny_pipeline()
    seen = []

    def scorer(frames, prompts):
        seen.append(list(prompts))
        return np.ones(frames.shape[:2])

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    stream = pipe.stream(PROMPT, num_frames=8, num_videos_per_prompt=2, generator=gens,
                         sdvg=SDVGOptions(tau=0.5, draft_steps=1, scorer=scorer))
    blocks = []
    for block in stream:
        blocks.append(block)
        if block.index == 1:
            stream.set_prompt("a blue square moving up")
    assert [b.sdvg.drafted for b in blocks] == [False, True, True, True]
    assert all(b.sdvg.accepted_B == [True, True] for b in blocks[1:])
    assert seen[0] == [PROMPT] * 2 and seen[-1] == ["a blue square moving up"] * 2
    assert blocks[1].frames.shape == (2, 2, 32, 32, 3) and blocks[1].frames.dtype == np.uint8
    assert stream.sdvg.stats.acceptance_rate == 1.0
    plain = list(pipe.stream(PROMPT, num_frames=8, num_videos_per_prompt=2,
                             generator=[torch.Generator().manual_seed(i) for i in range(2)]))
    routed = list(pipe.stream(PROMPT, num_frames=8, num_videos_per_prompt=2,
                              generator=[torch.Generator().manual_seed(i) for i in range(2)],
                              sdvg=SDVGOptions(tau=INF, scorer=scorer)))
    for a, b in zip(plain, routed, strict=True):
        assert np.array_equal(a.frames, b.frames)
    with pytest.raises(UserError, match="tau must be a number"):
        pipe.stream(PROMPT, num_frames=8, sdvg=SDVGOptions(tau="high", scorer=scorer))
    with pytest.raises(UserError, match="num_steps"):
        pipe.stream(PROMPT, num_frames=8, sdvg=SDVGOptions(tau=0.0, draft_steps=0, scorer=scorer))


def test_pipeline_sdvg_with_another_drafter_pipeline():
    pipe, drafter = tiny_pipeline(), tiny_pipeline(num_steps=1)
    with torch.no_grad():
        for p in drafter.transformer.parameters():
            p.mul_(0.5)
    stream = pipe.stream(PROMPT, num_frames=8, generator=torch.Generator().manual_seed(0),
                         sdvg=SDVGOptions(tau=-INF, drafter=drafter, scorer=constant_scorer(0)))
    blocks = list(stream)
    assert not stream.sdvg.shared_state and stream.sdvg.drafter.state.frame == 6
    assert [b.sdvg.drafted for b in blocks] == [False, True, True, True]
    with pytest.raises(UserError, match="must be a VideoPipeline"):
        pipe.stream(PROMPT, num_frames=8, sdvg=SDVGOptions(tau=0.0, drafter="dir", scorer=constant_scorer(0)))
