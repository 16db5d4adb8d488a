"""Training recipe for next-layer expert predictors: config, trace selection, fit and save.

A recipe is a frozen :class:`PredictorsConfig`; TOML files in ``training/configs/
predictors-*.toml`` only change its defaults, and ``--key=value`` overrides are checked
against it (unknown key or wrong type → one-line :class:`ExpertPredError`).

Splits are by prompt, never by token: every sequence belongs to the split its prompt has in
the prompt file (the dataset's ``split`` column); cross-domain runs train on one domain and
test on the other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureConfig, ModelInfo, build_features
from ..predictors import Predictor, available, make_predictor
from ..predictors.base import load_all, model_path  # noqa: F401 - load_all: re-exported
from ..predictors.nextuse import NextUseConfig, NextUseModel
from ..trace.record import Phase, SequenceTrace
from . import config

log = logging.getLogger(__name__)

LADDER = ("random", "popularity", "transition", "previous-token", "previous-token+transition",
          "gate-lookahead", "lightgbm", "mlp", "fast-mlp", "oracle")


@dataclass(frozen=True)
class PredictorsConfig:
    """Everything a train / evaluate run depends on; the defaults are the reference recipe."""

    # --- data
    dataset: str = ""  # trace dataset directory; "" = synthetic traces (development only)
    gguf: str = ""  # model file for gate-lookahead and cache sizes; "" = manifest's model path
    synthetic_seqs: int = 120  # sequences of the synthetic trace set when dataset = ""
    train_phase: str = "all"  # tokens to train on: "all" or "decode"
    eval_phase: str = "decode"  # tokens to score: "decode" (what prefetch serves) or "all"
    # --- predictors
    predictors: tuple[str, ...] = LADDER
    offsets: tuple[int, ...] = (1, 2, 3, 4)  # target layer offsets d
    history_decay: float = 0.5  # decay of the earlier-tokens history feature
    max_train_rows: int = 200_000  # uniform sample of training rows per offset (memory bound)
    seed: int = 0
    # --- learned models
    lgb_shared: bool = False  # per layer measured better (+0.8..1.2 pt recall, same time)
    lgb_rounds: int = 40
    lgb_leaves: int = 15
    lgb_max_rows: int = 60_000
    lgb_use_hidden: bool = False  # raw hidden columns too (+0.5 pt d=1 recall, ~3x fit time)
    mlp_hidden: int = 128  # 256 / 12 epochs: +0.4..0.8 pt recall for ~3x the time
    mlp_epochs: int = 8
    mlp_lr: float = 2e-3
    mlp_loss: str = "bce"  # "bce" or "softmax"
    mlp_use_hidden: bool = True
    mlp_max_rows: int = 200_000  # uniform sample of the MLP's training rows (memory bound)
    fast_mlp_hidden: int = 256  # the default online predictor: width of its hidden layers
    fast_mlp_layers: int = 1  # 1 or 2 hidden layers (each adds one gemv per online step)
    fast_mlp_epochs: int = 20
    # the plugin does not capture router inputs online, so the online predictor must not
    # read them (hidden columns or gate look-ahead scores): it could not run there
    fast_mlp_use_hidden: bool = False
    gate_features: bool = True  # learned models also get gate look-ahead scores (needs GGUF)
    # --- evaluation
    cross_domain: bool = True  # also train code → test prose and prose → code
    cache_budgets: tuple[float, ...] = (0.10, 0.25, 0.50)  # share of all expert bytes
    cache_predictor: str = "lightgbm"  # whose top-k the predictive cache prefetches
    cache_depth: int = 1  # prefetch layers l+1 .. l+cache_depth
    cache_prefetch_k: int = 0  # experts prefetched per layer; 0 = n_expert_used
    residency_horizon: int = 1  # next-use model target: used within this many tokens (the
    # learned residency policy's bytes per token were lowest at 1 on both shipped traces)
    residency_phase: str = "decode"  # the next-use model learns from the train split's
    # tokens of this phase, one stream in order (like the evaluated stream): decode repeats
    # itself more than prompts do, and the reuse head's copy feature lives on that
    residency_reuse_hidden: int = 0  # > 0: the reuse head adds a residual MLP of this width
    # (numpy inference; 32 read 1-3 % fewer bytes than ridge alone on all three shipped
    # traces at ~2x the fit time: docs/residency.md)
    residency_reuse_epochs: int = 4  # epochs of that MLP
    residency_max_rows: int = 1_000_000  # (token, layer, expert) rows the next-use model's
    # logistic fits on: a uniform sample of them, chosen by per-row keys
    plots: bool = True
    out: str = "runs/predictors"  # models/, report.json and plots land here

    def __post_init__(self) -> None:
        for name in ("train_phase", "eval_phase", "residency_phase"):
            if getattr(self, name) not in ("all", "decode"):
                raise ExpertPredError(f"config {name}={getattr(self, name)!r}: expected "
                                      "'all' or 'decode'")
        known = available()
        for p in (*self.predictors, self.cache_predictor):
            if p not in known:
                raise ExpertPredError(f"config: unknown predictor {p!r}; known: "
                                      f"{', '.join(known)}")
        if not self.offsets or min(self.offsets) < 1:
            raise ExpertPredError(f"config offsets={list(self.offsets)}: expected d >= 1")
        if self.residency_max_rows < 1:
            raise ExpertPredError(f"config residency_max_rows={self.residency_max_rows}: "
                                  "expected >= 1")
        if self.residency_horizon < 1:
            raise ExpertPredError(f"config residency_horizon={self.residency_horizon}: "
                                  "expected >= 1 token")
        for b in self.cache_budgets:
            if not 0 < b <= 1:
                raise ExpertPredError(f"config cache_budgets: {b} is not a share in (0, 1]")


# --- config loading ---------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Sequence[str] = ()) -> PredictorsConfig:
    """Defaults ← TOML file ← ``--key=value`` overrides, each checked against the dataclass."""
    return config.load_config(PredictorsConfig, None if path is None else Path(path), overrides)


def config_dict(cfg: PredictorsConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# --- trace source -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SeqMeta:
    seq_id: int
    prompt_id: str
    domain: str
    split: str


def _hash_split(prompt_id: str) -> str:
    """Fallback split by prompt id (70/15/15) when the dataset has none."""
    r = zlib.crc32(prompt_id.encode()) % 100
    return "train" if r < 70 else "validation" if r < 85 else "test"


@dataclass
class TraceSource:
    """Where sequences come from: a trace dataset directory or the synthetic generator."""

    model: ModelInfo
    meta: list[SeqMeta]
    gguf_path: str = ""
    description: str = ""
    _dataset: Any = None
    _synthetic: list[SequenceTrace] = field(default_factory=list)

    def select(self, split: str | None = None, domain: str | None = None) -> list[int]:
        return [m.seq_id for m in self.meta
                if (split is None or m.split == split) and (domain is None or m.domain == domain)]

    def sequences(self, seq_ids: Sequence[int]) -> Iterator[SequenceTrace]:
        """The selected sequences, streamed (one dataset shard in memory at a time)."""
        want = set(seq_ids)
        if self._dataset is not None:
            yield from self._dataset.sequences(seq_ids=sorted(want))
        else:
            yield from (t for t in self._synthetic if t.seq_id in want)


def phase_value(phase: str) -> int | None:
    """Config phase name → :class:`Phase` value to keep (None = all tokens)."""
    return None if phase == "all" else int(Phase.DECODE)


def open_source(cfg: PredictorsConfig) -> TraceSource:
    """Open the configured trace dataset (or generate synthetic traces)."""
    if not cfg.dataset:
        from ..predictors.synthetic import (
            SyntheticTraceSpec,
            split_of,
            synthetic_model,
            synthetic_traces,
        )

        spec = SyntheticTraceSpec(n_seq=cfg.synthetic_seqs, n_layer=8, n_expert=16,
                                  n_expert_used=2, n_embd=32, seq_len=64, prompt_len=24,
                                  seed=cfg.seed)
        traces = synthetic_traces(spec)
        meta = [SeqMeta(t.seq_id, t.prompt_id, t.domain, split_of(t.seq_id)) for t in traces]
        return TraceSource(model=synthetic_model(spec), meta=meta, gguf_path=cfg.gguf,
                           description=f"synthetic traces ({len(traces)} sequences)",
                           _synthetic=traces)
    from ..trace.dataset import TraceDataset

    ds = TraceDataset(cfg.dataset)
    model = ModelInfo.from_manifest(ds.manifest["model"])
    meta = []
    n_hashed = 0
    for r in ds.sequence_info():
        split = r.get("split")
        if split is None:
            split = _hash_split(str(r["prompt_id"]))
            n_hashed += 1
        meta.append(SeqMeta(int(r["seq_id"]), str(r["prompt_id"]),
                            str(r.get("domain", "unknown")), str(split)))
    if n_hashed:
        log.warning("%s: %d sequences without a split; assigned by prompt-id hash",
                    cfg.dataset, n_hashed)
    gguf = cfg.gguf or str(ds.manifest["model"].get("path", ""))
    if cfg.gguf:
        _check_traced_model(Path(cfg.gguf), ds)
    if gguf and not Path(gguf).is_file():
        log.warning("model file %s not found: gate-lookahead will be skipped", gguf)
        gguf = ""
    return TraceSource(model=model, meta=sorted(meta, key=lambda m: m.seq_id), gguf_path=gguf,
                       description=f"{cfg.dataset} ({len(meta)} sequences)", _dataset=ds)


def _check_traced_model(gguf: Path, ds: Any) -> None:  # ds: trace.dataset.TraceDataset
    """``gguf=`` must be the model the dataset was traced on: gate-lookahead reads its routers
    and the cache simulation sizes experts from its layout."""
    from ..gguf.layout import file_sha256, read_layout

    lay = read_layout(gguf)  # one-line GGUFError for a missing / bad file
    m = ds.model
    got = (lay.arch, lay.n_layer, tuple(lay.moe_layers), lay.n_expert, lay.n_expert_used)
    want = (m.arch, m.n_layer, tuple(m.moe_layers), m.n_expert, m.n_expert_used)
    if got != want:
        raise ExpertPredError(f"gguf={gguf}: {lay.arch}, {lay.n_layer} layers, "
                              f"{lay.n_expert} experts top-{lay.n_expert_used}; the dataset "
                              f"{ds.path} was traced on {m.arch}, {m.n_layer} layers, "
                              f"{m.n_expert} experts top-{m.n_expert_used} ({m.path})")
    sha = file_sha256(gguf)
    if sha != m.sha256:
        raise ExpertPredError(f"gguf={gguf}: sha256 {sha[:12]}…, the dataset {ds.path} was "
                              f"traced on {m.path} (sha256 {m.sha256[:12]}…); expected that "
                              "model file")


# --- fitting ----------------------------------------------------------------------------------

def rung_to_fit(cfg: PredictorsConfig, name: str, gguf_path: str, has_hidden: bool,
                skipped: dict[str, str]) -> Predictor | None:
    """Rung ``name`` built from ``cfg``, or None when it is skipped or cannot be fitted on
    these traces (then ``skipped[name]`` says why). The single-process and the Dask fit
    loops both ask here."""
    if name in skipped:
        return None
    p = make_predictor(name, **predictor_params(cfg, name, gguf_path))
    if p.needs_hidden and not has_hidden:
        skipped[name] = "the traces have no hidden states"
    elif p.name == "gate-lookahead" and not gguf_path:
        skipped[name] = "no model file (set gguf=...)"
    return None if name in skipped else p


def predictor_params(cfg: PredictorsConfig, name: str, gguf_path: str = "") -> dict[str, Any]:
    """Constructor arguments of predictor ``name`` under ``cfg``."""
    if name == "lightgbm":
        return {"shared": cfg.lgb_shared, "n_estimators": cfg.lgb_rounds,
                "num_leaves": cfg.lgb_leaves, "max_rows": cfg.lgb_max_rows, "seed": cfg.seed,
                "use_hidden": cfg.lgb_use_hidden,
                "gguf_path": gguf_path if cfg.gate_features else ""}
    if name == "mlp":
        return {"hidden_size": cfg.mlp_hidden, "epochs": cfg.mlp_epochs, "lr": cfg.mlp_lr,
                "loss": cfg.mlp_loss, "use_hidden": cfg.mlp_use_hidden,
                "max_rows": cfg.mlp_max_rows, "seed": cfg.seed,
                "gguf_path": gguf_path if cfg.gate_features else ""}
    if name == "fast-mlp":
        return {"hidden_size": cfg.fast_mlp_hidden, "n_hidden": cfg.fast_mlp_layers,
                "epochs": cfg.fast_mlp_epochs, "use_hidden": cfg.fast_mlp_use_hidden,
                "seed": cfg.seed,
                "gguf_path": gguf_path if cfg.gate_features and cfg.fast_mlp_use_hidden else ""}
    if name == "gate-lookahead":
        return {"gguf_path": gguf_path}
    if name == "random":
        return {"seed": cfg.seed}
    return {}


@dataclass
class FitResult:
    """Fitted predictors by name and offset, with fit times and the ones skipped (and why)."""

    predictors: dict[str, dict[int, Predictor]] = field(default_factory=dict)
    fit_seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    train_rows: dict[int, int] = field(default_factory=dict)


def fit_all(cfg: PredictorsConfig, source: TraceSource, train_ids: Sequence[int],
            names: Sequence[str] | None = None) -> FitResult:
    """Fit every configured predictor for every offset on the sequences ``train_ids``."""
    names = list(names if names is not None else cfg.predictors)
    res = FitResult()
    if not train_ids:
        raise ExpertPredError("too few examples to train: no training sequences selected")
    for d in cfg.offsets:
        if d >= source.model.n_moe:
            raise ExpertPredError(f"config offsets: d={d} but the model has only "
                                  f"{source.model.n_moe} MoE layers")
        fc = FeatureConfig(d=d, history_decay=cfg.history_decay)
        data = build_features(source.sequences(train_ids), source.model, fc,
                              max_rows=cfg.max_train_rows, seed=cfg.seed,
                              phase=phase_value(cfg.train_phase))
        res.train_rows[d] = len(data)
        for name in names:
            p = rung_to_fit(cfg, name, source.gguf_path, data.hidden is not None, res.skipped)
            if p is None:
                continue
            t0 = time.perf_counter()
            p.fit(data)
            res.fit_seconds.setdefault(name, {})[d] = time.perf_counter() - t0
            res.predictors.setdefault(name, {})[d] = p
            log.info("fitted %s d=%d on %d rows in %.1fs", name, d, len(data),
                     res.fit_seconds[name][d])
    for name, why in res.skipped.items():
        log.warning("skipped predictor %s: %s", name, why)
    return res


def save_all(fitted: FitResult, models_dir: str | os.PathLike[str]) -> list[Path]:
    paths = []
    for name, by_d in fitted.predictors.items():
        for d, p in by_d.items():
            paths.append(p.save(model_path(models_dir, name, d)))
    return paths


def fit_nextuse(cfg: PredictorsConfig, source: TraceSource,
                train_ids: Sequence[int]) -> NextUseModel:
    """The learned residency policy's next-use model, on the same training sequences."""
    return fit_nextuse_on(cfg, source.model, source.sequences(train_ids))


def fit_nextuse_on(cfg: PredictorsConfig, model: ModelInfo,
                   sequences: Iterable[SequenceTrace]) -> NextUseModel:
    """:func:`fit_nextuse` on ``sequences`` in stream order (a Dask worker has no source)."""
    experts, tokens = nextuse_stream(cfg, sequences)
    return NextUseModel(model.n_moe, model.n_expert, nextuse_config(cfg)).fit(
        [experts], [tokens])


def nextuse_config(cfg: PredictorsConfig) -> NextUseConfig:
    return NextUseConfig(horizon=cfg.residency_horizon, history_decay=cfg.history_decay,
                         seed=cfg.seed, reuse_hidden=cfg.residency_reuse_hidden,
                         reuse_epochs=cfg.residency_reuse_epochs,
                         max_rows=cfg.residency_max_rows)


def nextuse_stream(cfg: PredictorsConfig, sequences: Iterable[SequenceTrace],
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(experts (T, L, k), token ids (T,)): the ``residency_phase`` tokens of ``sequences``
    one after another, the one stream the next-use model learns from (a serving process
    keeps its residency across prompts)."""
    keep = phase_value(cfg.residency_phase)
    experts, tokens = [], []
    for t in sequences:
        pos = np.arange(t.n_tokens) if keep is None else np.flatnonzero(t.phase == keep)
        experts.append(t.experts[pos])
        tokens.append(t.tokens[pos])
    return np.concatenate(experts), np.concatenate(tokens)


NEXTUSE_FILE = "nextuse.npz"  # in <out>/models, next to the ladder's predictors


def train(cfg: PredictorsConfig) -> tuple[FitResult, list[Path]]:
    """Fit on the train split (all domains) and save to ``<out>/models`` (the ladder, and
    the next-use model of the learned residency policy as ``nextuse.npz``)."""
    source = open_source(cfg)
    train_ids = source.select(split="train")
    log.info("training on %d sequences of %s", len(train_ids), source.description)
    fitted = fit_all(cfg, source, train_ids)
    paths = save_all(fitted, Path(cfg.out) / "models")
    paths.append(fit_nextuse(cfg, source, train_ids).save(
        Path(cfg.out) / "models" / NEXTUSE_FILE))
    return fitted, paths
