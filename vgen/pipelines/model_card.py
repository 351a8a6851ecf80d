"""Model cards: the ``README.md`` every saved vgen pipeline folder carries, as the Hugging Face Hub expects (YAML
front matter with ``license``, ``library_name``, ``pipeline_tag`` and ``tags``, then Markdown).

What a card says comes from two places:

* the pipeline itself (:func:`pipeline_facts`): family, class, conditioning, components with their parameter counts
  and the dtype of the weights as written, the family's own facts (:meth:`VGenPipeline.card_facts`), the saved
  sampling defaults, what ``output_type="latent"`` returns, and how to load the folder;
* :class:`ModelCardInfo`, which whoever saves sets on ``pipe.model_card`` (a training export, the ship script, a
  converter, a user): what it is, how it was trained, measured scores, the licence of the weights and where they
  come from. It is kept in the front matter (``vgen: card:``), so loading a folder and saving it again keeps it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"


@dataclass
class Score:
    """One measured number: ``name`` (e.g. ``"Shapes-GenEval overall"``), ``value`` and ``how`` it was measured
    (protocol, sample count, command)."""

    name: str
    value: float
    how: str = ""


@dataclass
class ModelCardInfo:
    """What a pipeline's card says beyond what the pipeline shows by itself. Empty fields print as "not recorded"
    (training, scores) or "not stated" (licence)."""

    title: str = ""
    #: one paragraph on what the model is and is for
    summary: str = ""
    #: how it was trained (data, steps, recipe, command)
    training: str = ""
    scores: list[Score] = field(default_factory=list)
    #: a Hugging Face Hub licence identifier (``apache-2.0``, ``mit``, ...); "" = not stated
    license: str = ""
    #: where the licence comes from, or terms that go with it
    license_note: str = ""
    #: where the weights come from (the files a converter read, the run that trained them)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in ("", [], None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCardInfo:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data and key != "scores"}
        scores = [Score(str(s["name"]), float(s["value"]), str(s.get("how", ""))) for s in data.get("scores") or []
                  if isinstance(s, dict) and "name" in s and "value" in s]
        return cls(**{key: str(value) for key, value in known.items()}, scores=scores)


def read_card_info(folder: str | Path | None) -> ModelCardInfo | None:
    """The :class:`ModelCardInfo` kept in ``folder/README.md`` (None when there is no vgen card there)."""
    if folder is None:
        return None
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    metadata = front_matter(path.read_text(encoding="utf-8", errors="replace"))
    card = (metadata.get("vgen") or {}).get("card") if isinstance(metadata.get("vgen"), dict) else None
    return ModelCardInfo.from_dict(card) if isinstance(card, dict) else None


def front_matter(text: str) -> dict:
    """The YAML mapping between the leading ``---`` lines of a card ({} when there is none or it is not YAML)."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[4:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def weights_dtypes(folder: Path) -> list[str]:
    """The floating dtypes of the tensors in a component folder's safetensors files, as stored (e.g. ``["F16"]``)."""
    from safetensors import safe_open

    dtypes = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                dtype = fh.get_slice(key).get_dtype()
                if dtype.startswith(("F", "BF")):
                    dtypes.add(dtype)
    return sorted(dtypes)


_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def pipeline_facts(pipe, folder: Path) -> dict[str, Any]:
    """What the saved pipeline in ``folder`` shows by itself (used for the card's body and metadata)."""
    import torch

    from vgen.pipelines.registry import PIPELINES

    class_name = type(pipe).__name__
    family = PIPELINES[class_name].family if class_name in PIPELINES else class_name
    components = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dtypes = weights_dtypes(folder / name) if (folder / name).is_dir() else []
        components.append({
            "name": name, "class": f"{type(module).__module__}.{type(module).__name__}",
            "parameters": sum(p.numel() for p in module.parameters()),
            "dtype": ", ".join(_DTYPE_NAMES.get(d, d) for d in dtypes) or "-",
        })
    makes_videos = getattr(pipe, "produces", "images") == "videos"
    if pipe.is_text_conditional:
        conditioning = f"text-to-{'video' if makes_videos else 'image'} (prompts)"
    elif pipe.num_classes > 0:
        conditioning = f"class-conditional ({pipe.num_classes} classes)"
    else:
        conditioning = "unconditional"
    return {"family": family, "class_name": class_name, "conditioning": conditioning, "components": components,
            "facts": dict(pipe.card_facts()), "defaults": pipe.sampling_defaults(),
            "latent": pipe.latent_description, "text": pipe.is_text_conditional,
            "output_field": getattr(pipe, "output_field", "images"),
            "example_prompt": getattr(pipe, "example_prompt", "a photo of a red circle"),
            "command": getattr(pipe, "produces_command", "generate")}


def card_text(pipe, folder: Path, info: ModelCardInfo) -> str:
    """The whole ``README.md`` for ``pipe`` saved in ``folder``."""
    import yaml

    import vgen

    facts = pipeline_facts(pipe, folder)
    metadata: dict[str, Any] = {"license": info.license or "other"}
    if not info.license:
        metadata["license_name"] = "not-stated"
    metadata["library_name"] = "diffusers"
    if facts["text"]:
        metadata["pipeline_tag"] = "text-to-image"
    metadata["tags"] = ["vgen", facts["family"].lower(), "autoregressive",
                        "text-to-image" if facts["text"] else "class-conditional-image-generation"]
    metadata["vgen"] = {"version": vgen.__version__, "pipeline": facts["class_name"], "family": facts["family"],
                        "card": info.to_dict()}
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {info.title or facts['family'] + ' pipeline (' + facts['class_name'] + ')'}", ""]
    if info.summary:
        lines += [info.summary, ""]
    lines += ["## What it is", ""]
    lines += [f"- a {facts['family']} pipeline saved by vgen {vgen.__version__} (`{facts['class_name']}`): "
              f"{facts['conditioning']}"]
    lines += [f"- {key}: {value}" for key, value in facts["facts"].items()]
    if info.source:
        lines += [f"- weights from: {info.source}"]
    total = sum(c["parameters"] for c in facts["components"])
    lines += ["", f"| component | class | parameters | weights stored as |", "|---|---|---:|---|"]
    lines += [f"| `{c['name']}` | `{c['class']}` | {c['parameters']:,} | {c['dtype']} |" for c in facts["components"]]
    lines += [f"| all | | {total:,} | |", ""]
    defaults = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in facts["defaults"].items())
    lines += [f"Sampling defaults (`default_*` in `model_index.json`, used for every option a call leaves out): "
              f"{defaults or 'none'}.", ""]
    if facts["latent"]:
        lines += [f"`output_type=\"latent\"` returns {facts['latent']}", ""]
    lines += ["## How it was trained", "", info.training or "Not recorded (this folder was saved without training "
              "information; set `pipe.model_card.training` before `save_pretrained`).", ""]
    lines += ["## Measured scores", ""]
    if info.scores:
        lines += ["| metric | value | how it was measured |", "|---|---:|---|"]
        lines += [f"| {s.name} | {s.value:g} | {s.how} |" for s in info.scores]
    else:
        lines += ["None recorded."]
    lines += ["", "## Licence of the weights", ""]
    licence = f"`{info.license}`" if info.license else "Not stated"
    lines += [licence + (f": {info.license_note}" if info.license_note else "."), ""]
    lines += load_instructions(facts, folder.name)
    return "\n".join(lines).rstrip() + "\n"


def load_instructions(facts: dict, folder_name: str) -> list[str]:
    """The card's "How to load it" section."""
    from vgen.pipelines.registry import PIPELINES

    module = PIPELINES[facts["class_name"]].target.partition(":")[0] if facts["class_name"] in PIPELINES else ""
    prompt = facts.get("example_prompt", "a photo of a red circle")
    condition = f'prompt="{prompt}"' if facts["text"] else "class_labels=[0]"
    cli_condition = f'"{prompt}"' if facts["text"] else "--class-label 0"
    lines = ["## How to load it", "", "Everything loads offline from this folder, with vgen installed (its README: "
             "`pip install -e .` in a checkout).",
             "", "```python", "import torch", "from vgen.pipelines import load_pipeline", "",
             f'pipe, _ = load_pipeline("{folder_name}")  # any vgen family; checks the folder first',
             f"{facts['output_field']} = pipe({condition}, generator=torch.Generator().manual_seed(0))."
             f"{facts['output_field']}", "```", ""]
    if module:
        lines += ["With diffusers' own loader, import the family's module first (it registers the pipeline class "
                  "with diffusers; without it diffusers stops with `module diffusers has no attribute "
                  f"{facts['class_name']}`):", "", "```python", f"import {module}  # noqa: F401",
                  "from diffusers import DiffusionPipeline", "",
                  f'pipe = DiffusionPipeline.from_pretrained("{folder_name}")', "```", ""]
    command = facts.get("command", "generate")
    if command == "generate":
        cli = f"vgen generate --model {folder_name} {cli_condition} --n 4 --seed 0 --out grid.png"
    else:  # a video model: its own command, one clip
        cli = f"vgen {command} {cli_condition} --model {folder_name} --seed 0 --out clip.gif"
    lines += ["From the command line:", "", "```bash", cli, "```"]
    return lines


def write_model_card(pipe, folder: str | Path, info: ModelCardInfo | None = None) -> Path:
    """Write ``folder/README.md`` for ``pipe`` (saved in ``folder``) with ``info`` (default: ``pipe.model_card``)."""
    folder = Path(folder)
    path = folder / CARD_FILE
    path.write_text(card_text(pipe, folder, info if info is not None else pipe.model_card), encoding="utf-8")
    return path
