"""The scoring engine: rows -> token ids -> per-token losses (base and reference) -> influence scores.

One copy of the weights: the reference pass is the same model with the critical heads' query rows zeroed
for the duration of the pass (``QueryAblation``). No Ray here; the pipeline's actor wraps a ``Scorer``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from air_ray.ablation import QueryAblation, check_heads
from air_ray.config import BACKENDS
from air_ray.errors import AirRayError
from air_ray.influence import all_finite, influence
from air_ray.lm import batch_by_tokens, token_nll_pair
from air_ray.models import DEFAULT_MODEL, load_model, load_tokenizer, model_shape, prepare_model, resolve_dtype
from air_ray.rows import PreparedRow, RowError, RowPreparer

SCORE_COLUMNS = (
    "id", "domain", "n_prompt_tokens", "n_response_tokens", "loss_base", "loss_ref", "score",
    "step_spans", "step_token_counts", "step_scores", "step_weights", "truncated", "entropy_base",
)


class Scorer:
    """``Scorer(model, heads, ...).score(rows) -> list[dict]`` — see the README for the row and output forms."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        heads: str | dict | Sequence[Sequence[int]] = "heads.json",
        dtype: str = "auto",
        device: str = "auto",
        format: str = "chat",
        steps: str = "lines",
        step_temperature: float = 1.0,
        batch_tokens: int = 8192,
        max_tokens: int | None = None,
        truncate: bool = False,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        allow_model_mismatch: bool = False,
        shard: bool = False,
        share_prefix: bool = True,
        backend: str = "hf",
        gpus: float = 0,
        vllm_gpu_memory: float = 0.85,
        vllm_cpu_kv_cache_gib: float = 1.0,
    ):
        from air_ray.heads import load_heads
        from air_ray.models import load_config, resolve_device

        if step_temperature <= 0:
            raise AirRayError("step_temperature must be > 0")
        if backend not in BACKENDS:
            raise AirRayError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.ref = prepare_model(model, allow_pickle=allow_pickle)
        self.tokenizer = load_tokenizer(self.ref, trust_remote_code=trust_remote_code)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if backend == "vllm":
            config = load_config(self.ref, trust_remote_code=trust_remote_code)
            shape = model_shape(config)
            # a row longer than the engines' context is rejected as too_long, never sent
            max_model_len = max_tokens or int(getattr(config, "max_position_embeddings", 0) or 8192)
            max_tokens = max_model_len
            self.model = None
        else:
            self.model = load_model(self.ref, dtype=self.dtype, device=self.device, allow_pickle=allow_pickle,
                                    trust_remote_code=trust_remote_code, shard=shard)
            shape = model_shape(self.model)
        self.preparer = RowPreparer(self.tokenizer, format=format, steps=steps, max_tokens=max_tokens,
                                    truncate=truncate)
        if isinstance(heads, (str,)) or hasattr(heads, "__fspath__"):
            self.heads_doc = load_heads(str(heads), fingerprint=self.ref.fingerprint, shape=shape,
                                        allow_mismatch=allow_model_mismatch)
        elif isinstance(heads, dict):
            self.heads_doc = heads
        else:
            self.heads_doc = {"heads": [tuple(h) for h in heads]}
        self.heads = check_heads(self.heads_doc["heads"], shape)
        self.ablation = self.vllm = None
        if backend == "vllm":
            from air_ray.vllm_backend import VllmLosses

            self.vllm = VllmLosses(self.ref, self.heads, dtype=self.dtype, device=self.device,
                                   max_model_len=max_model_len, gpus=gpus, gpu_memory=vllm_gpu_memory,
                                   cpu_kv_cache_gib=vllm_cpu_kv_cache_gib, trust_remote_code=trust_remote_code)
        else:
            self.ablation = QueryAblation(self.model, self.heads)
        self.step_temperature = float(step_temperature)
        self.batch_tokens = int(batch_tokens)
        # run the layers below the first ablated one once for both passes (False: two full passes)
        self.share_prefix = bool(share_prefix)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # -- the two passes --------------------------------------------------------------------------

    def token_losses(self, prepared: Sequence[PreparedRow]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per response token: (loss under the base model, loss under the reference model, entropy of the base
        model's next-token distribution), in nats; the entropy is None under the vLLM backend.

        HF: batches by token budget (rows sorted by length); per batch the layers below the first ablated layer
        run once for both passes unless ``share_prefix=False`` (see ``air_ray.lm.token_nll_pair``). vLLM: all
        rows go to each engine at once; it schedules them itself."""
        if self.vllm is not None:
            base, ref = self.vllm.token_losses([p.input_ids for p in prepared],
                                               [p.n_prompt_tokens for p in prepared])
            return [(b, r, None) for b, r in zip(base, ref)]
        out: list = [None] * len(prepared)
        for batch in batch_by_tokens([len(p.input_ids) for p in prepared], self.batch_tokens):
            seqs = [prepared[i].input_ids for i in batch]
            starts = [prepared[i].n_prompt_tokens for i in batch]
            base, ref, ent = token_nll_pair(self.model, seqs, starts, ablated=self.ablation.ablated,
                                            first_layer=self.ablation.first_layer, pad_id=self.pad_id,
                                            share_prefix=self.share_prefix)
            for i, b, r, e in zip(batch, base, ref, ent):
                out[i] = (b, r, e)
        return out

    def score_prepared(self, prepared: Sequence[PreparedRow]) -> list[dict | RowError]:
        """Scores of prepared rows; a row whose losses are not finite comes back as a RowError."""
        results: list[dict | RowError] = []
        for p, (base, ref, ent) in zip(prepared, self.token_losses(prepared)):
            if not (all_finite(base, ref) and (ent is None or all_finite(ent))):
                results.append(RowError("non_finite_loss", f"id {p.id}: a loss is NaN or infinite"))
                continue
            row = {
                "id": p.id,
                "domain": p.domain,
                "n_prompt_tokens": p.n_prompt_tokens,
                "n_response_tokens": p.n_response_tokens,
            }
            row.update(influence(base, ref, p.token_starts, p.step_spans, self.step_temperature))
            row["truncated"] = p.truncated
            # a heuristic baseline (select --by entropy_base); vLLM gives no full distribution: null
            row["entropy_base"] = None if ent is None else float(np.mean(ent))
            results.append(row)
        return results

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
        import air_ray

        return {
            "model": self.ref.name,
            "model_fingerprint": self.ref.fingerprint,
            "heads": [list(h) for h in self.heads],
            "format": self.preparer.format,
            "steps": self.preparer.steps,
            "dtype": self.dtype,
            "backend": self.backend,
            "step_temperature": self.step_temperature,
            "version": air_ray.__version__,
        }
