"""Every option of every command, declared once; one typed config object per command.

Shared options are ``Opt`` declarations (``MODEL``, ``DTYPE``, ``INPUT``, ``OUTPUT`` ...) placed in each
command's dataclass; the choice lists (``DTYPES``, ``BACKENDS``, ``SELECT_BY``) live here and every part that checks
a value uses them; those of the data contract (``FORMATS``, the step rules, the think tags) are declared in
``air_ray.data`` and used here. ``air_ray.cli`` builds the flags from these classes, ``Options.load`` reads
the YAML files, and the Python API takes the objects themselves (``Scorer(EngineOptions(...))``,
``run_score(ScoreConfig(...))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from air_ray.config.options import Opt, Options
from air_ray.data.answers import REFERENCE_FIELDS
from air_ray.data.corpus import SPLIT_BYTES
from air_ray.data.rows import FORMATS
from air_ray.data.steps import RULES, THINK_TAGS, check_rule, parse_think_tags
from air_ray.errors import AirRayError
from air_ray.influence import EPS, WEIGHTINGS, StepWeighting
from air_ray.models.resolve import DEFAULT_MODEL
from air_ray.store.heads import Heads
from air_ray.store.layout import HEADS_FILE, CompareLayout
from air_ray.store.schemas import EMBED_DIMS

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("hf", "vllm")  # air_ray.engine.backends: where the per-token losses come from
# select --by: the AIR score, or a heuristic from the same scoring run (each ranked descending; random = a
# seeded hash of the id)
SELECT_BY = ("score", "delta", "loss_base", "entropy_base", "n_response_tokens", "random")
# select --balance: the column whose pool quantile bins each get their share of the selection
BALANCE_BY = ("loss_base", "entropy_base", "n_response_tokens")
# --batch-tokens when not given, by device: on the CPU smaller blocks per layer run faster (bench/RESULTS.md, run I);
# on a GPU larger batches fill the device
BATCH_TOKENS = {"cpu": 4096, "gpu": 8192}
EXPORT_STYLES = ("messages", "prompt-completion", "original")
EXPORT_FORMATS = ("parquet", "jsonl")

# The version of the numbers: bumped, with a line in CHANGELOG.md, only by a change that alters scores. The scoring
# key hashes it (not the package version), so a release that leaves the numbers alone rescores nothing.
SCORING_VERSION = 2
# air_ray releases whose keys hashed the package version (before SCORING_VERSION) -> the scoring version of their
# numbers: partitions they committed are kept when the numbers are still the same (EngineOptions.legacy_keys)
LEGACY_KEY_RELEASES = {"0.1.0": 1}

# ----------------------------------------------------------------------------------------------
# declarations shared by several commands

MODEL = Opt(DEFAULT_MODEL, group="model",
            help="alias, local Hugging Face model directory, .gguf file or hub id org/name")
DTYPE = Opt("auto", choices=DTYPES, group="model",
            help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32")
DEVICE = Opt("auto", group="model", help="auto | cpu | cuda[:N]")
ALLOW_PICKLE = Opt(False, group="model", help="allow pickle (.bin) weights (they can run arbitrary code)")
TRUST_REMOTE_CODE = Opt(False, group="model", help="allow model code from the model repository")
INPUT = Opt(factory=list, metavar="URI", group="input",
            help="the corpus: files, directories or globs (any fsspec URI)")
OUTPUT = Opt(None, group="output", help="where this command writes")
SCORES = Opt(None, metavar="URI", group="input", help="output of `air-ray score` (or a directory of score partitions)")
HEADS = Opt(HEADS_FILE, group="scoring", help="heads.json of `air-ray heads`")
PLACEBO_SCORES = Opt(None, metavar="URI", group="input",
                     help="the same pool scored with placebo heads (air-ray heads --placebo)")
FORMAT = Opt(FORMATS[0], choices=FORMATS,
             help="chat: the prompt through the tokenizer's chat template; raw: plain text")
SEED = Opt(0, help="random seed")
TOP_FRAC = Opt(None, group="selection", help="fraction of the rows to select, in (0, 1]")
NUM_PROBES = Opt(64, group="detection", help="synthetic retrieval probes")
ADDRESS = Opt(None, group="placement",
              help="default: join the cluster RAY_ADDRESS names (ray job submit sets it) or a `ray start` "
                   "cluster on this machine, else start an embedded one (never another run's); auto: join one, "
                   "or fail; local: always embedded; HOST:PORT or ray://...: that cluster")
PROBE_TOKENS = Opt(512, group="detection", help="tokens per synthetic probe")
# where the work runs, one spelling in every command: N workers (scoring actors, Ray Train workers), each with
# G GPUs and C CPUs (Ray's num_gpus / num_cpus of one worker)
WORKERS = Opt(None, group="placement", help="how many workers run the work")
GPUS_PER_WORKER = Opt(None, group="placement", help="GPUs of each worker (default: 1 if the cluster has GPUs, else 0)")
CPUS_PER_WORKER = Opt(None, group="placement", help="CPUs (and torch threads) of each worker")
PROGRESS = Opt(True, group="output", help="a progress bar (rows, tokens/s, ETA) when stderr is a terminal; off, or "
                                          "not a terminal: a plain progress line every 5 s")


@dataclass
class ModelOptions(Options):
    """Which model, and how to load it."""

    option_group = "model"

    model: str = MODEL()
    dtype: str = DTYPE()
    device: str = DEVICE()
    allow_pickle: bool = ALLOW_PICKLE()
    trust_remote_code: bool = TRUST_REMOTE_CODE()


@dataclass
class CorpusOptions(Options):
    """How to read a corpus row (``air_ray.data.shapes``): where its parts are when the row is not in a detected
    shape, and the tags around reasoning. Every command that reads the corpus has these."""

    option_group = "input"

    prompt_field: str | None = Opt(None, help="field holding the prompt (a string or a list of strings); several, "
                                              "a,b: the non-empty ones joined with a newline")()
    response_field: str | None = Opt(None, help="field holding the response (the answer); several: a,b")()
    reasoning_field: str | None = Opt(None, help="field holding reasoning given apart from the answer; several: a,b")()
    messages_field: str | None = Opt(None, help="field holding the conversation (OpenAI messages or ShareGPT turns)")()
    id_field: str | None = Opt(None, help="field holding the row id (default: id, else a hash of the content)")()
    domain_field: str | None = Opt(None, help="field holding the row's domain (default: domain)")()
    think_tags: str = Opt(",".join(THINK_TAGS), metavar="OPEN,CLOSE",
                          help="tags around reasoning: how reasoning given apart is rendered, and what the "
                               "think step rule looks for")()

    def check(self) -> None:
        super().check()
        parse_think_tags(self.think_tags)


@dataclass
class RunOptions(Options):
    """The scoring run a command reads (``air-ray score``'s output)."""

    scores: str = SCORES(required=True)


@dataclass
class EngineOptions(ModelOptions, CorpusOptions):
    """What the scoring engine (``air_ray.engine.scorer.Scorer``) computes: model, heads, row and step rules,
    numerics, backend. Placement (workers, GPUs per worker) belongs to the pipeline (``ScoreConfig``)."""

    option_group = "scoring"

    heads: str = HEADS()
    format: str = FORMAT()
    steps: str = Opt(RULES[0], help=" | ".join(RULES))()
    step_weighting: str = Opt("bounded", choices=WEIGHTINGS,
                              help="bounded: w = clip(1 + strength * z, min, max), z the step's mean divergence "
                                   "(nats per token) standardised within the row, renormalised to a token-weighted "
                                   "mean of 1; softmax: n * softmax(step_scores / temperature) (the earlier "
                                   "default; it can put a row's whole weight on one step)")()
    step_strength: float = Opt(StepWeighting.strength, help="bounded: weight change per standard deviation")()
    step_weight_min: float = Opt(StepWeighting.w_min, help="bounded: the smallest step weight, in [0, 1]")()
    step_weight_max: float = Opt(StepWeighting.w_max, help="bounded: the largest step weight, >= 1")()
    step_temperature: float = Opt(StepWeighting.temperature, help="softmax: temperature of the step weights")()
    base_loss_floor: float = Opt(EPS, help="floor of L_base (nats) in every relative score (L_ref - L_base) / "
                                           "max(L_base, floor); raise it (e.g. 0.05) so that near-zero base losses "
                                           "cannot blow up scores and step weights")()
    backend: str = Opt("hf", choices=BACKENDS,
                       help="hf: transformers, one weight copy; vllm: two vLLM engines per actor")()
    batch_tokens: int | None = Opt(None, group="placement",
                                   help=f"token budget of one model batch (hf; default: {BATCH_TOKENS['cpu']} on CPU, "
                                        f"{BATCH_TOKENS['gpu']} on GPU)")()
    max_tokens: int | None = Opt(8192, help="longer rows are rejected (or cut with --truncate)")()
    truncate: bool = Opt(False, help="cut a response that does not fit --max-tokens (column truncated=true) "
                                     "instead of rejecting the row")()
    vllm_gpu_memory: float = Opt(0.85, group="placement",
                                 help="vllm on GPU: the fraction of the device both engines share")()
    vllm_cpu_kv_cache_gib: float = Opt(1.0, group="placement", help="vllm on CPU: KV cache of each engine, GiB")()
    allow_model_mismatch: bool = Opt(False, group="model", help="use a heads.json made for another model fingerprint")()
    embed: bool = Opt(False, help=f"also write an embedding column: the base model's last hidden state mean-pooled "
                                  f"over the response tokens, {EMBED_DIMS} dims by a seeded random projection (for "
                                  "select --diversity; hf backend)")()

    def check(self) -> None:
        super().check()
        check_rule(self.steps)
        if self.embed and self.backend != "hf":
            raise AirRayError("--embed needs --backend hf (vLLM gives no hidden states)")
        if not 0 < self.vllm_gpu_memory <= 1 or self.vllm_cpu_kv_cache_gib <= 0:
            raise AirRayError("--vllm-gpu-memory must be in (0, 1] and --vllm-cpu-kv-cache-gib > 0")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise AirRayError("--batch-tokens must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise AirRayError("--max-tokens must be >= 2")
        if not self.step_temperature > 0:
            raise AirRayError("--step-temperature must be > 0")
        if not (self.step_strength >= 0 and 0 <= self.step_weight_min <= 1 <= self.step_weight_max
                and math.isfinite(self.step_strength) and math.isfinite(self.step_weight_max)):
            raise AirRayError("need --step-strength >= 0, --step-weight-min in [0, 1] and --step-weight-max >= 1")
        if not (self.base_loss_floor > 0 and math.isfinite(self.base_loss_floor)):
            raise AirRayError("--base-loss-floor must be a number > 0")

    @property
    def weighting(self) -> StepWeighting:
        return StepWeighting(self.step_weighting, self.step_strength, self.step_weight_min, self.step_weight_max,
                             self.step_temperature)

    def scoring_key(self, model_fingerprint: str, heads, dtype: str | None = None, *, legacy: str | None = None) -> str:
        """A short hash of everything that changes a partition's contents for the same input: the model,
        the heads, the row and step rules, the numerics (``dtype``: the one resolved on the device that scores, where
        the option is ``auto``) and ``SCORING_VERSION``. Placement options (workers, batch size, addresses) and the
        package version are not part of it. ``legacy``: the key that air_ray release ``legacy`` (before
        SCORING_VERSION) gave these options: it hashed the package version and the dtype option as given."""
        import hashlib
        import json

        resolved = self.dtype if legacy else (dtype or self.dtype)
        if resolved not in DTYPES or (resolved == "auto" and not legacy):
            raise ValueError(f"scoring_key needs the dtype resolved on the scoring device, got {resolved!r}")
        doc = {
            "model_fingerprint": model_fingerprint,
            "heads": Heads.of(heads).to_json(),
            "format": self.format, "steps": self.steps, "step_temperature": self.step_temperature,
            "dtype": resolved, "max_tokens": self.max_tokens, "truncate": self.truncate,
            "backend": self.backend, **({"air_ray": legacy} if legacy else {"scoring_version": SCORING_VERSION}),
        }
        rows = {f.name: getattr(self, f.name) for f in CorpusOptions.option_fields()
                if getattr(self, f.name) != f.default}
        if rows:  # only when set: outputs scored before these options existed keep their keys
            doc["rows"] = rows
        if self.base_loss_floor != EngineOptions.base_loss_floor:  # keys made before the option stay valid
            doc["base_loss_floor"] = self.base_loss_floor
        if self.embed:  # a run without it keeps its keys
            doc["embed"] = EMBED_DIMS
        if self.step_weighting != "softmax":  # softmax (the rule before the option) keeps the keys made with it
            del doc["step_temperature"]
            doc["step_weighting"] = {"rule": self.step_weighting, "strength": self.step_strength,
                                     "min": self.step_weight_min, "max": self.step_weight_max}
        return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def legacy_keys(self, model_fingerprint: str, heads) -> dict[str, str]:
        """``{release: key}``: the keys the releases of ``LEGACY_KEY_RELEASES`` whose numbers are this
        ``SCORING_VERSION``'s gave these options. Under such a key a partition was scored by the same code, but with
        ``dtype: auto`` not necessarily in the same dtype: the dtype its file records says."""
        return {release: self.scoring_key(model_fingerprint, heads, legacy=release)
                for release, version in LEGACY_KEY_RELEASES.items() if version == SCORING_VERSION}


# ----------------------------------------------------------------------------------------------
# the commands


@dataclass
class FetchConfig(Options):
    command = "model fetch"
    option_group = "model"
    model: str = MODEL(positional=True)
    allow_pickle: bool = ALLOW_PICKLE()


@dataclass
class HeadsConfig(ModelOptions):
    command = "heads"
    option_group = "detection"
    dtype: str = DTYPE(default="float32")
    output: str = OUTPUT(default=HEADS_FILE, aliases=("out",), help="heads.json to write (heads.png beside it)")
    probes: str | None = Opt(None, group="input",
                             help="JSONL of {prompt, answer}; default: built-in synthetic probes")()
    num_probes: int = NUM_PROBES()
    probe_tokens: int = PROBE_TOKENS()
    seed: int = SEED(group="detection", help="seed of the synthetic probes and of the random-heads check (and of "
                                             "the --placebo draw)")
    head_frac: float = Opt(0.05, group="detection", aliases=("top_frac",),
                           help="fraction of all (layer, head) pairs that are critical, in (0, 1]")()
    placebo: bool = Opt(False, group="detection",
                        help="write a placebo heads file instead of detecting: as many heads as --from marks critical, "
                             "drawn at random (--seed) among the others; score with it like any heads file to see how "
                             "much of a ranking any disabled heads would give")()
    from_: str | None = Opt(None, metavar="HEADS.json", group="input",
                            help="with --placebo: the heads.json the placebo is drawn against (no model is loaded, "
                                 "nothing is detected)")()
    gpus_per_worker: float | None = GPUS_PER_WORKER(aliases=("gpus",), help="GPUs of the detection task, one Ray "
                                                                            "worker (default: 1 if the cluster has "
                                                                            "GPUs, else 0)")
    cpus_per_worker: float | None = CPUS_PER_WORKER(aliases=("cpus",), help="CPUs (and torch threads) of the "
                                                                            "detection task (default: 1 with a GPU, "
                                                                            "else a node's CPUs)")
    address: str | None = ADDRESS()

    def check(self) -> None:
        if (self.gpus_per_worker is not None and self.gpus_per_worker < 0) or \
                (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            raise AirRayError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if not 0 < self.head_frac <= 1:
            raise AirRayError("--head-frac must be in (0, 1]")
        if self.placebo != (self.from_ is not None):
            raise AirRayError("heads: --placebo and --from go together (--placebo --from HEADS.json)")
        if self.num_probes < 1 or self.probe_tokens < 32:
            raise AirRayError("--num-probes must be >= 1 and --probe-tokens >= 32")


@dataclass
class ScoreConfig(EngineOptions):
    command = "score"
    input: list[str] = INPUT()
    output: str = OUTPUT(default="out/scores", metavar="URI",
                         help="run directory: scores/, rejected/, _manifest.json (any fsspec URI)")
    workers: int | None = WORKERS(aliases=("actors",), help="scoring workers (Ray actors, each holding one scorer); "
                                                            "default: one per GPU (GPU clusters), else one per node")
    gpus_per_worker: float | None = GPUS_PER_WORKER(aliases=("gpus_per_actor",),
                                                    help="GPUs of each scoring worker (default: 1 if the cluster has "
                                                         "GPUs, else 0); > 1: tensor parallel (vllm) or sharded (hf)")
    cpus_per_worker: float | None = CPUS_PER_WORKER(aliases=("cpus_per_actor",),
                                                    help="CPUs (and torch threads) of each scoring worker; default: "
                                                         "on GPU clusters 1, without GPUs the node's CPUs less what "
                                                         "the read/prepare stages need")
    rows_per_partition: int = Opt(512, group="output",
                                  help="rows per output partition (the unit of work and of resume)")()
    split_bytes: int = Opt(SPLIT_BYTES, group="placement",
                           help="an uncompressed .jsonl file larger than this is read in byte ranges of about this "
                                "size, each by its own task (the partitions of such a file are named by its ranges: "
                                "keep it fixed for a dump you rescore)")()
    executor: str = Opt("auto", choices=("auto", "ray", "in-process"), group="placement",
                        help="ray: the Ray Data pipeline (on the cluster --address names, or an embedded one); "
                             "in-process: the same stages in this process, one partition after another, no Ray; "
                             "auto: in-process for a small corpus (<= 16 MB, hf backend, one scorer) on a machine "
                             "with no Ray cluster to join and at most one GPU, else ray")()
    strict: bool = Opt(False, group="output",
                       help="exit 1 when any row is rejected (the outputs are still written)")()
    address: str | None = ADDRESS()
    progress: bool = PROGRESS()

    def check(self) -> None:
        if not self.input:
            raise AirRayError("no --input given")
        super().check()
        if (self.workers is not None and self.workers < 1) or self.rows_per_partition < 1 or self.split_bytes < 1:
            raise AirRayError("--workers, --rows-per-partition and --split-bytes must be >= 1")
        if (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) or \
                (self.gpus_per_worker is not None and self.gpus_per_worker < 0):
            raise AirRayError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if self.executor == "in-process" and ((self.workers or 1) > 1 or self.address is not None):
            raise AirRayError("--executor in-process runs one scorer in this process: it takes no --address and "
                              "no --workers above 1")


@dataclass
class SelectConfig(RunOptions):
    """Options of ``air-ray select``; exactly one of ``top_k`` / ``top_frac``."""

    command = "select"
    option_group = "selection"
    output: str = OUTPUT(required=True, metavar="URI",
                         help="selection directory: selection.parquet, selection.json, score_hist.png")
    top_k: int | None = Opt(None, help="rows to select")()
    top_frac: float | None = TOP_FRAC(help="fraction of the candidate rows to select, in (0, 1]")
    per_domain: bool = Opt(False, help="apply --top-k / --top-frac within each domain (ranks stay global)")()
    min_score: float | None = Opt(None, help="rows scoring below this are never selected")()
    by: str = Opt("score", choices=SELECT_BY,
                  help="the value ranked (descending): score (the AIR score, relative: (L_ref - L_base) / L_base), "
                       "delta (the absolute divergence L_ref - L_base, nats per token), or a heuristic baseline from "
                       "the same run")()
    balance: str | None = Opt(None, choices=BALANCE_BY,
                              help="rank within quantile bins of this column over the pool (per domain with "
                                   "--per-domain) and take each bin's share of the selection, so the selection keeps "
                                   "the pool's profile of it (loss_base: its difficulty)")()
    balance_bins: int = Opt(8, help="quantile bins of --balance")()
    diversity: int | None = Opt(None, metavar="K",
                                help="diversity quotas: cluster the pool into K groups (seeded k-means on the "
                                     "scores' embedding column, `air-ray score --embed`) and take each group's share "
                                     "of the selection by the value ranked; combines with --balance and "
                                     "--per-domain")()
    exclude_wrong_answer: bool = Opt(False, help="leave out rows whose final answer (#### N, \\boxed{}, else the "
                                                 "last number) differs from their reference field (--reference-field); "
                                                 "rows without a reference are kept and counted; reads the corpus")()
    exclude_defective: bool = Opt(False, help="leave out rows whose corpus field air_defect is set (a pool with "
                                              "planted defects: the oracle filter, compare's clean_random); reads "
                                              "the corpus")()
    reference_field: str | None = Opt(None, help="the field holding a row's reference answer (default: the first of "
                                                 + ", ".join(REFERENCE_FIELDS) + " a row has)")()
    input: list[str] = INPUT(group="input", help="the corpus, read for --exclude-wrong-answer, --exclude-defective "
                                                 "and the audit's defect and answer shares (default: the files the "
                                                 "scores name, read with the run's field flags)")
    seed: int = SEED(help="seed of --by random and of the --diversity clustering")

    def check(self) -> None:
        if (self.top_k is None) == (self.top_frac is None):
            raise AirRayError("select: set exactly one of --top-k / --top-frac")
        if self.top_k is not None and self.top_k < 0:
            raise AirRayError(f"select: top_k must be an integer >= 0, got {self.top_k!r}")
        if self.top_frac is not None and not 0.0 < self.top_frac <= 1.0:
            raise AirRayError(f"select: top_frac must be in (0, 1], got {self.top_frac!r}")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise AirRayError(f"select: min_score must be a finite number, got {self.min_score!r}")
        if self.balance_bins < 1:
            raise AirRayError(f"select: balance_bins must be >= 1, got {self.balance_bins!r}")
        if self.diversity is not None and self.diversity < 1:
            raise AirRayError(f"select: diversity must be >= 1 groups, got {self.diversity!r}")


# the keys of rescore's nested `select:` and `detect:` mappings
RESCORE_SELECT_KEYS = tuple(f.name for f in SelectConfig.option_fields() if f.name not in ("scores", "output", "input"))
RESCORE_DETECT_KEYS = ("probes", "num_probes", "probe_tokens", "seed", "head_frac", "dtype", "gpus_per_worker",
                       "cpus_per_worker")


@dataclass
class RescoreConfig(ScoreConfig):
    """``air-ray rescore``: the options of ``score`` (same keys) plus its own."""

    command = "rescore"
    input: list[str] = INPUT(aliases=("inputs",))
    output: str = OUTPUT(required=True, metavar="URI", help="root of the versioned output (v=<version>/...)")
    heads: str = HEADS(default="detect", help="a heads.json, or detect: detect once per model and keep it under "
                                              "<output>/heads/<fingerprint>.json")
    select: dict = Opt(factory=lambda: {"top_frac": 0.1}, metavar="KEY=VALUE", group="selection",
                       help="the selection refreshed after each pass (" + ", ".join(RESCORE_SELECT_KEYS) + ")")()
    detect: dict = Opt(factory=dict, metavar="KEY=VALUE", group="scoring",
                       help="options of `air-ray heads` for heads: detect (" + ", ".join(RESCORE_DETECT_KEYS) + ")")()
    lease_ttl_s: float = Opt(600.0, group="output",
                             help="lifetime of the output's lease, renewed while the run lives")()
    wait: bool = Opt(False, group="output", help="wait for a concurrent run instead of backing off")()

    def check(self) -> None:
        super().check()
        self.selection_config("-", "-")
        self.heads_config("-")
        if self.lease_ttl_s <= 0:
            raise AirRayError("--lease-ttl-s must be > 0")

    def selection_config(self, scores: str, output: str) -> SelectConfig:
        bad = sorted(set(self.select) - set(RESCORE_SELECT_KEYS))
        if bad:
            raise AirRayError(f"rescore: select: unknown key {bad[0]!r} (expected {', '.join(RESCORE_SELECT_KEYS)})")
        return SelectConfig.build(dict(self.select, scores=scores, output=output), "rescore: select")

    def heads_config(self, output: str) -> HeadsConfig:
        keys = HeadsConfig.keys()  # the option names and their old spellings (deprecated: a warning)
        bad = sorted(k for k in self.detect if keys.get(k) not in RESCORE_DETECT_KEYS)
        if bad:
            raise AirRayError(f"rescore: detect: unknown key {bad[0]!r} (expected {', '.join(RESCORE_DETECT_KEYS)})")
        detect = HeadsConfig.normalise(self.detect, "rescore: detect")
        return HeadsConfig.build(dict(detect, model=self.model, output=output, device=self.device,
                                      address=self.address,
                                      allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code),
                                 "rescore: detect")


@dataclass
class ReportConfig(RunOptions, CorpusOptions):
    """``air-ray report``: one HTML page of a scoring run (``air_ray.outputs.report``); the field flags and think
    tags used for scoring show each row's scored text."""

    command = "report"
    option_group = "output"
    heads: str | None = HEADS(default=None, help="heads.json (heatmap and critical heads)")
    output: str = OUTPUT(required=True, help="local directory for index.html and its images")
    selection: str | None = Opt(None, help="output of `air-ray select` (default: <scores>/selection or "
                                           "<scores>/../selection when there)")()
    compare: str | None = Opt(None, help="output of `air-ray compare` (default: <scores>/compare when there)")()
    placebo_scores: str | None = PLACEBO_SCORES(group="output", help=PLACEBO_SCORES.help + ": the report shows how "
                                                                     "much of the ranking they share")


@dataclass
class TrainingOptions(Options):
    """How a student is fine-tuned (``air_ray.training``): shared by ``train`` and ``compare``."""

    option_group = "training"

    format: str = FORMAT(help="as used for scoring")
    max_steps: int = Opt(100, help="optimiser steps")()
    lr: float = Opt(1e-5, help="learning rate")()
    batch_size: int = Opt(4, help="rows per step")()
    max_length: int = Opt(1024, help="tokens per row (longer rows are cut on the right)")()
    grad_accum: int = Opt(1, help="gradient accumulation steps")()
    bf16: bool = Opt(False, help="bf16 mixed precision (GPU)")()
    add_eos: bool = Opt(True, aliases=("eos",), help="append EOS to each response")()

    def check(self) -> None:
        super().check()
        for name in ("max_steps", "batch_size", "max_length", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AirRayError(f"--{name.replace('_', '-')} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AirRayError("--lr must be > 0")


@dataclass
class TrainConfig(TrainingOptions, ModelOptions, CorpusOptions):
    """Step-weighted fine-tuning on a selection (``air_ray.training``)."""

    command = "train"
    dtype: str = DTYPE(default="float32", help="weights dtype (float32; --bf16 for mixed precision on GPUs)")
    selection: str | None = Opt(None, group="input", help="selection.parquet, or the select output directory")()
    scores: str | None = SCORES()
    input: list[str] = INPUT(aliases=("corpus",), help="the corpus that was scored, or the directory of an "
                                                      "`air-ray export` (then no --selection / --scores)")
    output: str = OUTPUT(required=True, help="directory for the fine-tuned model, written by the first worker (on a "
                                             "cluster: a path every worker node sees, e.g. a shared volume)")
    seed: int = SEED(help="training seed")
    step_weights: bool = Opt(True, help="weight each response token by its step's weight (off: plain SFT, every "
                                        "response token 1.0)")()
    allow_missing: bool = Opt(False, help="train on the rows found when some selected ids are missing from the "
                                          "scores or the corpus")()
    save: bool = Opt(True, group="output", help="save the model and tokenizer into --output")()
    workers: int = WORKERS(default=1, help="Ray Train workers (data parallel: each takes its share of every step's "
                                           "rows)")
    gpus_per_worker: float | None = GPUS_PER_WORKER(help="GPUs of each Ray Train worker (default: 1 if the cluster "
                                                         "has GPUs, else 0)")
    cpus_per_worker: float | None = CPUS_PER_WORKER(help="CPUs (and torch threads) of each worker; default: 1 with a "
                                                         "GPU, else a node's CPUs shared by the workers")
    address: str | None = ADDRESS()

    def check(self) -> None:
        super().check()
        if self.workers < 1 or (self.gpus_per_worker is not None and self.gpus_per_worker < 0) or \
                (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            raise AirRayError("--workers must be >= 1, --gpus-per-worker >= 0 and --cpus-per-worker > 0")
        if not self.input:
            raise AirRayError("train needs --input (the corpus, or an export)")
        if (self.selection is None) != (self.scores is None):
            raise AirRayError("train: give --selection and --scores together (or neither, with an export as --input)")
        if "://" in self.output and not self.output.startswith("file://"):
            raise AirRayError("--output must be a local directory (the checkpoint is written with save_pretrained)")


# air-ray compare: the selection strategies (air_ray.evaluation.compare.STRATEGIES says how each selects and trains)
COMPARE_STRATEGIES = ("score", "score_balanced", "delta", "delta_balanced", "placebo", "loss_base", "entropy_base",
                      "n_response_tokens", "score_weighted", "score_diverse", "delta_diverse", "random_diverse",
                      "answer_filter", "random", "matched_random", "clean_random", "repaired_random")


@dataclass
class CompareConfig(RunOptions, TrainingOptions, ModelOptions, CorpusOptions):
    """``air-ray compare``: equal-size selections by several strategies from one scoring run, one student
    fine-tuned on each (same initial weights and hyperparameters), every student evaluated on held-out rows, each
    strategy placed in the null of many random subsets (``air_ray.evaluation``)."""

    command = "compare"
    option_group = "evaluation"
    dtype: str = DTYPE(default="float32", help="the student's weights dtype (float32; --bf16 for mixed precision)")
    input: list[str] = INPUT(required=True, help="the corpus that was scored (the pool the selections come from)")
    eval_input: list[str] = INPUT(required=True, group="evaluation",
                                  help="held-out rows the students are evaluated on (none may be in the pool)")
    output: str | None = OUTPUT(help="local directory for compare.json, compare.md, compare.png and runs/ "
                                     "(default: <scores>/compare, where `air-ray report` finds it)")
    strategies: list[str] = Opt(factory=lambda: list(COMPARE_STRATEGIES), choices=COMPARE_STRATEGIES,
                                group="selection",
                                help="the selections compared: deterministic ones train once per --seeds; random and "
                                     "matched_random are the nulls (--random-subsets / --matched-subsets students), "
                                     "clean_random and repaired_random the positive controls of a pool with "
                                     "planted defects (--clean-subsets students each); left out of the default "
                                     "where the run lacks what they need: placebo a --placebo-scores run, the "
                                     "*_diverse ones an embedding (score --embed), clean_random and repaired_random "
                                     "a defect column")()
    placebo_scores: str | None = PLACEBO_SCORES(help=PLACEBO_SCORES.help + ": the placebo strategy selects from it")
    random_subsets: int = Opt(10, group="selection",
                              help="random subsets, one student each: the null every strategy is placed in")()
    matched_subsets: int | None = Opt(None, group="selection",
                                      help="difficulty-matched random subsets (random within loss_base bins; default: "
                                           "--random-subsets)")()
    clean_subsets: int = Opt(10, group="selection",
                             help="clean_random and answer_filter: subsets of the rows each filter keeps, one "
                                  "student each; subset j is random subset j less the rows the filter drops, topped "
                                  "up from the same seeded order, so each pairs with a random student (clean_random: "
                                  "no planted defect, the positive control; answer_filter: a final answer that "
                                  "matches its reference); and repaired_random's: random subsets 0..N-1 again, "
                                  "trained with their planted defects repaired")()
    balance_bins: int = Opt(8, group="selection", help="loss_base bins of the balanced strategies and of matched_random")()
    diversity: int = Opt(8, group="selection", help="k-means groups of the *_diverse strategies (select --diversity)")()
    top_k: int = Opt(64, group="selection", help="rows selected by every strategy")()
    seeds: int = Opt(1, help="training seeds 0..N-1 of each deterministic strategy (random subset j trains with seed "
                             "j mod N): the spread that matters is which subset, not the training order")()
    max_steps: int | None = Opt(None, help="optimiser steps (default: one pass over the selection)")()
    lr: float = Opt(5e-5, help="learning rate")()
    batch_size: int = Opt(8, help="rows per step")()
    eval_rows: int | None = Opt(None, help="evaluate on the first N held-out rows (default: all)")()
    eval_batch_size: int = Opt(16, help="rows per evaluation batch (loss and generation)")()
    max_new_tokens: int = Opt(256, help="greedy decoding length bound of the exact-match evaluation")()

    def check(self) -> None:
        super().check()
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise AirRayError("compare: --strategies must name each strategy once")
        if self.placebo_scores is None and "placebo" in self.strategies:
            if self.strategies != list(COMPARE_STRATEGIES):
                raise AirRayError("compare: the placebo strategy needs --placebo-scores (the pool scored with "
                                  "`air-ray heads --placebo` heads)")
            self.strategies = [s for s in self.strategies if s != "placebo"]  # the default, without a placebo run
        if self.matched_subsets is None:
            self.matched_subsets = self.random_subsets
        for name in ("top_k", "seeds", "eval_batch_size", "random_subsets", "matched_subsets", "clean_subsets",
                     "balance_bins", "diversity"):
            if getattr(self, name) < 1:
                raise AirRayError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_new_tokens < 0 or (self.eval_rows is not None and self.eval_rows < 1):
            raise AirRayError("--max-new-tokens must be >= 0 and --eval-rows >= 1")
        if self.output is None and "://" in self.scores and not self.scores.startswith("file://"):
            raise AirRayError("compare: --scores is not local; give --output (a local directory)")
        if self.output is not None and "://" in self.output and not self.output.startswith("file://"):
            raise AirRayError("compare: --output must be a local directory")

    @property
    def out_dir(self) -> str:
        return (self.output or CompareLayout.default(self.scores)).removeprefix("file://")


@dataclass
class ExportConfig(RunOptions, CorpusOptions):
    """``air-ray export``: the selected rows as a training-ready dataset (``air_ray.outputs.export``)."""

    command = "export"
    option_group = "output"
    selection: str | None = Opt(None, group="input", help="output of `air-ray select` (default: <scores>/selection)")()
    input: list[str] = INPUT(required=True, help="the corpus that was scored")
    output: str = OUTPUT(required=True, metavar="URI", help="directory of the export: data/ (the rows), "
                                                          "dataset_info.json, .export.json (any fsspec URI)")
    style: str = Opt("messages", choices=EXPORT_STYLES,
                     help="messages: a messages column (OpenAI form: reasoning_content, tool_calls, tool messages, "
                          "name) and a tools column; prompt-completion: prompt and completion columns (TRL); original: "
                          "each source record as it is, every column, with the scores in air_* columns")()
    inline_reasoning: bool = Opt(False, help="write reasoning given apart into the assistant's content as it was "
                                             "scored (for templates and trainers that do not read reasoning_content)"
                                 )()
    output_format: str = Opt("parquet", choices=EXPORT_FORMATS, help="the files of DIR/data/: Parquet or JSON lines")()
    rows_per_file: int = Opt(10_000, help="rows per file")()

    def check(self) -> None:
        super().check()
        if self.rows_per_file < 1:
            raise AirRayError("--rows-per-file must be >= 1")
        if self.inline_reasoning and self.style == "original":
            raise AirRayError("--inline-reasoning is for --style messages and prompt-completion (--style original "
                              "keeps each record as it is; air_scored_response holds the scored text)")


@dataclass
class DemoConfig(Options):
    command = "demo"
    option_group = "input"
    output: str = OUTPUT(default="out/demo", help="directory for every output of the demo (report/index.html last)")
    input: str | None = Opt(None, group="input", help="one JSONL file of rows (default: the GSM8K sample installed "
                                                      "with air_ray, 200 rows)")()
    limit: int | None = Opt(None, group="input", help="score only the first N rows")()
    num_probes: int = NUM_PROBES(default=12)
    probe_tokens: int = PROBE_TOKENS()
    progress: bool = PROGRESS()
