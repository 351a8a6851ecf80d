"""What the training tasks of the image generators share (``vgen train var`` for VAR / NFIG, ``raster-ar``,
``flowar``): a data world with captions or class labels, class or text conditioning through the project's text
encoder, the module the loop optimises, fine-tuning from an exported pipeline, frozen parameters, and sample grids.

A family's task subclasses :class:`ImageGeneratorTask` with a config dataclass that subclasses
:class:`ImageGeneratorTaskConfig` (adding its tokenizer, model size and sampling defaults), and a train module that
subclasses :class:`ConditionedTrainModule` (its ``forward`` runs the family's transformer on ``self.condition(...)``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgen.checkpoints import read_state_dict, state_dict_mismatch
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder, split_words
from vgen.train.task import TrainTask

WORLDS = ("shapes", "folder")
CONDITIONINGS = ("text", "class")

#: the prompts of the training-time sample grids (text models)
SAMPLE_PROMPTS = (
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a green triangle and a yellow star",
    "a photo of three purple hexagons",
    "a photo of an orange diamond left of a white circle",
    "a photo of a pink star above a black square",
)


@dataclass
class ImageGeneratorTaskConfig:
    """The ``task:`` fields every image generator has: conditioning, its text encoder, the data world and the
    conditions of the sample grids. (All fields have defaults, so a family's subclass adds its own after them.)"""

    #: a saved pipeline folder (``final/`` of an earlier run of the same task) whose transformer and text encoder
    #: weights start this run (fine-tuning with a fresh optimiser and schedule); sizes must match. "" = random init.
    init_from: str = ""
    #: glob patterns of the parameters this run trains (names as in the task's train module, e.g. ``text_encoder.*``);
    #: the rest stay frozen. Empty = train everything.
    trainable: tuple[str, ...] = ()
    # --- conditioning
    #: "text" (prompts through a trainable ShapesTextEncoder) or "class" (class labels, null class = num_classes)
    conditioning: str = "text"
    num_classes: int = 0  #: 0 = the world's number of classes
    text_embed_dim: int = 256
    text_depth: int = 2
    text_heads: int = 4
    text_max_length: int = 32
    #: odd window of words mixed into every text token after the encoder (ShapesTextEncoder ``word_mixing``); 0 = off
    text_word_mixing: int = 0
    # --- data
    world: str = "shapes"
    data_path: str = ""
    resolution: int = 64
    dataset_length: int = 100_000
    seed: int = 0
    #: shapes world: relative caption frequency per GenEval tag (e.g. {counting: 2, position: 2}); None = equal
    tag_weights: dict[str, float] | None = None
    # --- conditions of the sample grids drawn during training
    sample_prompts: tuple[str, ...] = SAMPLE_PROMPTS
    sample_class_labels: tuple[int, ...] = (0, 7, 14, 21, 28, 35)


class ConditionedTrainModule(nn.Module):
    """What the training loop optimises: a generator plus (text models) the text encoder, trained together."""

    def __init__(self, transformer: nn.Module, text_encoder: ShapesTextEncoder | None):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def condition(self, label_B: torch.Tensor | None = None, ids_BT: torch.Tensor | None = None,
                  mask_BT: torch.Tensor | None = None):
        """The transformer's :class:`~vgen.models.conditioning.Condition` for B rows: class labels (B,), or the
        prompt ids / mask (B, T) through the text encoder."""
        if self.text_encoder is None:
            return self.transformer.class_condition(label_B)
        pooled_BD, tokens_BTD = self.text_encoder(ids_BT, mask_BT)
        return self.transformer.text_condition(pooled_BD, tokens_BTD, mask_BT)


def freeze_all_but(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """``requires_grad`` only for parameters whose name matches one of the glob ``patterns``; a pattern that matches
    nothing is an error (a typo would otherwise freeze what it meant to train)."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pat for pat in patterns if not fnmatch.filter(names, pat)]
    if unmatched:
        raise UserError(
            f"task.trainable: {', '.join(repr(p) for p in unmatched)} match(es) no parameter; names look like "
            f"{names[0]}, {names[-1]}"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))


class ImageGeneratorTask(TrainTask):
    """Shared pieces of the image generators' tasks (see the module docstring). ``cfg`` is an
    :class:`ImageGeneratorTaskConfig` subclass; ``command`` names the task in messages (``vgen train <command>``)."""

    command = ""

    def __init__(self, cfg: ImageGeneratorTaskConfig):
        super().__init__(cfg)
        if cfg.conditioning not in CONDITIONINGS:
            raise UserError(f"task.conditioning must be 'text' or 'class', got {cfg.conditioning!r}")
        if cfg.world not in WORLDS:
            raise UserError(f"task.world must be one of {', '.join(WORLDS)}, got {cfg.world!r}")
        if cfg.tag_weights and cfg.world != "shapes":
            raise UserError("task.tag_weights applies to the shapes world only; remove it for world: folder")
        self._images = None

    # -- data ------------------------------------------------------------------------------------------------

    def image_dataset(self) -> torch.utils.data.Dataset:
        """The world's images (items with ``image`` in [-1, 1], ``caption``, ``class_label``), made once."""
        if self._images is None:
            cfg = self.cfg
            if cfg.world == "shapes":
                from vgen.data.shapes import ShapesDataset

                self._images = ShapesDataset(resolution=cfg.resolution, length=cfg.dataset_length, seed=cfg.seed,
                                             tag_weights=cfg.tag_weights,
                                             class_conditional=cfg.conditioning == "class")
            else:
                from vgen.data.folder import ImageFolderDataset

                self._images = ImageFolderDataset(cfg.data_path, resolution=cfg.resolution)
        return self._images

    def build_dataset(self) -> torch.utils.data.Dataset:
        return self.image_dataset()

    def vocabulary(self) -> list[str]:
        """The text encoder's words: the Shapes prompt vocabulary, or every word of a folder's captions."""
        if self.cfg.world == "shapes":
            from vgen.data.shapes import PROMPT_VOCABULARY

            return list(PROMPT_VOCABULARY)
        words = sorted({w for caption in self.image_dataset().captions for w in split_words(caption)})
        if not words:
            raise UserError(f"no captions found under {self.cfg.data_path} (metadata.jsonl); use conditioning: class")
        return words

    def num_classes(self) -> int:
        if self.cfg.num_classes > 0:
            return self.cfg.num_classes
        if self.cfg.world == "shapes":
            from vgen.data.shapes import NUM_CLASSES

            return NUM_CLASSES
        return len(self.image_dataset().classes)

    # -- model -----------------------------------------------------------------------------------------------

    def build_text_encoder(self) -> ShapesTextEncoder | None:
        """A fresh text encoder for text conditioning (None for class conditioning)."""
        cfg = self.cfg
        if cfg.conditioning != "text":
            return None
        return ShapesTextEncoder(vocabulary=self.vocabulary(), embed_dim=cfg.text_embed_dim, depth=cfg.text_depth,
                                 num_heads=cfg.text_heads, max_length=cfg.text_max_length,
                                 word_mixing=cfg.text_word_mixing)

    def prepare_model(self, model: ConditionedTrainModule) -> ConditionedTrainModule:
        """``task.init_from`` weights loaded and ``task.trainable`` applied."""
        if self.cfg.init_from:
            self.load_initial_weights(model, Path(self.cfg.init_from))
        if self.cfg.trainable:
            freeze_all_but(model, self.cfg.trainable)
        return model

    def load_initial_weights(self, model: ConditionedTrainModule, folder: Path) -> None:
        """Copy ``folder``'s transformer (and text encoder) weights into ``model``; one-line errors on a mismatch.
        Blocks a module declares in ``IDENTITY_WHEN_ABSENT`` (they start as the identity, e.g. the text encoder's
        word mixing) may be new in this run."""
        for name, module in {"transformer": model.transformer, "text_encoder": model.text_encoder}.items():
            if module is None:
                continue
            files = sorted((folder / name).glob("*.safetensors"))
            if not files:
                raise UserError(f"task.init_from: no {name} weights under {folder / name}; give the final/ folder of "
                                f"a 'vgen train {self.command}' run")
            state = read_state_dict(files[0], what=f"task.init_from {name} weights")
            expected = module.state_dict()
            new_blocks = tuple(getattr(module, "IDENTITY_WHEN_ABSENT", ()))
            added = [k for k in expected if k not in state and k.startswith(new_blocks)] if new_blocks else []
            mismatch = state_dict_mismatch({k: v for k, v in expected.items() if k not in added}, state, limit=3)
            if mismatch:
                raise UserError(f"task.init_from: the {name} in {folder} does not match this config's sizes "
                                f"({mismatch}); set the task's size fields as that run had them")
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            module.load_state_dict({**{k: expected[k] for k in added}, **state})

    # -- steps -----------------------------------------------------------------------------------------------

    @staticmethod
    def condition_inputs(inner: ConditionedTrainModule, batch: Any, device: torch.device) -> dict[str, Any]:
        """The train module's condition arguments for a batch: ``ids_BT`` / ``mask_BT`` of its captions (text
        models) or ``label_B``."""
        if inner.text_encoder is not None:
            ids_BT, mask_BT = inner.text_encoder.tokenize(list(batch["caption"]))
            return {"ids_BT": ids_BT.to(device), "mask_BT": mask_BT.to(device)}
        return {"label_B": torch.as_tensor(batch["class_label"], device=device).long()}

    @torch.no_grad()
    def sample_grid_of(self, pipe, step: int, **sampling):
        """A captioned grid of ``pipe``'s images for the sample prompts (or class labels), image i seeded i."""
        from vgen.imaging import make_grid, tensor_to_pil

        pipe.set_progress_bar_config(disable=True)
        cfg = self.cfg
        if pipe.text_encoder is not None:
            conditions, kwargs = list(cfg.sample_prompts), {"prompt": list(cfg.sample_prompts)}
        else:
            labels = [lab % pipe.transformer.config.num_classes for lab in cfg.sample_class_labels]
            conditions, kwargs = [f"class {lab}" for lab in labels], {"class_labels": labels}
        generators = [torch.Generator().manual_seed(i) for i in range(len(conditions))]
        images = pipe(**kwargs, **sampling, generator=generators, output_type="pt").images
        return make_grid(tensor_to_pil(images, value_range=(0.0, 1.0)), [f"{c} (step {step})" for c in conditions])
