"""``vgen bench sample --official PATH`` on xAR models, and the timing loop both families share.

The project never ships the official code, so the comparison itself runs where a checkout is named by
``VGEN_OFFICIAL_XAR`` (a clone of OliverRensu/xAR) and is skipped elsewhere, as the VAR comparison is with
``VGEN_OFFICIAL_VAR``; what a user gets wrong (a folder that is not the official code, a text model, a layout the
official class hard-codes otherwise, flags of the other family) and the shared timing loop are tested everywhere.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from vgen.cli import main
from vgen.errors import UserError
from vgen.eval import official_compare
from vgen.eval.bench_official_xar import LATENT_TOLERANCE, import_official_xar, official_twin
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.xar import XAR, xar_size
from vgen.pipelines.xar import XARPipeline
from vgen.tokenizers.kl_autoencoder import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")
TENSOR_CUDA = torch.Tensor.cuda


def _vae(z_channels=16):
    torch.manual_seed(1)  # never decoded here: the comparison excludes decoding on both sides
    return AutoencoderKL(z_channels=z_channels, ch=32, ch_mult=(1, 1), num_res_blocks=1, encoder_attn_levels=())


@pytest.fixture(scope="module")
def tiny_xar(tmp_path_factory):
    """Folders of tiny xAR pipelines: ``xar`` on the official layout (16 x 16 grid, 4 cells of 8 x 8, 16 channels,
    1000 classes; 1 + 1 blocks of width 64), ``xar_grid8`` (a grid the official class hard-codes otherwise) and
    ``xar_text`` (text-conditional)."""
    root = tmp_path_factory.mktemp("official_xar")
    torch.manual_seed(0)
    XARPipeline(_vae(), XAR(**xar_size(1, 64, 2)).eval()).save_pretrained(root / "xar")
    torch.manual_seed(0)
    small = XAR(**xar_size(1, 64, 2), latent_channels=4, grid_size=8, entity_size=4, num_classes=10)
    XARPipeline(_vae(4), small.eval()).save_pretrained(root / "xar_grid8")
    torch.manual_seed(0)
    text = XAR(**xar_size(1, 64, 2), conditioning="text", text_embed_dim=16)
    encoder = ShapesTextEncoder(vocabulary=["a", "red", "circle"], embed_dim=16, depth=1, num_heads=2)
    XARPipeline(_vae(), text.eval(), text_encoder=encoder.eval()).save_pretrained(root / "xar_text")
    return root


@pytest.fixture
def official_xar_checkout() -> Path:
    path = os.environ.get("VGEN_OFFICIAL_XAR")
    if not path:
        pytest.skip("set VGEN_OFFICIAL_XAR to a checkout of the official xAR code to run the comparison")
    return Path(path)


def _bench(*args):
    return main(["bench", "sample", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 *args])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- without the official code ------------------------------------------------------------------------------------


def test_a_folder_that_is_not_the_official_xar_code_is_one_line(tmp_path, tiny_xar, capsys):
    (tmp_path / "models").mkdir()
    assert _bench("--official", str(tmp_path), "--model", str(tiny_xar / "xar")) == 2
    line = _one_line(capsys)
    assert "is not a checkout of the official xAR code (missing models/xar.py, models/sampler.py" in line
    assert "clone OliverRensu/xAR" in line
    # the family is the model's: a random xAR size asks for the xAR code too
    assert _bench("--official", str(tmp_path), "--random-xar", "xar-tiny") == 2
    assert "not a checkout of the official xAR code" in _one_line(capsys)


def test_what_the_official_class_cannot_build_is_one_line_before_the_checkout_is_read(tmp_path, tiny_xar, capsys):
    assert _bench("--official", str(tmp_path), "--model", str(tiny_xar / "xar_text")) == 2
    assert "the official xAR code is class-conditional: compare a class-conditional xAR pipeline" in _one_line(capsys)
    assert _bench("--official", str(tmp_path), "--model", str(tiny_xar / "xar_grid8")) == 2
    line = _one_line(capsys)
    assert line.startswith("vgen bench: error: the official xAR hard-codes latent_channels=16, patch_size=1, "
                           "grid_size=16")
    assert line.endswith("this model differs in latent_channels=4, grid_size=8, entity_size=4, num_classes=10")


def test_flags_of_the_comparison(tmp_path, tiny_xar, capsys):
    assert _bench("--official", str(tmp_path), "--random-xar", "xar-x") == 2
    assert "unknown --random-xar 'xar-x'; choose one of xar-tiny, xar-b, xar-l, xar-h" in _one_line(capsys)
    assert _bench("--official", str(tmp_path), "--random-xar", "xar-tiny", "--top-k", "5", "--top-p", "0.9") == 2
    assert "--top-k, --top-p are VAR's; xAR's official comparison samples with --cfg and --num-steps" in \
        _one_line(capsys)
    assert _bench("--official", str(tmp_path), "--random-xar", "xar-tiny", "--num-steps", "2") == 2
    assert "--num-steps must be at least 3 for the official xAR sampler" in _one_line(capsys)
    assert _bench("--official", str(tmp_path), "--random-var", "var-d16", "--num-steps", "8") == 2
    assert "--num-steps is xAR's; VAR's official comparison samples with --cfg, --top-k and --top-p" in \
        _one_line(capsys)
    assert _bench("--official", str(tmp_path), "--random-var", "var-d16", "--random-xar", "xar-tiny") == 2
    assert "not --random-var and --random-xar" in _one_line(capsys)
    assert _bench("--official", str(tmp_path)) == 2
    assert "needs the model: --model DIR (a class-conditional VAR or xAR pipeline)" in _one_line(capsys)
    # the plain benchmark samples with the saved settings: the comparison's flags alone are one line
    assert _bench("--model", str(tiny_xar / "xar"), "--random-xar", "xar-tiny", "--num-steps", "8") == 2
    assert "--random-xar, --num-steps are for the comparison with official code: add --official PATH" in \
        _one_line(capsys)
    assert _bench("--official", str(tmp_path), "--random-xar", "xar-tiny", "--threads", "-1") == 2
    assert "--threads must be a positive number of threads" in _one_line(capsys)


def test_time_alternately_calls_the_sides_in_turn_and_reports_medians(monkeypatch):
    calls, clock = [], [0.0]
    # seconds per image of each side's 5 calls per batch size: 2 untimed, then 3 timed ones (medians 3 and 2)
    durations = {"official": [9.0, 9.0, 1.0, 5.0, 3.0], "vgen": [9.0, 9.0, 2.0, 1.0, 4.0]}

    def side(name):
        def call(batch):
            calls.append((name, batch))
            clock[0] += durations[name][sum(1 for n, b in calls if n == name and b == batch) - 1] * batch
        return call

    monkeypatch.setattr(official_compare.time, "perf_counter", lambda: clock[0])
    rows = official_compare.time_alternately({"official": side("official"), "vgen": side("vgen")}, [1, 4],
                                             warmup=2, repeats=3, device=torch.device("cpu"))
    # per batch size: 2 untimed rounds (the second measures memory), then 3 timed ones, official then vgen each round
    assert calls == [(name, b) for b in (1, 4) for _ in range(5) for name in ("official", "vgen")]
    assert [row["batch_size"] for row in rows] == [1, 4]
    for row, b in zip(rows, (1, 4)):
        assert row["official_seconds_all"] == [1.0 * b, 5.0 * b, 3.0 * b]
        assert row["vgen_seconds_all"] == [2.0 * b, 1.0 * b, 4.0 * b]
        assert row["official_seconds_per_batch"] == 3.0 * b and row["vgen_seconds_per_batch"] == 2.0 * b
        assert row["vgen_images_per_s"] == pytest.approx(0.5) and row["official_images_per_s"] == pytest.approx(1 / 3)
        assert row["vgen_speedup"] == pytest.approx(1.5)
        assert row["official_peak_memory_bytes"] >= 0 and row["vgen_peak_memory_bytes"] >= 0
    # at least one untimed round even with --warmup 0: it measures the memory
    calls.clear()
    rows = official_compare.time_alternately({"official": side("official"), "vgen": side("vgen")}, [2],
                                             warmup=0, repeats=1, device=torch.device("cpu"))
    assert calls == [("official", 2), ("vgen", 2)] * 2 and "vgen_peak_memory_bytes" in rows[0]


def test_patched_restores_the_attribute_even_on_error():
    original = torch.Tensor.cuda
    with pytest.raises(RuntimeError, match="inside"):
        with official_compare.patched(torch.Tensor, "cuda", lambda self, *a, **k: self):
            assert torch.ones(1).cuda().device.type == "cpu"
            raise RuntimeError("inside")
    assert torch.Tensor.cuda is original


# -- with the official code (VGEN_OFFICIAL_XAR) -------------------------------------------------------------------


def test_official_xar_comparison(official_xar_checkout, tiny_xar, capsys):
    assert _bench("--official", str(official_xar_checkout), "--model", str(tiny_xar / "xar"), "--cfg", "2.7",
                  "--num-steps", "4") == 0
    report = json.loads(capsys.readouterr().out)
    # the same weights and the same noise give the same latents (measured 2e-6 here)
    parity = report["parity"]
    assert parity["cells"] == 4 and parity["sde_steps_per_cell"] == 3 and parity["batch_size"] == 1
    assert parity["latents_match"] and parity["latents_max_abs_difference"] < LATENT_TOLERANCE
    assert parity["latents_max_abs"] > 0.1  # a sample, not zeros
    assert [row["batch_size"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["vgen_speedup"] == pytest.approx(row["official_seconds_per_batch"] / row["vgen_seconds_per_batch"])
    assert report["sampling"]["cfg"] == 2.7 and report["sampling"]["num_steps"] == 4
    assert report["sampling"]["decode"] is False and report["autocast"] == "none"
    assert report["parameters"] == sum(p.numel() for p in XARPipeline.from_pretrained(
        tiny_xar / "xar").transformer.parameters())
    # the official code's .cuda() is a no-op only during its calls, and no stand-in or checkout module stays behind
    assert torch.Tensor.cuda is TENSOR_CUDA
    assert "flash_attn" not in sys.modules and "models" not in sys.modules


def test_official_xar_refuses_weights_it_has_no_place_for(official_xar_checkout, tiny_xar):
    pipe = XARPipeline.from_pretrained(tiny_xar / "xar")
    xar_module, _sampler = import_official_xar(official_xar_checkout)
    assert official_twin(pipe, xar_module).mask.shape == (1, 1, 256, 256)
    pipe.transformer.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(UserError, match=r"the official xAR does not take this model's weights: missing \[\], "
                                        r"unexpected \['extra_scale'\]"):
        official_twin(pipe, xar_module)


def test_the_checkout_imports_beside_a_module_of_the_same_name(official_xar_checkout, monkeypatch):
    """VAR's and xAR's checkouts both have a package ``models``: one already imported steps aside while the checkout
    imports and is back afterwards, with no stand-in left behind."""
    import types

    mine = types.ModuleType("models")
    monkeypatch.setitem(sys.modules, "models", mine)
    xar_module, sampler_module = import_official_xar(official_xar_checkout)
    assert Path(xar_module.__file__).resolve() == (official_xar_checkout / "models" / "xar.py").resolve()
    assert xar_module.sampler is sampler_module  # the official module keeps its own sampler module
    assert sys.modules["models"] is mine and "models.xar" not in sys.modules and "flash_attn" not in sys.modules
