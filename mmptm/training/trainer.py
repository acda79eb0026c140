"""The training loop: one loop on ``accelerate.Accelerator`` for every model and objective mix.

Each optimizer step draws, for every configured objective, ``grad_accum_steps``
batches from that objective's data stream, sums the weighted losses and steps
once. Logging, evaluation, checkpointing and signal handling happen between
steps, on the schedule of the ``train`` section.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from safetensors.torch import load_file
from torch import nn

from mmptm.config import Config, ConfigError
from mmptm.data_pipelines.context import DataContext, model_data_context
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.tokenizer import load_tokenizer
from mmptm.evaluation import (
    EvalContext,
    EvaluationError,
    classification_stream,
    load_classnames,
    load_templates,
    prompt_languages,
    retrieval_stream,
    zeroshot_classification,
    zeroshot_retrieval,
)
from mmptm.evaluation.retrieval import RECALL_K
from mmptm.models import create_model
from mmptm.registry import DATASETS, EVALUATORS, OBJECTIVES, build
from mmptm.training.checkpoint import (
    distributed_state_dir,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    optimizer_state_file,
    resolve_checkpoint,
    save_checkpoint,
    staging_dir,
)
from mmptm.training.objective_sampling import objectives_for_draw
from mmptm.training.optim import build_optimizer, build_scheduler
from mmptm.training.precision import cpu_bf16_gemms
from mmptm.training.sharding import (
    average_replicated_grads,
    check_shardable,
    clip_grad_norm,
    load_distributed_state,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save_distributed_state,
    shard_model,
)

logger = logging.getLogger("mmptm.train")

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class DataStream:
    """An endless iterator over a dataset's epochs that tracks its position and skipped samples.

    Batches may carry ``skipped_keys`` (ids of the samples skipped since the
    previous batch): a bad sample is skipped again in every epoch, so the
    stream keeps the set of distinct ids, and ``skipped`` counts each bad
    sample once however long the run is. Batches with only a ``skipped`` count
    are summed as they come.
    """

    def __init__(self, name: str, dataset: Any, epoch: int = 0) -> None:
        self.name = name
        self.dataset = dataset
        self.epoch = epoch
        self.batches_in_epoch = 0
        self.skipped_ids: set[str] = set()
        self.new_skipped_ids: list[str] = []  # seen here since the last exchange between ranks
        self.skipped_uncounted = 0  # skips reported without ids
        self.replay_batches = 0  # batches of the current epoch to draw and drop when resuming exactly
        self._iterator: Iterator[dict[str, Any]] | None = None

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids) + self.skipped_uncounted

    def _start_epoch(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self._iterator = iter(self.dataset)
        self.batches_in_epoch = 0

    def _count_skips(self, batch: dict[str, Any]) -> None:
        ids = batch.get("skipped_keys")
        if ids is None:
            if not self.replay_batches:  # counted before the interruption
                self.skipped_uncounted += int(batch.get("skipped", 0))
            return
        for sample_id in ids:
            if sample_id not in self.skipped_ids:
                self.skipped_ids.add(sample_id)
                self.new_skipped_ids.append(sample_id)

    def merge_skipped(self, ids: list[str]) -> None:
        """Add the skipped ids other ranks saw."""
        self.skipped_ids.update(ids)

    def next_batch(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                if self.batches_in_epoch == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise RuntimeError(
                            f"data stream '{self.name}' produced no batch in a whole epoch "
                            f"({self.skipped} samples skipped so far): check its shards and batch_size"
                        ) from None
                self.epoch += 1
                self._iterator = None
                continue
            self._count_skips(batch)
            if batch.get("empty"):
                continue
            self.batches_in_epoch += 1
            if self.replay_batches:
                self.replay_batches -= 1  # trained on before the interruption
                continue
            return batch

    def close(self) -> None:
        """Drop the current epoch's iterator, which shuts its DataLoader workers down.

        The next :meth:`next_batch` continues where this one stopped (the epoch's
        batches drawn so far are drawn again and dropped, as after an exact resume).
        """
        if self._iterator is not None:
            self._iterator = None
            self.replay_batches += self.batches_in_epoch

    def position(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "skipped": self.skipped,
            "skipped_ids": sorted(self.skipped_ids),
            "skipped_uncounted": self.skipped_uncounted,
        }

    def restore(self, position: dict[str, Any], main: bool = True, exact: bool = True) -> None:
        """Continue from a saved :meth:`position`.

        Args:
            position: what :meth:`position` returned.
            main: this is the rank that keeps the count of id-less skips.
            exact: continue the interrupted epoch with the batch after the last one trained on (its
                batches are drawn again and dropped, which costs reading them: epochs are seeded, so
                the stream is the same); False: start the next epoch (no re-reading, but the rest of
                the interrupted epoch is never seen).
        """
        if exact:
            self.epoch, self.replay_batches = position["epoch"], position["batches_in_epoch"]
        else:
            self.epoch = position["epoch"] + 1
        self.skipped_ids = set(position.get("skipped_ids", []))
        self.skipped_uncounted = position.get("skipped_uncounted", 0) if main else 0


class _EvaluationInterrupted(Exception):
    """A stop signal arrived while evaluating."""


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _batch_size(batch: dict[str, Any]) -> int:
    return next((len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim > 0), 0)


class Trainer:
    """Trains the model of a :class:`~mmptm.config.Config` with its objectives and data streams.

    Args:
        config: a validated run config.
        output_dir: where checkpoints and logs go (default: ``train.output_dir`` or ``runs/<name>``).
        resume: continue from the newest complete checkpoint in ``output_dir`` if there is one.
    """

    def __init__(self, config: Config, output_dir: str | Path | None = None, resume: bool = False) -> None:
        self.config = config
        tc = config.train
        self.output_dir = Path(output_dir or tc.output_dir or Path("runs") / config.name)
        self.resume = resume
        on_gpu = torch.cuda.is_available() and not tc.cpu
        if tc.precision == "fp16" and not on_gpu:
            raise ValueError("train.precision=fp16 needs a GPU (loss scaling is CUDA-only); use bf16 on the CPU")
        self.precision = tc.precision
        if tc.precision == "auto":
            self.precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
        self.accelerator = Accelerator(
            mixed_precision="no" if self.precision == "fp32" else self.precision,
            # accelerate runs several CPU processes (torchrun, gloo) only when told it is on the CPU.
            cpu=not on_gpu,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[
                # A micro-step that samples one objective of several may leave parameters (another
                # objective's tower or head) without a gradient, which DDP must be told to expect.
                DistributedDataParallelKwargs(
                    find_unused_parameters=config.distributed.find_unused_parameters
                    or (tc.objective_sampling != "all" and len(config.objectives) > 1)
                )
            ],
        )
        self.is_main = self.accelerator.is_main_process
        set_seed(tc.seed)

        self.tokenizer = load_tokenizer(resolve(config.tokenizer.path), context_length=config.tokenizer.context_length)
        self.model = create_model(config.model, tokenizer=self.tokenizer)
        if tc.init_from:
            self._init_weights(tc.init_from)
        elif hasattr(self.model, "init_towers"):  # model.<tower>.init_from: towers from other checkpoints
            try:
                self.model.init_towers()
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if hasattr(self.model, "portable_config"):  # e.g. a frozen sub-model named by path: saved inline
            self.config.model = self.model.portable_config(dict(self.config.model))
        if tc.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.objectives = nn.ModuleList(
            build(OBJECTIVES, {k: v for k, v in spec.items() if k not in ("weight", "data")})
            for spec in config.objectives
        )
        self.weights = [float(spec.get("weight", 1.0)) for spec in config.objectives]
        self.ratios = [float(spec.get("ratio", 1.0)) for spec in config.objectives]
        # The objective's name in metric keys; with the data stream when two entries share a name.
        names = [spec["name"] for spec in config.objectives]
        self.metric_names = [
            name if names.count(name) == 1 else f"{name}:{spec.get('data', 'train')}"
            for name, spec in zip(names, config.objectives, strict=True)
        ]
        self.stream_of = [spec.get("data", "train") for spec in config.objectives]

        self.model.to(self.accelerator.device)
        self.objectives.to(self.accelerator.device)
        # FSDP with a single process would shard over nothing: it trains like plain single-process.
        self.sharded = config.distributed.strategy == "fsdp" and self.accelerator.num_processes > 1
        if config.distributed.strategy == "fsdp":  # single-process too: the config fails before it scales out
            check_shardable(self.model)
        if config.distributed.cpu_offload and (config.distributed.strategy != "fsdp" or not on_gpu):
            raise ConfigError(
                "distributed.cpu_offload moves FSDP shards between GPU and CPU memory: it needs "
                "distributed.strategy=fsdp and GPUs"
            )
        self.replicated_params = (
            shard_model(self.model, self.precision, config.distributed.cpu_offload) if self.sharded else []
        )
        # Names every optimised parameter, for checkpoints that do not depend on the strategy.
        self.trained_modules = nn.ModuleDict({"model": self.model, "objectives": self.objectives})
        optimizer = build_optimizer(
            list(self.trained_modules.named_parameters()), tc.lr, tc.weight_decay, tc.betas, tc.eps
        )
        self.scheduler = build_scheduler(
            optimizer,
            warmup_steps=tc.warmup_steps,
            max_steps=tc.max_steps,
            schedule=tc.schedule,
            lr=tc.lr,
            min_lr=tc.min_lr,
        )
        if self.accelerator.num_processes > 1 and any(
            step is not None for step in getattr(self.model, "frozen_towers", {}).values()
        ):
            raise ConfigError(
                "unfreeze_at_step needs a single-process run: DDP fixes the set of trained parameters when it "
                "wraps the model (a tower frozen for the whole run, frozen: true alone, works with any count)"
            )
        # After the optimizer is built, so that it holds a tower that unfreezes later.
        self._update_frozen_towers(0)
        train_model = torch.compile(self.model) if tc.compile else self.model
        if self.sharded:  # already sharded: accelerate must not wrap it in DDP as well
            self.train_model, self.optimizer = train_model, self.accelerator.prepare(optimizer)
        else:
            self.train_model, self.optimizer = self.accelerator.prepare(train_model, optimizer)
        if any(True for _ in self.objectives.parameters()):
            self.objectives = self.accelerator.prepare(self.objectives)

        self.streams = {
            name: DataStream(name, build(DATASETS, config.data[name], context=self._data_context(training=True)))
            for name in dict.fromkeys(self.stream_of)
        }
        self.zeroshot_prompts, self.zeroshot_language = self._load_zeroshot_prompts()
        self.step = 0
        self.samples_seen = 0
        self.stopped_by: str | None = None
        self._metrics_file: Any = None
        self._tensorboard: Any = None

    # ------------------------------------------------------------------ setup helpers

    def _data_context(self, training: bool) -> DataContext:
        return model_data_context(
            self.model,
            tokenizer=self.tokenizer,
            training=training,
            seed=self.config.train.seed,
            rank=self.accelerator.process_index if training else 0,
            world_size=self.accelerator.num_processes if training else 1,
        )

    def _load_zeroshot_prompts(self) -> tuple[tuple[dict[str, list[str]], dict[str, list[str]]] | None, str | None]:
        """Read and check ``eval.zeroshot``'s class names and templates now, so that a bad file fails before training.

        Returns:
            ``((classnames, templates), primary language)``, or ``(None, None)`` without zero-shot evaluation.
        """
        zs = self.config.eval.zeroshot
        if zs is None:
            return None, None
        try:
            classnames = load_classnames(zs.classnames, zs.data)
            templates = load_templates(zs.templates)
            _, primary = prompt_languages(classnames, templates, zs.languages, zs.primary_language)
        except (EvaluationError, FileNotFoundError) as err:
            raise ConfigError(f"eval.zeroshot: {err}") from None
        return (classnames, templates), primary

    def _init_weights(self, source: str) -> None:
        """Load ``train.init_from``'s weights into the freshly built model (strict: same architecture)."""
        try:
            checkpoint = resolve_checkpoint(resolve(source))
            load_weights(self.model, checkpoint / "model.safetensors")
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(
                f"train.init_from={source}: {err}. The run's model section must describe the checkpoint's "
                "architecture (see its config.yaml), and tokenizer.path its tokenizer (the checkpoint folder)"
            ) from None
        logger.info("initialised the model from %s", checkpoint)

    def _update_frozen_towers(self, step: int) -> None:
        """Apply the model's tower freezing schedule (``frozen``, ``unfreeze_at_step``) at ``step``."""
        update = getattr(self.model, "update_frozen_towers", None)
        if update is not None:
            update(step)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The run's mixed precision: accelerate's autocast, with fp32-kernel bf16 GEMMs on CPUs lacking bf16 ones."""
        with self.accelerator.autocast(), cpu_bf16_gemms(self.accelerator.device, self.precision):
            yield

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def _install_signal_handlers(self) -> list[tuple[int, Any]]:
        previous = []

        def request_stop(signum: int, _frame: Any) -> None:
            self.stopped_by = signal.Signals(signum).name

        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                previous.append((sig, signal.signal(sig, request_stop)))
        return previous

    def _restore(self) -> None:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s yet; starting from step 0", self.output_dir)
            return
        if distributed_state_dir(checkpoint).is_dir():  # shards of a sharded run, resharded for this one
            load_distributed_state(self.trained_modules, self._inner_optimizer(), distributed_state_dir(checkpoint))
        else:
            if self.sharded:
                load_model_state(self.model, load_file(str(checkpoint / "model.safetensors")), sharded=True)
            else:
                load_weights(self.model, checkpoint / "model.safetensors")
            load_optimizer_state(
                self.trained_modules,
                self._inner_optimizer(),
                torch.load(optimizer_state_file(checkpoint), map_location="cpu", weights_only=True),
                self.sharded,
            )
        state = load_training_state(
            checkpoint, scheduler=self.scheduler, scaler=self.accelerator.scaler,
            objectives=self.trained_modules["objectives"],
        )
        self.step = state["step"]
        self.samples_seen = state.get("samples_seen", 0)
        for name, position in self._rank_data_positions(state, checkpoint).items():
            if name in self.streams:
                self.streams[name].restore(position, main=self.is_main, exact=self.config.train.data_resume == "exact")
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    def _rank_data_positions(self, state: dict[str, Any], checkpoint: Path) -> dict[str, dict[str, Any]]:
        """This rank's position in each data stream of a checkpoint's ``state.json``.

        Without ``resample``, ranks read different shards and may count different batches per epoch:
        each continues from its own position when the process count is the checkpoint's. With another
        count the shards are split differently and no saved position is exact: every rank continues
        from rank 0's (as do checkpoints written before the per-rank positions were saved).
        """
        shared = state.get("data", {})
        per_rank = state.get("data_per_rank")
        world = self.accelerator.num_processes
        if per_rank is not None and len(per_rank) == world:
            own = per_rank[self.accelerator.process_index]
            return {name: {**position, **own.get(name, {})} for name, position in shared.items()}
        if self.is_main and (world > 1 or per_rank is not None):
            saved_by = f"{len(per_rank)} processes" if per_rank is not None else "a version without per-rank positions"
            logger.warning(
                "%s was saved by %s and resumes on %d: every rank continues its data streams from rank 0's "
                "position, so some samples of the interrupted epoch may be read twice or not at all",
                checkpoint, saved_by, world,
            )
        return shared

    def _refuse_used_output_dir(self) -> None:
        """Refuse to start a fresh run where an earlier run left checkpoints.

        Its checkpoints would mix with this run's: ``latest``, checkpoint rotation and ``--resume``
        would pick up the earlier run's weights and training state.
        """
        if found := list_checkpoints(self.output_dir):
            raise ConfigError(
                f"output dir '{self.output_dir}' already holds checkpoints of an earlier run "
                f"(newest: {found[-1].name}); "
                "continue that run with --resume (Trainer(..., resume=True)), or start this one in another or "
                "an empty output dir (--output-dir)"
            )

    # ------------------------------------------------------------------ logging

    def _open_logs(self) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(self.config.to_yaml(), encoding="utf-8")
        self._metrics_file = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.config.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; logging to metrics.jsonl only")

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": self.step, **metrics}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, self.step)

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    # ------------------------------------------------------------------ checkpoints and evaluation

    def save(self) -> Path | None:
        """Write a resumable checkpoint of the current step (main process), then sync every rank."""
        path = None
        uncounted = self._exchange_skipped()  # every rank's skipped ids, gathered onto each rank
        staging, optimizer_full = None, None
        if self.sharded:  # every rank writes its shards into the folder rank 0 will rename
            staging = staging_dir(self.output_dir, self.step)
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            save_distributed_state(self.trained_modules, self._inner_optimizer(), distributed_state_dir(staging))
        else:
            optimizer_full = optimizer_state(self.trained_modules, self._inner_optimizer(), sharded=False)
        # The consolidated weights, for inference (a collective under FSDP; rank 0 gets them).
        weights = model_state(self.model, self.sharded)
        # Each rank's position: without resample, ranks may count different batches per epoch.
        positions = {name: {"epoch": stream.epoch, "batches_in_epoch": stream.batches_in_epoch}
                     for name, stream in self.streams.items()}
        every_rank = gather_object([positions]) if self.accelerator.num_processes > 1 else [positions]
        if self.is_main:
            data = {
                name: {
                    **stream.position(),
                    "skipped": len(stream.skipped_ids) + uncounted[name],
                    "skipped_uncounted": uncounted[name],
                }
                for name, stream in self.streams.items()
            }
            state = {"samples_seen": self.samples_seen, "data": data, "data_per_rank": every_rank}
            path = save_checkpoint(
                self.output_dir,
                self.step,
                weights,
                self.config.to_yaml(),
                self.tokenizer,
                optimizer=optimizer_full,
                staging=staging,
                scheduler=self.scheduler,
                state=state,
                keep=self.config.train.keep_checkpoints,
                scaler=self.accelerator.scaler,
                objectives=self.trained_modules["objectives"].state_dict(),  # e.g. mrm's k-means codebook
            )
            logger.info("saved checkpoint %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def evaluate(self) -> dict[str, float]:
        """Zero-shot classification in every prompt language and, if configured, retrieval and ``eval.tasks``.

        The main process evaluates (every process under FSDP, whose forward
        passes gather the shards: they compute the same numbers, the main one
        logs them). The numbers are those of ``mmptm zeroshot classify|retrieve``
        on the same checkpoint and data. A stop signal during evaluation
        abandons it (nothing is logged) so that the caller can checkpoint at once.
        """
        metrics: dict[str, float] = {}
        if self.is_main or self.sharded:
            try:
                builtin = {**self._evaluate_zeroshot(), **self._evaluate_retrieval()}  # distinct names
                metrics = {**builtin, **self._evaluate_tasks(builtin)}
            except _EvaluationInterrupted:
                logger.warning("received %s during evaluation at step %d: evaluation abandoned",
                               self.stopped_by, self.step)
                metrics = {}
            if metrics:
                self._log(metrics)
        self.accelerator.wait_for_everyone()
        return metrics

    def _evaluate_tasks(self, builtin: dict[str, float] | None = None) -> dict[str, float]:
        """The registered evaluators of ``eval.tasks``, each on the unwrapped model in eval mode.

        Raises:
            ValueError: a task logs a metric name that an earlier task, or ``builtin`` (the zero-shot
                and retrieval metrics), already holds.
        """
        if not self.config.eval.tasks:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        context = EvalContext(
            tokenizer=self.tokenizer,
            data=self._data_context(training=False),
            device=self.accelerator.device,
            autocast=self.autocast,
            batches=self._eval_batches,
            step=self.step,
        )
        metrics: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            for index, task in enumerate(self.config.eval.tasks):
                options = {k: v for k, v in task.items() if k != "prefix"}
                prefix = f"{task['prefix']}/" if task.get("prefix") else ""
                result = build(EVALUATORS, options, model=model, context=context)
                named = {f"eval/{prefix}{key}": value for key, value in result.items()}
                if clash := sorted(set(named) & (set(metrics) | set(builtin or ()))):
                    source = "an earlier task" if clash[0] in metrics else "eval.zeroshot or eval.retrieval"
                    raise ValueError(
                        f"eval.tasks.{index} ('{task['name']}') logs '{clash[0]}', as {source} does: it would "
                        "overwrite that metric; give the task a distinct 'prefix' (eval/<prefix>/<metric>)"
                    )
                metrics.update(named)
        finally:
            model.train(was_training)
        return metrics

    def _eval_batches(self, stream: Iterable[dict[str, Any]], what: str) -> Iterable[dict[str, Any]]:
        """``stream`` interrupted by a stop signal, with a progress bar if the run shows one."""
        batches: Iterable[dict[str, Any]] = self._until_stopped(stream)
        if self.config.train.progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"eval {what} step {self.step}", unit="batch", leave=False, file=sys.stderr)
        return batches

    def _evaluate_zeroshot(self) -> dict[str, float]:
        zs = self.config.eval.zeroshot
        if zs is None:
            return {}
        classnames, templates = self.zeroshot_prompts
        stream = classification_stream(
            zs.data, self._data_context(training=False), zs.label_key, zs.batch_size, zs.num_workers
        )
        result = zeroshot_classification(
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            self._eval_batches(stream, "zero-shot"),
            classnames,
            templates,
            languages=zs.languages,
            primary_language=zs.primary_language,
            device=self.accelerator.device,
            autocast=self.autocast,
        )
        metrics = {
            "eval/zeroshot_top1": result["top1"],
            "eval/zeroshot_top5": result["top5"],
            "eval/zeroshot_mean_per_class_recall": result["mean_per_class_recall"],
            "eval/num_images": result["num_images"],
            "eval/skipped_samples": result["skipped_samples"],
        }
        for lang, language_metrics in result["per_language"].items():
            metrics[f"eval/zeroshot_top1/{lang}"] = language_metrics["top1"]
        return metrics

    def _evaluate_retrieval(self) -> dict[str, float]:
        rc = self.config.eval.retrieval
        if rc is None:
            return {}
        stream = retrieval_stream(rc.data, self._data_context(training=False), rc.languages, rc.batch_size,
                                  rc.num_workers)
        result = zeroshot_retrieval(
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            self._eval_batches(stream, "retrieval"),
            device=self.accelerator.device,
            autocast=self.autocast,
        )
        metrics = {
            "eval/retrieval_num_images": result["num_images"],
            "eval/retrieval_num_texts": result["num_texts"],
            "eval/retrieval_skipped_samples": result["skipped_samples"],
        }
        for k in RECALL_K:
            metrics[f"eval/i2t_r{k}"] = result[f"text_retrieval_recall@{k}"]
            metrics[f"eval/t2i_r{k}"] = result[f"image_retrieval_recall@{k}"]
        return metrics

    def _until_stopped(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # Under FSDP all ranks evaluate in lockstep and must abandon together: the flag is shared.
        stop = self._should_stop if self.sharded else lambda: self.stopped_by is not None
        for batch in batches:
            if stop():
                raise _EvaluationInterrupted
            yield batch
        if stop():
            raise _EvaluationInterrupted

    # ------------------------------------------------------------------ the loop

    def _train_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One optimizer step over the accumulation micro-steps, each training the objectives
        ``train.objective_sampling`` picks for it.

        Returns:
            The step's metrics (an objective's: the mean over the micro-steps it ran in; absent if it
            ran in none) and the number of samples it trained on, over all ranks.
        """
        tc = self.config.train
        totals: dict[str, torch.Tensor] = {}
        runs: dict[str, int] = {}  # micro-steps each objective metric was summed over
        samples = 0
        for micro in range(tc.grad_accum_steps):
            last = micro == tc.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.train_model)
            chosen = objectives_for_draw(
                tc.objective_sampling, self.ratios, tc.seed, self.step * tc.grad_accum_steps + micro
            )
            with sync:
                loss = torch.zeros((), device=self.accelerator.device)
                for i in chosen:
                    batch = _to_device(self.streams[self.stream_of[i]].next_batch(), self.accelerator.device)
                    samples += _batch_size(batch)
                    with self.autocast():
                        out = self.objectives[i](self.train_model, batch)
                    loss = loss + self.weights[i] * out["loss"].float()
                    for key, value in out.items():
                        logged = len(self.objectives) > 1 or key != "loss"  # a lone objective's loss is train/loss
                        name = f"train/{self.metric_names[i]}/{key}" if logged else None
                        if name is not None and torch.is_tensor(value):
                            totals[name] = totals.get(name, 0) + value.detach().float()
                            runs[name] = runs.get(name, 0) + 1
                # Activations rebuilt in backward (checkpointing, GradCache) must be computed as in forward.
                with cpu_bf16_gemms(self.accelerator.device, self.precision):
                    self.accelerator.backward(loss / tc.grad_accum_steps)
                totals["train/loss"] = totals.get("train/loss", 0) + loss.detach() / tc.grad_accum_steps
        for name, count in runs.items():
            totals[name] = totals[name] / count
        if self.sharded:
            average_replicated_grads(self.replicated_params)
        if tc.grad_clip is not None:
            if self.sharded:
                norm = clip_grad_norm(list(self.train_model.parameters()), tc.grad_clip)
            else:
                norm = self.accelerator.clip_grad_norm_(self.train_model.parameters(), tc.grad_clip)
            totals["train/grad_norm"] = torch.as_tensor(norm).detach().float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, samples * self.accelerator.num_processes

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps`` (or until SIGTERM/SIGUSR1), evaluate, save; return the last eval metrics."""
        tc = self.config.train
        if self.resume:
            self._restore()
        else:
            self._refuse_used_output_dir()
        self._open_logs()
        previous_handlers = self._install_signal_handlers()
        progress = None
        if self.is_main and tc.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=tc.max_steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        interval: dict[str, torch.Tensor] = {}
        interval_counts: dict[str, int] = {}  # steps that logged each key (sampled objectives skip some)
        interval_samples, interval_start = 0, time.perf_counter()
        eval_metrics: dict[str, float] = {}
        try:
            self.train_model.train()
            while self.step < tc.max_steps:
                self._update_frozen_towers(self.step)
                step_lr = self.scheduler.get_last_lr()[0]  # the step below trains with it, then steps the schedule
                totals, samples = self._train_step()
                self.step += 1
                self.samples_seen += samples
                interval_samples += samples
                for key, value in totals.items():
                    interval[key] = interval.get(key, 0) + value
                    interval_counts[key] = interval_counts.get(key, 0) + 1
                if progress is not None:
                    progress.update(1)

                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    elapsed = time.perf_counter() - interval_start
                    metrics = self._reduce_interval(interval, interval_counts)
                    metrics["train/lr"] = step_lr
                    metrics["train/samples_per_second"] = interval_samples / max(elapsed, 1e-9)
                    metrics["train/samples_seen"] = self.samples_seen
                    metrics["data/skipped_samples"] = self._skipped_total()
                    self._log(metrics)
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{metrics['train/loss']:.4f}",
                            lr=f"{metrics['train/lr']:.2e}",
                            samples_s=f"{metrics['train/samples_per_second']:.1f}",
                        )
                    interval, interval_counts, interval_samples = {}, {}, 0
                    interval_start = time.perf_counter()
                    if not math.isfinite(metrics["train/loss"]):
                        raise FloatingPointError(f"loss is {metrics['train/loss']} at step {self.step}")

                stop = self._should_stop()
                if not stop and tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                    eval_metrics = self.evaluate()
                    stop = self._should_stop()  # a signal during evaluation abandons it
                if stop:
                    if progress is not None:
                        progress.close()
                        progress = None
                    logger.warning("received %s: checkpointing step %d and exiting", self.stopped_by, self.step)
                    self.save()
                    return {}
                if self.step % tc.checkpoint_every == 0 and self.step < tc.max_steps:
                    self.save()
            if progress is not None:
                progress.close()
                progress = None
            self.save()
            eval_metrics = self.evaluate()
            return eval_metrics
        finally:
            if progress is not None:
                progress.close()
            for sig, handler in previous_handlers:
                # After a stop request the process is about to exit: a repeated (or, on a rank that
                # stopped because another one did, a late) signal must not kill it while it shuts
                # down. SIG_IGN, unlike a Python handler, survives the interpreter's finalisation.
                signal.signal(sig, handler if self.stopped_by is None else signal.SIG_IGN)
            self._close_logs()
            for stream in self.streams.values():
                # Workers left running would outlive fit() in a script that keeps the Trainer.
                stream.close()

    def _should_stop(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.stopped_by is not None
        # Every rank must stop at the same step, so the flag is shared (one tiny all-reduce per step).
        requested = torch.tensor(float(self.stopped_by is not None), device=self.accelerator.device)
        if self.accelerator.reduce(requested, reduction="sum").item() == 0:
            return False
        self.stopped_by = self.stopped_by or "a stop signal on another rank"
        return True

    def _reduce_interval(self, interval: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
        """Each key's mean over the steps that logged it, averaged over ranks (who all log the same keys)."""
        keys = sorted(interval)
        if not keys:
            return {}
        stacked = torch.stack([torch.as_tensor(interval[k], device=self.accelerator.device).float() for k in keys])
        stacked = stacked / torch.tensor([float(counts[k]) for k in keys], device=stacked.device)
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(keys, stacked.tolist(), strict=True))

    def _skipped_total(self) -> int:
        """Distinct samples skipped so far by every stream of every rank (a collective: all ranks call it)."""
        uncounted = self._exchange_skipped()
        return sum(len(stream.skipped_ids) + uncounted[name] for name, stream in self.streams.items())

    def _exchange_skipped(self) -> dict[str, int]:
        """Merge every rank's new skipped ids into each rank's streams; return the id-less skips per stream."""
        streams = self.streams
        uncounted = {name: stream.skipped_uncounted for name, stream in streams.items()}
        if self.accelerator.num_processes > 1:
            for rank_new in gather_object([{name: s.new_skipped_ids for name, s in streams.items()}]):
                for name, ids in rank_new.items():
                    streams[name].merge_skipped(ids)
            local = torch.tensor([float(uncounted[name]) for name in streams], device=self.accelerator.device)
            total = self.accelerator.reduce(local, reduction="sum").tolist()
            uncounted = {name: int(n) for name, n in zip(streams, total, strict=True)}
        for stream in streams.values():
            stream.new_skipped_ids = []
        return uncounted


def train(config: Config, output_dir: str | Path | None = None, resume: bool = False) -> dict[str, float]:
    """Build a :class:`Trainer` and run it; returns the final evaluation metrics."""
    return Trainer(config, output_dir=output_dir, resume=resume).fit()
