"""The scoring engine: rows -> token ids -> per-token losses (base and reference) -> influence scores.

``Scorer(EngineOptions(...))`` (or the same options as keyword arguments) prepares the model, reads the heads,
opens a backend from ``air_ray.engine.backends.TABLE`` and scores rows; ``close()`` (or ``with Scorer(...) as
s:``) releases the backend's model or engines. No Ray here; the pipeline's scoring stage wraps a ``Scorer``.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np

from air_ray.config.commands import SCORING_VERSION, EngineOptions
from air_ray.data.rows import PreparedRow, RowError, RowPreparer
from air_ray.engine.ablation import check_heads
from air_ray.engine.backends import Backend, BackendSpec, OnBatch, TokenLosses, open_backend
from air_ray.errors import AirRayError
from air_ray.influence import all_finite, copy_mask, influence
from air_ray.models.load import resolve_device, resolve_dtype
from air_ray.models.open import open_model


EMBED_SEED = 0  # the random projection of --embed: the same for every run of a model


class Scorer:
    """``Scorer(options).score(rows) -> list[dict]`` — see the README for the row and output forms.

    ``options``: an ``EngineOptions`` (a ``ScoreConfig`` is one), or the model spec as a string; keyword
    arguments set options by name (``Scorer(model=..., heads=..., dtype="float32")``). ``heads`` may also be a
    loaded heads document or a list of (layer, head). Placement, not options: ``gpus`` (GPUs this process
    holds; vllm: tensor parallel over them), ``threads`` (CPU threads the backend runs on; None: as the process
    has them), and the hf backend's own ``shard`` (spread over every visible GPU) and ``share_prefix`` (False = two
    full passes).
    """

    def __init__(self, options: EngineOptions | str | None = None, heads=None, *, gpus: float = 0,
                 threads: int | None = None, shard: bool = False, share_prefix: bool = True, **overrides):
        from air_ray.store.heads import load_heads

        if isinstance(options, str):
            overrides["model"] = options
            options = None
        if isinstance(heads, str) or hasattr(heads, "__fspath__"):
            overrides["heads"], heads = str(heads), None
        if options is None:
            names = {f.name for f in EngineOptions.option_fields()}
            options = EngineOptions.build({k: v for k, v in overrides.items() if k in names}, "Scorer")
            overrides = {k: v for k, v in overrides.items() if k not in names}
        if overrides:
            options = options.replace(**overrides)
        self.options = opts = options.validate()
        # a model outside the supported families: one line, before any weights load
        opened = open_model(opts, check_family=True)
        self.ref, self.tokenizer, config, shape = opened.ref, opened.tokenizer, opened.config, opened.shape
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)
        if heads is None:
            self.heads_doc = load_heads(opts.heads, fingerprint=self.ref.fingerprint, shape=shape,
                                        allow_mismatch=opts.allow_model_mismatch)
        elif isinstance(heads, dict):
            self.heads_doc = heads
        else:
            self.heads_doc = {"heads": [tuple(h) for h in heads]}
        self.heads = check_heads(self.heads_doc["heads"], shape)
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.backend: Backend | None = open_backend(opts.backend, BackendSpec(
            ref=self.ref, heads=self.heads, options=opts, config=config, device=self.device, dtype=self.dtype,
            pad_id=pad_id, gpus=gpus, threads=threads), shard=shard, share_prefix=share_prefix)
        self.preparer = RowPreparer.of(self.tokenizer, opts, max_tokens=self.backend.max_tokens)
        self._projection = None  # [d_model, EMBED_DIMS] of --embed, made on first use
        self.engine_s = 0.0  # seconds spent in the backend (token_losses) so far

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the backend's model or engines now (idempotent)."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model(self):
        """The loaded model of the ``hf`` backend (None for other backends)."""
        return getattr(self.backend, "model", None)

    # -- scoring ----------------------------------------------------------------------------------

    def token_losses(self, prepared: Sequence[PreparedRow], on_batch: OnBatch | None = None) -> list[TokenLosses]:
        """Per response token: (loss under the base model, loss under the reference model, entropy of the base
        model's next-token distribution), in nats; the entropy is None where the backend has no distribution.
        ``on_batch(rows, tokens)``: called after each model batch (progress inside a long call)."""
        if self.backend is None:
            raise AirRayError("this Scorer is closed")
        t = time.perf_counter()
        try:
            return self.backend.token_losses(prepared, on_batch)
        finally:
            self.engine_s += time.perf_counter() - t

    def score_prepared(self, prepared: Sequence[PreparedRow], on_batch: OnBatch | None = None
                       ) -> list[dict | RowError]:
        """Scores of prepared rows; a row whose losses are not finite comes back as a RowError."""
        results: list[dict | RowError] = []
        for p, losses in zip(prepared, self.token_losses(prepared, on_batch)):
            base, ref, ent = losses.base, losses.ref, losses.entropy
            if not (all_finite(base, ref) and (ent is None or all_finite(ent))):
                results.append(RowError("non_finite_loss", f"id {p.id}: a loss is NaN or infinite"))
                continue
            row = {
                "id": p.id,
                "domain": p.domain,
                "n_prompt_tokens": p.n_prompt_tokens,
                "n_response_tokens": p.n_response_tokens,
            }
            ids = p.input_ids
            copied = copy_mask(ids[:p.n_prompt_tokens], ids[p.n_prompt_tokens:])
            row.update(influence(base, ref, p.token_starts, p.step_spans, self.options.weighting,
                                 self.options.base_loss_floor, copied))
            row["truncated"] = p.truncated
            # a heuristic baseline (select --by entropy_base); a backend without the distribution: null
            row["entropy_base"] = None if ent is None else float(np.mean(ent))
            row["step_kinds"] = list(p.step_kinds)
            if self.options.embed:
                row["embedding"] = self.embedding(losses.pooled)
            results.append(row)
        return results

    def embedding(self, pooled: np.ndarray) -> list[float]:
        """A row's ``embedding`` column (``score --embed``): its pooled last hidden state [d_model] times a fixed
        random projection [d_model, EMBED_DIMS] (seeded Gaussian / sqrt(EMBED_DIMS): distances are kept in
        expectation), float32."""
        from air_ray.store.schemas import EMBED_DIMS

        if self._projection is None or self._projection.shape[0] != len(pooled):
            rng = np.random.default_rng(EMBED_SEED)
            self._projection = rng.standard_normal((len(pooled), EMBED_DIMS)) / np.sqrt(EMBED_DIMS)
        return (np.asarray(pooled, np.float64) @ self._projection).astype(np.float32).tolist()

    def score(self, rows: Iterable[dict]) -> list[dict]:
        """Score rows; a row that cannot be scored raises RowError naming its index."""
        prepared = []
        for i, row in enumerate(rows):
            try:
                prepared.append(self.preparer.prepare(row))
            except RowError as e:
                raise RowError(e.reason, f"row {i}: {e.detail}") from None
        results = self.score_prepared(prepared)
        for r in results:
            if isinstance(r, RowError):
                raise r
        return results  # type: ignore[return-value]

    def describe(self) -> dict:
        """What produced these scores: recorded in every artifact."""
        from air_ray.store.schemas import EMBED_DIMS
        from air_ray.version import __version__

        o = self.options
        return {
            "model": self.ref.name,
            "model_fingerprint": self.ref.fingerprint,
            "heads": [list(h) for h in self.heads],
            "format": o.format,
            "steps": o.steps,
            "dtype": self.dtype,
            "backend": o.backend,
            "step_weighting": o.step_weighting,
            "step_strength": o.step_strength,
            "step_weight_min": o.step_weight_min,
            "step_weight_max": o.step_weight_max,
            "step_temperature": o.step_temperature,
            "base_loss_floor": o.base_loss_floor,
            "version": __version__,
            "scoring_version": SCORING_VERSION,
            **({"embed": {"dims": EMBED_DIMS, "seed": EMBED_SEED, "pooled": "last hidden state, mean over the response "
                                                                       "tokens"}} if o.embed else {}),
        }
