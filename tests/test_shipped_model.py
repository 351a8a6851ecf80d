"""The default model shipped inside the package (``vgen/assets/default_model``): it loads with no ``--model`` (fp16
weights upcast to fp32), and its images for a fixed set of prompts pass the Shapes-GenEval bar (>= 0.5 over 24
prompts, 4 per task).

Scoring uses the exact Shapes detector (``vgen.eval.shapes_detector``), which scores 1.0 on real renders of every
prompt, so the bar measures the generator alone. configs/shapes/README.md has the model's full measurements and the
commands that trained it. Without a shipped model (an install that removed it), ``vgen generate`` must say so in one
line."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from vgen.eval.geneval import evaluate_image, load_metadata, summarise
from vgen.eval.shapes_detector import ShapesDetector
from vgen.pipelines import DEFAULT_MODEL_BUDGET_BYTES, DEFAULT_MODEL_DIR, load_pipeline

PROMPTS_PER_TASK = 4
MIN_SHAPES_GENEVAL = 0.5


def fixed_prompts() -> list[dict]:
    """4 prompts per GenEval task from the shipped Shapes prompt set, spread over each task's list (24 in all)."""
    by_tag: dict[str, list[dict]] = {}
    for entry in load_metadata("shapes"):
        by_tag.setdefault(entry["tag"], []).append(entry)
    chosen = []
    for entries in by_tag.values():
        stride = len(entries) // PROMPTS_PER_TASK
        chosen += entries[::stride][:PROMPTS_PER_TASK]
    return chosen


def test_default_model_is_shipped_within_budget():
    assert (DEFAULT_MODEL_DIR / "model_index.json").is_file()
    weights = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    assert weights <= DEFAULT_MODEL_BUDGET_BYTES
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert {"vqvae", "transformer", "text_encoder"} <= set(index)
    pipe, _ = load_pipeline(None, "cpu")
    for component in (pipe.vqvae, pipe.transformer, pipe.text_encoder):
        assert {p.dtype for p in component.parameters()} == {torch.float32}


def test_default_model_passes_shapes_geneval_on_fixed_prompts():
    prompts = fixed_prompts()
    assert len(prompts) == 24 and len({e["tag"] for e in prompts}) == 6
    pipe, model_dir = load_pipeline(None, "cpu")
    assert model_dir == DEFAULT_MODEL_DIR
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompt=[e["prompt"] for e in prompts], generator=generators).images
    assert all(image.size == (64, 64) for image in images)
    detector = ShapesDetector()
    summary = summarise([evaluate_image(image, entry, detector) for image, entry in zip(images, prompts)])
    per_task = {tag: round(task["accuracy"], 2) for tag, task in summary["tasks"].items()}
    assert summary["overall"] >= MIN_SHAPES_GENEVAL, per_task


def test_generate_without_model_in_a_fresh_process(tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "generate", "a photo of a red circle left of a blue square", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    grid = Image.open(out)
    assert grid.width > 2 * 64 and grid.height > 64
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["model"] == str(DEFAULT_MODEL_DIR.resolve())


def test_missing_default_model_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import vgen.pipelines
    from vgen.cli import main

    monkeypatch.setattr(vgen.pipelines, "DEFAULT_MODEL_DIR", tmp_path / "removed")
    assert main(["generate", "a photo of a red circle", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no default model is shipped" in err[0] and "--model DIR" in err[0]


def test_raster_model_is_shipped_by_name_within_the_budgets_and_predicts_shapes_codes(tmp_path, monkeypatch):
    """``shapes-raster`` (configs/shapes/ship_raster_model.py): the best raster AR of the Token-Shuffle comparison.
    Its teacher-forced loss on fresh Shapes renders is 3.45 nats per code (measured; chance is ln 1024 = 6.93), so a
    model that lost its training fails the bound. A folder of that name in the working directory wins."""
    from vgen.data.shapes import ShapesDataset
    from vgen.errors import UserError
    from vgen.pipelines import ASSETS_BUDGET_BYTES, ASSETS_DIR, SHIPPED_MODELS, resolve_model_dir

    shipped = SHIPPED_MODELS["shapes-raster"]
    assert resolve_model_dir("shapes-raster") == shipped and resolve_model_dir("shapes-var") == DEFAULT_MODEL_DIR
    assert sum(p.stat().st_size for p in shipped.rglob("*.safetensors")) <= DEFAULT_MODEL_BUDGET_BYTES
    assert sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file()) <= ASSETS_BUDGET_BYTES
    pipe, model_dir = load_pipeline("shapes-raster", "cpu")
    assert model_dir == shipped and type(pipe).__name__ == "RasterARPipeline"
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    data = ShapesDataset(resolution=64, length=32, seed=7)
    images = torch.stack([data[i]["image"] for i in range(32)])
    with torch.no_grad():
        codes = pipe.vqvae.encode(images).idx
        cond, _ = pipe.encode_condition([data[i]["caption"] for i in range(32)], None, 1, False)
        logits = pipe.transformer(codes, cond=cond)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), pipe.transformer.to_units(codes).flatten())
    assert float(loss) < 4.0, float(loss)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a photo of a red circle", generator=[torch.Generator().manual_seed(0)]).images[0]
    assert image.size == (64, 64)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes-raster").mkdir()
    try:
        load_pipeline("shapes-raster", "cpu")
    except UserError as err:
        assert "is not a saved pipeline" in str(err)
    else:
        raise AssertionError("a local folder named shapes-raster must win over the shipped model")


def test_xar_model_is_shipped_by_name_and_denoises_shapes_latents_given_their_captions():
    """``shapes-xar`` (configs/shapes/ship_model.py): the best Shapes xAR. Its Noisy-Context loss on fresh renders is
    0.324 with their own captions and 0.343 with the captions rolled by one (measured; an untrained model of the same
    size: 4.04), so a model that lost its training or its text path fails."""
    from vgen.data.shapes import ShapesDataset
    from vgen.pipelines import SHIPPED_MODELS, resolve_model_dir

    shipped = SHIPPED_MODELS["shapes-xar"]
    assert resolve_model_dir("shapes-xar") == shipped
    assert sum(p.stat().st_size for p in shipped.rglob("*.safetensors")) <= DEFAULT_MODEL_BUDGET_BYTES
    pipe, model_dir = load_pipeline("shapes-xar", "cpu")
    assert model_dir == shipped and type(pipe).__name__ == "XARPipeline"
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    data = ShapesDataset(resolution=64, length=32, seed=7)
    images = torch.stack([data[i]["image"] for i in range(32)])
    captions = [data[i]["caption"] for i in range(32)]
    with torch.no_grad():
        latents = pipe.vae.encode_latents(images, sample=False)

        def loss(caps):
            cond, _ = pipe.encode_condition(caps, None, 1, False)
            return float(pipe.transformer(latents, cond=cond, generator=torch.Generator().manual_seed(0)).loss)

        own, rolled = loss(captions), loss(captions[1:] + captions[:1])
    assert own < 0.5 and own < rolled, (own, rolled)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a photo of a red circle", generator=[torch.Generator().manual_seed(0)]).images[0]
    assert image.size == (64, 64)


def test_ship_pipeline_keeps_the_assets_budget_and_leaves_the_old_folder(tmp_path, monkeypatch):
    """``ship_pipeline`` into a (stand-in) vgen/assets: refused in one line when the folder would take the assets over
    their budget, and the folder already there is kept; within the budget it replaces it with fp16 weights."""
    from vgen.errors import UserError
    from vgen.pipelines import shipping
    from vgen.pipelines.model_card import ModelCardInfo

    from test_xar_cspd import pipeline

    assets = tmp_path / "assets"
    (assets / "other").mkdir(parents=True)
    (assets / "other" / "weights.bin").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(shipping, "ASSETS_DIR", assets)
    out = assets / "model"
    (out).mkdir()
    (out / "keep.txt").write_text("old")
    pipe = pipeline()
    size = shipping.ship_pipeline(pipe, out, "test-model", ModelCardInfo(title="t", **shipping.OWN_WEIGHTS))
    assert (out / "model_index.json").is_file() and not (out / "keep.txt").exists()
    assert size == shipping.weights_bytes(out) > 0
    card = (out / "README.md").read_text()  # it names the folder it is in
    assert 'load_pipeline("model")' in card and ".tmp" not in card and not (assets / "model.tmp").exists()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(shipping, "ASSETS_BUDGET_BYTES", size + 500)  # the other folder's 1000 bytes do not fit
    try:
        shipping.ship_pipeline(pipeline(), out, "test-model", ModelCardInfo(title="t"))
    except UserError as err:
        assert "vgen/assets would hold" in str(err) and "MB budget; ship a smaller model" in str(err)
    else:
        raise AssertionError("over the assets budget must be refused")
    assert (out / "keep.txt").read_text() == "old" and not (assets / "model.tmp").exists()


def test_every_assets_folder_is_a_listed_package_so_wheels_carry_it():
    """pyproject lists sub-packages explicitly; a folder of shipped files under vgen/assets that is not listed would
    be missing from wheels (package-data only reaches listed packages)."""
    import tomllib

    from vgen.pipelines import ASSETS_DIR

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    folders = {".".join(("vgen", "assets", *p.parent.relative_to(ASSETS_DIR).parts)) for p in ASSETS_DIR.rglob("*")
               if p.is_file() and p.parent != ASSETS_DIR and "__pycache__" not in p.parts}
    assert folders and not folders - packages, sorted(folders - packages)


def test_shipped_cards_name_their_own_folders():
    from vgen.pipelines import ASSETS_DIR

    cards = sorted(ASSETS_DIR.glob("*/README.md"))
    assert len(cards) >= 3
    for card in cards:
        text = card.read_text()
        assert ".tmp" not in text and f'load_pipeline("{card.parent.name}")' in text, card


def test_video_model_is_shipped_as_the_default_and_denoises_clips_given_their_captions():
    """vgen/assets/default_video_model (configs/moving_shapes/ship_video_model.py) is what the video commands use
    without --model. Its flow-matching loss on fresh Moving Shapes clips at t = 0.6 is 0.236 with their own captions
    and 0.532 with the captions rolled by one (measured; an untrained transformer of the same size: 2.31), so a model
    that lost its training or its text path fails."""
    import numpy as np

    from vgen.data.moving_shapes import MovingShapesWorld
    from vgen.pipelines import VIDEO_MODEL_BUDGET_BYTES
    from vgen.pipelines.video import DEFAULT_VIDEO_MODEL_DIR, load_video_pipeline
    from vgen.train.video_task import VideoTrainModule

    weights = sum(p.stat().st_size for p in DEFAULT_VIDEO_MODEL_DIR.rglob("*.safetensors"))
    assert 0 < weights <= VIDEO_MODEL_BUDGET_BYTES
    pipe, model_dir = load_video_pipeline(None, "cpu")
    assert model_dir == DEFAULT_VIDEO_MODEL_DIR and {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    pipe.head_profile.check_model(pipe.transformer)  # the Forcing-KV profile fits the shipped weights
    cfg = pipe.transformer.config
    side = pipe.autoencoder.downsample * cfg.latent_height
    world = MovingShapesWorld(side, cfg.max_frames, 7, motion="directions", max_objects=2)
    samples = [world.sample(i) for i in range(16)]
    frames = torch.from_numpy(np.stack([f for s in samples for f in s.frames])).permute(0, 3, 1, 2).float()
    captions = [s.caption for s in samples]
    module = VideoTrainModule(pipe.transformer, pipe.text_encoder).eval()
    with torch.no_grad():
        z = pipe.autoencoder.encode_latents(frames / 127.5 - 1, sample=False)
        x0 = z.view(16, cfg.max_frames, *z.shape[1:])
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        x_t, t = 0.4 * x0 + 0.6 * eps, torch.full((16, cfg.max_frames), 0.6)

        def loss(caps):
            ids, mask = pipe.text_encoder.tokenize(caps)
            return float((module(x_t, t, ids, mask) - (eps - x0)).square().mean())

        own, rolled = loss(captions), loss(captions[1:] + captions[:1])
        video = pipe("a red circle moving right", num_frames=cfg.max_frames,
                     generator=torch.Generator().manual_seed(0)).frames
    assert own < 0.35 and own < 0.6 * rolled, (own, rolled)
    assert np.asarray(video).shape == (1, cfg.max_frames, side, side, 3)
