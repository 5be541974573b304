"""eval.py, the caption CLI / ``Captioner`` and the summary table, on one tiny random model.

The model is random, so its predictions are junk; the tests check the files, their formats,
which samples were evaluated, that the metrics agree with the predictions, and that every
entry point gives the same text for the same image. One test replaces the decoded text by known
answers to check metric values exactly.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict

import pytest
import torch
from PIL import Image

import eval as eval_script
from vlmoe import VLMoEConfig, VLMoEForConditionalGeneration, VLMoEProcessor, build_model, train_tokenizer
from vlmoe.caption import Captioner
from vlmoe.caption import main as caption_main
from vlmoe.data import SKIP_REASONS, DataSource, build_dataset, open_image
from vlmoe.evaluation import compute_caption_metrics, compute_vqa_metrics
from vlmoe.evaluation import runner
from vlmoe.evaluation.runner import EvalOptions, evaluate
from vlmoe.evaluation.score import main as score_main
from vlmoe.evaluation.summary import main as summary_main
from vlmoe.tasks import GenerationCollate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("vqa", "caption")
ID = {"vqa": "question_id", "caption": "image_id"}
TEXT = {"vqa": "answer", "caption": "caption"}
NUM = {"vqa": "num_questions", "caption": "num_images"}
METRIC_KEYS = {
    "vqa": {"vqa_accuracy", "exact_match", "num_questions", "vqa_accuracy_by_type", "vqa_accuracy_by_answer_type",
            "images_per_s", "num_skipped"},
    "caption": {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "exact_match", "num_images",
                "images_per_s", "num_skipped"},
}
NO_SKIPS = dict.fromkeys(SKIP_REASONS, 0)
FRACTIONS = {"vqa": ("vqa_accuracy", "exact_match"),
             "caption": ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "exact_match")}
FILES = ("metrics.json", "predictions.json", "samples.jsonl", "routing.json", "routing_load.png", "routing_patches.png")
MAX_NEW = 6  # new tokens everywhere, so eval.py, the CLI and Captioner generate the same text
LIMIT, LIMIT_BATCH = 6, 4  # two batches (8 samples) read, the first 6 kept
FULL_BATCH = 8
QUESTION = "what color is the shape?"

# The tiny model of tests/test_model.py (tiny_config), at the shapes' 32 px.
VISION = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
              crop_pct=1.0, mlp_ratio=2.0, moe_every=1)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=128)
TEXTS = ["a large red circle left of a small blue square", "Question: what color is it? Answer: red", "yes no 1 2 3"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random model saved with save_pretrained (4 experts, MoE in every ViT and decoder layer)."""
    config = VLMoEConfig(vision=dict(VISION), decoder={"text_config": dict(DECODER), "moe_every": 1},
                         moe={"num_experts": 4, "top_k": 2, "modality_mode": "per_modality"})
    torch.manual_seed(0)
    model, processor = build_model(config, train_tokenizer(TEXTS * 10, vocab_size=300))
    directory = str(tmp_path_factory.mktemp("checkpoint"))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def pattern(shapes: str, task: str) -> str:
    return f"{shapes}/{task}/test-*.tar"


@pytest.fixture(scope="module")
def test_samples(shapes) -> dict[str, list]:
    """Every sample of each test split, in shard order, read by the data pipeline on its own."""
    out = {}
    for task in TASKS:
        dataset = build_dataset(DataSource(pattern(shapes, task), task), train=False, batch_size=1000)
        out[task] = [s for batch in dataset for s in (batch.data or [])]
    return out


def run_eval(checkpoint: str, shapes: str, task: str, output: str, *extra: str) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = eval_script.main(["--checkpoint", checkpoint, "--data", pattern(shapes, task), "--task", task,
                                    "--max-new-tokens", str(MAX_NEW), "--output", output, *extra])
    return metrics, stdout.getvalue()


@pytest.fixture(scope="module")
def limited_runs(checkpoint, shapes, tmp_path_factory) -> dict[str, tuple[str, dict, str]]:
    """eval.py --limit 6 --batch-size 4 per task: (output folder, returned metrics, stdout)."""
    runs = {}
    for task in TASKS:
        output = str(tmp_path_factory.mktemp(f"limited_{task}"))
        metrics, stdout = run_eval(checkpoint, shapes, task, output, "--limit", str(LIMIT),
                                   "--batch-size", str(LIMIT_BATCH), "--num-workers", "0")
        runs[task] = (output, metrics, stdout)
    return runs


@pytest.fixture(scope="module")
def full_runs(checkpoint, shapes, tmp_path_factory) -> dict[str, str]:
    """eval.py without --limit (batch size 8, one DataLoader worker): the output folder per task."""
    runs = {}
    for task in TASKS:
        output = str(tmp_path_factory.mktemp(f"full_{task}"))
        run_eval(checkpoint, shapes, task, output, "--batch-size", str(FULL_BATCH), "--num-workers", "1")
        runs[task] = output
    return runs


@pytest.fixture(scope="module")
def image_folder(shapes, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(good, mixed): the 8 exported test PNGs; the same plus a corrupt bad.png and a notes.txt."""
    pngs = sorted((pathlib.Path(shapes) / "images").glob("test-*.png"))
    assert len(pngs) == 8
    good, mixed = tmp_path_factory.mktemp("good_images"), tmp_path_factory.mktemp("mixed_images")
    for folder in (good, mixed):
        for png in pngs:
            (folder / png.name).write_bytes(png.read_bytes())
    (mixed / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    (mixed / "notes.txt").write_text("not an image, and no image extension: must be ignored")
    return good, mixed


def read_json(path) -> object:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def sample_id(task: str, sample):
    return sample.question_id if task == "vqa" else sample.image_id


def check_routing(output: str, num_samples: int, num_experts: int = 4, positions_per_image: int = 1 + 16,
                  image_tokens: int = 16) -> None:
    """routing.json: every MoE layer, load fractions per modality over all experts summing to 1, and
    the position counts of ``num_samples`` images (17 ViT tokens, 16 image tokens in the decoder)."""
    routing = read_json(os.path.join(output, "routing.json"))
    assert list(routing) == ["vision.0", "vision.1", "decoder.0", "decoder.1"]
    for name, modalities in routing.items():
        assert set(modalities) == ({"image"} if name.startswith("vision") else {"image", "text"}), name
        for modality, entry in modalities.items():
            assert set(entry) == {"positions", "load", "load_cv", "entropy"}
            assert len(entry["load"]) == num_experts and all(0.0 <= x <= 1.0 for x in entry["load"])
            assert sum(entry["load"]) == pytest.approx(1.0, abs=1e-5), (name, modality)
            assert entry["load_cv"] >= 0.0 and 0.0 <= entry["entropy"] <= math.log(num_experts) + 1e-6
        assert modalities["image"]["positions"] == num_samples * (positions_per_image if name.startswith("vision")
                                                                  else image_tokens), name


def check_run(task: str, output: str, evaluated: list) -> dict:
    """The evaluation files of ``output`` against the samples that should have been evaluated."""
    for name in FILES:
        assert os.path.isfile(os.path.join(output, name)), name
    for name in ("routing_load.png", "routing_patches.png"):
        with Image.open(os.path.join(output, name)) as picture:
            assert picture.format == "PNG" and min(picture.size) > 50
            picture.verify()

    metrics = read_json(os.path.join(output, "metrics.json"))
    assert set(metrics) == METRIC_KEYS[task]
    assert metrics[NUM[task]] == len(evaluated)
    assert metrics["num_skipped"] == NO_SKIPS
    for key in FRACTIONS[task]:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["images_per_s"] > 0
    if task == "caption":
        assert metrics["cider_d"] >= 0.0
    else:
        types = {s.question_type for s in evaluated}
        assert set(metrics["vqa_accuracy_by_type"]) == types
        assert all(0.0 <= v <= 1.0 for v in metrics["vqa_accuracy_by_type"].values())

    expected = {sample_id(task, s): s for s in evaluated}
    assert len(expected) == len(evaluated)  # the premise: ids are unique in the split
    predictions = read_json(os.path.join(output, "predictions.json"))
    assert isinstance(predictions, list)
    assert all(set(p) == {ID[task], TEXT[task]} and isinstance(p[TEXT[task]], str) for p in predictions)
    ids = [p[ID[task]] for p in predictions]
    assert len(ids) == len(set(ids)), "duplicate predictions"
    assert set(ids) == set(expected)

    samples = read_jsonl(os.path.join(output, "samples.jsonl"))
    assert len(samples) == len(evaluated)
    by_id = {r[ID[task]]: r for r in samples}
    assert set(by_id) == set(expected)
    for prediction in predictions:  # samples.jsonl and predictions.json tell the same story
        record, sample = by_id[prediction[ID[task]]], expected[prediction[ID[task]]]
        assert record["prediction"] == prediction[TEXT[task]]
        assert record["key"] == sample.key and record["image_id"] == sample.image_id
        if task == "vqa":
            assert (record["question"], record["answers"], record["question_type"]) == (
                sample.question, sample.answers, sample.question_type)
        else:
            assert record["references"] == sample.captions

    preds = [r["prediction"] for r in samples]
    if task == "vqa":
        again = compute_vqa_metrics(preds, [r["answers"] for r in samples], [r["question_type"] for r in samples],
                                    [r["answer_type"] for r in samples])
    else:
        again = compute_caption_metrics(preds, [r["references"] for r in samples])
    assert again == {k: v for k, v in metrics.items() if k not in ("images_per_s", "num_skipped")}
    return metrics


# ------------------------------------------------------------------------------------------ eval.py


@pytest.mark.parametrize("task", TASKS)
def test_eval_limit_writes_documented_files_for_the_first_samples(task, limited_runs, test_samples):
    output, returned, stdout = limited_runs[task]
    metrics = check_run(task, output, test_samples[task][:LIMIT])
    assert returned == metrics
    assert [json.loads(line) for line in stdout.splitlines() if line.startswith("{")] == [metrics]
    # one process: predictions come in shard order
    ids = [p[ID[task]] for p in read_json(os.path.join(output, "predictions.json"))]
    assert ids == [sample_id(task, s) for s in test_samples[task][:LIMIT]]


@pytest.mark.parametrize("task", TASKS)
def test_eval_limit_routing_covers_only_the_evaluated_samples(task, limited_runs):
    routing = read_json(os.path.join(limited_runs[task][0], "routing.json"))
    assert [routing[name]["image"]["positions"] for name in routing] == [LIMIT * 17] * 2 + [LIMIT * 16] * 2


@pytest.mark.parametrize("task", TASKS)
def test_eval_without_limit_covers_every_test_sample_once(task, full_runs, test_samples):
    assert len(test_samples[task]) == {"vqa": 72, "caption": 24}[task]
    check_run(task, full_runs[task], test_samples[task])
    check_routing(full_runs[task], len(test_samples[task]))


@pytest.mark.parametrize("task", TASKS)
def test_eval_scores_known_predictions_exactly(task, checkpoint, shapes, test_samples, tmp_path, monkeypatch):
    """The decoded text is replaced by the reference for even ids and by a wrong text for odd ids."""

    def oracle(sample) -> str:
        right = sample_id(task, sample) % 2 == 0
        if task == "vqa":
            return sample.answers[0] if right else "no idea"
        return sample.captions[0] if right else "nothing to see here"

    processor = VLMoEProcessor.from_pretrained(checkpoint)
    pending = []

    class RecordingCollate(GenerationCollate):  # runs in this process (num_workers=0), batch by batch
        def __call__(self, samples):
            pending.extend(samples)
            return super().__call__(samples)

    def decode(generated, prompt_length):
        batch = [pending.pop(0) for _ in range(generated.shape[0])]
        return [oracle(s) for s in batch]

    monkeypatch.setattr(runner, "GenerationCollate", RecordingCollate)
    monkeypatch.setattr(processor, "decode", decode)
    model = VLMoEForConditionalGeneration.from_pretrained(checkpoint)
    options = EvalOptions(batch_size=FULL_BATCH, max_new_tokens=2, num_workers=0)
    metrics = evaluate(model, processor, pattern(shapes, task), task, str(tmp_path), options)

    samples = test_samples[task]
    right = [sample_id(task, s) % 2 == 0 for s in samples]
    assert 0 < sum(right) < len(right)
    assert metrics["exact_match"] == pytest.approx(sum(right) / len(right), abs=1e-6)
    assert metrics[NUM[task]] == len(samples)
    if task == "vqa":  # 10 equal reference answers: accuracy 1 or 0 per question
        assert metrics["vqa_accuracy"] == pytest.approx(sum(right) / len(right), abs=1e-6)
        per_type, per_answer_type = defaultdict(list), defaultdict(list)
        for sample, ok in zip(samples, right):
            per_type[sample.question_type].append(ok)
            per_answer_type[sample.meta["answer_type"]].append(ok)
        assert metrics["vqa_accuracy_by_type"] == pytest.approx({t: sum(v) / len(v) for t, v in per_type.items()},
                                                                abs=1e-6)
        assert metrics["vqa_accuracy_by_answer_type"] == pytest.approx(
            {t: sum(v) / len(v) for t, v in per_answer_type.items()}, abs=1e-6)
    else:
        assert 0 < metrics["bleu_4"] < 1 and 0 < metrics["rouge_l"] < 1 and metrics["cider_d"] > 0
    predictions = {p[ID[task]]: p[TEXT[task]] for p in read_json(tmp_path / "predictions.json")}
    assert predictions == {sample_id(task, s): oracle(s) for s in samples}
    assert not pending
    # predictions.json scores as a results file against the set's reference files, to eval.py's figures, and
    # carries the dataset's ids with their type (pycocotools' loadRes rejects ids the annotations lack)
    refs = os.path.join(shapes, "refs")
    files = ([f"{refs}/caption_test.json"] if task == "caption" else
             ["--questions", f"{refs}/vqa_test_questions.json", f"{refs}/vqa_test_annotations.json"])
    scored = score_main([task, "--predictions", str(tmp_path / "predictions.json"), "--annotations", files[-1],
                         *files[:-1]])
    assert scored == {k: v for k, v in metrics.items() if k not in ("num_skipped", "images_per_s")}
    if task == "caption" and importlib.util.find_spec("pycocotools") is not None:
        from pycocotools.coco import COCO

        COCO(files[0]).loadRes(str(tmp_path / "predictions.json"))


def test_eval_rejects_missing_checkpoint_and_data(checkpoint, shapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--checkpoint", str(tmp_path / "nope"), "--data", pattern(shapes, "vqa"), "--task", "vqa"])
    assert exit_info.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no-such-shards"):
        eval_script.main(["--checkpoint", checkpoint, "--data", str(tmp_path / "no-such-shards-*.tar"), "--task", "vqa",
                          "--output", str(tmp_path / "out")])


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def eval_folder(checkpoint: str, data: str, output: str, *extra: str) -> tuple[dict | None, str | None]:
    """eval.py on a folder of caption shards: (returned metrics or None, the error it exited with or None)."""
    args = ["--checkpoint", checkpoint, "--data", data, "--task", "caption", "--max-new-tokens", "2",
            "--num-workers", "0", "--output", output, *extra]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return eval_script.main(args), None
    except SystemExit as exit_info:
        return None, str(exit_info.code)


def test_eval_counts_skipped_samples_and_fails_unless_allowed(checkpoint, shapes, tmp_path):
    """A shard with an undecodable image and a caption without image, read before the good test shard."""
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "0-bad.tar", {"bad1.png": b"not a png", "bad1.txt": b"a red circle", "bad2.txt": b"a square"})
    for shard in sorted(pathlib.Path(shapes, "caption").glob("test-*.tar")):
        shutil.copy(shard, data)
    expected = {**NO_SKIPS, "bad_image": 1, "missing_image": 1}

    returned, error = eval_folder(checkpoint, str(data), str(tmp_path / "strict"), "--batch-size", "8")
    assert returned is None and "2 sample(s) skipped" in error and "--allow-skips" in error
    metrics = read_json(tmp_path / "strict" / "metrics.json")  # the files are written all the same
    assert metrics["num_skipped"] == expected and metrics["num_images"] == 24

    returned, error = eval_folder(checkpoint, str(data), str(tmp_path / "allowed"), "--allow-skips",
                                  "--limit", "4", "--batch-size", "4")
    assert error is None and returned["num_skipped"] == expected and returned["num_images"] == 4
    assert read_json(tmp_path / "allowed" / "metrics.json") == returned


@pytest.mark.parametrize("members", [{}, {"bad1.png": b"not a png", "bad1.txt": b"a red circle"}], ids=["empty", "all-bad"])
def test_eval_that_evaluates_nothing_fails(checkpoint, tmp_path, members):
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "only.tar", members)
    returned, error = eval_folder(checkpoint, str(tmp_path / "data"), str(tmp_path / "out"), "--allow-skips")
    assert returned is None and "no sample was evaluated" in error and str(tmp_path / "data") in error
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert metrics["num_images"] == 0 and metrics["num_skipped"] == {**NO_SKIPS, "bad_image": len(members) // 2}


def predictions_set(folder: str) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in read_json(os.path.join(folder, "predictions.json")))


@pytest.mark.slow
def test_two_processes_match_one_process(checkpoint, shapes, full_runs, tmp_path):
    """torch.distributed.run, 2 CPU processes (gloo), both tasks in one launch: 3 VQA shards are dealt
    to the ranks, the 1 caption shard is split by sample."""
    runs = [["--checkpoint", checkpoint, "--data", pattern(shapes, task), "--task", task, "--batch-size",
             str(FULL_BATCH), "--max-new-tokens", str(MAX_NEW), "--output", str(tmp_path / task)] for task in TASKS]
    script = tmp_path / "eval_tasks.py"
    script.write_text("import json, sys\nimport eval\nfor args in json.loads(sys.argv[1]):\n    eval.main(args)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               json.dumps(runs)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 2, done.stdout  # only the main process prints: the two processes were one group
    for task, shown in zip(TASKS, printed):
        one, two = full_runs[task], str(tmp_path / task)
        metrics_one, metrics_two = (read_json(os.path.join(d, "metrics.json")) for d in (one, two))
        for metrics in (metrics_one, metrics_two, shown):
            assert metrics.pop("images_per_s") > 0
        assert metrics_two == metrics_one == shown
        assert predictions_set(two) == predictions_set(one)
        assert len(read_jsonl(os.path.join(two, "samples.jsonl"))) == metrics_one[NUM[task]]
        routing_one, routing_two = (read_json(os.path.join(d, "routing.json")) for d in (one, two))
        assert routing_two.keys() == routing_one.keys()
        for name in routing_one:
            for modality, entry in routing_one[name].items():
                assert routing_two[name][modality]["positions"] == entry["positions"]
                assert routing_two[name][modality]["load"] == pytest.approx(entry["load"], abs=1e-5)


# ------------------------------------------------------------------------------------------ caption CLI


def cli_lines(out: str) -> list[tuple[str, str]]:
    lines = out.splitlines()
    assert all(line.count("\t") >= 1 for line in lines), out
    return [tuple(line.split("\t", 1)) for line in lines]


def test_caption_cli_skips_and_reports_a_corrupt_file(checkpoint, image_folder, capsys):
    mixed = image_folder[1]
    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", str(MAX_NEW), str(mixed)]) == 1
    out, err = capsys.readouterr()
    lines = cli_lines(out)
    assert [path for path, _ in lines] == [str(mixed / f"test-{i:06d}.png") for i in range(8)]
    assert all(isinstance(text, str) for _, text in lines)
    assert f"error: {mixed / 'bad.png'}: not an image file (PIL cannot identify it)\n" in err
    assert "1 image(s) could not be read" in err
    assert "notes.txt" not in out + err
    assert "image/s" not in err  # one batch: no progress bar

    # --json with a question: one object per file, in path order; the bad one says why; a bar over 3 batches
    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", str(MAX_NEW), "--json", "--batch-size", "4",
                         "--question", QUESTION, str(mixed)]) == 1
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0] == {"path": str(mixed / "bad.png"), "question": QUESTION,
                          "error": "not an image file (PIL cannot identify it)"}
    assert [set(r) for r in records[1:]] == [{"path", "question", "text"}] * 8
    assert [r["path"] for r in records[1:]] == [path for path, _ in lines]
    assert all(r["question"] == QUESTION and isinstance(r["text"], str) for r in records[1:])
    assert "9/9" in err and "image/s" in err  # the progress bar, on stderr


def test_caption_cli_names_why_a_file_cannot_be_read(tmp_path):
    from vlmoe.caption import _load

    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    reasons = {os.path.basename(p): reason for p, _, reason in _load(
        [str(tmp_path / n) for n in ("text.png", "folder.png", "missing.png")])}
    assert reasons == {"text.png": "not an image file (PIL cannot identify it)",
                       "folder.png": "a folder, not a file", "missing.png": "no such file"}


def test_caption_cli_all_good_images_exit_zero_and_match_eval(checkpoint, image_folder, full_runs, test_samples,
                                                             capsys):
    good, mixed = image_folder
    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", str(MAX_NEW), str(mixed)]) == 1
    with_bad = cli_lines(capsys.readouterr().out)
    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", str(MAX_NEW), "--json", str(good)]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(good / f"test-{i:06d}.png") for i in range(8)]
    assert all(r["question"] is None for r in records)
    assert "error" not in err
    # Same 8 images in one batch (the corrupt file is dropped before batching): same captions.
    assert [r["text"] for r in records] == [text for _, text in with_bad]

    # The exported PNGs are the first 8 test images, which eval.py captioned in its first batch of 8.
    for i, sample in enumerate(test_samples["caption"][:8]):
        assert open_image(good / f"test-{i:06d}.png").tobytes() == sample.image.tobytes()
    predictions = read_json(os.path.join(full_runs["caption"], "predictions.json"))
    predictions = {p["image_id"]: p["caption"] for p in predictions}
    assert [r["text"] for r in records] == [predictions[s.image_id] for s in test_samples["caption"][:8]]


def test_caption_cli_skips_an_image_over_the_pixel_limit(checkpoint, image_folder, tmp_path, capsys):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A valid PNG header declaring 20000 x 20000 pixels: PIL refuses it before decoding.
    huge = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    (tmp_path / "huge.png").write_bytes(huge)
    good_png = image_folder[0] / "test-000000.png"
    huge_png = tmp_path / "huge.png"
    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", "2", str(good_png), str(huge_png)]) == 1
    out, err = capsys.readouterr()
    assert [path for path, _ in cli_lines(out)] == [str(good_png)]
    assert "huge.png" in err


def test_captioner_takes_images_and_paths_and_matches_the_cli(checkpoint, image_folder, capsys):
    good, _ = image_folder
    paths = [good / f"test-{i:06d}.png" for i in range(8)]
    captioner = Captioner.from_pretrained(checkpoint, device="cpu")
    mixed_inputs = [open_image(p) if i % 3 == 0 else (str(p) if i % 3 == 1 else p) for i, p in enumerate(paths)]
    assert any(isinstance(x, Image.Image) for x in mixed_inputs) and any(isinstance(x, str) for x in mixed_inputs)
    texts = captioner(mixed_inputs, max_new_tokens=MAX_NEW)
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert texts == captioner([str(p) for p in paths], max_new_tokens=MAX_NEW)

    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", str(MAX_NEW), *map(str, paths)]) == 0
    assert [text for _, text in cli_lines(capsys.readouterr().out)] == texts

    answers = captioner(mixed_inputs, question=QUESTION, max_new_tokens=MAX_NEW)
    assert caption_main(["--checkpoint", checkpoint, "--max-new-tokens", str(MAX_NEW), "--json",
                         "--question", QUESTION, *map(str, paths)]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == answers


# ------------------------------------------------------------------------------------------ summary


def test_summary_prints_the_metric_values(full_runs, tmp_path, capsys):
    assert summary_main([full_runs["vqa"], full_runs["caption"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "metric" and lines[0].split()[-1] == "target"
    vqa, caption = (read_json(os.path.join(full_runs[t], "metrics.json")) for t in TASKS)
    expected = [("VQA exact match", vqa["exact_match"]),
                *((f"  {t}", vqa["vqa_accuracy_by_type"][t]) for t in sorted(vqa["vqa_accuracy_by_type"])),
                ("VQA accuracy", vqa["vqa_accuracy"]),
                ("caption exact match", caption["exact_match"]), ("caption CIDEr-D", caption["cider_d"]),
                ("caption BLEU-4", caption["bleu_4"]), ("VQA questions/s", vqa["images_per_s"]),
                ("caption images/s", caption["images_per_s"])]
    assert len(lines) == 1 + len(expected)
    for line, (label, value) in zip(lines[1:], expected):
        assert line[:24].rstrip() == label.rstrip()
        assert line[24:].split()[0] == (f"{value:.4f}" if value < 10 else f"{value:.1f}"), line

    # Two models side by side, targets marked ok / below, the probe's rows, and the markdown form.
    for name, vqa_em, caption_em in (("moe", 0.95, 0.5), ("dense", 0.5, 0.85)):
        run = tmp_path / name / "final"
        for task, metrics in (("vqa", {"vqa_accuracy": vqa_em, "exact_match": vqa_em, "num_questions": 3}),
                              ("caption", {"exact_match": caption_em, "cider_d": 1.25, "bleu_4": 0.125})):
            (run / f"eval_{task}").mkdir(parents=True)
            (run / f"eval_{task}" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "moe" / "final" / "probe.json").write_text(json.dumps({"projector": {"shape": 0.75}, "vit": {"shape": 0.5}, "chance": {"shape": 0.33}}))
    runs = [str(tmp_path / "moe" / "final"), str(tmp_path / "dense" / "final")]
    assert summary_main(runs) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "moe", "dense", "target"]
    rows = {line[:24].strip(): line[24:].split() for line in lines[1:]}
    assert rows == {
        "VQA exact match": ["0.9500", "ok", "0.5000", "below", ">=", "0.90"], "VQA accuracy": ["0.9500", "0.5000"],
        "caption exact match": ["0.5000", "below", "0.8500", "ok", ">=", "0.80"],
        "caption CIDEr-D": ["1.2500", "1.2500"], "caption BLEU-4": ["0.1250", "0.1250"],
        "probe shape": ["0.7500", "-"], "chance shape": ["0.3300", "-"],
    }
    assert summary_main(["--markdown", *runs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| metric | moe | dense | target |"
    assert "| VQA exact match | 0.9500 ok | 0.5000 below | >= 0.90 |" in lines


def test_eval_progress_total_is_the_sample_count_where_known(shapes, test_samples, tmp_path):
    from accelerate import Accelerator

    from vlmoe.evaluation.runner import EvalOptions, _expected_samples

    acc = Accelerator(cpu=True)
    for task in TASKS:
        assert _expected_samples(pattern(shapes, task), EvalOptions(), acc) == len(test_samples[task])
    assert _expected_samples(pattern(shapes, "caption"), EvalOptions(limit=10, batch_size=4), acc) == 10
    unrecorded = tmp_path / "copy-000000.tar"  # a shard that no index.json or _stats.json describes
    unrecorded.write_bytes(open(sorted(glob.glob(pattern(shapes, "caption")))[0], "rb").read())
    assert _expected_samples(str(unrecorded), EvalOptions(), acc) is None
