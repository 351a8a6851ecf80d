"""XARPipeline with ``speculative="cspd"`` on tiny random pipelines (the xAR of test_xar_pipeline.py: 4 cells of 2x2
tokens, 3 SDE points per cell, CFG 3 on xAR's ramp): a drafter equal to the target accepts every cell and makes
target-only sampling's images with the same generators (as far as the random streams are the same), a mismatched
drafter fills every cell and its counts add up, one-line refusals, saved CSpD defaults with a relative drafter path,
``vgen generate``. (``vgen bench speculative`` on these folders: tests/test_cspd_bench.py.)"""

import json

import pytest
import torch
from vgen.cli import main
from vgen.data import PROMPT_VOCABULARY
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.pipelines import load_pipeline
from vgen.pipelines.flowar import FlowARPipeline
from vgen.pipelines.xar import XARPipeline

from test_flowar_pipeline import tiny_flowar
from test_xar_pipeline import tiny_vae, tiny_xar

STEPS, CELLS = 3, 4  # default_num_steps: 2 stochastic steps + the final drift step per cell
#: the latent pixels (rows, columns) of each 2x2 cell of the 4x4 grid, in generation order
CELL_PIXELS = [(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2)),
               (slice(2, 4), slice(2, 4))]


def pipeline(transformer=None, vae=None, **defaults):
    pipe = XARPipeline(vae=vae or tiny_vae(), transformer=transformer or tiny_xar(), default_guidance_scale=3.0,
                       default_num_steps=STEPS, **defaults)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def small_xar():
    """A smaller xAR (width 16) on the same cells, its weights moved off the seeded initialisation."""
    torch.manual_seed(4)
    small = tiny_xar(encoder_embed_dim=16, decoder_embed_dim=16)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return small


@pytest.fixture(scope="module")
def xar_folders(tmp_path_factory):
    """``target``; ``small`` (a mismatched drafter); and drafters that must be refused: ``vae`` (another
    autoencoder), ``subsample`` (4 units of 4 tokens, as the target's, but other tokens), ``tokens`` (16 one-token
    cells), ``patch`` (patch 2: 4 units of 1 token x 16 channels), ``text`` (text-conditional), ``flowar``."""
    root = tmp_path_factory.mktemp("xar_cspd")
    pipeline().save_pretrained(str(root / "target"))
    pipeline(small_xar()).save_pretrained(str(root / "small"))
    pipeline(vae=tiny_vae(scale_factor=0.25)).save_pretrained(str(root / "vae"))
    pipeline(tiny_xar(entity="subsample", entity_size=2)).save_pretrained(str(root / "subsample"))
    pipeline(tiny_xar(entity_size=1)).save_pretrained(str(root / "tokens"))
    pipeline(tiny_xar(grid_size=2, patch_size=2, entity_size=1)).save_pretrained(str(root / "patch"))
    text = XARPipeline(vae=tiny_vae(), transformer=tiny_xar(conditioning="text", text_embed_dim=16),
                       text_encoder=ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16, depth=1,
                                                      num_heads=2))
    text.save_pretrained(str(root / "text"))
    FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar()).save_pretrained(str(root / "flowar"))
    return root


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def loaded(folder):
    pipe, _ = load_pipeline(folder, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_drafter_equal_to_the_target_accepts_every_cell_and_makes_target_only_images(xar_folders):
    """The drafter is the target's own folder. Its drafted trajectories are the target's, op for op (same weights,
    batch, noise, CFG ramp and cache contents), so every cell is accepted (log ratio 0 > log u) and the accepted
    state is the one target-only sampling reaches. The random streams agree as far as they are drawn alike: the
    pre-filled cells and the first drafted window draw their noise in target-only order, after which every image
    draws one acceptance uniform per drafted cell, so later windows see other noise (the same distribution, other
    samples). Measured: exactly equal where the streams agree; the tolerance only allows allocation-dependent
    float32 kernel paths."""
    pipe = loaded(xar_folders / "target")
    labels, seeds = [1, 2, 3], (0, 1, 2)
    target_only = pipe(class_labels=labels, generator=gens(*seeds), output_type="latent").images
    assert pipe.speculative_stats is None
    # one window covers the 3 cells after the pre-filled one
    latents = pipe(class_labels=labels, speculative="cspd", drafter=str(xar_folders / "target"), gamma=3,
                   prefill_fraction=0.25, generator=gens(*seeds), output_type="latent").images
    stats = pipe.speculative_stats
    assert stats.drafted.tolist() == [3, 3, 3] and stats.accepted.tolist() == [3, 3, 3]
    assert stats.resampled.tolist() == [0, 0, 0] and stats.fallbacks.tolist() == [0, 0, 0]
    assert stats.summary()["acceptance_rate"] == 1.0
    assert stats.target_forwards.tolist() == [pipe.target_only_forwards()] * 3  # 1 + 4 x 3 + 3 = 16
    torch.testing.assert_close(latents, target_only, rtol=0, atol=1e-5)
    # windows of one cell: cells 0 (pre-filled) and 1 (the first window) as target-only, the later ones not
    latents = pipe(class_labels=labels, speculative="cspd", drafter=str(xar_folders / "target"), gamma=1,
                   prefill_fraction=0.25, generator=gens(*seeds), output_type="latent").images
    assert pipe.speculative_stats.accepted.tolist() == [3, 3, 3] and int(pipe.speculative_stats.rounds[0]) == 3
    for rows, cols in CELL_PIXELS[:2]:
        torch.testing.assert_close(latents[:, :, rows, cols], target_only[:, :, rows, cols], rtol=0, atol=1e-5)
    for rows, cols in CELL_PIXELS[2:]:
        assert (latents[:, :, rows, cols] - target_only[:, :, rows, cols]).abs().max() > 1e-3


def test_a_mismatched_drafter_fills_every_cell_and_counts_add_up(xar_folders):
    pipe = loaded(xar_folders / "target")
    B = 4
    for rounds in (32, 1):  # 1: a rejected cell gets one proposal, else the fallback
        latents = pipe(class_labels=[0, 3, 5, 9], speculative="cspd", drafter=str(xar_folders / "small"), gamma=2,
                       prefill_fraction=0.0, rejection_rounds=rounds, generator=gens(*range(B)),
                       output_type="latent").images
        assert latents.shape == (B, 4, 4, 4) and torch.isfinite(latents).all()  # no NaN: every cell was made
        stats = pipe.speculative_stats
        assert stats.units.tolist() == [CELLS] * B and stats.drafted.tolist() == [CELLS] * B
        assert (stats.accepted + stats.resampled + stats.fallbacks).tolist() == [CELLS] * B
        assert (stats.rejection_trials >= stats.resampled + stats.fallbacks).all()
        assert (stats.rejection_trials <= rounds * (CELLS - stats.accepted)).all()
        assert stats.target_forwards.tolist() == [pipe.target_only_forwards()] * B
        # the draft: prefill, 4 trajectories of 3 calls, the commit inside each window of 2, the re-commits of the
        # committed cells but the last
        assert stats.drafter_forwards.tolist() == [1 + CELLS * STEPS + 2 + 3] * B
        assert int(stats.rounds[0]) == 2
    # a target built in code (its autoencoder's config holds tuples, the loaded drafter's lists) takes the drafter
    images = pipeline()(class_labels=[1], speculative="cspd", drafter=str(xar_folders / "small"), generator=gens(0),
                        output_type="pt").images
    assert images.shape == (1, 3, 8, 8) and torch.isfinite(images).all()


def test_window_verification_in_the_pipeline(xar_folders):
    """``verification="window"``: a drafter equal to the target accepts every cell in one window, makes the
    target-only latents and takes 12 target passes (target-only 16): the prefill, the pre-filled cell's 3 steps and
    commit, then 3 finishing steps, 2 speculative commits and 2 window passes; a mismatched drafter fills every cell, each cell either a kept draft or a resampled one."""
    pipe = loaded(xar_folders / "target")
    labels, seeds = [1, 2, 3], (0, 1, 2)
    target_only = pipe(class_labels=labels, generator=gens(*seeds), output_type="latent").images
    latents = pipe(class_labels=labels, speculative="cspd", drafter=str(xar_folders / "target"), gamma=3,
                   prefill_fraction=0.25, verification="window", generator=gens(*seeds), output_type="latent").images
    stats = pipe.speculative_stats
    assert stats.accepted.tolist() == [3, 3, 3] and stats.discarded.tolist() == [0, 0, 0]
    assert stats.target_forwards.tolist() == [1 + STEPS + 1 + 3 + 2 + (STEPS - 1)] * 3
    torch.testing.assert_close(latents, target_only, rtol=0, atol=1e-5)
    B = 4
    latents = pipe(class_labels=[0, 3, 5, 9], speculative="cspd", drafter=str(xar_folders / "small"), gamma=2,
                   prefill_fraction=0.0, verification="window", generator=gens(*range(B)), output_type="latent").images
    assert torch.isfinite(latents).all()
    stats = pipe.speculative_stats
    assert stats.units.tolist() == [CELLS] * B
    kept = stats.accepted - stats.discarded
    assert (kept + stats.resampled + stats.fallbacks).tolist() == [CELLS] * B
    flowar = FlowARPipeline.from_pretrained(str(xar_folders / "flowar"))
    with pytest.raises(UserError, match="--verification window needs a model that verifies several units in one "
                                        "pass \\(xAR\\); FlowAR verifies unit by unit"):
        flowar(class_labels=[1], speculative="cspd", drafter=str(xar_folders / "flowar"), verification="window")
    with pytest.raises(UserError, match="verification"):
        pipe(class_labels=[1], verification="batch")


@pytest.mark.parametrize("drafter, message", [
    ("vae", "uses another autoencoder than this model"),
    ("subsample", "this model 4 units (cell 2) of 4 tokens x 4 channels on a 4x4 grid, patch 1; a drafter must share"),
    ("tokens", "generates 16 units (cell 1) of 1 token x 4 channels on a 4x4 grid"),
    ("patch", "generates 4 units (cell 1) of 1 token x 16 channels on a 2x2 grid, patch 2"),
    ("text", "are conditioned differently (text vs class labels)"),
    ("flowar", "is not an xAR pipeline; --speculative cspd drafts with a smaller xAR on the same autoencoder"),
])
def test_drafters_that_do_not_fit_are_refused_in_one_line(xar_folders, drafter, message, capsys):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loaded(xar_folders / "target")(class_labels=[1], speculative="cspd", drafter=str(xar_folders / drafter))
    assert main(["generate", "--model", str(xar_folders / "target"), "--class-label", "1", "--speculative", "cspd",
                 "--drafter", str(xar_folders / drafter), "--out", str(xar_folders / "refused.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_settings_that_cspd_refuses(xar_folders):
    pipe = pipeline()
    with pytest.raises(UserError, match=r"--speculative cspd needs a drafter: pass --drafter DIR \(a smaller xAR "):
        pipe(class_labels=[1], speculative="cspd")
    with pytest.raises(UserError, match=r"callback_on_step_end is not supported with speculative='cspd' \(its steps "
                                        r"are drafted windows of units\)"):
        pipe(class_labels=[1], speculative="cspd", drafter=str(xar_folders / "small"),
             callback_on_step_end=lambda p, i, t, kw: kw)
    with pytest.raises(UserError, match="--drafter is for --speculative cspd"):
        pipe(class_labels=[1], drafter=str(xar_folders / "small"))
    with pytest.raises(UserError, match="speculative sjd is for next-token models; xAR takes none, cspd"):
        pipe(class_labels=[1], speculative="sjd")
    with pytest.raises(UserError, match=r"needs at least one stochastic SDE step: give --num-steps >= 2 \(got 1\)"):
        pipe(class_labels=[1], speculative="cspd", drafter=str(xar_folders / "small"), num_steps=1)
    with pytest.raises(UserError, match="gamma must be"):
        pipe(class_labels=[1], speculative="cspd", drafter=str(xar_folders / "small"), gamma=0)
    with pytest.raises(UserError, match="prefill_fraction must be"):
        pipe(class_labels=[1], prefill_fraction=1.5)


def test_saved_cspd_defaults_and_relative_drafter_path(xar_folders, tmp_path):
    pipe = pipeline(default_speculative="cspd", default_drafter=str((xar_folders / "small").resolve()),
                    default_gamma=2, default_prefill_fraction=0.3, default_rejection_rounds=5,
                    default_verification="window")
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert (index["default_speculative"], index["default_gamma"], index["default_prefill_fraction"],
            index["default_rejection_rounds"], index["default_verification"]) == ("cspd", 2, 0.3, 5, "window")
    assert not index["default_drafter"].startswith("/")
    assert (tmp_path / "saved" / index["default_drafter"]).resolve() == (xar_folders / "small").resolve()
    again = loaded(tmp_path / "saved")
    assert again.sampling_defaults() == {"guidance_scale": 3.0, "num_steps": STEPS, "speculative": "cspd",
                                         "drafter": index["default_drafter"], "gamma": 2, "prefill_fraction": 0.3,
                                         "rejection_rounds": 5, "verification": "window"}
    again(class_labels=[0], generator=gens(0), output_type="latent")  # the saved drafter, relative to the folder
    # 2 pre-filled cells, then windows of 2 until the 4 cells are made (window verification keeps 1 or 2 per round)
    stats = again.speculative_stats
    assert int(stats.drafted[0]) >= 2 and 1 <= int(stats.rounds[0]) <= 2 and stats.units.tolist() == [CELLS]
    # what the CLI does: every resolved setting passed, the saved relative drafter path among them
    again(class_labels=[0], generator=gens(0), output_type="latent", **again.resolve_sampling())
    assert int(again.speculative_stats.drafted[0]) == 2
    # saving the loaded pipeline elsewhere rewrites the path relative to the new folder
    again.save_pretrained(tmp_path / "deeper" / "copy")
    moved = json.loads((tmp_path / "deeper" / "copy" / "model_index.json").read_text())["default_drafter"]
    assert (tmp_path / "deeper" / "copy" / moved).resolve() == (xar_folders / "small").resolve()


def test_generate_cli_with_cspd(xar_folders, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(xar_folders / "target"), "--class-label", "1", "4", "--n", "1",
                 "--speculative", "cspd", "--drafter", str(xar_folders / "small"), "--gamma", "2",
                 "--prefill-fraction", "0.2", "--rejection-rounds", "4", "--verification", "window", "--seed", "3",
                 "--out", str(out)]) == 0
    settings = json.loads((tmp_path / "grid.json").read_text())
    assert (settings["speculative"], settings["gamma"], settings["prefill_fraction"], settings["rejection_rounds"],
            settings["verification"], settings["num_steps"]) == ("cspd", 2, 0.2, 4, "window", STEPS)
    assert out.is_file()
