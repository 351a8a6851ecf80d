"""Bad and hostile input through every command: each case must end with exit code 2 and one line on stderr that says
what is wrong, never a traceback, and must leave every file the user had as it was.

Most cases run in-process through ``vgen.cli.main`` with tiny random models; a few run through a real
``python -m vgen`` process to show that nothing escapes as a traceback there either."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_sample_at_scale import tiny_pipeline
from vgen.eval.geneval import load_metadata, sample_path, write_prompt_metadata

from vgen.cli import main
from vgen.train.registry import TASKS
from vgen.train.run_folder import LOCK_FILE, RunLock

BIG_SEED = str(2**64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny saved pipelines: class-conditional ("class") and text-conditional ("text")."""
    root = tmp_path_factory.mktemp("models")
    tiny_pipeline().save_pretrained(str(root / "class"))
    tiny_pipeline(text=True).save_pretrained(str(root / "text"))
    return root


class CodeOnLoad:
    """Unpickling this object would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Case:
    """``build(tmp, models) -> argv``; stderr must contain ``expect``."""

    name: str
    build: Callable[[Path, Path], list[str]]
    expect: str
    skip: str | None = None


# ---------------------------------------------------------------------------------------------- case builders


def broken_model(mutate):
    """A copy of the tiny class model in the case folder, changed by ``mutate(folder)``; argv generates from it."""

    def build(tmp, models):
        folder = tmp / "model"
        shutil.copytree(models / "class", folder)
        mutate(folder)
        return ["generate", "--model", str(folder), "--class-label", "1", "--out", str(tmp / "g.png")]

    return build


def weights(folder, component="transformer"):
    return folder / component / "diffusion_pytorch_model.safetensors"


def edit_config(component, **changes):
    def mutate(folder):
        path = folder / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return mutate


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def generate(*extra, model="class", label="1"):
    def build(tmp, models):
        condition = ["--class-label", label] if model == "class" else []
        return ["generate", "--model", str(models / model), *condition, *extra]

    return build


def with_file(name, content: bytes, argv_of):
    def build(tmp, models):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return argv_of(tmp, models, path)

    return build


def convert_with_var(make_file):
    def build(tmp, models):
        make_file(tmp / "var.pth", tmp)
        return ["convert", "var-official", "--vae", str(tmp / "var.pth"), "--var", str(tmp / "var.pth"),
                "--out", str(tmp / "out")]

    return build


def images_folder(tmp, n=4):
    folder = tmp / "imgs"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(folder / f"{i}.png")
    return folder


def geneval_folder(tmp, entries, break_it=None):
    root = tmp / "gen"
    for p, entry in enumerate(entries):
        write_prompt_metadata(root, p, entry)
        Image.new("RGB", (32, 32), (250, 250, 250)).save(sample_path(root, p, 0))
    if break_it is not None:
        break_it(root)
    return ["eval", "geneval", "--images", str(root), "--detector", "shapes"]


def preview_folder_with_binary_metadata(tmp, models):
    folder = images_folder(tmp)
    (folder / "metadata.jsonl").write_bytes(b"\xff\xfe\x00 not text")
    return ["data", "preview", "--world", "folder", "--path", str(folder), "--out", str(tmp / "p.png")]


SHAPES_PROMPT = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}

TOY_CONFIG = "task: {}\ntrain: {steps: 4, batch_size: 8, log_every: 1, ckpt_every: 2, seed: 7}\n"


def toy_train(*extra, prepare=None, config=TOY_CONFIG):
    """``vgen train toy`` (the toy task of test_train_loop) into tmp/run, after ``prepare(tmp)``."""

    def build(tmp, models):
        (tmp / "run.yaml").write_bytes(config.encode() if isinstance(config, str) else config)
        if prepare is not None:
            prepare(tmp)
        return ["train", "toy", "--config", str(tmp / "run.yaml"), "--out", str(tmp / "run"), "--no-progress",
                *extra]

    return build


def finished_toy_run(tmp):
    """The run ``toy_train()`` makes, finished."""
    assert main(toy_train()(tmp, None)) == 0


def corrupt_checkpoints(tmp):
    finished_toy_run(tmp)
    for path in (tmp / "run" / "checkpoints").glob("*.pt"):
        cut_in_half(path)


def planted_checkpoint(tmp):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "step": 1, "payload": CodeOnLoad(tmp / "code_ran")},
               tmp / "run" / "checkpoints" / "latest.pt")


def torch_save_to(obj):
    def make(path, tmp):
        torch.save(obj, path)

    return make


def planted_var_file(path, tmp):
    torch.save({"head.weight": torch.zeros(2), "payload": CodeOnLoad(tmp / "code_ran")}, path)


def truncated_var_file(path, tmp):
    torch.save({"head.weight": torch.zeros(1000)}, path)
    cut_in_half(path)


def readonly_dir(tmp):
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def sys_is_writable() -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- the table

CASES = [
    # ---- generate: numbers
    Case("seed beyond 64 bits", generate("--seed", BIG_SEED), "must be an integer from 0 to 18446744073709551615"),
    Case("seeds of the batch beyond 64 bits", generate("--seed", str(2**64 - 1), "--n", "2"),
         "beyond the largest seed"),
    Case("--n 0", generate("--n", "0"), "argument --n: must be an integer >= 1, got 0"),
    Case("nan guidance scale", generate("--guidance-scale", "nan"), "--guidance-scale: must be a finite number"),
    Case("infinite temperature", generate("--temperature", "inf"), "--temperature: must be a finite number"),
    Case("zero temperature", generate("--temperature", "0"), "argument --temperature: must be > 0"),
    Case("nan guidance profile", generate("--guidance-profile", "nan,1,1,1,1,1,1,1,1,1"),
         "comma-separated finite numbers"),
    Case("top-p above 1", generate("--top-p", "1.5"), "argument --top-p: must be in [0, 1]"),
    Case("class label out of range", generate(label="12"), "class label(s) 12 out of range"),
    Case("more images than a grid holds", generate("--n", "5000"), "too many for one grid"),
    # ---- generate: prompts
    Case("empty prompt", generate("", model="text"), "has no words; give a prompt, or ask for unconditional"),
    Case("blank prompt", generate("   ", model="text"), "has no words"),
    Case("12 KB prompt", generate("zebra " * 2000, model="text"), "... (12000 characters)"),
    Case("prompt and --unconditional", generate("a photo of a star", "--unconditional", model="text"),
         "only one of them"),
    # ---- generate: outputs
    Case("--out with an unknown extension", generate("--out", "grid.gif"), "must end in one of .png"),
    Case("--out is a folder", lambda tmp, models: [*generate("--out", str(tmp))(tmp, models)], "is a folder"),
    Case("--out-dir is a file", with_file("taken", b"mine", lambda tmp, models, path: [
        *generate("--out-dir", str(path))(tmp, models)]), "is a file"),
    Case("--out next to the user's own .json", with_file("mine.json", b'{"mine": 1}', lambda tmp, models, path: [
        *generate("--out", str(tmp / "mine.png"))(tmp, models)]), "mine.json exists and was not written by vgen"),
    Case("--out-dir holding the user's images", with_file("photos/0000.png", b"png", lambda tmp, models, path: [
        *generate("--out-dir", str(path.parent))(tmp, models)]), "holds images vgen generate did not write"),
    Case("--out in a read-only folder", lambda tmp, models: [
        *generate("--out", str(readonly_dir(tmp) / "g.png"))(tmp, models)], "cannot write in",
         skip="root writes into read-only folders" if running_as_root() else None),
    Case("--out where nobody may write", generate("--out", "/sys/vgen-grid.png"), "cannot write in /sys",
         skip=None if sys.platform.startswith("linux") and not sys_is_writable() else "needs Linux's /sys"),
    Case("--device gpu", generate("--device", "gpu"), "unknown device 'gpu'"),
    Case("--device tpu", generate("--device", "tpu"), "unknown device 'tpu'"),
    Case("--device cuda without CUDA", generate("--device", "cuda"), "is not available on this machine",
         skip="this machine has CUDA" if torch.cuda.is_available() else None),
    # ---- model folders
    Case("missing weights", broken_model(lambda f: weights(f).unlink()), "is missing: the folder has no weights"),
    Case("missing component", broken_model(lambda f: shutil.rmtree(f / "vqvae")), "has no vqvae/ folder"),
    Case("corrupt model_index.json", broken_model(lambda f: (f / "model_index.json").write_text("{oops")),
         "model_index.json is not valid JSON"),
    Case("model_index.json not an object", broken_model(lambda f: (f / "model_index.json").write_text("[1, 2]")),
         "holds a JSON list, not an object"),
    Case("truncated safetensors", broken_model(lambda f: cut_in_half(weights(f))), "truncated or corrupt"),
    Case("empty safetensors", broken_model(lambda f: weights(f).write_bytes(b"")), "truncated or corrupt"),
    Case("random safetensors", broken_model(lambda f: weights(f).write_bytes(os.urandom(3000))),
         "not a readable safetensors file"),
    Case("config deeper than the weights", broken_model(edit_config("transformer", depth=3)),
         "missing key(s): blocks.1."),
    Case("config shallower than the weights", broken_model(edit_config("transformer", depth=0)),
         "unexpected key(s): blocks.0."),
    Case("config no model can have", broken_model(edit_config("transformer", num_heads=0)),
         "does not describe a valid VAR"),
    Case("weights of another shape", broken_model(edit_config("transformer", embed_dim=64)), "other shape(s)"),
    Case("no pipeline folder", generate("--model", "/no/such/model"), "model folder not found"),
    # ---- convert: checkpoint files
    Case("pickled list as a checkpoint", convert_with_var(torch_save_to([1, 2, 3])), "holds a list, not a dictionary"),
    Case("raw pickle as a checkpoint", convert_with_var(lambda path, tmp: path.write_bytes(pickle.dumps([1, 2]))),
         "not written by torch.save"),
    Case("empty checkpoint", convert_with_var(lambda path, tmp: path.write_bytes(b"")), "is empty (0 bytes)"),
    Case("truncated checkpoint", convert_with_var(truncated_var_file), "truncated or corrupt"),
    Case("checkpoint that would run code", convert_with_var(planted_var_file), "because unpickling them can run code"),
    Case("convert --out is a file", with_file("out", b"x", lambda tmp, models, path: [
        "convert", "var-official", "--vae", "v.pth", "--var", "w.pth", "--out", str(path)]), "is a file"),
    # ---- sample
    Case("--batch-size 0", lambda tmp, models: ["sample", "--model", str(models / "class"), "--class-labels", "0",
                                                "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    Case("--num-samples beyond memory", lambda tmp, models: [
        "sample", "--model", str(models / "class"), "--class-labels", "0", "--n", str(10**15),
        "--out", str(tmp / "s")], "of memory, more than the"),
    Case("sample --seed beyond 64 bits", lambda tmp, models: [
        "sample", "--model", str(models / "class"), "--class-labels", "0", "--seed", BIG_SEED], "from 0 to"),
    Case("sample --out is a file", with_file("s", b"x", lambda tmp, models, path: [
        "sample", "--model", str(models / "class"), "--class-labels", "0", "--out", str(path)]), "is a file"),
    Case("corrupt sample_config.json", with_file("s/sample_config.json", b'{"seed": 0, "top', lambda tmp, models, p: [
        "sample", "--model", str(models / "class"), "--class-labels", "0", "--n", "2", "--out", str(p.parent)]),
         "sample_config.json is corrupt"),
    Case("binary prompt file", with_file("prompts.txt", bytes(range(128, 256)), lambda tmp, models, path: [
        "sample", "--model", str(models / "text"), "--metadata", str(path)]), "is not UTF-8 text"),
    Case("blank prompt in a prompt file", with_file("prompts.jsonl", b'{"prompt": " "}\n', lambda tmp, models, p: [
        "sample", "--model", str(models / "text"), "--metadata", str(p), "--out", str(tmp / "s")]),
         "has no words"),
    # ---- eval fid
    Case("fid --n -3", lambda tmp, models: ["eval", "fid", "--samples", "a", "--ref", "b", "--n", "-3"],
         "--n: must be an integer >= 1, got -3"),
    Case("fid --n 1", lambda tmp, models: ["eval", "fid", "--samples", str(images_folder(tmp)), "--ref",
                                           str(tmp / "imgs"), "--features", "shapes", "--n", "1"],
         "--n must be at least 2"),
    Case("fid --batch-size 0", lambda tmp, models: ["eval", "fid", "--samples", "a", "--ref", "b",
                                                    "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    Case("fid --num-workers -1", lambda tmp, models: ["eval", "fid", "--samples", "a", "--ref", "b",
                                                      "--num-workers", "-1"],
         "--num-workers: must be an integer >= 0"),
    Case("random bytes as --ref", with_file("ref.npz", os.urandom(2048), lambda tmp, models, path: [
        "eval", "fid", "--samples", str(images_folder(tmp)), "--ref", str(path), "--features", "shapes"]),
         "ref.npz is not a readable .npz file"),
    Case("fid --device tpu", lambda tmp, models: ["eval", "fid", "--samples", str(images_folder(tmp)), "--ref",
                                                  str(tmp / "imgs"), "--features", "shapes", "--device", "tpu"],
         "unknown device 'tpu'"),
    Case("fid-ref --out is a folder", lambda tmp, models: ["eval", "fid-ref", "--world", "shapes", "--n", "8",
                                                           "--out", str(tmp)], "is a folder"),
    Case("fid-ref --n beyond memory", lambda tmp, models: ["eval", "fid-ref", "--world", "shapes", "--n",
                                                           str(10**13), "--out", str(tmp / "r.npz")],
         "of memory, more than the"),
    # ---- eval geneval
    Case("unknown GenEval tag", with_file("meta.jsonl", json.dumps({**SHAPES_PROMPT, "tag": "texture"}).encode(),
         lambda tmp, models, path: ["eval", "geneval", "--real", "--metadata", str(path), "--detector", "shapes",
                                    "--out", str(tmp / "g")]), "unknown tag 'texture'"),
    Case("empty metadata.jsonl", lambda tmp, models: geneval_folder(
        tmp, [SHAPES_PROMPT], lambda root: (root / "00000" / "metadata.jsonl").write_text("")), "is empty"),
    Case("binary metadata.jsonl", lambda tmp, models: geneval_folder(
        tmp, [SHAPES_PROMPT], lambda root: (root / "00000" / "metadata.jsonl").write_bytes(bytes(range(256)))),
         "is not UTF-8 text"),
    Case("corrupt sample image", lambda tmp, models: geneval_folder(
        tmp, [SHAPES_PROMPT], lambda root: sample_path(root, 0, 0).write_bytes(b"\x89PNG\r\n\x1a\nbroken")),
         "cannot read the sample image"),
    Case("classes the detector does not know", lambda tmp, models: geneval_folder(tmp, load_metadata("geneval")[:2]),
         "the detector does not know: 'bench'"),
    Case("geneval seeds beyond 64 bits", lambda tmp, models: [
        "eval", "geneval", "--model", str(models / "text"), "--limit", "2", "--images-per-prompt", "2",
        "--seed", str(2**64 - 3), "--out", str(tmp / "g")], "beyond the largest seed"),
    Case("geneval --threshold 2", lambda tmp, models: [*geneval_folder(tmp, [SHAPES_PROMPT]), "--threshold", "2"],
         "threshold must be a number from 0 to 1"),
    Case("geneval --results is a folder", lambda tmp, models: [*geneval_folder(tmp, [SHAPES_PROMPT]),
                                                               "--results", str(tmp)], "--results"),
    # ---- data preview
    Case("data preview --n 0", lambda tmp, models: ["data", "preview", "--n", "0"], "--n: must be an integer >= 1"),
    Case("data preview --seed -1", lambda tmp, models: ["data", "preview", "--seed", "-1"], "--seed: must be"),
    Case("binary folder metadata.jsonl", preview_folder_with_binary_metadata, "is not UTF-8 text"),
    # ---- train (the toy task of test_train_loop)
    Case("train.lr=.nan", toy_train("--set", "train.lr=.nan"), "train.lr must be a finite number"),
    Case("train.seed beyond 64 bits", toy_train("--set", f"train.seed={2**70}"), "train.seed must be an integer"),
    Case("binary run config", toy_train(config=bytes(range(128, 256))), "is not UTF-8 text"),
    Case("train --out is a file", toy_train(prepare=lambda tmp: (tmp / "run").write_text("x")), "is a file"),
    Case("resume with other settings", toy_train("--resume", "--set", "train.lr=0.5", prepare=finished_toy_run),
         "holds a run made with other settings (train.lr: 0.0001 -> 0.5);"),
    Case("resume when no checkpoint reads", toy_train("--resume", prepare=corrupt_checkpoints),
         "none of the 2 checkpoints"),
    Case("resume from a planted checkpoint", toy_train("--resume", prepare=planted_checkpoint), "can run code"),
    Case("a second run in the folder", toy_train(prepare=lambda tmp: None), "another training run is using"),
]


def user_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links as their target path), but run-folder lock files."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.name == LOCK_FILE or path.is_dir():
            continue
        files[path.relative_to(root).as_posix()] = (os.readlink(path).encode() if path.is_symlink()
                                                    else path.read_bytes())
    return files


def run_main(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_no_file(case, models, tmp_path, capsys, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.setitem(TASKS, "toy", "test_train_loop:ToyTask")
    monkeypatch.chdir(tmp_path)
    argv = case.build(tmp_path, models)
    holder = None
    if case.name == "a second run in the folder":
        holder = RunLock(tmp_path / "run")
        holder.acquire()
    before = user_files(tmp_path)
    capsys.readouterr()
    try:
        code = run_main(argv)
    finally:
        if holder is not None:
            holder.release()
        for path in tmp_path.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert out == ""
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("vgen ")
    assert case.expect in lines[0]
    assert len(lines[0]) < 1000
    assert user_files(tmp_path) == before
    assert not (tmp_path / "code_ran").exists()


def test_every_config_file_named_in_help_exists(capsys):
    from vgen.cli import build_parser

    parser = build_parser()
    helps = []
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            helps.append(sub.format_help())
    named = {word.strip(".,;:()'\"") for text in helps for word in text.split() if word.startswith("configs/")}
    repo = Path(__file__).resolve().parents[1]
    assert named and all((repo / path).is_file() for path in named), named


@pytest.mark.parametrize("argv, expect", [
    (["generate", "--model", "/no/such/model", "--class-label", "1"], "model folder not found"),
    (["eval", "fid", "--samples", ".", "--ref", ".", "--n", "-3"], "must be an integer >= 1"),
    (["train", "var", "--config", "configs/shapes/var_text.yaml", "--set", "train.lr=.nan", "--out", "{tmp}/run"],
     "train.lr must be a finite number"),
])
def test_in_a_real_process_bad_input_is_one_line(argv, expect, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    proc = subprocess.run([sys.executable, "-m", "vgen", *argv], capture_output=True, text=True, cwd=repo,
                          timeout=300, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
