#!/usr/bin/env python3
"""A real PyTorch training loop fed by ``fabric_client.Loader``, and a bitwise resume check.

A small decoder-only transformer (token embedding, RoPE indexed by the batch's ``position_ids``,
pre-norm blocks) trains on the fabric's packed micro-batches. Attention stays inside each packed
sequence, by ``cu_seqlens``: varlen flash attention on a GPU when ``flash_attn`` is importable,
else ``scaled_dot_product_attention`` under a block-diagonal causal mask. One job step is several
micro-batches per rank: their gradients accumulate (summed losses), are divided by the step's
number of target tokens, and then the optimizer steps once, so the accumulation is exact.

Usage::

    # train on a fabric the script starts itself (one local daemon, a small generated corpus)
    python scripts/train_example.py --steps 20

    # train K steps, then again to step k, checkpoint, resume in a fresh process, compare:
    # the two loss curves must be bitwise equal (CPU); ends with one JSON line, exit 1 if not
    python scripts/train_example.py --check-resume --steps 8 --resume-at 4

    # train one DP rank against a running fabric (the trainer key from $FABRIC_KEY), checkpoint
    # every 100 steps, and later resume from the checkpoint
    python scripts/train_example.py --address tcp://node-a:7700 --job vlm-pretrain \\
        --dp-rank 0 --dp-size 8 --steps 1000 --checkpoint ckpt.pt --save-every 100
    python scripts/train_example.py --address tcp://node-a:7700 --job vlm-pretrain \\
        --dp-rank 0 --dp-size 8 --steps 2000 --resume ckpt.pt --checkpoint ckpt.pt

``--steps`` is the step to stop at (exclusive), not a count: a resumed run continues to it. A
checkpoint (``torch.save``) holds the model, optimizer, scheduler and RNG states, the loss curve so
far and ``loader.state_dict()``. Each rank here trains its own replica: a real job wraps the model
in DistributedDataParallel and all-reduces the step's target count before dividing.

Batches are text-only for this model: image tokens are ordinary ids of the ``image`` token (the
fabric puts ``-100`` labels before them); ``pixel_values`` and any key it does not know are
ignored. The vocabulary size comes from :func:`vocab_size`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fabric_client import FabricBatch, Loader
from fabricd.tokenizer import VOCAB_SIZE

log = logging.getLogger("train_example")

IGNORE_INDEX = -100  # labels the loss skips (fabricd.pack.IGNORE_INDEX; cross_entropy's default)
LOCAL_JOB = "train-example"
#: the keys of a checkpoint file
CKPT_MODEL, CKPT_OPTIMIZER, CKPT_SCHEDULER, CKPT_RNG, CKPT_DATA, CKPT_STEP, CKPT_LOSSES, CKPT_CONFIG = (
    "model", "optimizer", "scheduler", "rng", "data", "step", "losses", "config")

try:  # varlen flash attention, on a GPU only
    from flash_attn import flash_attn_varlen_func
    _FLASH_DETERMINISTIC = "deterministic" in inspect.signature(flash_attn_varlen_func).parameters
except ImportError:
    flash_attn_varlen_func = None
    _FLASH_DETERMINISTIC = False


# ---------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int = 64
    layers: int = 2
    heads: int = 2
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim = {self.dim}, heads = {self.heads}: the head width must be even and divide dim")


class SequenceAttention:
    """Causal attention that stays inside each packed sequence (given by ``cu_seqlens``).

    ``flash=True``: ``flash_attn_varlen_func`` (CUDA, bf16/fp16). Otherwise
    ``scaled_dot_product_attention`` under a block-diagonal causal mask built once per batch.
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int, *, flash: bool) -> None:
        self.flash = flash
        self.cu_seqlens = cu_seqlens
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        self.max_seqlen = int(lengths.max()) if lengths.numel() else 0
        self.mask: torch.Tensor | None = None
        if not flash:
            segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
            if segment.numel() != total:
                raise ValueError(f"cu_seqlens covers {segment.numel()} tokens, the batch has {total}")
            pos = torch.arange(total, device=cu_seqlens.device)
            self.mask = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q, k, v``: ``[T, heads, head_dim]`` → ``[T, heads, head_dim]``."""
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast, RoPE's float32 tables promote q and k
        if self.flash:
            extra = {"deterministic": True} if _FLASH_DETERMINISTIC else {}
            return flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.cu_seqlens,
                                          self.max_seqlen, self.max_seqlen, causal=True, **extra)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=self.mask)
        return out.transpose(0, 1)


def rotary(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, 1, head_dim/2]`` of each token's position within its own sequence."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim, bias=False), nn.GELU(),
                                 nn.Linear(4 * cfg.dim, cfg.dim, bias=False))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: SequenceAttention) -> torch.Tensor:
        q, k, v = self.qkv(self.attn_norm(x)).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        a = attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        x = x + self.proj(a.reshape(x.shape[0], -1))
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    """Decoder-only transformer over one packed sequence of ``T`` tokens (no batch dimension)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: SequenceAttention) -> torch.Tensor:
        cos, sin = rotary(position_ids, self.cfg.dim // self.cfg.heads, self.cfg.rope_base)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, attend)
        return self.head(self.norm(x))  # logits [T, vocab]


# ---------------------------------------------------------------------------------------- config


def vocab_size(args: argparse.Namespace) -> int:
    """The model's vocabulary size: ``--vocab-size`` if given, else that of ``--tokenizer`` (a
    Hugging Face ``tokenizer.json``), else the fabric's byte-level tokenizer's ``VOCAB_SIZE``."""
    if args.vocab_size:
        return args.vocab_size
    if args.tokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # read the file itself: the largest id, added tokens included, + 1
            spec = json.loads(Path(args.tokenizer).read_text())
            ids = [*spec.get("model", {}).get("vocab", {}).values(), *(t["id"] for t in spec.get("added_tokens", []))]
            if not ids or not all(isinstance(i, int) for i in ids):
                raise SystemExit(f"--tokenizer {args.tokenizer}: no integer vocabulary in model.vocab")
            return max(ids) + 1
        return Tokenizer.from_file(str(args.tokenizer)).get_vocab_size()
    return VOCAB_SIZE


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_deterministic(device: torch.device, threads: int) -> None:
    """Fixed thread count and deterministic kernels: the same inputs give the same bits."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    # on CUDA a kernel without a deterministic version warns instead of failing the run
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


# ---------------------------------------------------------------------------------------- training


@dataclass
class Trainer:
    """Model, optimizer and scheduler of one run, restorable from a checkpoint."""

    args: argparse.Namespace
    device: torch.device
    config: ModelConfig = field(init=False)
    model: TinyDecoder = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    step: int = 0                                      # the next step to train
    losses: list[float] = field(default_factory=list)  # losses[s]: the mean loss of step s

    def __post_init__(self) -> None:
        a = self.args
        torch.manual_seed(a.seed)
        self.config = ModelConfig(vocab_size=vocab_size(a), dim=a.dim, layers=a.layers, heads=a.heads)
        self.model = TinyDecoder(self.config).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=a.lr, weight_decay=0.01)
        warmup = max(1, a.warmup)  # warmup then constant: the schedule does not depend on --steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.flash = self.device.type == "cuda" and flash_attn_varlen_func is not None
        log.info("model: %s, %d parameters, on %s, attention: %s", self.config,
                 sum(p.numel() for p in self.model.parameters()), self.device,
                 "flash_attn varlen" if self.flash else "SDPA, block-diagonal causal mask")

    # -------------------------------------------------------------------------- checkpoints

    def save(self, path: Path, loader: Loader) -> None:
        """Write a checkpoint at a step boundary (atomically: a crash leaves the old one)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {CKPT_MODEL: self.model.state_dict(), CKPT_OPTIMIZER: self.optimizer.state_dict(),
                 CKPT_SCHEDULER: self.scheduler.state_dict(), CKPT_RNG: rng, CKPT_DATA: loader.state_dict(),
                 CKPT_STEP: self.step, CKPT_LOSSES: list(self.losses), CKPT_CONFIG: vars(self.config)}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        log.info("checkpoint at step %d: %s", self.step, path)

    def load(self, path: Path, loader: Loader) -> None:
        """Restore everything :meth:`save` wrote; the loader continues from the saved cursor."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state[CKPT_CONFIG] != vars(self.config):
            raise SystemExit(f"{path}: model {state[CKPT_CONFIG]} != this run's {vars(self.config)}")
        self.model.load_state_dict(state[CKPT_MODEL])
        self.optimizer.load_state_dict(state[CKPT_OPTIMIZER])
        self.scheduler.load_state_dict(state[CKPT_SCHEDULER])
        torch.set_rng_state(state[CKPT_RNG]["torch"])
        if "cuda" in state[CKPT_RNG] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state[CKPT_RNG]["cuda"])
        self.step, self.losses = state[CKPT_STEP], list(state[CKPT_LOSSES])
        loader.load_state_dict(state[CKPT_DATA])
        log.info("resumed from %s at step %d (data cursor %s)", path, self.step, state[CKPT_DATA])

    # -------------------------------------------------------------------------- the loop

    def micro_step(self, batch: FabricBatch) -> tuple[torch.Tensor, int, int]:
        """Forward and backward of one micro-batch with the *summed* loss; returns
        ``(summed loss, target tokens, tokens)``. Only the text keys are read."""
        ids = batch["input_ids"]
        tokens = int(ids.shape[0])
        if tokens == 0:  # an empty micro-batch is legal: nothing to learn from
            return torch.zeros((), device=self.device), 0, 0
        ids = ids.to(self.device, torch.long)
        labels = batch["labels"].to(self.device, torch.long)
        if int(ids.max()) >= self.config.vocab_size:
            raise SystemExit(f"step {batch.step}: token id {int(ids.max())} >= vocab size {self.config.vocab_size}; "
                             "pass the job's tokenizer (--tokenizer) or --vocab-size")
        attend = SequenceAttention(batch["cu_seqlens"].to(self.device, torch.int32), tokens, flash=self.flash)
        with (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
              else contextlib.nullcontext()):  # float32 on CPU
            logits = self.model(ids, batch["position_ids"].to(self.device), attend)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        return loss.detach(), int((labels != IGNORE_INDEX).sum()), tokens

    def finish_step(self, loss_sum: torch.Tensor, targets: int) -> float:
        """Divide the accumulated gradients by the step's target count, clip, step once."""
        if targets > 0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(targets)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum / targets) if targets else 0.0

    def train(self, loader: Loader, checkpoint: Path | None = None, save_every: int = 0) -> tuple[int, float]:
        """Train until the loader stops (at ``--steps``); returns ``(tokens, seconds)``."""
        tokens, started = 0, time.perf_counter()
        loss_sum, targets, expect = torch.zeros((), device=self.device), 0, (self.step, 0)
        for batch in loader:
            if (batch.step, batch.micro_batch) != expect:  # the loader promises strict order
                raise RuntimeError(f"got step {batch.step} micro {batch.micro_batch}, expected {expect}")
            loss, n_targets, n_tokens = self.micro_step(batch)
            loss_sum, targets, tokens = loss_sum + loss, targets + n_targets, tokens + n_tokens
            if batch.micro_batch + 1 < batch.num_micro_batches:
                expect = (batch.step, batch.micro_batch + 1)
                continue
            self.losses.append(self.finish_step(loss_sum, targets))
            log.info("step %d: loss %.4f (%d micro-batches, %d targets)", self.step, self.losses[-1],
                     batch.num_micro_batches, targets)
            self.step += 1
            loss_sum, targets, expect = torch.zeros((), device=self.device), 0, (self.step, 0)
            if checkpoint is not None and save_every and self.step % save_every == 0:
                self.save(checkpoint, loader)
        if self.step < self.args.steps:
            raise RuntimeError(f"the loader stopped at step {self.step}, before --steps {self.args.steps}")
        if checkpoint is not None:
            self.save(checkpoint, loader)
        return tokens, time.perf_counter() - started


def first_difference(a: Sequence[float], b: Sequence[float]) -> int | None:
    """Index of the first step whose losses differ bitwise (their ``float.hex``), or the shorter
    length when one curve is a prefix of the other; ``None`` when the curves are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if float(x).hex() != float(y).hex():
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args: argparse.Namespace, address: str | list[str], job: str, keys=None) -> tuple[Trainer, int, float]:
    """One training run with fresh objects: resume if ``--resume``, train to ``--steps``."""
    device = pick_device(args.device)
    make_deterministic(device, args.threads)
    trainer = Trainer(args, device)
    with Loader(address, job=job, dp_rank=args.dp_rank, dp_size=args.dp_size, torch=True,
                max_steps=args.steps, deadline_s=args.deadline_s, keys=keys) as loader:
        if args.resume:
            trainer.load(Path(args.resume), loader)
        tokens, seconds = trainer.train(loader, Path(args.checkpoint) if args.checkpoint else None, args.save_every)
    return trainer, tokens, seconds


# ---------------------------------------------------------------------------------------- local fabric


def job_spec(corpus: Path, *, seed: int, samples_per_step: int, micro_batch_tokens: int) -> str:
    """A small job over the generated corpus: captions and interleaved documents (with images),
    code and long documents (split into context-sized pieces); one rank."""
    sources = ("captions", "interleaved", "code", "longdocs")
    tables = "".join(f'[[sources]]\nname = "{s}"\npath = "{corpus / s}"\n\n' for s in sources)
    return f"""[job]
name = "{LOCAL_JOB}"
seed = {seed}
[topology]
dp_size = 1
ranks_per_constructor = 1
[batch]
samples_per_step = {samples_per_step}
micro_batch_tokens = {micro_batch_tokens}
prefetch = 4
[tokenizer]
kind = "hf"
path = "{corpus / 'tokenizer' / 'tokenizer.json'}"
[images]
mode = "fixed"
image_tokens = 16
image_size = 32
[[buckets]]
name = "ctx"
max_seq_len = {micro_batch_tokens // 2}
long_samples = "split"
{tables}[mixture]
[[mixture.points]]
step = 0
weights = {{ captions = 0.25, interleaved = 0.25, code = 0.25, longdocs = 0.25 }}
"""


@contextlib.contextmanager
def local_fabric(args: argparse.Namespace) -> Iterator[tuple[str, str, object, dict[str, str]]]:
    """Generate a corpus, start one daemon, submit the job; yields ``(address, job, trainer
    keys, environment for a trainer subprocess)``. Stops the daemon and every process it started,
    and removes the temporary directory, on the way out (Ctrl-C included)."""
    from fabric_client import protocol
    from fabricd.corpus import make_dataset
    from fabricd.localnode import LocalDaemon

    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fabric-train-")))
        corpus = workdir / "corpus"
        if not (corpus / ".complete").exists():
            log.info("generating a corpus of %d samples per source in %s", args.samples, corpus)
            make_dataset(corpus, args.samples, seed=args.seed, progress=False, overwrite=True)
            (corpus / ".complete").write_text("")
        if args.tokenizer is None and args.vocab_size is None:
            args.tokenizer = str(corpus / "tokenizer" / "tokenizer.json")  # the job's: its BPE
        daemon = LocalDaemon(workdir / "node", node_id="train", data_roots=[corpus], log_level="WARNING")
        stack.callback(daemon.stop)
        daemon.start()
        spec = job_spec(corpus, seed=args.seed, samples_per_step=args.samples_per_step,
                        micro_batch_tokens=args.micro_batch_tokens)
        with daemon.client() as client:
            client.request(protocol.SubmitJob(spec_toml=spec, spec_path=str(workdir / "job.toml")))
        deadline = time.monotonic() + 120
        while not (state := daemon.status()["jobs"].get(LOCAL_JOB, {})).get("serving"):
            if state.get("state") == "failed" or time.monotonic() > deadline:
                raise SystemExit(f"job {LOCAL_JOB} not served: {state.get('error') or state.get('state')}; "
                                 f"see {daemon.log_path}")
            time.sleep(0.1)
        log.info("fabric up at %s (log %s)", daemon.address, daemon.log_path)
        yield daemon.address, LOCAL_JOB, daemon.trainer_keys, daemon.client_env()


# ---------------------------------------------------------------------------------------- check-resume


def resumed_run(args: argparse.Namespace, address: str | list[str], job: str, env: dict[str, str],
                checkpoint: Path, curve_file: Path) -> list[float]:
    """The script itself, in a fresh process: resume from ``checkpoint`` and train to ``--steps``;
    returns its loss curve (every step, those before the checkpoint included)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--address", ",".join([address] if isinstance(address, str)
                                                                                else address),
           "--job", job, "--dp-rank", str(args.dp_rank), "--dp-size", str(args.dp_size), "--steps", str(args.steps),
           "--resume", str(checkpoint), "--curve-out", str(curve_file), *model_flags(args)]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        if proc.wait() != 0:
            raise SystemExit(f"the resumed run failed (exit {proc.returncode}): {' '.join(cmd)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [float.fromhex(x) for x in json.loads(curve_file.read_text())]


def model_flags(args: argparse.Namespace) -> list[str]:
    """The flags that fix the model, the optimizer and the arithmetic: a resumed run needs the same."""
    flags = ["--seed", args.seed, "--dim", args.dim, "--layers", args.layers, "--heads", args.heads, "--lr", args.lr,
             "--warmup", args.warmup, "--clip", args.clip, "--threads", args.threads, "--device", args.device,
             "--deadline-s", args.deadline_s, "--vocab-size", vocab_size(args)]
    return [str(f) for f in flags]


def check_resume(args: argparse.Namespace, address, job: str, keys, env: dict[str, str]) -> dict:
    k = args.steps // 2 if args.resume_at is None else args.resume_at
    if not 0 < k < args.steps:
        raise SystemExit(f"--resume-at {k}: must be in [1, --steps - 1 = {args.steps - 1}]")
    with tempfile.TemporaryDirectory(prefix="fabric-resume-") as tmp:
        log.info("run 1: steps 0..%d uninterrupted", args.steps)
        whole, tokens, seconds = run(args, address, job, keys)
        log.info("run 2: steps 0..%d, checkpoint", k)
        ckpt = Path(tmp) / "ckpt.pt"
        run(argparse.Namespace(**{**vars(args), "steps": k, "checkpoint": str(ckpt), "save_every": 0}),
            address, job, keys)
        log.info("run 2: resume at %d in a new process, steps %d..%d", k, k, args.steps)
        resumed = resumed_run(args, address, job, env, ckpt, Path(tmp) / "curve.json")
    diff = first_difference(whole.losses, resumed)
    if diff is not None:
        log.error("the loss curves differ from step %d: %s (uninterrupted) vs %s (resumed)", diff,
                  [float(x).hex() for x in whole.losses[diff:diff + 1]], [x.hex() for x in resumed[diff:diff + 1]])
    return {"steps": args.steps, "resumed_at": k, "identical": diff is None,
            "tokens_per_s": round(tokens / seconds, 1), "first_loss": whole.losses[0], "last_loss": whole.losses[-1],
            "vocab_size": vocab_size(args), **({} if diff is None else {"first_difference": diff})}


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="train until this step (exclusive; default 8)")
    ap.add_argument("--check-resume", action="store_true",
                    help="train --steps uninterrupted, then to --resume-at, checkpoint, resume in a new process; "
                         "compare the loss curves bitwise")
    ap.add_argument("--resume-at", type=int, default=None, help="checkpoint step of --check-resume (default steps//2)")
    ap.add_argument("--resume", default=None, help="checkpoint to resume from")
    ap.add_argument("--checkpoint", default=None, help="write a checkpoint here at the end (and every --save-every)")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--curve-out", default=None, help="write the loss curve here (JSON list of float.hex)")
    fab = ap.add_argument_group("an existing fabric (default: start one local daemon with a small job)")
    fab.add_argument("--address", default=None, help="daemon endpoint(s), comma-separated")
    fab.add_argument("--job", default=None)
    fab.add_argument("--dp-rank", type=int, default=0)
    fab.add_argument("--dp-size", type=int, default=1)
    fab.add_argument("--deadline-s", type=float, default=120.0, help="the loader gives up after this much silence")
    local = ap.add_argument_group("the local fabric")
    local.add_argument("--samples", type=int, default=200, help="generated samples per source (default 200)")
    local.add_argument("--samples-per-step", type=int, default=8)
    local.add_argument("--micro-batch-tokens", type=int, default=2048)
    local.add_argument("--workdir", default=None, help="keep the corpus and daemon files here (default: a temp dir)")
    model = ap.add_argument_group("model and optimizer")
    model.add_argument("--tokenizer", default=None, help="the job's tokenizer.json: the vocabulary size comes from it")
    model.add_argument("--vocab-size", type=int, default=None, help=f"default: --tokenizer's, else {VOCAB_SIZE}")
    model.add_argument("--dim", type=int, default=64)
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--heads", type=int, default=2)
    model.add_argument("--lr", type=float, default=3e-3)
    model.add_argument("--warmup", type=int, default=2, help="linear warmup steps, then a constant rate")
    model.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    model.add_argument("--seed", type=int, default=0, help="model init (and the local job's data) seed")
    model.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: bitwise reproducible)")
    model.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    args = ap.parse_args(argv)
    if (args.address is None) != (args.job is None):
        ap.error("--address and --job go together")
    if args.address is None and (args.dp_size != 1 or args.dp_rank != 0):
        ap.error("the local fabric serves one rank: --dp-rank/--dp-size need --address")
    if args.steps < 1 or args.save_every < 0 or args.threads < 1:
        ap.error(f"--steps {args.steps}, --save-every {args.save_every}, --threads {args.threads}: out of range")
    if args.check_resume and (args.resume or args.checkpoint):
        ap.error("--check-resume makes its own checkpoint: no --resume or --checkpoint")
    return args


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="train_example: %(message)s")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # finally-blocks stop what we started
    try:
        result = _main(args)
    except KeyboardInterrupt as e:
        log.error("interrupted (%s); everything this run started is stopped", str(e) or "Ctrl-C")
        return 130
    print(json.dumps(result), flush=True)
    return 0 if result.get("identical", True) else 1


def _main(args: argparse.Namespace) -> dict:
    with contextlib.ExitStack() as stack:
        if args.address is None:
            address, job, keys, env = stack.enter_context(local_fabric(args))
        else:
            address, job, keys, env = args.address.split(","), args.job, None, {}
        if args.check_resume:
            result = check_resume(args, address, job, keys, env)
        else:
            trainer, tokens, seconds = run(args, address, job, keys)
            if args.curve_out:
                Path(args.curve_out).write_text(json.dumps([float(x).hex() for x in trainer.losses]))
            result = {"steps": trainer.step, "tokens_per_s": round(tokens / seconds, 1),
                      "last_loss": trainer.losses[-1] if trainer.losses else None}
    return result


if __name__ == "__main__":
    sys.exit(main())
