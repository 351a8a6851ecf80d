"""YAML configs map onto dataclasses; --set overrides; unknown keys are clear errors."""

from dataclasses import dataclass, field

import pytest
import yaml

from vgen.config import load_config, parse_overrides, save_config, to_dict
from vgen.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    patch_nums: tuple[int, ...] = (1, 2, 4)
    optim: Optim = field(default_factory=Optim)
    note: str | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"steps": 5, "optim": {"lr": 3}, "patch_nums": [1, 2, 3, 4]}))
    cfg = load_config(Run, path, ["optim.lr=2e-4", "name=big", "optim.betas=[0.8, 0.99]"])
    assert cfg.steps == 5 and cfg.name == "big"
    assert cfg.patch_nums == (1, 2, 3, 4)
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99)


def test_int_in_yaml_becomes_float_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1\n")
    assert isinstance(load_config(Run, path).optim.lr, float)


def test_unknown_key_names_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(UserError, match="unknown config key.*stepz.*valid keys.*steps"):
        load_config(Run, path)
    with pytest.raises(UserError, match="optim.lrr"):
        load_config(Run, None, ["optim.lrr=1"])


def test_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="steps.*must be int"):
        load_config(Run, None, ["steps=many"])
    with pytest.raises(UserError, match="not found"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["steps"])


def test_save_round_trip(tmp_path):
    cfg = load_config(Run, None, ["steps=7", "note=hello"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Run, path)
    assert to_dict(again) == to_dict(cfg)
