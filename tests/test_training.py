"""train.py: smoke run, resume after kill -9, 2 processes, bad configs, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from omegaconf import OmegaConf

import train
from vlmoe import build_model, train_tokenizer
from vlmoe.training import load_config
from vlmoe.training.config import SourceConfig
from vlmoe.training.checkpoint import TRAINER_STATE, complete_checkpoints, latest_checkpoint, save_checkpoint
from vlmoe.training.optim import build_optimizer, build_scheduler
from vlmoe.training.trainer import start_checkpoint, val_tags

from test_moe import fake_trial_times

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = [
    "model.vision.img_size=32", "model.vision.embed_dim=32", "model.vision.depth=2", "model.vision.num_heads=2",
    "model.decoder.text_config.hidden_size=32", "model.decoder.text_config.intermediate_size=64",
    "model.decoder.text_config.num_hidden_layers=2", "model.decoder.text_config.num_attention_heads=2",
    "model.decoder.text_config.num_key_value_heads=2", "model.moe.num_experts=4", "model.tokenizer.vocab_size=300",
    "model.tokenizer.train_samples=200", "data.num_workers=0", "data.shuffle_buffer=20", "data.batch_size=4",
    "data.eval_batch_size=8", "train.log_every=1", "train.stats_every=2", "optim.warmup_steps=2",
]


def overrides(shapes: str, run_dir: str, name: str, *extra: str) -> list[str]:
    data = [
        f"data.train=[{{pattern: '{shapes}/caption/train-*.tar', task: caption}}, "
        f"{{pattern: '{shapes}/vqa/train-*.tar', task: vqa, weight: 2.0}}]",
        f"data.val=[{{pattern: '{shapes}/vqa/val-*.tar', task: vqa}}]",
    ]
    return TINY_MODEL + data + [f"train.output_dir={run_dir}", f"train.name={name}", *extra]


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def logged_lrs(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["lr"] for r in map(json.loads, f) if "lr" in r]


def schedule(config) -> list[float]:
    """The learning rate after each step, from the schedule alone (one parameter group)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.optim.lr)
    scheduler = build_scheduler(optimizer, config.optim, config.train.steps)
    lrs = []
    for _ in range(config.train.steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def run_script(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    command = (launcher or [sys.executable]) + [os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_two_step_smoke_run(shapes, tmp_path):
    history = train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"),
                          *overrides(shapes, str(tmp_path), "smoke", "train.steps=2", "train.eval_every=2",
                                     "train.eval_samples=8")])
    run = tmp_path / "smoke"
    assert (run / "config.yaml").is_file() and (run / "final" / "model.safetensors").is_file()
    assert (run / "final" / "tokenizer.json").is_file()
    assert set(losses(str(run))) == {1, 2}
    assert 0.0 <= history["val/vqa_exact_match"] <= 1.0 and history["val/vqa_loss"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("moe/vision0/image/load_e") for k in records[1])  # routing stats at step 2
    assert any(k.startswith("moe/decoder1/text/entropy") for k in records[1])
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(run) for name in files)


def test_kill_and_resume_matches_uninterrupted_run(shapes, tmp_path):
    steps = ["train.steps=10", "train.checkpoint_every=3", "train.keep_checkpoints=2"]
    reference = run_script(overrides(shapes, str(tmp_path), "reference", *steps))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    killed = run_script(overrides(shapes, str(tmp_path), "killed", *steps))
    run_dir = str(tmp_path / "killed")
    deadline = time.time() + 300
    while time.time() < deadline and not (latest_checkpoint(run_dir) and max(losses(run_dir), default=0) >= 7):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert latest_checkpoint(run_dir) is not None and max(losses(run_dir)) < 10
    resumed = run_script(overrides(shapes, str(tmp_path), "killed", *steps) + ["--resume", "auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert losses(run_dir) == losses(str(tmp_path / "reference"))  # every step, bit for bit
    assert len(complete_checkpoints(run_dir)) == 2


def train_in_process(shapes: str, run_dir: str, name: str, *extra: str) -> dict:
    return train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *overrides(shapes, run_dir, name, *extra)])


def drop_checkpoints_after(run_dir: str, step: int) -> None:
    """What a kill after ``step``'s checkpoint leaves: the later checkpoints and final/ never written."""
    for path in complete_checkpoints(run_dir):
        if int(os.path.basename(path).split("_")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(os.path.join(run_dir, "final"))


@pytest.mark.parametrize("extra", [[], ["data.num_workers=2"], ["train.grad_accum=2"]],
                         ids=["jitter", "jitter-2-workers", "jitter-grad-accum-2"])
def test_resume_is_exact_when_randomness_runs(shapes, tmp_path, extra):
    """Router jitter draws from the global torch RNG, which the checkpoint restores; nothing else
    (the DataLoader starting its iterator) may draw from it, or every step after a resume differs."""
    steps = ["train.steps=6", "train.checkpoint_every=3", "model.moe.jitter_noise=0.1", *extra]
    run_dir, expected = interrupted_run(shapes, tmp_path, *steps)
    train_in_process(shapes, str(tmp_path), "run", *steps, "--resume", "auto")
    assert losses(run_dir) == expected  # every step, bit for bit


def test_resume_keeps_the_autotuned_expert_forms(shapes, tmp_path, monkeypatch):
    """The two matmul forms of an expert block, and the two CPU kernels, round differently; a resumed
    process that measured anew could pick the others. The checkpoint keeps each process's choices."""
    from vlmoe.moe import experts

    def prefer(form: str, kernel: str) -> None:  # in a process that has chosen nothing yet
        monkeypatch.setattr(experts, "_time_form", lambda choice, *args: float(choice != form))
        fake_trial_times(monkeypatch, lambda key, choice: float(choice != kernel))

    prefer("weight_first", "walk")
    small = ["data.batch_size=1"]  # blocks of a few rows, where the two forms round differently
    run_dir, expected = interrupted_run(shapes, tmp_path, *small)
    assert set(experts.chosen_forms().values()) == {"weight_first", "walk"}
    prefer("rows_first", "grouped_mm")  # a new process, where the others measure faster
    train_in_process(shapes, str(tmp_path), "run", "train.steps=6", "train.checkpoint_every=3", *small, "--resume", "auto")
    assert losses(run_dir) == expected  # every step, bit for bit


def interrupted_run(shapes: str, tmp_path, *steps: str) -> tuple[str, dict[int, float]]:
    """A 6-step run killed after its step-3 checkpoint, having logged steps 4-6; and its losses."""
    run_dir = str(tmp_path / "run")
    train_in_process(shapes, str(tmp_path), "run", "train.steps=6", "train.checkpoint_every=3", *steps)
    expected = losses(run_dir)
    drop_checkpoints_after(run_dir, 3)
    return run_dir, expected


def test_compiled_training_resumes_compiled_bit_for_bit_and_eagerly_alike(shapes, tmp_path, monkeypatch):
    """``train.torch_compile``, or the launch config's dynamo backend: checkpoints and the export hold
    the model's own state dict, so a run resumes compiled, bit for bit, or eagerly, with the compiled
    steps' losses to float rounding (a compiled graph may order float ops otherwise). The ``eager``
    backend: dynamo's capture alone, the fastest to compile (``test_compiled_model_trains_like_the_eager_one``
    holds ``aot_eager``'s gradients, traced as inductor's are, to the eager model's)."""
    from safetensors import safe_open

    steps = ["train.steps=6", "train.checkpoint_every=3"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_dir, expected = interrupted_run(shapes, tmp_path, "train.torch_compile=true", "train.torch_compile_backend=eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    with monkeypatch.context() as launch:
        launch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # what `accelerate launch --dynamo_backend eager` sets
        compiled, compile = [], torch.compile  # the graphs compiled above serve this model too: count the calls
        launch.setattr(torch, "compile", lambda model, **options: compiled.append(options) or compile(model, **options))
        train_in_process(shapes, str(tmp_path), "run", *steps, "--resume", "auto")
        assert compiled == [{"backend": "eager"}]
    assert losses(run_dir) == expected  # every step, bit for bit
    with safe_open(os.path.join(run_dir, "final", "model.safetensors"), "pt") as f:
        assert not [key for key in f.keys() if "_orig_mod" in key]
    drop_checkpoints_after(run_dir, 3)
    train_in_process(shapes, str(tmp_path), "run", *steps, "--resume", "auto")
    assert losses(run_dir) == pytest.approx(expected, rel=1e-5)
    torch._dynamo.reset()


def test_compiled_training_under_deepspeed_is_refused_before_anything_is_written(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    with pytest.raises(ValueError, match=r"train.torch_compile=true under DeepSpeed: not supported"):
        train_in_process(shapes, str(tmp_path), "run", "train.torch_compile=true")
    assert not os.path.exists(tmp_path / "run")


def test_resume_repairs_a_torn_metrics_line(shapes, tmp_path, caplog):
    run_dir, expected = interrupted_run(shapes, tmp_path)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 5.0')  # the kill came in the middle of a write
    train_in_process(shapes, str(tmp_path), "run", "train.steps=6", "train.checkpoint_every=3", "--resume", "auto")
    assert losses(run_dir) == expected
    assert "torn last line" in caplog.text


def test_tensorboard_holds_each_step_once_after_a_resume(shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, expected = interrupted_run(shapes, tmp_path)
    train_in_process(shapes, str(tmp_path), "run", "train.steps=6", "train.checkpoint_every=3", "--resume", "auto")
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in logged] == sorted(expected)
    assert [value for _, value in logged] == pytest.approx([expected[step] for step in sorted(expected)])


def test_resume_without_a_checkpoint_names_the_run_folder(shapes, tmp_path):
    run_dir = str(tmp_path / "fresh")
    with pytest.raises(ValueError, match=re.escape(run_dir) + ".*no complete checkpoint"):
        train_in_process(shapes, str(tmp_path), "fresh", "train.steps=2", "--resume", "auto")
    missing = str(tmp_path / "elsewhere" / "step_00000003")
    with pytest.raises(ValueError, match=re.escape(missing) + ": not a complete checkpoint"):
        train_in_process(shapes, str(tmp_path), "fresh", "train.steps=2", "--resume", missing)


def test_a_run_folder_holds_one_run(shapes, tmp_path):
    """Re-running a run's name without --resume is refused before anything is written; resuming
    with other tokenizer settings is refused; train.overwrite=true starts afresh in an emptied folder."""
    run_dir = tmp_path / "run"
    train_in_process(shapes, str(tmp_path), "run", "train.steps=2", "train.checkpoint_every=1")
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match=re.escape(f"run folder {run_dir} is not empty") + ".*--resume.*train.overwrite"):
        train_in_process(shapes, str(tmp_path), "run", "train.steps=2")
    with pytest.raises(ValueError, match=r"model.tokenizer.vocab_size=280 \(trained with 300\)"):
        train_in_process(shapes, str(tmp_path), "run", "train.steps=4", "model.tokenizer.vocab_size=280", "--resume", "auto")
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written
    train_in_process(shapes, str(tmp_path), "run", "train.steps=1", "model.tokenizer.vocab_size=280",
                     "train.overwrite=true")
    assert not (run_dir / "checkpoints").exists() and set(losses(str(run_dir))) == {1}
    with open(run_dir / "tokenizer" / "trained_with.json") as f:
        assert json.load(f)["vocab_size"] == 280


def test_two_processes_match_one_process(shapes, tmp_path):
    """The same config (``data.split_batches``: 8 samples a step, whatever the processes) on one
    process and on two."""
    steps = ["train.steps=6", "optim.lr=1e-3", "data.batch_size=8", "data.split_batches=true", "train.checkpoint_every=6"]
    single = run_script(overrides(shapes, str(tmp_path), "single", *steps))
    assert single.wait(timeout=300) == 0, single.stderr.read()[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    double = run_script(overrides(shapes, str(tmp_path), "double", *steps), launcher)
    assert double.wait(timeout=300) == 0, double.stderr.read()[-3000:]
    one, two = losses(str(tmp_path / "single")), losses(str(tmp_path / "double"))
    assert set(one) == set(two) == set(range(1, 7))
    # one schedule step per optimizer step, whatever the processes (TINY_MODEL: 2 warmup steps)
    expected = schedule(load_config(os.path.join(ROOT, "configs/tiny.yaml"), overrides(shapes, str(tmp_path), "schedule", *steps)))
    assert logged_lrs(str(tmp_path / "single")) == logged_lrs(str(tmp_path / "double")) == pytest.approx(expected)
    for name in ("single", "double"):
        with open(tmp_path / name / "checkpoints" / "step_00000006" / "trainer_state.json") as f:
            assert json.load(f)["samples_seen"] == 6 * 8, name
    # Same initial model and global batch; the processes see other samples, so losses agree within noise.
    assert abs(two[1] - one[1]) / one[1] < 0.05
    mean_one, mean_two = sum(one.values()) / 6, sum(two.values()) / 6
    assert abs(mean_two - mean_one) / mean_one < 0.10


def accelerate_launch(*flags: str) -> list[str]:
    """``accelerate launch FLAGS`` through the CLI's own entry point, with this interpreter."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *flags]


def test_accelerate_launch_multi_gpu_trains_two_cpu_processes(shapes, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU: two gloo processes train, and
    the run says so in its log (per process) and in metrics.jsonl."""
    launcher = accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "29536")
    run = run_script(overrides(shapes, str(tmp_path), "double", "train.steps=2"), launcher)
    stderr = run.communicate(timeout=300)[1]
    assert run.returncode == 0, stderr[-3000:]
    assert "process 0 of 2" in stderr and "process 1 of 2" in stderr, stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "double" / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if "loss" in r] == [2, 2]


def test_accelerate_launch_cpu_with_two_processes_is_refused(shapes, tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts one process (Accelerate starts several
    CPU processes only through MPI): train.py stops, naming the commands that work, before it
    writes anything, instead of training alone and exiting 0."""
    launcher = accelerate_launch("--cpu", "--num_processes", "2", "--main_process_port", "29537")
    run = run_script(overrides(shapes, str(tmp_path), "single", "train.steps=2"), launcher)
    stderr = run.communicate(timeout=300)[1]
    assert run.returncode != 0
    assert "accelerate launch --multi_gpu --num_processes" in stderr and "torchrun --nproc_per_node" in stderr, stderr[-3000:]
    assert not (tmp_path / "single").exists()


def test_deepspeed_zero2_matches_plain_run_and_resumes(shapes, tmp_path):
    """configs/accelerate/deepspeed_zero2.yaml on 1 CPU process (Accelerate forms no multi-process
    DeepSpeed group on CPU), with gradient accumulation: the losses equal a plain run's, and
    after resuming from DeepSpeed's checkpoint at step 3 they do again."""
    pytest.importorskip("deepspeed")
    launch_config = OmegaConf.load(os.path.join(ROOT, "configs/accelerate/deepspeed_zero2.yaml"))
    launch_config.num_processes, launch_config.mixed_precision = 1, "no"
    launch_config.deepspeed_config.gradient_accumulation_steps = 2
    OmegaConf.save(launch_config, tmp_path / "deepspeed.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "deepspeed.yaml")]
    steps = ["train.steps=6", "train.checkpoint_every=3", "train.grad_accum=2", "optim.lr=1e-3"]
    plain = run_script(overrides(shapes, str(tmp_path), "plain", *steps))
    assert plain.wait(timeout=300) == 0, plain.stderr.read()[-3000:]
    deepspeed = run_script(overrides(shapes, str(tmp_path), "deepspeed", *steps), launcher)
    assert deepspeed.wait(timeout=300) == 0, deepspeed.stderr.read()[-3000:]
    expected = losses(str(tmp_path / "plain"))
    assert losses(str(tmp_path / "deepspeed")) == expected

    shutil.rmtree(tmp_path / "deepspeed" / "checkpoints" / "step_00000006")
    resumed = run_script(overrides(shapes, str(tmp_path), "deepspeed", *steps) + ["--resume", "auto"], launcher)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert losses(str(tmp_path / "deepspeed")) == expected


def test_fsdp2_sharding_matches_unsharded_model(tmp_path):
    """The units configs/accelerate/fsdp.yaml names, with MoE layers shared across towers, under
    FSDP2 on 2 CPU processes: see tests/fsdp_worker.py for what is compared."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
               os.path.join(ROOT, "tests", "fsdp_worker.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.moe.top_kk=2", "model.moe.top_kk"),
        ("model.moe.top_k=two", "model.moe.top_k"),
        ("model.moe.top_k=9", "top_k"),
        ("model.moe.capacity_factor=0", "capacity_factor"),
        ("model.moe.expert_type=relu_mlp", "expert_type"),
        ("optim.freeze=[everything]", "optim.lr_mult/freeze"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("train.steps=0", "train.steps"),
        ("optim.warmup_steps=-5", "optim.warmup_steps"),
        ("train.checkpoint_every=-2", "train.checkpoint_every"),
        ("train.eval_every=-1", "train.eval_every"),
        ("optim.min_lr_ratio=5", "optim.min_lr_ratio must be in [0, 1]"),
        ("optim.lr_mult.vision=-1", "optim.lr_mult.vision"),
        ("model.moe.aux_loss_weight=-1", "moe.aux_loss_weight"),
        ("model.moe.z_loss_weight=-0.5", "moe.z_loss_weight"),
        ("model.pixel_loss_weight=-1", "pixel_loss_weight must be >= 0"),
        ("model.pixel_loss_size=0", "pixel_loss_size must be >= 1"),
        ("model.decoder.text_config.hiden_size=64", "decoder.text_config: unknown key(s) ['hiden_size']"),
        ("model.decoder.text_config.model_type=no_such_model", "decoder.text_config.model_type"),
        # tiny.yaml: a 4-convolution stem (16 px) and patch_size 1: 60 px is not whole tokens
        ("model.vision.img_size=60", "vision.img_size=60 is not a multiple of the patch"),
        ("model.vision.mlp_ratio=4.0", "vision.mlp_ratio"),  # shared MoE layers: ViT MLP 512 wide, decoder's 256
        ("model.decoder.moe_every=2", "share_moe_layers needs as many MoE layers"),
        ("train.loss_average=mean", "train.loss_average='mean' is not one of ['token', 'square', 'sample']"),
        ("data.caption_target=first", "data.caption_target='first' is not one of ['canonical', 'random']"),
        ("model.image_position_ids=rows", "image_position_ids='rows' is not one of ['sequential', 'shared']"),
        ("train.torch_compile=true train.torch_compile_backend=inducter", "train.torch_compile_backend='inducter'"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer must be >= 1"),
        ("train.eval_samples=0", "train.eval_samples must be >= 1"),  # validation would log 0.0 losses
    ],
)
def test_bad_config_names_the_key(override, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), override.split())


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.val=[{pattern: x, task: vqa2}]", "data.val[0]: DataSource.task='vqa2'"),
        ("data.val=[{pattern: x, task: vqa, weight: 0}]", "data.val[0]: DataSource.weight=0.0"),
        ("data.train=[{pattern: x, task: caption, conversations: true}]", "data.train[0]: DataSource.conversations"),
    ],
)
def test_bad_source_fields_name_the_source_at_load(override, match):
    """A validation source is first read at the first validation, hours in: its fields are checked at load."""
    with pytest.raises(ValueError, match=re.escape(match)):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), [override])


def test_split_batches_gives_each_process_its_share_or_names_the_key():
    data = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["data.batch_size=96", "data.split_batches=true"]).data
    assert [data.batch_size_per_process(n) for n in (1, 2, 4)] == [96, 48, 24]
    with pytest.raises(ValueError, match=re.escape("data.batch_size=96 with data.split_batches=true does not split "
                                                   "evenly over 5 processes")):
        data.batch_size_per_process(5)
    unsplit = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["data.batch_size=96", "data.split_batches=false"]).data
    assert unsplit.batch_size_per_process(2) == 96


def test_tokenizer_learns_from_every_training_source(shapes):
    """Half the tokenizer's samples come from each source, not all from the first, read as the model
    reads them: question words and one-word answers get tokens of their own."""
    from vlmoe.training.trainer import _training_texts

    def texts(samples):
        config = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                             overrides(shapes, "unused", "tok", f"model.tokenizer.train_samples={samples}",
                                       'model.vqa_prompt="Question: {question} Answer:"'))
        return list(_training_texts(config))

    ten = texts(10)
    assert sum(t.startswith("Question: ") and t.endswith("? Answer:") for t in ten) == 5
    assert len(ten) == 5 * (1 + 5) + 5 * (1 + 10)  # prompts; 5 captions per image, 10 answers per question
    tokenizer = train_tokenizer(texts(96), vocab_size=512)  # the demo's vocabulary size
    assert [len(tokenizer.tokenize(word)) for word in (" what", " no", " yes", " circle")] == [1, 1, 1, 1]


def test_decoder_text_config_accepts_what_transformers_knows():
    """Legacy names that transformers folds into others, and a saved decoder's resolved config, are accepted."""
    config = load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["model.decoder.text_config.rope_theta=500.0"])
    resolved = config.model.decoder.transformers_config()
    assert resolved.rope_parameters["rope_theta"] == 500.0
    assert resolved.hidden_size == 128 and not hasattr(resolved, "hiden_size")
    again = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                        [f"model.decoder.text_config={json.dumps(resolved.to_diff_dict())}"])
    assert again.model.decoder.transformers_config().to_dict() == resolved.to_dict()


def test_fused_adamw_steps_like_the_op_by_op_one():
    """The default optimizer runs torch's fused AdamW kernel; over the parameter groups (learning-rate
    multipliers, weight decay or none) its steps equal the op-by-op implementation's."""
    tokenizer = train_tokenizer(["a small red circle left of a large blue square", "how many shapes?"], vocab_size=300)
    config = load_config(os.path.join(ROOT, "configs/tiny.yaml"), [*TINY_MODEL, "optim.lr_mult.routers=10"])
    models, optimizers = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(config.model.to_vlmoe_config(), tokenizer)[0]
        models.append(model)
        optimizers.append(build_optimizer(model, dataclasses.replace(config.optim, fused=fused)))
    assert [o.defaults["fused"] for o in optimizers] == [True, False]
    start = [p.detach().clone() for p in models[0].parameters()]
    for step in range(3):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
    for fused, reference, before in zip(models[0].parameters(), models[1].parameters(), start):
        assert not torch.equal(fused, before)
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modality_mode", ["shared", "per_modality"])
def test_tiny_dense_has_the_active_parameters_of_tiny(modality_mode):
    """The baseline of the MoE study: per token, each tower runs as many weights as the MoE model's
    two active experts; the only difference is routers and MLP biases (under 1% of a tower)."""
    tokenizer = train_tokenizer(["a small red circle left of a large blue square", "how many shapes?"], vocab_size=300)
    counts = {}
    routing = [f"model.moe.modality_mode={modality_mode}", "model.moe.experts_per_modality=[]"]
    for name, overrides in (("tiny", routing), ("tiny-dense", [])):
        config = load_config(os.path.join(ROOT, f"configs/{name}.yaml"), overrides)
        counts[name] = build_model(config.model.to_vlmoe_config(), tokenizer)[0].parameter_counts()
    for tower in ("vision_active", "decoder_active"):
        assert counts["tiny"][tower] == pytest.approx(counts["tiny-dense"][tower], rel=0.01), tower
    assert counts["tiny"]["total"] > 1.5 * counts["tiny-dense"]["total"]


def test_missing_config_file_and_empty_data():
    with pytest.raises(ValueError, match="no such file"):
        load_config("configs/missing.yaml")
    with pytest.raises(ValueError, match="data.train"):
        load_config(None, [])


def empty_shards(folder) -> str:
    """Two tar files with no member: shards a failed conversion could leave behind."""
    os.makedirs(folder, exist_ok=True)
    for i in range(2):
        tarfile.open(os.path.join(folder, f"empty-{i}.tar"), "w").close()
    return f"{folder}/empty-*.tar"


@pytest.mark.parametrize("tokenizer", ["trained", "given"])
def test_training_on_empty_shards_names_the_pattern(tokenizer, tmp_path):
    pattern = empty_shards(tmp_path / "shards")
    extra = []
    if tokenizer == "given":  # then the training loader is the first to read the shards
        train_tokenizer(["a red circle"] * 10, vocab_size=300).save_pretrained(tmp_path / "tokenizer")
        extra = [f"model.tokenizer.path={tmp_path / 'tokenizer'}"]
    args = TINY_MODEL + [f"data.train=[{{pattern: '{pattern}', task: caption}}]", "data.val=[]",
                         f"train.output_dir={tmp_path}", "train.name=empty", "train.steps=2", *extra]
    with pytest.raises((ValueError, RuntimeError), match=re.escape(pattern)) as error:
        train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *args])
    assert "no readable sample" in str(error.value)
    assert not (tmp_path / "empty" / "final").exists()


def damaged_caption_shard(folder) -> str:
    """One caption shard of 10 samples (index.json says so): an undecodable image, a missing
    caption, bad JSON, 4 good samples, then a cut inside the header of the 9th sample's image."""
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image, format="PNG")
    good = lambda key: [(f"{key}.png", image.getvalue()), (f"{key}.txt", b"a red square")]  # noqa: E731
    members = [("k1.png", b"\x89PNG garbage"), ("k1.txt", b"x"), ("k2.png", image.getvalue()), ("k2.json", b"{}"),
               *good("k3"), ("k3.json", b"[1, 2"), *[m for i in range(4, 11) for m in good(f"k{i}")]]
    os.makedirs(folder / "caption")
    with tarfile.open(folder / "caption" / "train-0.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name == "k9.png":
                cut = tar.offset + 100
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = (folder / "caption" / "train-0.tar").read_bytes()
    (folder / "caption" / "train-0.tar").write_bytes(raw[:cut])
    (folder / "index.json").write_text(json.dumps({"caption/train": {"shards": {"caption/train-0.tar": 10}}}))
    return str(folder / "caption" / "train-0.tar")


def test_training_logs_skipped_samples_by_reason(tmp_path):
    """Step 1's batch (k4-k7) comes after 3 bad samples; step 2's after the truncation (k8 being
    read, k9 and k10 lost) and the next pass's 3 bad samples. Validation on the same shard skips
    all 6 and says so; a validation source of empty shards gives NaN, not 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pattern = damaged_caption_shard(tmp_path / "shards")
    val = f"data.val=[{{pattern: '{pattern}', task: caption}}, {{pattern: '{empty_shards(tmp_path / 'empty')}', task: vqa}}]"
    args = ["--config", os.path.join(ROOT, "configs/tiny.yaml"), *TINY_MODEL,
            f"data.train=[{{pattern: '{pattern}', task: caption}}]", val, "data.shuffle_buffer=1",
            f"train.output_dir={tmp_path}", "train.name=skips", "train.steps=2", "train.checkpoint_every=1",
            "train.eval_every=2"]
    history = train.main(args)
    assert history["val/caption_num_skipped"] == 6 and history["val/caption_loss"] > 0
    assert history["val/vqa_num_skipped"] == 0
    assert math.isnan(history["val/vqa_loss"]) and math.isnan(history["val/vqa_exact_match"])
    run_dir = tmp_path / "skips"

    def counts():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k.split("/")[1]: v for k, v in r.items() if k.startswith("num_skipped/") and v}
                for r in records if "loss" in r]

    expected = [{"bad_image": 1, "missing_text": 1, "bad_json": 1},
                {"bad_image": 2, "missing_text": 2, "bad_json": 2, "truncated": 3}]
    assert counts() == expected
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("num_skipped/truncated")] == [0, 3]
    drop_checkpoints_after(str(run_dir), 1)
    train.main([*args, "--resume", "auto"])
    assert counts() == expected  # the counts before the checkpoint are kept with it


def test_training_skips_and_counts_captions_longer_than_max_text_length(tmp_path):
    """In a shard read in order, k1 and k6 have 40-word captions (past model.max_text_length=16):
    step 1 trains on k2-k5, step 2 on k7-k10, and the logs count one, then two too_long skips."""
    from PIL import Image
    from vlmoe.data import ShardWriter

    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image, format="PNG")
    os.makedirs(tmp_path / "shards")
    with ShardWriter(str(tmp_path / "shards" / "train-%06d.tar"), 100) as writer:
        for i in range(1, 11):
            caption = " ".join(["a red square"] * 13) if i in (1, 6) else "a red square"
            writer.write({"__key__": f"k{i}", "png": image.getvalue(), "txt": caption})
    pattern = str(tmp_path / "shards" / "train-000000.tar")
    train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *TINY_MODEL, "model.max_text_length=16",
                f"data.train=[{{pattern: '{pattern}', task: caption}}]", "data.val=[]", "data.shuffle_buffer=1",
                f"train.output_dir={tmp_path}", "train.name=long", "train.steps=2", "train.checkpoint_every=0"])
    records = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_skipped/too_long"] for r in records if "loss" in r] == [1, 2]


def test_validation_pattern_that_matches_nothing_fails_before_anything_is_written(shapes, tmp_path):
    args = overrides(shapes, str(tmp_path), "typo", "train.steps=4", "train.eval_every=2",
                     f"data.val=[{{pattern: '{shapes}/vqa/vall-*.tar', task: vqa}}]")
    with pytest.raises(ValueError, match=re.escape(r"data.val[0].pattern: shard pattern") + ".*vall-"):
        train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *args])
    assert not (tmp_path / "typo").exists()


def test_shared_moe_layers_of_unequal_widths_fail_before_anything_is_written(shapes, tmp_path):
    args = overrides(shapes, str(tmp_path), "unshareable", "train.steps=2", "model.share_moe_layers=true",
                     "model.vision.moe_every=1", "model.decoder.moe_every=1", "model.vision.mlp_ratio=4.0")
    # TINY_MODEL: ViT MLP 32 -> 128, decoder MLP 32 -> 64
    with pytest.raises(ValueError, match=r"share_moe_layers.*vision\.mlp_ratio.*\(32, 128\).*intermediate_size.*\(32, 64\)"):
        train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *args])
    assert not (tmp_path / "unshareable").exists()


class _FailingAccelerator:
    """Writes part of a checkpoint, then dies, as a kill during save would."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed during save")


class _Accelerator(_FailingAccelerator):
    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"complete")


def test_interrupted_checkpoint_write_keeps_the_last_complete_one(tmp_path):
    run = str(tmp_path)
    good = save_checkpoint(_Accelerator(), run, 5, {"step": 5}, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_FailingAccelerator(), run, 10, {"step": 10}, keep=2)
    assert latest_checkpoint(run) == good
    assert os.path.isdir(os.path.join(run, "checkpoints", ".partial-step_00000010"))
    save_checkpoint(_Accelerator(), run, 15, {"step": 15}, keep=2)
    assert [os.path.basename(p) for p in complete_checkpoints(run)] == ["step_00000005", "step_00000015"]
    assert not any(n.startswith(".partial") for n in os.listdir(os.path.join(run, "checkpoints")))


def test_logged_lr_is_the_schedules_whatever_the_groups_multipliers(shapes, tmp_path):
    # the decoder's no-decay group sorts first among the optimizer's groups
    args = overrides(shapes, str(tmp_path), "mult", "train.steps=3", "optim.lr_mult.decoder=0.1")
    train.main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), *args])
    expected = schedule(load_config(os.path.join(ROOT, "configs/tiny.yaml"), args))
    assert logged_lrs(str(tmp_path / "mult")) == pytest.approx(expected)


class _RankAccelerator(_Accelerator):
    """Records when a checkpoint is marked complete against the barriers around save_state."""

    def __init__(self, run: str):
        self.run, self.events = run, []

    def wait_for_everyone(self):
        marked = any(TRAINER_STATE in files for _, _, files in os.walk(self.run))
        self.events.append("barrier, marked" if marked else "barrier")

    def save_state(self, path):
        super().save_state(path)
        self.events.append("saved")


def test_a_checkpoint_is_marked_complete_only_after_every_process_saved(tmp_path):
    """Each process writes its own RNG state in save_state: the main process marks the folder
    complete (trainer_state.json, then the rename) only after a barrier."""
    accelerator = _RankAccelerator(str(tmp_path))
    save_checkpoint(accelerator, str(tmp_path), 3, {"step": 3}, keep=2)
    assert accelerator.events[accelerator.events.index("saved") + 1] == "barrier"


def test_resuming_an_older_checkpoint_than_the_folders_latest_is_refused(tmp_path):
    """The later checkpoints would stay the folder's latest (--resume auto) and outlive the resumed
    run's own when old ones are pruned: refused, naming them, before anything is written."""
    run = str(tmp_path)
    for step in (4, 6, 8):
        save_checkpoint(_Accelerator(), run, step, {"step": step}, keep=3)
    older, latest = complete_checkpoints(run)[0], complete_checkpoints(run)[-1]
    with pytest.raises(ValueError, match=re.escape("later checkpoints (step_00000006, step_00000008)") + ".*--resume auto"):
        start_checkpoint(run, older, overwrite=False)
    assert start_checkpoint(run, latest, overwrite=False) == start_checkpoint(run, "auto", overwrite=False) == latest


def test_validation_sources_of_one_task_log_apart():
    sources = [SourceConfig("a", "caption"), SourceConfig("b", "vqa"), SourceConfig("c", "caption")]
    assert val_tags(sources) == ["val/caption0", "val/vqa", "val/caption1"]
    assert val_tags(sources[:2]) == ["val/caption", "val/vqa"]


def test_resuming_with_other_training_sources_is_refused(shapes, tmp_path):
    """The checkpoint's data positions are places in the run's own sources' streams: with a source
    more (a saved cursor too few) or another order, resuming is refused before anything is written."""
    train_in_process(shapes, str(tmp_path), "run", "train.steps=2", "train.checkpoint_every=2")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    extra = f"{{pattern: '{shapes}/vqa/val-*.tar', task: vqa}}"
    swapped = (f"data.train=[{{pattern: '{shapes}/vqa/train-*.tar', task: vqa, weight: 2.0}}, "
               f"{{pattern: '{shapes}/caption/train-*.tar', task: caption}}]")
    more = (f"data.train=[{{pattern: '{shapes}/caption/train-*.tar', task: caption}}, "
            f"{{pattern: '{shapes}/vqa/train-*.tar', task: vqa, weight: 2.0}}, {extra}]")
    for other in (swapped, more):
        with pytest.raises(ValueError, match=re.escape("data.train differs from the run's")):
            train_in_process(shapes, str(tmp_path), "run", "train.steps=4", other, "--resume", "auto")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_nonfinite_losses_skip_steps_then_stop(shapes, tmp_path, monkeypatch):
    from vlmoe.training.trainer import NonFiniteLossError, Trainer

    config = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                         overrides(shapes, str(tmp_path), "nan", "train.steps=8", "train.max_nonfinite=2",
                                   "train.checkpoint_every=2"))
    trainer = Trainer(config)
    model = trainer.unwrapped
    real_forward, calls, snapshots = model.forward, [], []

    def forward(*args, **kwargs):  # steps 3 and later produce a NaN loss
        calls.append(1)
        snapshots.append([p.detach().clone() for p in model.parameters()])
        out = real_forward(*args, **kwargs)
        if len(calls) >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite=2"):
        trainer.fit()
    assert len(calls) == 5  # 2 good steps, 2 skipped, the 3rd non-finite in a row stops the run
    for before, after in zip(snapshots[2], snapshots[4]):  # skipped steps changed no parameter
        assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[2]))  # good steps did
    run_dir = str(tmp_path / "nan")
    assert os.path.basename(latest_checkpoint(run_dir)) == "step_00000004"


def first_step_gradients(config) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The logged losses and the gradients the optimizer sees at a run's first step."""
    from vlmoe.training.trainer import Trainer

    trainer = Trainer(config)
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    grads, real_step = [], trainer.optimizer.step

    def step(*args, **kwargs):
        grads.extend(torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params)
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    step_losses, _, _ = trainer._step(trainer._batches())
    return step_losses, grads


@pytest.mark.parametrize("average", ["token", "sample", "square"])
def test_gradient_accumulation_normalises_by_the_target_tokens_of_the_whole_step(shapes, tmp_path, average):
    """Two micro-batches of 16 give the gradient of one batch of the same 32 samples: the LM loss
    is a (weighted) mean over the step's target tokens, not a mean of per-micro-batch means
    (captions and answers differ in length). Off here: what depends on the micro-batch as a whole
    (aux and z-losses, per-micro-batch means; the convolutional stem's BatchNorm statistics)."""
    common = ["model.moe.aux_loss_weight=0", "model.moe.z_loss_weight=0", "train.clip_grad_norm=0",
              "model.vision.conv_stem=null", "model.vision.patch_size=8", f"train.loss_average={average}"]
    results = {}
    for grad_accum, batch_size in ((1, 32), (2, 16)):
        name = f"accum{grad_accum}"
        config = load_config(os.path.join(ROOT, "configs/tiny.yaml"), overrides(
            shapes, str(tmp_path), name, *common, f"train.grad_accum={grad_accum}", f"data.batch_size={batch_size}"))
        results[name] = first_step_gradients(config)
    (one_losses, one_grads), (two_losses, two_grads) = results["accum1"], results["accum2"]
    assert two_losses["lm_loss"] == pytest.approx(one_losses["lm_loss"], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in one_grads)
    for one, two in zip(one_grads, two_grads):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_with_gradient_accumulation(shapes, tmp_path):
    # A process of its own: Accelerate's precision is fixed once per process.
    run = run_script(overrides(shapes, str(tmp_path), "bf16", "train.steps=2", "train.mixed_precision=bf16",
                               "train.grad_accum=2"))
    assert run.wait(timeout=300) == 0, run.stderr.read()[-3000:]
    recorded = losses(str(tmp_path / "bf16"))
    assert set(recorded) == {1, 2} and all(torch.isfinite(torch.tensor(v)) for v in recorded.values())
    assert (tmp_path / "bf16" / "final" / "model.safetensors").is_file()
