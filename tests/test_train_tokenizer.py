"""The tokenizer training task run through the generic training loop (tiny model, 32 px Shapes, CPU)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError
from vgen.train.loop import TrainConfig, train, unwrap
from vgen.train.registry import load_task
from vgen.train.tokenizer_task import TokenizerTask, TokenizerTaskConfig, psnr_01

TINY_TASK = {
    "ch": 16, "ch_mult": (1, 2, 2), "z_channels": 8, "vocab_size": 64, "patch_nums": (1, 2, 4, 8),
    "norm_num_groups": 8, "resolution": 32, "dataset_length": 256, "restart_every": 10, "num_sample_images": 4,
}


def test_registered_under_tokenizer():
    assert load_task("tokenizer") is TokenizerTask


def test_loss_decreases_over_30_steps_and_export_loads(tmp_path, one_thread):
    task = TokenizerTask(TokenizerTaskConfig(**TINY_TASK))
    cfg = TrainConfig(
        steps=30, batch_size=8, lr=2e-3, weight_decay=0.0, warmup_steps=3, schedule="cosine", grad_clip=1.0,
        log_every=1, ckpt_every=0, sample_every=30, seed=0, out_dir=str(tmp_path / "run"),
    )
    train(task, cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert sum(r["psnr"] for r in records[-5:]) / 5 > sum(r["psnr"] for r in records[:5]) / 5 + 2.0
    for key in ("recon_loss", "vq_loss", "usage_pct", "restarted_codes"):
        assert all(key in r for r in records), key
    # the step-1 restart replaced the unused codes of the tiny uniform init
    assert records[0]["restarted_codes"] > 5
    assert all(r["restarted_codes"] == 0 for r in records if r["step"] % 10 and r["step"] != 1)
    assert (tmp_path / "run" / "samples").is_dir() and any((tmp_path / "run" / "samples").glob("*.png"))

    vae = MultiScaleVQModel.from_pretrained(tmp_path / "run" / "final").eval()
    assert tuple(vae.config.patch_nums) == (1, 2, 4, 8)
    img = torch.stack([task.build_dataset()[i]["image"] for i in range(4)])
    with torch.no_grad():
        assert float(psnr_01(vae.img_to_reconstructed_img(img), img)) > 12.0


def test_resolution_must_fit_the_tokenizer():
    with pytest.raises(UserError, match="resolution 64 does not fit"):
        TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "resolution": 64}))
    with pytest.raises(UserError, match="data_path"):
        TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "world": "folder"}))
    with pytest.raises(UserError, match="task.world"):
        TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "world": "imagenet"}))


def test_shipped_config_builds_a_small_tokenizer():
    from conftest import REPO_ROOT

    from vgen.train.registry import load_run_config

    task_cfg, train_cfg = load_run_config("tokenizer", REPO_ROOT / "configs" / "shapes" / "tokenizer.yaml")
    task = TokenizerTask(task_cfg)
    with torch.device("meta"):
        model = task.build_model()
    assert model.resolution == task_cfg.resolution == 64
    assert 2 * sum(p.numel() for p in model.parameters()) <= 8 * 2**20  # <= 8 MiB in fp16
    assert train_cfg.steps > 0 and train_cfg.batch_size > 0


class RecordingTokenizerTask(TokenizerTask):
    """Saves each rank's final state dict (weights, codebook and usage statistics)."""

    def after_step(self, model, batch, step):
        metrics = super().after_step(model, batch, step)
        if step == 4:
            rank = torch.distributed.get_rank()
            torch.save(unwrap(model).state_dict(), os.path.join(self.record_dir, f"rank{rank}.pt"))
        return metrics


def _ddp_worker(rank: int, port: int, out_dir: str, kind: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    task = RecordingTokenizerTask(
        TokenizerTaskConfig(**{**TINY_TASK, "restart_every": 2, "dataset_length": 64, "kind": kind})
    )
    task.record_dir = out_dir
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, weight_decay=0.0, log_every=1, ckpt_every=0,
                      out_dir=os.path.join(out_dir, "run"))
    train(task, cfg, progress=False)


@pytest.mark.parametrize("kind", ["msvq", "vq"])
def test_ddp_keeps_codebook_and_usage_statistics_identical_across_ranks(tmp_path, kind):
    """Code hits are all-reduced (msvq) or gathered into the usage window (vq), and restarts (made from each rank's
    own batch) are broadcast from rank 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path), kind), nprocs=2, join=True)
    sd0, sd1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0), [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[0]["restarted_codes"] > 0  # step 1 restarted codes, with different samples on each rank


# ------------------------------------------------------------------------------------------------ other kinds


def _tiny_run(tmp_path, kind: str, **overrides) -> list[dict]:
    task = TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "kind": kind, **overrides}))
    cfg = TrainConfig(
        steps=30, batch_size=8, lr=2e-3, weight_decay=0.0, warmup_steps=3, schedule="cosine", grad_clip=1.0,
        log_every=1, ckpt_every=0, sample_every=30, seed=0, out_dir=str(tmp_path / kind),
    )
    train(task, cfg, progress=False)
    return [json.loads(line) for line in (tmp_path / kind / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["vq", "frvae"])
def test_other_kinds_lower_the_loss_and_export(tmp_path, one_thread, kind):
    from vgen.train.tokenizer_task import tokenizer_class

    records = _tiny_run(tmp_path, kind, codebook_dim=4)
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert sum(r["psnr"] for r in records[-5:]) / 5 > sum(r["psnr"] for r in records[:5]) / 5 + 2.0
    assert records[0]["restarted_codes"] > 5 and records[-1]["usage_pct"] > 30
    model = tokenizer_class(kind).from_pretrained(tmp_path / kind / "final").eval()
    assert type(model).__name__ == {"vq": "SingleScaleVQModel", "frvae": "FrequencyVQModel"}[kind]
    img = torch.stack([TokenizerTask(TokenizerTaskConfig(**TINY_TASK)).build_dataset()[i]["image"] for i in range(4)])
    assert float(psnr_01(model.img_to_reconstructed_img(img), img)) > 12.0
    if kind == "vq":
        assert model.encode(img).idx.shape == (4, 8 * 8) and model.codebook_dim == 4


def test_kind_and_resolution_checks():
    with pytest.raises(UserError, match="task.kind must be one of msvq, frvae, vq"):
        TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "kind": "lfq"}))
    with pytest.raises(UserError, match="must be a multiple of the downsampling 2\\*\\*\\(len\\(ch_mult\\)-1\\) = 4"):
        TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "kind": "vq", "resolution": 30}))
    # a single-scale tokenizer takes any multiple of its downsampling (patch_nums do not apply)
    TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "kind": "vq", "resolution": 48}))
    with pytest.raises(UserError, match="resolution 64 does not fit"):
        TokenizerTask(TokenizerTaskConfig(**{**TINY_TASK, "kind": "frvae", "resolution": 64}))


@pytest.mark.parametrize("name, kind, cls", [
    ("tokenizer.yaml", "msvq", "MultiScaleVQModel"),
    ("default_model_tokenizer.yaml", "msvq", "MultiScaleVQModel"),
    ("vq_tokenizer.yaml", "vq", "SingleScaleVQModel"),
    ("msvq_compare.yaml", "msvq", "MultiScaleVQModel"),
    ("frvae_compare.yaml", "frvae", "FrequencyVQModel"),
])
def test_shipped_configs_select_their_kind(name, kind, cls):
    from conftest import REPO_ROOT

    from vgen.train.registry import load_run_config

    task_cfg, _ = load_run_config("tokenizer", REPO_ROOT / "configs" / "shapes" / name)
    assert task_cfg.kind == kind
    with torch.device("meta"):
        model = TokenizerTask(task_cfg).build_model()
    assert type(model).__name__ == cls


def test_compare_configs_differ_only_in_kind():
    from conftest import REPO_ROOT

    from vgen.train.registry import load_run_config

    shapes = REPO_ROOT / "configs" / "shapes"
    (ms, ms_train), (fr, fr_train) = (load_run_config("tokenizer", shapes / n) for n in
                                      ("msvq_compare.yaml", "frvae_compare.yaml"))
    differing = {k for k in vars(ms) if getattr(ms, k) != getattr(fr, k)}
    assert differing == {"kind"}
    assert {k for k in vars(ms_train) if getattr(ms_train, k) != getattr(fr_train, k)} == {"out_dir"}
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in TokenizerTask(c).build_model().parameters()) for c in (ms, fr)]
    assert sizes[0] == sizes[1]
