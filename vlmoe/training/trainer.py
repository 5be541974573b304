"""The training loop: Accelerate, mixed tasks, routing logs, validation, checkpoints that survive a kill.

Notable choices:
- Accelerate owns devices, processes and precision; one code path for 1 CPU process, several
  processes (torchrun / accelerate launch) and GPUs. Each process logs its rank and the world size
  at start, and each training record holds ``world_size`` (``samples_per_s`` is over all of them);
  a launch that asked for several processes and started one is refused (``launch.py``). The
  data pipeline splits shards by rank itself, so the loader is not passed to ``accelerator.prepare``.
- Gradient accumulation: ``grad_accum`` micro-batches under ``accelerator.accumulate`` (no
  gradient sync but on the last; under DeepSpeed its engine accumulates), then clipping and one
  optimizer step. The LM loss is the mean over the target tokens of the whole step, on every
  process together (transformers' ``num_items_in_batch``), however they fall into micro-batches.
- The data stream is a deterministic function of the seed, and a checkpoint keeps each process's
  position in it (``SampleLoader.position``: per loader worker and source, a shard and a place
  in it), so resuming reads on from there, one shard per source, with the same RNG states and
  the same optimizer: losses after a resume equal an uninterrupted run's.
- A run starts in an empty run folder (``train.overwrite`` empties it first) or resumes one with
  ``--resume``; it never mixes two runs' checkpoints, logs or tokenizers. After a resume,
  ``metrics.jsonl`` is cut back to the checkpoint's step (a line torn by the kill is dropped with
  a warning) and TensorBoard hides the steps logged after the checkpoint (``purge_step``).
- With ``train.lora.rank > 0`` the built model gets PEFT adapters and only they train; the model
  they adapt is written once to ``runs/NAME/base``, ``final/`` holds the adapter alone, and
  ``merged/`` the model with the adapter folded in (``vlmoe/lora.py``).
- ``model.init_from`` starts from a vlmoe checkpoint (``vlmoe.model.upcycle``): its tokenizer, its
  weights, its dense MLPs upcycled where the config puts MoE layers; a fresh run logs at step 0 the
  largest logit difference to it on one validation batch (``upcycle/max_logit_diff``).
- The expert matmul forms each process autotuned (``vlmoe/moe/experts.py``; they round
  differently) are kept in every checkpoint and taken back on resume, so a resume stays bit-exact.
- ``train.torch_compile`` (or the launch config's dynamo backend): the training steps call
  ``torch.compile(model)``; validation, generation, checkpoints and the export use the model itself
  (no ``_orig_mod.`` in a state dict), so a run resumes with compilation on or off.
- A non-finite loss on any process skips the whole step on every process (no update); more
  than ``max_nonfinite`` in a row stop the run, leaving the last good checkpoint as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DynamoBackend, TorchDynamoPlugin, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..data import SKIP_REASONS, build_dataset, build_loader, expand_shards
from ..evaluation.vqa_metrics import vqa_exact_match
from ..lora import BASE, attach_lora, merge_lora
from ..model.config import IMAGE_SLOT, task_prompt
from ..model.modeling import RoutingRecord, target_weights
from ..model.upcycle import max_logit_difference
from ..moe.experts import chosen_forms, restore_forms
from ..processing import VLMoEProcessor, build_model, load_run, train_tokenizer
from ..tasks import GenerationCollate, TrainingCollate, generate_from_batch
from .checkpoint import TRAINER_STATE, checkpoint_root, checkpoint_step, complete_checkpoints, latest_checkpoint
from .checkpoint import load_checkpoint, save_checkpoint
from .config import LOSS_AVERAGES, Config, ModelConfig, TrainConfig, config_to_yaml
from .launch import check_launch
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)
MODALITY_NAMES = ("image", "text")
LOSS_TERMS = ("loss", "lm_loss", "aux_loss", "z_loss", "pixel_loss")
TOKENIZER_SETTINGS = "trained_with.json"  # in the run's tokenizer folder: the model.tokenizer it was trained with


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainerState:
    """What a checkpoint adds to Accelerate's state: where the run is."""

    step: int = 0
    nonfinite_in_a_row: int = 0
    samples_seen: int = 0
    history: dict[str, Any] = field(default_factory=dict)
    data_positions: list[dict[str, Any]] | None = None  # per process: its training stream's position
    skipped: dict[str, int] = field(default_factory=dict)  # training samples skipped before, per reason
    expert_forms: list[dict[str, str]] | None = None  # per process: its autotuned expert matmul forms and CPU kernels
    train_sources: list[dict[str, Any]] | None = None  # data.train, whose streams the data positions are places in


def start_checkpoint(run_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """The checkpoint a run starts from (None: a fresh run), checked before anything is written.

    A fresh run needs an empty (or absent) run folder, or ``overwrite``; resuming needs a
    complete checkpoint. Either way two runs are never mixed in one folder.
    """
    if resume is not None and overwrite:
        raise ValueError(f"--resume {resume} and train.overwrite=true: resume the run in {run_dir}, or start it afresh")
    if resume is None:
        if not overwrite and os.path.isdir(run_dir) and os.listdir(run_dir):
            raise ValueError(f"run folder {run_dir} is not empty: continue its run with --resume auto, start it "
                             "afresh with train.overwrite=true (deletes the folder), or choose another train.name")
        return None
    path = latest_checkpoint(run_dir) if resume == "auto" else resume
    if path is None:
        raise ValueError(f"--resume auto: the run folder {run_dir} holds no complete checkpoint yet "
                         "(checkpoints/step_N); start the run afresh with train.overwrite=true")
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise ValueError(f"--resume {path}: not a complete checkpoint (no {TRAINER_STATE} in it)")
    newer = [p for p in complete_checkpoints(run_dir) if checkpoint_step(p) > checkpoint_step(path)]
    if newer:  # they would stay the folder's latest (--resume auto) and outlive this run's own in pruning
        names = ", ".join(os.path.basename(p) for p in newer)
        raise ValueError(f"--resume {path}: the run folder holds later checkpoints ({names}) of the run this one "
                         f"replaces: move them out of {checkpoint_root(run_dir)} first, or continue from the latest "
                         "with --resume auto")
    return path


def train_sources(config: Config) -> list[dict[str, Any]]:
    return [asdict(source) for source in config.data.train]


def check_resumed_sources(checkpoint: str | None, config: Config) -> None:
    """A resumed run reads the training sources its checkpoint's data positions are places in."""
    if checkpoint is None:
        return
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        saved = json.load(f).get("train_sources")  # absent from checkpoints of older vlmoe
    if saved is not None and saved != train_sources(config):
        raise ValueError(f"--resume {checkpoint}: data.train differs from the run's ({saved}); resume with the run's "
                         "own data.train, or train on other data in a new run (model.init_from=<run>/final)")


def val_tags(sources: Sequence[Any]) -> list[str]:
    """``val/TASK`` per validation source; ``val/TASK0``, ``val/TASK1``, ... where sources share a task."""
    tasks = [source.task for source in sources]
    return [f"val/{task}" if tasks.count(task) == 1 else f"val/{task}{tasks[:i].count(task)}"
            for i, task in enumerate(tasks)]


def run_tokenizer(config: Config, accelerator: Accelerator, run_dir: str):
    """The tokenizer of this run: the parent checkpoint's, the pretrained decoder's, a given one, or trained once and saved
    (with the settings it was trained with, which a resumed run's config must repeat)."""
    model_cfg = config.model
    if model_cfg.init_from is not None:
        return VLMoEProcessor.from_pretrained(model_cfg.init_from).tokenizer  # the parent's vocabulary
    if model_cfg.decoder.pretrained_path is not None:
        return None  # build_model takes the decoder's own
    if model_cfg.tokenizer.path is not None:
        return AutoTokenizer.from_pretrained(model_cfg.tokenizer.path, local_files_only=True)
    saved = os.path.join(run_dir, "tokenizer")
    if accelerator.is_main_process and not os.path.isdir(saved):
        texts = list(_training_texts(config))
        if not texts:
            patterns = [s.pattern for s in config.data.train]
            raise ValueError(f"data.train: the shards of {patterns} hold no readable sample (skipped ones are "
                             "logged above); there is nothing to train the tokenizer or the model on")
        tokenizer = train_tokenizer(texts, vocab_size=model_cfg.tokenizer.vocab_size)
        tokenizer.save_pretrained(saved)
        with open(os.path.join(saved, TOKENIZER_SETTINGS), "w") as f:
            json.dump(asdict(model_cfg.tokenizer), f)
    accelerator.wait_for_everyone()
    check_tokenizer_settings(saved, asdict(model_cfg.tokenizer))
    return AutoTokenizer.from_pretrained(saved, local_files_only=True)


def check_tokenizer_settings(saved: str, settings: dict[str, Any]) -> None:
    """A saved tokenizer is reused only with the settings it was trained with."""
    path = os.path.join(saved, TOKENIZER_SETTINGS)
    if not os.path.isfile(path):  # a run from before the settings were recorded
        logger.warning("%s does not say what it was trained with; reusing it as it is", saved)
        return
    with open(path) as f:
        trained_with = json.load(f)
    differ = [f"model.tokenizer.{k}={settings.get(k)!r} (trained with {v!r})" for k, v in trained_with.items()
              if settings.get(k) != v]
    if differ:
        raise ValueError(f"{saved} was trained with other settings than the config's: {', '.join(differ)}; "
                         "resume with the run's own settings, or start afresh with train.overwrite=true")


def check_data_patterns(config: Config) -> None:
    """Every train and validation pattern matches files: checked before anything is written, so a
    typo in a validation pattern does not surface at the first validation, hours in."""
    for split in ("train", "val"):
        for i, source in enumerate(getattr(config.data, split)):
            try:
                expand_shards(source.pattern)
            except ValueError as err:
                raise ValueError(f"data.{split}[{i}].pattern: {err}") from None


def _training_texts(config: Config) -> Iterator[str]:
    """``tokenizer_texts`` of ``tokenizer.train_samples`` samples, drawn evenly from every training
    source (the first ones of each), so that questions and answers shape the vocabulary as much as
    captions do."""
    per_source = max(config.model.tokenizer.train_samples // len(config.data.train), 1)
    for source in config.data.train:
        samples = (s for batch in build_dataset(source.to_source(), train=False, batch_size=64)
                   for s in batch.data or ())
        yield from tokenizer_texts(
            config.model, ((s.question, s.answers or s.captions) for s in islice(samples, per_source))
        )


def tokenizer_texts(model: ModelConfig, samples: Iterable[tuple[str | None, Sequence[str]]]) -> Iterator[str]:
    """The texts a tokenizer learns from, as the model reads them: each ``(question or None, targets)``
    sample's prompt, and each of its targets after a space (``VLMoEProcessor.training_batch``)."""
    for question, targets in samples:
        yield task_prompt(model.caption_prompt, model.vqa_prompt, question).replace(IMAGE_SLOT, " ")
        for target in targets:
            yield " " + target


def routing_scalars(routing: list[RoutingRecord]) -> dict[str, float]:
    """Per MoE layer and modality: expert load, router entropy, drop rate, load-balancing loss."""
    scalars = {}
    for record in routing:
        out = record.output
        for m, present in enumerate(out.tokens.tolist()):
            if not present:
                continue
            name = f"moe/{record.tower}{record.layer}/{MODALITY_NAMES[m] if m < 2 else m}"
            scalars[f"{name}/entropy"] = out.entropy[m].item()
            scalars[f"{name}/dropped"] = out.dropped[m].item()
            scalars[f"{name}/load_balance"] = out.load_balance[m].item()
            for e, load in enumerate(out.load[m].tolist()):
                scalars[f"{name}/load_e{e}"] = load
    return scalars


def compile_options(train: TrainConfig, deepspeed: bool) -> dict[str, Any] | None:
    """``torch.compile``'s arguments for the training steps (None: eager): ``train.torch_compile``'s,
    else the launch config's dynamo settings (``accelerate config``, ``accelerate launch
    --dynamo_backend``). The trainer compiles, not ``Accelerator.prepare``, so that checkpoints and
    the export hold the model's own state dict; under DeepSpeed the engine compiles itself from the
    launch config, and ``train.torch_compile`` is refused."""
    if deepspeed:
        if train.torch_compile:
            raise ValueError("train.torch_compile=true under DeepSpeed: not supported; set dynamo_backend in the "
                             "accelerate launch config instead (the DeepSpeed engine compiles itself)")
        return None
    if train.torch_compile:
        return {"backend": train.torch_compile_backend}
    launch = TorchDynamoPlugin()  # read from the environment `accelerate launch` sets
    return None if launch.backend == DynamoBackend.NO else launch.to_kwargs()  # backend, mode, ...: the set ones


class Trainer:
    """Builds a run from ``config``, fresh or resumed from ``resume`` (``"auto"``: the run's latest
    complete checkpoint, or a checkpoint folder); ``fit`` trains it."""

    def __init__(self, config: Config, resume: str | None = None):
        self.config = config
        train = config.train
        self.run_dir = train.run_dir
        check_data_patterns(config)
        checkpoint = start_checkpoint(self.run_dir, resume, train.overwrite)
        check_resumed_sources(checkpoint, config)
        moe_loop = config.model.moe.implementation == "loop"  # the loop leaves unrouted experts without grads
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        compile_with = compile_options(train, deepspeed)  # checked before anything is written
        self.accelerator = Accelerator(
            # cpu=True lets torchrun on CPU form one gloo group; DeepSpeed brings its own CPU backend.
            cpu=not torch.cuda.is_available() and not deepspeed,
            mixed_precision=train.mixed_precision, gradient_accumulation_steps=train.grad_accum,
            log_with="tensorboard", project_dir=self.run_dir,
            # one schedule step per optimizer step, whatever the processes (Accelerate's default steps
            # it once per process, for a global batch that grows with them; data.batch_size decides here)
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=moe_loop)],
            **({} if deepspeed else {"dynamo_backend": "no"}),  # compiled below (compile_options)
        )
        check_launch(self.accelerator)  # refuses `accelerate launch --cpu --num_processes 2` (one process)
        self.batch_size = config.data.batch_size_per_process(self.accelerator.num_processes)
        if self.accelerator.gradient_accumulation_steps != train.grad_accum:
            raise ValueError(
                f"train.grad_accum={train.grad_accum} but the launcher set gradient_accumulation_steps="
                f"{self.accelerator.gradient_accumulation_steps} (accelerate config): make them equal"
            )
        if deepspeed:  # the loader is not prepared, so DeepSpeed cannot read the batch size off it
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.batch_size
        set_seed(train.seed)
        self.accelerator.wait_for_everyone()  # every process has looked at the run folder before it changes
        if self.accelerator.is_main_process:
            if train.overwrite:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            os.makedirs(self.run_dir, exist_ok=True)
        tokenizer = run_tokenizer(config, self.accelerator, self.run_dir)  # refuses a resume with other settings
        if self.accelerator.is_main_process:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(config_to_yaml(config))
        model, self.processor, parent = self._build_model(tokenizer)
        self.upcycle_record = {}
        if parent is not None and checkpoint is None:  # a resumed run's weights come from its checkpoint
            self.upcycle_record = self._logit_difference(model, parent)
        del parent
        if train.lora.enabled:
            model = self._attach_lora(model)
        optimizer = build_optimizer(model, config.optim)
        scheduler = build_scheduler(optimizer, config.optim, train.steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.train_model = self.model  # what the training steps call
        if compile_with is not None:  # compiled for them only: checkpoints keep the model's own state dict
            self.train_model = torch.compile(self.model, **compile_with)
        self.state = TrainerState()
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if checkpoint is not None:
            self._resume(checkpoint)

    def _attach_lora(self, model):
        """Adapters on ``model``, which is saved to ``runs/NAME/base`` first (the adapter alone does not
        run; a resumed run rebuilds the same model from the seed, so it is written once)."""
        base = os.path.join(self.run_dir, BASE)
        if self.accelerator.is_main_process and not os.path.isdir(base):
            model.save_pretrained(base)
            self.processor.save_pretrained(base)
        self.accelerator.wait_for_everyone()
        model = attach_lora(model, self.config.train.lora)
        model.peft_config["default"].base_model_name_or_path = os.path.abspath(base)
        return model

    def _build_model(self, tokenizer):
        """The model and processor, and the parent model when ``model.init_from`` names one."""
        model_cfg = self.config.model
        parent = None
        if model_cfg.init_from is not None:
            parent = load_run(model_cfg.init_from)[0]
        try:
            model, processor = build_model(model_cfg.to_vlmoe_config(), tokenizer, parent, model_cfg.upcycle_noise)
        except ValueError as err:
            if parent is None:
                raise
            raise ValueError(f"model.init_from={model_cfg.init_from!r}: {err}") from None
        return model, processor, parent

    def _logit_difference(self, model, parent) -> dict[str, float]:
        """The largest |logit difference| to the parent on the first validation batch (the same batch
        on every process): about 0 for an upcycle without noise."""
        acc, data = self.accelerator, self.config.data
        sources = data.val[:1] or data.train[:1]
        collate = TrainingCollate(self.processor)
        loader = build_loader([s.to_source() for s in sources], train=False, batch_size=data.eval_batch_size,
                              collate=collate, transform=collate.fit, seed=self.config.train.seed)
        batch = {k: v.to(acc.device) for k, v in next(iter(loader)).items()}
        model.to(acc.device), parent.to(acc.device)
        with acc.autocast():
            diff = max_logit_difference(model, parent, batch)
        logger.info("upcycled from %s: largest |logit difference| to it on one validation batch: %.3g",
                    self.config.model.init_from, diff)
        return {"upcycle/max_logit_diff": diff}

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # --- data ----------------------------------------------------------------------------

    def _loader(self, sources, train: bool, batch_size: int, collate, transform=None,
                position: dict[str, Any] | None = None):
        acc, data = self.accelerator, self.config.data
        return build_loader(
            [s.to_source() for s in sources], train=train, batch_size=batch_size, collate=collate, transform=transform,
            rank=acc.process_index, world_size=acc.num_processes, seed=self.config.train.seed,
            shuffle_buffer=data.shuffle_buffer, num_workers=data.num_workers, position=position,
        )

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches from the checkpoint's data position on."""
        acc, positions = self.accelerator, self.state.data_positions
        if positions is not None and len(positions) != acc.num_processes:
            raise ValueError(f"the checkpoint's data positions are for {len(positions)} processes, not "
                             f"{acc.num_processes}: resume with as many processes")
        if positions is None and self.state.step > 0:
            logger.warning("the checkpoint holds no data position (written by an older vlmoe): "
                           "the training data starts again from the beginning of the stream")
        collate = TrainingCollate(self.processor, self.config.data.caption_target)
        self.train_loader = self._loader(self.config.data.train, True, self.batch_size, collate,
                                         collate.fit, position=positions[acc.process_index] if positions else None)
        return iter(self.train_loader)

    def scheduled_lr(self) -> float:
        """``optim.lr`` where the schedule stands now, without any group's ``lr_mult``."""
        schedule = self.scheduler.scheduler  # the LambdaLR inside Accelerate's wrapper
        return self.config.optim.lr * schedule.lr_lambdas[0](schedule.last_epoch)

    def _skipped(self) -> dict[str, int]:
        """Training samples the pipeline skipped so far, per reason, over every process (each
        loader sums its workers' counts), before the resume included."""
        stats = self.train_loader.stats.skipped
        counts = torch.tensor([stats[reason] for reason in SKIP_REASONS], device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return {reason: self.state.skipped.get(reason, 0) + n for reason, n in zip(SKIP_REASONS, counts.tolist())}

    def _save_checkpoint(self) -> None:
        """Every process calls it: the data positions, skip counts and expert matmul forms are gathered first."""
        state = {**vars(self.state), "data_positions": gather_object([self.train_loader.position]),
                 "skipped": self._skipped(), "expert_forms": gather_object([chosen_forms()]),
                 "train_sources": train_sources(self.config)}
        cfg = self.config.train
        save_checkpoint(self.accelerator, self.run_dir, self.state.step, state, cfg.keep_checkpoints)

    # --- loop ----------------------------------------------------------------------------

    def _resume(self, checkpoint: str) -> None:
        self.state = TrainerState(**load_checkpoint(self.accelerator, checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, self.state.step)
        forms = self.state.expert_forms
        if forms is not None and len(forms) == self.accelerator.num_processes:
            restore_forms(forms[self.accelerator.process_index])  # the same rounding as before the kill
        if self.accelerator.is_main_process and os.path.isfile(self.metrics_path):
            self._truncate_metrics(self.state.step)

    def fit(self) -> dict[str, float]:
        cfg = self.config.train
        acc = self.accelerator
        # TensorBoard hides what an earlier attempt logged after the checkpoint (it is logged again)
        acc.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": self.state.step + 1}})
        if self.upcycle_record and self.state.step == 0:
            self._log(0, self.upcycle_record)
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.state.step, disable=not acc.is_main_process, desc="train")
        window_start, window_samples = time.perf_counter(), 0
        while self.state.step < cfg.steps:
            losses, routing, samples = self._step(batches)
            self.state.step += 1
            window_samples += samples * acc.num_processes
            bar.update(1)
            step = self.state.step
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                record = {**losses, "lr": self.scheduled_lr(), "samples_per_s": window_samples / elapsed,
                          "world_size": acc.num_processes,
                          **{f"num_skipped/{reason}": n for reason, n in self._skipped().items()}}
                if step % cfg.stats_every == 0 and routing:
                    record.update(routing_scalars(routing))
                self._log(step, record)
                bar.set_postfix(loss=f"{losses['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                window_start, window_samples = time.perf_counter(), 0
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                self._log(step, self.validate())
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save_checkpoint()
        bar.close()
        self.export()
        acc.end_training()
        return self.state.history

    def _step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[dict[str, float], list[RoutingRecord], int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns mean losses (over processes)."""
        acc, cfg = self.accelerator, self.config.train
        self.model.train()
        totals = torch.zeros(len(LOSS_TERMS), device=acc.device)
        finite, routing, samples = True, [], 0
        micro_batches = [{k: v.to(acc.device) for k, v in next(batches).items()} for _ in range(cfg.grad_accum)]
        for batch in micro_batches:
            batch["label_weights"] = target_weights(batch["labels"], LOSS_AVERAGES[cfg.loss_average])
        total_weight = self._target_weight_per_micro_batch(micro_batches)
        for batch in micro_batches:
            samples += batch["input_ids"].shape[0]
            with acc.accumulate(self.model), acc.autocast():
                out = self.train_model(**batch, num_items_in_batch=total_weight)
                loss = out.loss
                terms = [getattr(out, name) for name in LOSS_TERMS]
                totals += torch.stack([t.detach().float() if t is not None else loss.new_zeros(()) for t in terms])
                finite = finite and bool(acc.gather(torch.isfinite(loss.detach()).float().view(1)).min() > 0)
                if finite:
                    # divided by grad_accum (DeepSpeed: by its engine): aux and z-losses (and the
                    # pixel loss) stay means of per-micro-batch means
                    acc.backward(loss)
            routing = out.routing
        if finite:
            if cfg.clip_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
            self.optimizer.step()
            self.state.nonfinite_in_a_row = 0
        else:
            self._on_nonfinite()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.samples_seen += samples * acc.num_processes
        means = acc.reduce(totals / cfg.grad_accum, reduction="mean").tolist()
        return dict(zip(LOSS_TERMS, means)), routing, samples

    def _target_weight_per_micro_batch(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The step's total target weight over all processes, per process and micro-batch.

        Each micro-batch's LM loss is its weighted sum over target tokens divided by this;
        ``backward`` divides by ``grad_accum`` and DDP (FSDP, DeepSpeed) averages over processes, so
        the step's gradient is that of the weighted mean over all of its target tokens (with
        ``loss_average: token``, every weight is 1: the mean over the step's target tokens).
        """
        acc = self.accelerator
        weight = sum(batch["label_weights"].sum() for batch in micro_batches).float()
        return acc.reduce(weight, reduction="mean") / len(micro_batches)

    def _on_nonfinite(self) -> None:
        self.state.nonfinite_in_a_row += 1
        limit = self.config.train.max_nonfinite
        logger.warning("non-finite loss at step %d: step skipped (%d in a row)", self.state.step + 1, self.state.nonfinite_in_a_row)
        if self.state.nonfinite_in_a_row > limit:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"{self.state.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite={limit}); "
                f"stopping. The last good checkpoint is {last or '(none yet)'}; lower optim.lr or check the data."
            )

    # --- validation ----------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss per task, the samples skipped in reading it, and generation-based exact
        match on the VQA subset; NaN where nothing could be read."""
        acc, cfg, data = self.accelerator, self.config.train, self.config.data
        model = self.unwrapped
        model.eval()
        results = {}
        limit = math.ceil(cfg.eval_samples / (data.eval_batch_size * acc.num_processes))
        for tag, source in zip(val_tags(data.val), data.val):
            sums = torch.zeros(3, device=acc.device, dtype=torch.float64)  # loss x tokens, tokens, samples skipped
            collate = TrainingCollate(self.processor)
            loader = self._loader([source], False, data.eval_batch_size, collate, collate.fit)
            for batch in islice(iter(loader), limit):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.autocast():
                    out = model(**batch)
                tokens = (batch["labels"][:, 1:] != -100).sum()
                sums[:2] += torch.stack([out.lm_loss.double() * tokens, tokens.double()])
            sums[2] = loader.stats.num_skipped
            sums = acc.reduce(sums, reduction="sum")
            results[f"{tag}_loss"] = (sums[0] / sums[1]).item() if sums[1] > 0 else math.nan
            results[f"{tag}_num_skipped"] = int(sums[2])
            if source.task == "vqa":
                results[f"{tag}_exact_match"] = self._exact_match(source, limit)
        return results

    def _exact_match(self, source, limit: int) -> float:
        acc, data = self.accelerator, self.config.data
        loader = self._loader([source], False, data.eval_batch_size, GenerationCollate(self.processor))
        scores = []
        for batch, samples in islice(iter(loader), limit):
            with acc.autocast():
                answers = generate_from_batch(
                    self.unwrapped, self.processor, batch, max_new_tokens=self.config.train.eval_max_new_tokens
                )
            scores += [vqa_exact_match(a, s.answers) for a, s in zip(answers, samples)]
        counts = acc.reduce(torch.tensor([sum(scores), len(scores)], device=acc.device, dtype=torch.float64), "sum")
        return (counts[0] / counts[1]).item() if counts[1] > 0 else math.nan

    # --- outputs -------------------------------------------------------------------------

    def _log(self, step: int, record: dict[str, float]) -> None:
        self.state.history.update({k: v for k, v in record.items() if not k.startswith("moe/")})
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines a killed run logged after its last checkpoint (they are logged again), and a
        last line the kill tore."""
        with open(self.metrics_path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{self.metrics_path}, line {number}: not JSON: {line[:80]!r}") from None
                logger.warning("%s: dropped a torn last line (a kill while it was written): %r", self.metrics_path, line[:80])
                continue
            if record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def export(self) -> str:
        final = os.path.join(self.run_dir, "final")
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model)  # every rank: gathers FSDP / ZeRO shards
        if self.accelerator.is_main_process:
            self.unwrapped.save_pretrained(final, state_dict=state_dict)  # LoRA: the adapter alone
            self.processor.save_pretrained(final)
            if self.config.train.lora.enabled:
                merge_lora(final, os.path.join(self.run_dir, "merged"))
        self.accelerator.wait_for_everyone()
        return final


def train(config: Config, resume: str | None = None) -> dict[str, float]:
    """Build everything from ``config``, optionally resume (``"auto"`` or a checkpoint path), and train."""
    return Trainer(config, resume).fit()
