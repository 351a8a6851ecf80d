"""What every ``vgen convert`` kind checks before it writes anything: the output folder must be new or empty, and a
given ``--num-classes`` must match the checkpoint (the same one-line messages for every kind). In-process CLI calls
on the tiny official-layout files of each family's tests."""

import pytest
import torch

from vgen.cli import main

from test_flowar_pipeline import official_flowar_state_dict
from test_var_cli import official_var_state_dict
from test_xar_pipeline import official_xar_state_dict

#: kind -> (the flag of its transformer file, other required flags, its tiny official transformer state dict)
KINDS = {
    "var-official": ("--var", ["--vae", "vae.pth"], official_var_state_dict),
    "flowar-official": ("--flowar", ["--vae", "kl.ckpt"], official_flowar_state_dict),
    "xar-official": ("--xar", ["--vae", "kl.ckpt"], official_xar_state_dict),
    "llamagen-official": ("--gpt", ["--vq", "vq.pt"], None),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_converter_refuses_a_folder_that_is_not_empty(kind, tmp_path, capsys):
    flag, others, _ = KINDS[kind]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # checked before any checkpoint is read: the files named need not exist
    rc = main(["convert", kind, flag, "model.pth", *others, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    expected = f"vgen convert: error: output folder {out} exists and is not empty; choose a new --out"
    assert err.splitlines() == [expected]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kind", [kind for kind, (_, _, sd) in KINDS.items() if sd is not None])
def test_a_wrong_num_classes_is_one_line_and_writes_nothing(kind, tmp_path, capsys):
    flag, others, state_dict = KINDS[kind]
    torch.save(state_dict(), tmp_path / "model.pth")
    out = tmp_path / "out"
    # the tiny checkpoints have 10 classes; the check comes before the tokenizer is read
    rc = main(["convert", kind, flag, str(tmp_path / "model.pth"), *others, "--out", str(out), "--num-classes", "7"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.splitlines() == ["vgen convert: error: --num-classes 7 does not match the checkpoint, which has 10 "
                                "classes"]
    assert not out.exists() or not any(out.iterdir())
