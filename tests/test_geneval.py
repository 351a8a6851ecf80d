"""GenEval's official rules on hand-built detections, the shipped metadata, folders and the CLI."""

import inspect
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import GENEVAL_DIR
from PIL import Image
from vgen.eval.geneval import (
    COLORS,
    OFFICIAL_CLASS_NAMES,
    OFFICIAL_METADATA_PATH,
    Detection,
    GenEvalConfig,
    ImageResult,
    check_metadata,
    evaluate_image,
    evaluate_images,
    group_detections,
    list_geneval_images,
    load_metadata,
    relative_position,
    sample_path,
    summarise,
    write_prompt_metadata,
)

from vgen.cli import main
from vgen.errors import UserError
from vgen.pipelines import DEFAULT_MODEL_DIR


def det(label, box=(0, 0, 10, 10), score=0.95, color=None):
    return Detection(box=tuple(float(v) for v in box), label=label, score=score, color=color)


def judge(detections, metadata, **kwargs):
    return check_metadata(group_detections(detections, metadata["tag"]), metadata, **kwargs)[0]


# ---------------------------------------------------------------------------------------------- position rule


@pytest.mark.parametrize(
    "box_a,box_b,expected",
    [
        ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),
        ((30, 0, 40, 10), (0, 0, 10, 10), {"right of"}),
        ((0, 0, 10, 10), (0, 30, 10, 40), {"above"}),  # image y points down
        ((0, 30, 10, 40), (0, 0, 10, 10), {"below"}),
        ((0, 0, 2, 2), (20, 20, 22, 22), {"left of", "above"}),  # diagonal: both components beyond 0.5
    ],
)
def test_relative_position_directions(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_relative_position_margin_rule_edges():
    # widths 10 + 10 -> margin 0.1 * 20 = 2 px. |dx| = 4: revised 2, 2 / 4 = 0.5 is not beyond 0.5.
    assert relative_position((0, 0, 10, 10), (4, 0, 14, 10)) == set()
    # |dx| = 4.5: revised 2.5 / 4.5 = 0.556 > 0.5.
    assert relative_position((0, 0, 10, 10), (4.5, 0, 14.5, 10)) == {"left of"}
    # |dx| = 1.5 < margin: revised 0 -> no relation at all, even though the centres differ.
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # dc = (-20, -15), heights 40 + 40 -> vertical margin 8 px: revised dy = -7 / 25 = -0.28, so not "above" ...
    assert relative_position((0, 0, 2, 40), (20, 15, 22, 55)) == {"left of"}
    # ... which it is without the margin (-15 / 25 = -0.6).
    assert relative_position((0, 0, 2, 40), (20, 15, 22, 55), position_threshold=0.0) == {"left of", "above"}
    # The 1e-3 rule: revised offset 0.0009 px (< 1e-3) -> no relation, although 0.0009 / 0.0014 = 0.64 > 0.5 ...
    assert relative_position((0, 0, 0.0025, 0.0025), (0.0014, 0, 0.0039, 0.0025)) == set()
    # ... while a revised offset of 0.0011 px (>= 1e-3) gives the relation.
    assert relative_position((0, 0, 0.0025, 0.0025), (0.0016, 0, 0.0041, 0.0025)) == {"left of"}
    # Identical boxes: zero offset, no relation (and no division by zero).
    assert relative_position((5, 5, 9, 9), (5, 5, 9, 9)) == set()
    # The threshold is a parameter of the official evaluator (position_threshold).
    assert relative_position((0, 0, 10, 10), (4, 0, 14, 10), position_threshold=0.0) == {"left of"}


# ------------------------------------------------------------------------------------------ detection filtering


def test_threshold_is_strict_and_counting_uses_point_nine():
    dets = [det("cat", score=0.3), det("cat", score=0.31), det("dog", score=0.89), det("dog", score=0.91)]
    grouped = group_detections(dets, "single_object")
    assert [d.score for d in grouped["cat"]] == [0.31]
    assert [d.score for d in grouped["dog"]] == [0.91, 0.89]
    counting = group_detections(dets, "counting")
    assert "cat" not in counting and [d.score for d in counting["dog"]] == [0.91]


def test_at_most_16_per_class_most_confident_first():
    scores = np.linspace(0.4, 0.99, 20)
    rng = np.random.default_rng(0)
    dets = [det("cup", score=float(s)) for s in rng.permutation(scores)]
    kept = group_detections(dets, "single_object")["cup"]
    assert len(kept) == 16
    assert [d.score for d in kept] == sorted(scores, reverse=True)[:16]
    assert len(group_detections(dets, "x", GenEvalConfig(max_objects=3))["cup"]) == 3


def test_nms_only_when_max_overlap_below_one():
    dets = [det("cup", (0, 0, 10, 10), 0.9), det("cup", (1, 0, 11, 10), 0.8), det("cup", (50, 50, 60, 60), 0.7)]
    assert len(group_detections(dets, "single_object")["cup"]) == 3
    kept = group_detections(dets, "single_object", GenEvalConfig(max_overlap=0.5))["cup"]
    assert [d.score for d in kept] == [0.9, 0.7]


# ------------------------------------------------------------------------------------------------- six tasks

SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "prompt": "p"}
COUNT3 = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}],
          "prompt": "a photo of three cups"}  # fmt: skip
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a pink car"}
POSITION = {"tag": "position", "include": [{"class": "bear", "count": 1},
            {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a dog right of a bear"}  # fmt: skip
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
              {"class": "cake", "count": 1, "color": "black"}], "prompt": "a green bus and a black cake"}  # fmt: skip


def test_single_and_two_object():
    assert judge([det("cat"), det("dog", score=0.4)], SINGLE)
    assert not judge([det("cat", score=0.25)], SINGLE)
    assert judge([det("cat"), det("dog", score=0.35)], TWO)
    assert not judge([det("cat"), det("cat")], TWO)


def test_counting_is_exact_at_point_nine():
    three = [det("cup", (20 * i, 0, 20 * i + 10, 10), 0.95) for i in range(3)]
    assert judge(three, COUNT3)
    assert not judge(three[:2], COUNT3)  # too few
    assert not judge([*three, det("cup", score=0.92)], COUNT3)  # a fourth confident cup: exclude clause fails
    assert judge([*three, det("cup", score=0.85)], COUNT3)  # a fourth below 0.9 does not count
    assert not judge([*three[:2], det("cup", score=0.85)], COUNT3)  # and cannot complete the three either


def test_colour_of_most_confident_objects_only():
    assert judge([det("car", color="pink")], COLOR)
    assert not judge([det("car", color="red")], COLOR)
    # Only the top-1 car is looked at: a pink car behind a more confident red one does not help.
    assert not judge([det("car", score=0.9, color="red"), det("car", score=0.8, color="pink")], COLOR)
    assert judge([det("car", score=0.8, color="red"), det("car", score=0.9, color="pink")], COLOR)
    assert judge([det("bus", color="green"), det("cake", color="black")], COLOR_ATTR)
    assert not judge([det("bus", color="black"), det("cake", color="green")], COLOR_ATTR)


def test_position_against_every_target():
    bear, dog_right, dog_left = (0, 0, 10, 10), (40, 0, 50, 10), (-40, 0, -30, 10)
    assert judge([det("bear", bear), det("dog", dog_right)], POSITION)
    assert not judge([det("bear", bear), det("dog", dog_left)], POSITION)
    assert not judge([det("dog", dog_right)], POSITION)
    # Only the top-1 bear is a target (count 1): a less confident bear far right does not matter ...
    assert judge([det("bear", bear, 0.9), det("bear", (90, 0, 100, 10), 0.5), det("dog", dog_right)], POSITION)
    # ... but when it is the most confident one, the dog is no longer right of the target.
    assert not judge([det("bear", bear, 0.5), det("bear", (90, 0, 100, 10), 0.9), det("dog", dog_right)], POSITION)


def test_position_skipped_when_target_clause_failed():
    meta = {"tag": "position", "include": [{"class": "bear", "count": 1, "color": "red"},
            {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "p"}  # fmt: skip
    grouped = group_detections([det("bear", color="blue"), det("dog", (40, 0, 50, 10))], "position")
    correct, reason = check_metadata(grouped, meta)
    assert not correct and "no target for dog" in reason


class CountingColorClassifier:
    """A colour classifier that answers from a lookup on the box's x0 and counts calls."""

    def __init__(self, colors_by_x0):
        self.colors_by_x0, self.calls = colors_by_x0, []

    def classify(self, image, detections, class_name):
        self.calls.append((class_name, len(detections)))
        return [self.colors_by_x0[d.box[0]] for d in detections]


def test_colour_classifier_applied_to_the_top_count_detections():
    clf = CountingColorClassifier({0.0: "pink", 20.0: "red"})
    dets = [det("car", (0, 0, 10, 10), 0.9), det("car", (20, 0, 30, 10), 0.8)]
    assert judge(dets, COLOR, color_classifier=clf)
    assert clf.calls == [("car", 1)]
    with pytest.raises(UserError, match="colour classifier"):
        judge(dets, COLOR)


def test_summary_is_mean_of_task_means():
    def res(tag, prompt, correct):
        return ImageResult("f", tag, prompt, correct, "", json.dumps({"prompt": prompt}))

    results = [res("counting", "a", True), res("counting", "a", False), res("counting", "b", False),
               res("counting", "b", False), res("colors", "c", True)]  # fmt: skip
    summary = summarise(results)
    assert summary["tasks"]["counting"] == {"correct": 1, "images": 4, "accuracy": 0.25}
    assert summary["tasks"]["colors"]["accuracy"] == 1.0
    assert summary["overall"] == pytest.approx(0.625)  # not the image mean 0.4
    assert summary["correct_images"] == pytest.approx(0.4)
    assert summary["correct_prompts"] == pytest.approx(2 / 3)
    assert (summary["images"], summary["prompts"]) == (5, 3)


# ---------------------------------------------------------------------------------------- official metadata


def test_shipped_official_metadata():
    entries = load_metadata("geneval")
    assert len(entries) == 553
    assert Counter(e["tag"] for e in entries) == {"single_object": 80, "two_object": 99, "counting": 80,
                                                  "colors": 94, "position": 100, "color_attr": 100}  # fmt: skip
    classes = {req["class"] for e in entries for req in e["include"]}
    assert classes <= set(OFFICIAL_CLASS_NAMES) and len(OFFICIAL_CLASS_NAMES) == 80
    colors = {req["color"] for e in entries for req in e["include"] if "color" in req}
    assert colors == set(COLORS)
    if GENEVAL_DIR.is_dir():
        assert OFFICIAL_METADATA_PATH.read_bytes() == (GENEVAL_DIR / "evaluation_metadata.jsonl").read_bytes()
        names = (GENEVAL_DIR / "object_names.txt").read_text().split("\n")
        assert tuple(n.strip() for n in names if n.strip()) == OFFICIAL_CLASS_NAMES


class OracleDetector:
    """Reads the prompt index from pixel (0, 0) and returns detections that satisfy that prompt exactly
    (``count_offset`` adds / removes objects, ``swap_relation`` mirrors positions)."""

    def __init__(self, entries, count_offset=0, swap_relation=False):
        self.entries, self.count_offset, self.swap_relation = entries, count_offset, swap_relation

    def detect(self, image):
        r, g, _ = image.getpixel((0, 0))
        entry = self.entries[r * 256 + g]
        dets, centres = [], []
        for k, req in enumerate(entry["include"]):
            cx, cy = 500.0, 500.0
            if "position" in req:
                rel, target = req["position"]
                dx, dy = {"left of": (-200, 0), "right of": (200, 0), "above": (0, -200), "below": (0, 200)}[rel]
                sign = -1 if self.swap_relation else 1
                cx, cy = centres[target][0] + sign * dx, centres[target][1] + sign * dy
            centres.append((cx, cy))
            n = req["count"] + (self.count_offset if entry["tag"] == "counting" else 0)
            for i in range(n):
                x = cx + 30 * i
                dets.append(Detection((x - 10, cy - 10, x + 10, cy + 10), req["class"], 0.95, color=req.get("color")))
        return dets


def write_index_images(root, entries):
    for p, entry in enumerate(entries):
        write_prompt_metadata(root, p, entry)
        Image.new("RGB", (4, 4), (p // 256, p % 256, 0)).save(sample_path(root, p, 0))


def test_official_prompts_end_to_end_with_an_oracle_detector(tmp_path):
    entries = load_metadata("geneval")
    write_index_images(tmp_path, entries)
    summary = summarise(evaluate_images(tmp_path, OracleDetector(entries), progress=False))
    assert summary["images"] == 553 and summary["overall"] == 1.0
    assert all(t["accuracy"] == 1.0 for t in summary["tasks"].values())
    extra = summarise(evaluate_images(tmp_path, OracleDetector(entries, count_offset=1), progress=False))
    assert extra["tasks"]["counting"]["accuracy"] == 0.0 and extra["tasks"]["position"]["accuracy"] == 1.0
    mirrored = summarise(evaluate_images(tmp_path, OracleDetector(entries, swap_relation=True), progress=False))
    assert mirrored["tasks"]["position"]["accuracy"] == 0.0 and mirrored["tasks"]["colors"]["accuracy"] == 1.0


def test_folder_listing_follows_the_official_layout(tmp_path):
    write_index_images(tmp_path, [SINGLE, TWO])
    Image.new("RGB", (4, 4)).save(tmp_path / "00000" / "samples" / "grid.png")  # not \d+.png: ignored
    (tmp_path / "notes").mkdir()  # not a digit folder: ignored
    Image.new("RGB", (4, 4)).save(sample_path(tmp_path, 1, 1))
    items = list_geneval_images(tmp_path)
    assert [(m["tag"], p.name) for m, p in items] == [("single_object", "0000.png"), ("two_object", "0000.png"),
                                                      ("two_object", "0001.png")]  # fmt: skip
    with pytest.raises(UserError, match="does not exist"):
        list_geneval_images(tmp_path / "missing")


def test_bad_metadata_says_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}]}) + "\n")
    with pytest.raises(UserError, match="teal"):
        load_metadata(bad)
    with pytest.raises(UserError, match="neither"):
        load_metadata(tmp_path / "missing.jsonl")


def test_what_used_to_be_scored_without_a_word_is_refused_or_reported(tmp_path):
    tagged = tmp_path / "tag.jsonl"
    tagged.write_text(json.dumps({"tag": "texture", "prompt": "x", "include": [{"class": "cat", "count": 1}]}) + "\n")
    with pytest.raises(UserError, match="unknown tag 'texture'; GenEval's tasks are single_object, two_object"):
        load_metadata(tagged)
    write_index_images(tmp_path / "f", [SINGLE, TWO, SINGLE])
    sample_path(tmp_path / "f", 1, 0).unlink()
    with pytest.warns(UserWarning, match="1 prompt folder\\(s\\) of .* have no images and are not scored: 00001"):
        assert len(list_geneval_images(tmp_path / "f")) == 2
    # a detector that names its classes refuses prompts about other classes (they would score 0)
    from vgen.eval.shapes_detector import ShapesDetector

    with pytest.raises(UserError, match="does not know: 'cat'; it finds circle, square"), pytest.warns(UserWarning):
        evaluate_images(tmp_path / "f", ShapesDetector(), progress=False)


def test_broken_prompt_folders_are_one_line_each(tmp_path):
    write_index_images(tmp_path, [SINGLE, TWO])
    meta = tmp_path / "00001" / "metadata.jsonl"
    meta.write_text("")
    with pytest.raises(UserError, match="metadata.jsonl is empty; it needs the prompt's GenEval line"):
        list_geneval_images(tmp_path)
    meta.write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="metadata.jsonl is not UTF-8 text"):
        list_geneval_images(tmp_path)
    write_prompt_metadata(tmp_path, 1, TWO)
    sample_path(tmp_path, 1, 0).write_bytes(b"\x89PNG\r\n\x1a\ncut off")
    with pytest.raises(UserError, match="cannot read the sample image .*0000.png .* delete it and make it again"):
        evaluate_images(tmp_path, OracleDetector([SINGLE, TWO]), progress=False)


def test_official_options_change_the_filter():
    dets = [det("cat", score=0.5)]
    assert judge(dets, SINGLE)
    grouped = group_detections(dets, "single_object", GenEvalConfig(threshold=0.6))
    assert not check_metadata(grouped, SINGLE)[0]
    with pytest.raises(UserError, match="position_threshold must be a finite number >= 0"):
        GenEvalConfig(position_threshold=float("nan"))


def test_evaluate_image_records_kept_boxes():
    class Fixed:
        def detect(self, image):
            return [det("cat", (1, 2, 3, 4), 0.5), det("dog", score=0.1)]

    result = evaluate_image(Image.new("RGB", (8, 8)), SINGLE, Fixed(), filename="x.png")
    assert result.correct and result.details == {"cat": [[1.0, 2.0, 3.0, 4.0]]} and result.filename == "x.png"


# ------------------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vgen", *args], capture_output=True, text=True, check=False)


def test_cli_scores_a_folder_with_a_plugin_detector(tmp_path):
    entries = load_metadata("geneval")[:12]
    write_index_images(tmp_path / "imgs", entries)
    # A user's plug-in module: the oracle above plus a factory, importable from PYTHONPATH.
    plugin_dir = tmp_path / "plug"
    plugin_dir.mkdir()
    (plugin_dir / "oracle_plugin.py").write_text(
        "from vgen.eval.geneval import Detection, load_metadata\n\n"
        + inspect.getsource(OracleDetector)
        + "\n\ndef make():\n    return OracleDetector(load_metadata('geneval'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "vgen", "eval", "geneval", "--images", str(tmp_path / "imgs"), "--metadata",
         "geneval", "--detector", "oracle_plugin:make", "--results", str(tmp_path / "r.jsonl")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(plugin_dir)}, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["overall"] == 1.0 and out["images"] == 12 and out["tasks"]["single_object"]["images"] == 12
    assert "overall" in result.stderr and len((tmp_path / "r.jsonl").read_text().splitlines()) == 12


def run_main(argv, capsys):
    """``vgen`` in-process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_folder_is_one_line_exit_2():
    result = run_cli("eval", "geneval", "--images", "/no/such/folder", "--detector", "shapes")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "geneval", "--real", "--metadata", "geneval"], "--detector"),
        (["eval", "geneval", "--images", "x", "--detector", "nomodule_xyz:make"], "cannot import"),
        (["eval", "geneval", "--real", "--out", "x", "--images-per-prompt", "0"], "integer >= 1, got 0"),
        (["eval", "geneval", "--real", "--out", "x", "--threshold", "1.5"], "threshold must be a number from 0 to 1"),
        (["eval", "geneval", "--real", "--out", "x", "--max-objects", "0"], "integer >= 1, got 0"),
        (["eval", "geneval"], "give --out DIR"),
        (["eval", "geneval", "--real", "--images", "x"], "not allowed with"),
    ],
)
def test_cli_bad_arguments_say_what_to_do(args, needle, capsys):
    code, out, err = run_main(args, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_cli_without_a_source_scores_the_shipped_default_model(tmp_path, capsys):
    code, out, err = run_main(["eval", "geneval", "--limit", "3", "--images-per-prompt", "1", "--out", str(tmp_path)],
                              capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["images"] == 3 and 0.0 <= summary["overall"] <= 1.0
    assert len(list_geneval_images(tmp_path)) == 3
    settings = json.loads((tmp_path / "sample_config.json").read_text())
    assert Path(settings["model"]) == DEFAULT_MODEL_DIR.resolve()


def test_cli_real_shapes_folder_scores_full_marks(tmp_path, capsys):
    code, out, err = run_main(["eval", "geneval", "--real", "--metadata", "shapes", "--limit", "12",
                               "--images-per-prompt", "2", "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["images"] == 24 and summary["overall"] == 1.0
    assert len(list_geneval_images(tmp_path)) == 24 and "overall" in err
    # a smaller run into the same folder scores only what it asked for
    code, out, err = run_main(["eval", "geneval", "--real", "--limit", "5", "--images-per-prompt", "1",
                               "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["images"] == 5
