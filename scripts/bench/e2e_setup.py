"""The end-to-end benchmark's configuration, corpus and job spec (``scripts/bench/e2e.py``).

Both sides read the one job spec that :func:`fabric_job_toml` writes: the fabric runs it, and the
baseline takes its tokenizer, image geometry, buckets, cost model, sources and mixture from it,
so the two do the same work per sample and are judged by the same cost model.

The corpus is the demo corpus (``fabricd.corpus.make_dataset``: captions, interleaved, longdocs,
code, ocr; its byte-level BPE tokenizer; native-resolution images), made once under
``.demo/bench/corpus`` and reused. The source sweep repeats the five sources under new names,
each copy with its own files (``replicas/<name>_<k>/``), so 35 sources are 35 sets of files.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fabricd.config import DEFAULT_MAX_DELAY_STEPS, JobSpec, parse_job_spec
from fabricd.corpus import SOURCES, make_dataset, tokenizer_paths
from fabricd.job import job_tokenizer, open_sources, source_units, transform_spec
from fabricd.planner import CostModel, SourceUnits
from fabricd.sources.transform import SampleLoader

__all__ = ["ROOT", "DEMO_JOB", "MAX_DELAY_STEPS", "BenchConfig", "BenchSource", "ensure_corpus", "bench_sources", "fabric_job_toml",
           "job_spec", "job_units", "job_cost", "heaviest_source", "shifted_weights"]

ROOT = Path(__file__).resolve().parents[2]
DEMO_JOB = ROOT / "config" / "jobs" / "demo.toml"
JOB_NAME = "e2e"
#: the fabric's composition window - 1 (both the live runs' and the simulation's): the spec default
MAX_DELAY_STEPS = DEFAULT_MAX_DELAY_STEPS


def _demo_tables() -> dict:
    return tomllib.loads(DEMO_JOB.read_text())


@dataclass(frozen=True)
class BenchConfig:
    """One configuration both sides run. ``rank_tokens``: tokens per DP rank per step (the
    baseline's packing budget, the fabric's micro-batch budget and the context of the long
    bucket); the fabric's global batch is matched to the baseline's mean tokens per step."""

    ranks: int = 8                 # simulated DP ranks on this host
    workers: int = 4               # baseline: DataLoader workers per rank
    prefetch_factor: int = 2       # baseline: batches each worker prepares ahead
    rank_tokens: int = 8192
    sources: int = 5               # 5 demo sources, or a multiple: the demo sources repeated
    seed: int = 20261123
    loader_workers: int = 1        # fabric: base source-loader pool per source (the node default)
    ranks_per_constructor: int = 8
    shift_fraction: float = 0.5    # share of every other source's weight moved to the heavy source
    compression: str = ""          # fabric: batch compression ("": the demo job's, auto)
    local_ipc: bool = True         # fabric: same-node links over private Unix sockets (the default)
    fabric_nice: int = 0           # fabric: the daemon's niceness (0: as the trainers; the packaged unit's is 5)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class BenchSource:
    name: str
    base: str      # the demo source it copies
    path: Path
    weight: float  # in the base mixture (the demo job's last point, split evenly over copies)


@dataclass(frozen=True)
class Mixture:
    """The base weights and, from ``shift_step`` on, the shifted ones (None: no shift)."""

    base: dict[str, float]
    shifted: dict[str, float] | None = None
    shift_step: int | None = None
    heavy: str | None = None
    notes: dict = field(default_factory=dict)


def ensure_corpus(corpus: Path, samples: int, seed: int = 7) -> Path:
    """The demo corpus at ``corpus`` (made once: ``samples`` per source, no corrupt samples)."""
    marker = corpus / ".bench-complete"
    want = f"{samples} {seed}\n"
    if marker.exists() and marker.read_text() == want and tokenizer_paths(corpus)["hf"].is_file():
        return corpus
    print(f"generating the demo corpus ({samples} samples per source) in {corpus} ...", flush=True)
    started = time.monotonic()
    shutil.rmtree(corpus, ignore_errors=True)
    make_dataset(corpus, samples, seed, corrupt_fraction=0.0, progress=False, workers=None)
    marker.write_text(want)
    print(f"corpus ready in {time.monotonic() - started:.0f}s", flush=True)
    return corpus


def bench_sources(corpus: Path, count: int) -> list[BenchSource]:
    """``count`` sources (a multiple of 5): the demo sources, then copies ``<name>_<k>`` with their
    own files (their indexes copied along, so nothing is re-indexed). Weights: the demo job's
    final mixture point, each source's weight split evenly over its copies."""
    if count < len(SOURCES) or count % len(SOURCES):
        raise ValueError(f"sources = {count}: need a multiple of {len(SOURCES)}")
    copies = count // len(SOURCES)
    weights = dict(_demo_tables()["mixture"]["points"][-1]["weights"])
    out = []
    for k in range(copies):
        for base in SOURCES:
            if k == 0:
                name, path = base, corpus / base
            else:
                name, path = f"{base}_{k}", corpus / "replicas" / f"{base}_{k}"
                if not (path / ".complete").exists():
                    shutil.rmtree(path, ignore_errors=True)
                    shutil.copytree(corpus / base, path)  # copy2: same sizes and mtimes, so the index holds
                    (path / ".complete").write_text("")
            out.append(BenchSource(name, base, path, weights[base] / copies))
    return out


def shifted_weights(sources: list[BenchSource], heavy: str, fraction: float) -> dict[str, float]:
    """The mixture after the shift: ``fraction`` of every other source's weight moves to the
    copies of ``heavy`` (in proportion to their weights)."""
    moved = sum(s.weight * fraction for s in sources if s.base != heavy)
    heavy_total = sum(s.weight for s in sources if s.base == heavy)
    return {s.name: s.weight * (1 - fraction) if s.base != heavy else s.weight * (1 + moved / heavy_total)
            for s in sources}


def fabric_job_toml(cfg: BenchConfig, corpus: Path, sources: list[BenchSource], mixture: Mixture,
                    tokens_per_step: int | None = None) -> str:
    """THE job spec of a run (both sides read it). Everything but the topology, the batch, the
    long bucket's context and the mixture is the demo job's (``config/jobs/demo.toml``):
    tokenizer, native images, cost model, balance method, buckets' policies, autoscale.

    The global batch is in tokens, as the baseline's is: ``tokens_per_step`` (the baseline's mean
    tokens per step; default ``ranks × rank_tokens``), with step composition on
    (``compose = "outliers"``, windows of MAX_DELAY_STEPS + 1 steps): what the fabric is for."""
    demo = _demo_tables()
    tokens_per_step = tokens_per_step or cfg.ranks * cfg.rank_tokens
    global_batch = f'tokens_per_step = {tokens_per_step}\ncompose = "outliers"\nmax_delay_steps = {MAX_DELAY_STEPS}'

    images, cost, autoscale = ("".join(f"{k} = {_toml(v)}\n" for k, v in demo[t].items())
                               for t in ("images", "cost", "autoscale"))
    tok = demo["tokenizer"]
    srcs = "".join(f'[[sources]]\nname = "{s.name}"\npath = "{s.path}"\nbucket = "{"long" if s.base == "longdocs" else "short"}"\n\n'
                   for s in sources)

    def weights(w: dict[str, float]) -> str:
        return "{ " + ", ".join(f"{n} = {v:.6f}" for n, v in w.items()) + " }"

    points = f"[[mixture.points]]\nstep = 0\nweights = {weights(mixture.base)}\n"
    if mixture.shifted is not None:
        points += f"\n[[mixture.points]]\nstep = {mixture.shift_step}\nweights = {weights(mixture.shifted)}\n"
    short = next(b for b in demo["buckets"] if b["name"] == "short")
    return f"""# generated by scripts/bench/e2e.py: the demo job at the benchmark's configuration
[job]
name = "{JOB_NAME}"
seed = {cfg.seed}

[topology]
dp_size = {cfg.ranks}
mp_size = 1
ranks_per_constructor = {min(cfg.ranks_per_constructor, cfg.ranks)}

[batch]
{global_batch}
micro_batch_tokens = {cfg.rank_tokens}
prefetch = {demo["batch"]["prefetch"]}
compression = "{cfg.compression or demo["batch"]["compression"]}"

[tokenizer]
kind = "{tok["kind"]}"
path = "{tokenizer_paths(corpus)["hf"]}"
eos = "{tok["eos"]}"
pad = "{tok["pad"]}"
image = "{tok["image"]}"

[images]
{images}
[cost]
{cost}
[balance]
method = "{demo["balance"]["method"]}"

[[buckets]]
name = "short"
max_seq_len = {min(short["max_seq_len"], cfg.rank_tokens)}
long_samples = "{short["long_samples"]}"

[[buckets]]
name = "long"
max_seq_len = {cfg.rank_tokens}
long_samples = "split"

{srcs}[mixture]
kind = "{"piecewise" if mixture.shifted is not None else "constant"}"

{points}
[autoscale]
{autoscale}"""


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings and numbers are written alike


def job_spec(path: Path) -> JobSpec:
    return parse_job_spec(path.read_text(), path)


def job_cost(spec: JobSpec) -> CostModel:
    c = spec.cost
    return CostModel(attention=c.attention, linear=c.linear, per_image=c.per_image,
                     vision_attention=c.vision_attention, vision_linear=c.vision_linear)


def job_units(spec: JobSpec, indexes: dict | None = None) -> list[SourceUnits]:
    """The planner's units of every source of ``spec`` (from its indexes: ``indexes``, else
    opened, built if needed)."""
    indexes = indexes if indexes is not None else open_sources(spec, tokenizer=job_tokenizer(spec))
    vision = bool(spec.cost.vision_attention or spec.cost.vision_linear)
    out = []
    for s in spec.sources:
        b = spec.bucket(s.bucket)
        out.append(source_units(s.name, indexes[s.name], spec.images, max_seq_len=b.max_seq_len,
                                long_samples=b.long_samples, vision=vision))
    return out


def heaviest_source(spec: JobSpec, units: list[SourceUnits], per_source: int = 24, repeats: int = 3,
                    seed: int = 0) -> tuple[str, dict]:
    """The demo source that costs the most CPU per token to load (read, decode, transform), as
    measured here on ``per_source`` random units of each (the least of ``repeats`` loads: what
    other processes on the machine add is left out), and the measured µs per token."""
    tokenizer = job_tokenizer(spec, parallel=False)
    indexes = open_sources(spec, tokenizer=tokenizer)
    rng = np.random.default_rng(seed)
    us_per_token = {}
    for s, u in zip(spec.sources, units):
        if s.name not in SOURCES:
            continue
        loader = SampleLoader(indexes[s.name], transform_spec(spec, s.name), tokenizer=tokenizer)
        pick = rng.integers(0, len(u), per_source)
        loader.load(u.sample_id[pick], u.piece[pick])  # open the files, fill the cache
        took = []
        for _ in range(repeats):
            t0 = time.process_time()
            loader.load(u.sample_id[pick], u.piece[pick])
            took.append(time.process_time() - t0)
        us_per_token[s.name] = round(min(took) / max(1, int(u.tokens[pick].sum())) * 1e6, 2)
        loader.close()
    return max(us_per_token, key=us_per_token.get), us_per_token
