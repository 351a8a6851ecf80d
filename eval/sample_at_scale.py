"""Sampling at scale: many images from a pipeline, sharded over processes, reproducible, resumable.

Every image has a global index and its own seed ``seed + index`` (one ``torch.Generator`` per image), so the random
numbers of an image do not depend on the number of processes or on which ranks drew which batch. Under ``torchrun``
(process group from :mod:`vgen.distributed`) rank r draws indices r, r + W, r + 2W, ... ; images already on disk
are skipped, so an interrupted run resumes where it stopped. The pixels are equal bit for bit only where the
arithmetic is: the same batch size (``--batch-size 1`` makes every image's batch the same), the same intra-op thread
count (torchrun sets ``OMP_NUM_THREADS=1``) and the same device type; batched kernels and float reductions round
differently by shape and thread count, and one flipped token changes the rest of its image. Files are written
atomically (temporary name, then rename). After a barrier, rank 0 writes ``manifest.jsonl`` (index, seed, prompt or
class label, file) and optionally ``samples.npz`` (``arr_0``: uint8 [N, H, W, 3] in index order, the input format of
OpenAI's ADM evaluator).

Two layouts share this code: a flat folder (``000000.png`` ...; :func:`flat_jobs`) and GenEval's per-prompt folders
(``00000/samples/0000.png``; :func:`geneval_jobs`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgen.atomic_files import remove_leftovers, temporary_path, write_text_atomic
from vgen.errors import UserError
from vgen.memory import check_fits_in_memory
from vgen.distributed import DistContext, barrier, setup_distributed

SETTINGS_FILE = "sample_config.json"
MANIFEST_FILE = "manifest.jsonl"
NPZ_FILE = "samples.npz"
#: Bytes a job description takes in memory (generously): what :func:`flat_jobs` checks a huge ``--n`` against.
JOB_BYTES = 1024


@dataclass(frozen=True)
class SampleJob:
    """One image to make: global ``index``, its ``seed``, where it goes, and its condition (prompt or class label)."""

    index: int
    seed: int
    path: Path
    prompt: str | None = None
    class_label: int | None = None

    def manifest_entry(self, root: Path) -> dict:
        entry = {"index": self.index, "seed": self.seed, "file": str(self.path.relative_to(root))}
        if self.prompt is not None:
            entry["prompt"] = self.prompt
        if self.class_label is not None:
            entry["class_label"] = self.class_label
        return entry


# --------------------------------------------------------------------------------------------------------- jobs


def flat_jobs(
    out: str | Path,
    n: int,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
) -> list[SampleJob]:
    """``n`` jobs ``out/{index:06d}.png``; image i is conditioned on ``prompts[i % P]`` or ``class_labels[i % C]``."""
    if (prompts is None) == (class_labels is None):
        raise ValueError("give exactly one of prompts or class_labels")
    conditions = list(prompts if prompts is not None else class_labels)
    if not conditions:
        raise UserError("the prompt / class-label list is empty; give at least one")
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    check_fits_in_memory(n * JOB_BYTES, f"a list of {n} images to sample", "give a smaller --n (or sample the set in "
                         "parts, each into its own --out folder, with --seed shifted by the images before it)")
    out = Path(out)
    jobs = []
    for i in range(n):
        cond = conditions[i % len(conditions)]
        jobs.append(SampleJob(i, seed + i, out / f"{i:06d}.png", prompt=cond if prompts is not None else None,
                              class_label=int(cond) if class_labels is not None else None))  # fmt: skip
    return jobs


def geneval_jobs(out: str | Path, metadata: Sequence[dict], images_per_prompt: int, seed: int = 0) -> list[SampleJob]:
    """GenEval layout: prompt p, sample k -> ``out/{p:05d}/samples/{k:04d}.png``, index p * images_per_prompt + k."""
    from vgen.eval.geneval import sample_path

    if images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be at least 1 (got {images_per_prompt})")
    jobs = []
    for p, entry in enumerate(metadata):
        for k in range(images_per_prompt):
            index = p * images_per_prompt + k
            jobs.append(SampleJob(index, seed + index, sample_path(out, p, k), prompt=entry["prompt"]))
    return jobs


def parse_class_labels(spec: str, num_classes: int | None) -> list[int]:
    """ "all" -> 0 .. num_classes-1; "3,1,4" -> [3, 1, 4] (each checked against num_classes when known)."""
    if spec == "all":
        if not num_classes:
            raise UserError("--class-labels all needs a class-conditional model; this one reports no class count")
        return list(range(num_classes))
    try:
        labels = [int(tok) for tok in spec.split(",") if tok.strip()]
    except ValueError:
        raise UserError(f"--class-labels {spec!r}: give 'all' or comma-separated integers like 0,1,2") from None
    if not labels:
        raise UserError("--class-labels is empty; give 'all' or comma-separated integers like 0,1,2")
    bad = [lab for lab in labels if lab < 0 or (num_classes is not None and lab >= num_classes)]
    if bad:
        raise UserError(f"class labels {bad} are outside 0..{(num_classes or 1) - 1} for this model")
    return labels


def load_prompts(spec: str) -> list[str]:
    """Prompts from "shapes" / "geneval" (the GenEval prompt sets), a ``.jsonl`` (key "prompt" or "text") or a text
    file (one prompt a line)."""
    from vgen.eval.geneval import load_metadata, read_jsonl

    if spec in ("shapes", "geneval"):
        return [entry["prompt"] for entry in load_metadata(spec)]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--metadata {spec!r} is neither 'shapes', 'geneval' nor an existing file")
    if path.suffix == ".jsonl":
        prompts = []
        for line_no, entry in enumerate(read_jsonl(path), 1):
            text = entry.get("prompt", entry.get("text")) if isinstance(entry, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path} line {line_no} has no 'prompt' (or 'text') string")
            prompts.append(text)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--metadata {path} is not UTF-8 text; give one prompt a line (or a .jsonl)") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


# -------------------------------------------------------------------------------------------------------- sampling


def pipeline_num_classes(pipe) -> int | None:
    """The class count of a class-conditional pipeline, if it tells (``num_classes`` on the pipeline or a model
    config)."""
    if getattr(pipe, "num_classes", None):
        return int(pipe.num_classes)
    for name in ("transformer", "generator", "model"):
        config = getattr(getattr(pipe, name, None), "config", None)
        value = getattr(config, "num_classes", None) if config is not None else None
        if value:
            return int(value)
    return None


def load_pipeline(model_dir: str | Path, device: torch.device):
    """Load a saved pipeline folder onto ``device``, with its progress bar off (the sampling run shows one bar)."""
    from vgen.pipelines import load_pipeline as load_saved_pipeline

    pipe, _ = load_saved_pipeline(model_dir, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_conditions(pipe, jobs: Sequence[SampleJob]) -> None:
    """Every distinct prompt / class label of ``jobs`` through the pipeline's condition check (``encode_condition``,
    when it has one) before the first image is made: a bad prompt is one error, not a failure halfway."""
    encode = getattr(pipe, "encode_condition", None)
    if encode is None or not jobs:
        return
    if jobs[0].prompt is not None:
        encode(list(dict.fromkeys(job.prompt for job in jobs)), None, 1)
    else:
        encode(None, list(dict.fromkeys(job.class_label for job in jobs)), 1)


def _save_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, ".png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def image_is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole, readable image (a zero-byte or cut-off file left in a folder is not)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def pending_jobs(jobs: Sequence[SampleJob]) -> tuple[list[SampleJob], int]:
    """The jobs whose image is missing or unreadable, and how many of those were unreadable files (remade)."""
    pending, broken = [], 0
    for job in jobs:
        if not job.path.exists():
            pending.append(job)
        elif not image_is_complete(job.path):
            pending.append(job)
            broken += 1
    return pending, broken


def generate_jobs(
    pipe,
    jobs: Sequence[SampleJob],
    batch_size: int = 16,
    pipeline_kwargs: dict | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> int:
    """Make the images of ``jobs`` whose file is missing or unreadable, ``batch_size`` at a time, one generator per
    image seeded with ``job.seed``. Returns the number of images written. (Progress bars, here and in the other
    evaluation loops, show on terminals only.)"""
    from tqdm.auto import tqdm

    pending, broken = pending_jobs(jobs)
    if broken:
        tqdm.write(f"vgen sample: warning: {broken} image file(s) in the folder are empty or unreadable; making them "
                   "again", file=sys.stderr)
    kwargs = {k: v for k, v in (pipeline_kwargs or {}).items() if v is not None}
    with tqdm(total=len(pending), desc="sample", unit="img", disable=None if progress else True) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            generators = [torch.Generator(device=device).manual_seed(job.seed) for job in batch]
            if batch[0].prompt is not None:
                condition = {"prompt": [job.prompt for job in batch]}
            else:
                condition = {"class_labels": [job.class_label for job in batch]}
            with torch.no_grad():
                images = pipe(**condition, num_images_per_prompt=1, generator=generators, output_type="pil", **kwargs)
            images = images.images if hasattr(images, "images") else images[0]
            if len(images) != len(batch):
                raise RuntimeError(f"pipeline returned {len(images)} images for a batch of {len(batch)}")
            for job, image in zip(batch, images):
                _save_atomic(image.convert("RGB"), job.path)
            bar.update(len(batch))
    return len(pending)


def check_settings(out: Path, settings: dict, model_defaults: dict | None = None) -> None:
    """Refuse to resume into ``out`` if it was filled with different settings (the images would not form one set).

    A folder written before a setting was recorded was sampled with the model's saved value of it
    (``model_defaults``; e.g. the temperature, which earlier versions did not pass), or, for the CFG profile, which
    did not exist then, with VAR's ramp."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict):
            raise UserError(f"{path} is corrupt (not a JSON object), so the settings of the images in {out} are "
                            "unknown; delete it to resume with the current settings, or use a new --out folder")
        if "guidance_profile" in settings:  # folders from before profiles existed were sampled with VAR's ramp
            old.setdefault("guidance_profile", "ramp")
        for name, value in (model_defaults or {}).items():
            if name in settings:
                old.setdefault(name, value)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise UserError(f"{out} holds samples made with other settings ({', '.join(diff)} differ); "
                            "use a new --out folder or the same settings to resume")  # fmt: skip


def write_manifest(out: Path, jobs: Sequence[SampleJob]) -> Path:
    path = out / MANIFEST_FILE
    entries = (json.dumps(job.manifest_entry(out)) + "\n" for job in sorted(jobs, key=lambda j: j.index))
    write_text_atomic(path, "".join(entries))
    return path


def _rgb_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_npz(out: Path, jobs: Sequence[SampleJob], progress: bool = True) -> Path:
    """``out/samples.npz`` with ``arr_0``: uint8 [N, H, W, 3], images in index order. The array is streamed into the
    file image by image (the layout ``np.savez`` writes), so its size is bounded by the disk, not by memory."""
    from tqdm.auto import tqdm

    ordered = sorted(jobs, key=lambda j: j.index)
    first = _rgb_pixels(ordered[0].path)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(ordered), *first.shape)}
    path = out / NPZ_FILE
    tmp = temporary_path(path)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive, \
            archive.open("arr_0.npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for job in tqdm(ordered, desc="npz", unit="img", disable=None if progress else True):
            pixels = _rgb_pixels(job.path)
            if pixels.shape != first.shape:
                raise UserError(f"{job.path} is {pixels.shape[1]}x{pixels.shape[0]}, others are "
                                f"{first.shape[1]}x{first.shape[0]}; an .npz needs one resolution")  # fmt: skip
            fh.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    os.replace(tmp, path)
    return path


@dataclass
class SampleReport:
    """What a run did (on this rank): images written, skipped as already present, seconds spent generating."""

    total: int
    written: int
    skipped: int
    seconds: float
    rank: int = 0
    world_size: int = 1
    npz: str | None = None

    def table(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 and self.written else 0.0
        return "\n".join([
            f"{'images in set':<22}{self.total:>10d}",
            f"{'written (rank ' + str(self.rank) + ')':<22}{self.written:>10d}",
            f"{'skipped (existing)':<22}{self.skipped:>10d}",
            f"{'processes':<22}{self.world_size:>10d}",
            f"{'images/s (this rank)':<22}{rate:>10.2f}",
        ] + ([f"{'npz':<22}{self.npz}"] if self.npz else []))  # fmt: skip


def run_sampling(
    pipe,
    out: str | Path,
    jobs: Sequence[SampleJob],
    ctx: DistContext | None = None,
    batch_size: int = 16,
    pipeline_kwargs: dict | None = None,
    settings: dict | None = None,
    npz: bool = False,
    progress: bool = True,
) -> SampleReport:
    """Generate this rank's share of ``jobs`` into ``out``, then (rank 0, after a barrier) the manifest and npz.

    ``settings`` (JSON-able) is written to ``out/sample_config.json`` and checked on resume.
    """
    out = Path(out)
    ctx = ctx or setup_distributed()
    check_conditions(pipe, jobs)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            check_settings(out, settings, getattr(pipe, "sampling_defaults", dict)())
            write_text_atomic(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        removed = remove_leftovers(out, recursive=True)
        if removed:
            print(f"vgen sample: removed {len(removed)} temporary file(s) left by an interrupted run", file=sys.stderr)
    barrier(ctx)
    mine = list(jobs)[ctx.rank :: ctx.world_size]
    start = time.perf_counter()
    written = generate_jobs(pipe, mine, batch_size, pipeline_kwargs, ctx.device, progress and ctx.is_main)
    skipped = len(mine) - written
    seconds = time.perf_counter() - start
    barrier(ctx)
    report = SampleReport(len(jobs), written, skipped, seconds, ctx.rank, ctx.world_size)
    if ctx.is_main:
        missing = [job.path for job in jobs if not job.path.exists()]
        if missing:
            raise RuntimeError(f"{len(missing)} images are missing after sampling, e.g. {missing[0]}")
        write_manifest(out, jobs)
        if npz:
            report.npz = str(write_npz(out, jobs, progress))
    barrier(ctx)
    return report
