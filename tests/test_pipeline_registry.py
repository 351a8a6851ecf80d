"""The pipeline registry: one loader for every family, declared sampling options, diffusers' generic loader."""

import json
import subprocess
import sys

import pytest
import torch
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError
from vgen.models.var import VAR
from vgen.pipelines import load_pipeline, pipeline_class_name
from vgen.pipelines.registry import PIPELINES, all_sampling_options, load_pipeline_class
from vgen.pipelines.var import VARPipeline


@pytest.fixture(scope="module")
def var_folder(tmp_path_factory):
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), norm_num_groups=8,
                           patch_nums=(1, 2, 4)).eval()
    var = VAR(vocab_size=64, Cvae=8, patch_nums=(1, 2, 4), depth=1, embed_dim=32, num_heads=2, num_classes=3).eval()
    folder = tmp_path_factory.mktemp("registry") / "pipe"
    VARPipeline(vq, var, default_top_k=5).save_pretrained(folder)
    return folder


def test_loader_dispatches_on_class_name(var_folder):
    assert pipeline_class_name(var_folder) == "VARPipeline"
    pipe, folder = load_pipeline(var_folder, "cpu")
    assert type(pipe) is VARPipeline and folder == var_folder
    assert pipe.sampling_defaults()["top_k"] == 5
    assert load_pipeline_class("VARPipeline") is VARPipeline


@pytest.mark.parametrize("index, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("{\"transformer\": null}", "does not name a pipeline class"),
    ('{"_class_name": "FancyPipeline"}', "'FancyPipeline' pipeline, which this version of vgen does not know"),
])
def test_loader_refuses_bad_model_index(tmp_path, index, message):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(UserError, match=message):
        load_pipeline(tmp_path, "cpu")


def test_declared_options_drive_the_pipeline(var_folder):
    pipe = VARPipeline.from_pretrained(var_folder)
    declared = {o.name for o in PIPELINES["VARPipeline"].options if o.saved}
    assert set(pipe.sampling_defaults()) == declared
    assert {"guidance_scale", "top_k", "top_p", "temperature", "guidance_profile", "more_smooth"} <= set(
        all_sampling_options())
    with pytest.raises(UserError, match="VARPipeline has no sampling option num_steps"):
        pipe.resolve_sampling(num_steps=3)
    for bad in ({"guidance_scale": float("nan")}, {"temperature": float("inf")}, {"top_p": 1.5}, {"top_k": -1},
                {"guidance_profile": [0.5, float("nan"), 1.0]}):
        with pytest.raises(UserError, match="must be"):
            pipe.resolve_sampling(**bad)
    assert pipe.resolve_sampling(top_k=2)["top_k"] == 2


def test_diffusers_generic_loader_after_importing_the_family(var_folder):
    """A fresh process: `import vgen.pipelines.var`, then diffusers' own DiffusionPipeline.from_pretrained."""
    code = (
        "import diffusers, vgen.pipelines.var, sys\n"
        f"pipe = diffusers.DiffusionPipeline.from_pretrained({str(var_folder)!r})\n"
        "print(type(pipe).__name__, pipe.sampling_defaults()['top_k'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["VARPipeline", "5"]


def test_saved_folder_names_the_registered_class(var_folder):
    index = json.loads((var_folder / "model_index.json").read_text())
    assert index["_class_name"] in PIPELINES and index["transformer"] == ["vgen.models.var", "VAR"]


def test_cli_flags_come_from_the_declarations(var_folder):
    import argparse

    from vgen.cli import build_parser
    from vgen.cli.sampling_flags import sampling_from_flags
    from vgen.pipelines.registry import SamplingOption, finite_float

    parser = build_parser()
    for command in (["generate", "x"], ["sample", "--class-labels", "all"], ["eval", "geneval"]):
        args = parser.parse_args([*command, "--temperature", "0.5", "--top-k", "3"])
        assert (args.temperature, args.top_k, args.guidance_scale) == (0.5, 3, None)
    pipe = VARPipeline.from_pretrained(var_folder)
    saved, extra = sampling_from_flags(argparse.Namespace(top_k=2, more_smooth=True), pipe)
    assert saved["top_k"] == 2 and saved["top_p"] == pipe.sampling_defaults()["top_p"] and extra == {"more_smooth": True}

    class OnlyGuidance:  # a family that declares guidance alone
        sampling_options = (SamplingOption("guidance_scale", finite_float, 1.0, "cfg"),)

        def resolve_sampling(self, **given):
            return {"guidance_scale": given.get("guidance_scale", 1.0)}

    with pytest.raises(UserError, match="--top-k: not a sampling option of OnlyGuidance models; this model takes "
                                        "--guidance-scale"):
        sampling_from_flags(argparse.Namespace(top_k=2, guidance_scale=None), OnlyGuidance())
