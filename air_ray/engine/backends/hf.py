"""The ``hf`` backend: transformers, one copy of the weights.

The reference pass is the same model with the critical heads' attention made uniform for the duration of the
pass (``air_ray.engine.ablation.HeadAblation``: the model's own attention kernel, wrapped; no weight changes).
Rows are batched by token budget (sorted by length); per batch the layers below the first ablated layer run once
for both passes unless ``share_prefix=False`` (``air_ray.engine.losses.token_nll_pair``). torch runs ``threads``
threads while the backend is open (given back on ``close``). On the CPU the process keeps freed memory while the
backend is open (``air_ray.engine.heap``: no page faults on each batch's blocks).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

from air_ray.data.rows import PreparedRow
from air_ray.engine import heap
from air_ray.engine.ablation import HeadAblation
from air_ray.engine.backends import BackendSpec, OnBatch, TokenLosses
from air_ray.engine.losses import batch_by_tokens, default_batch_tokens, token_nll_pair
from air_ray.models.load import load_model, token_limit


@dataclass
class HFSpec(BackendSpec):
    shard: bool = False  # spread the model over every visible GPU
    share_prefix: bool = True  # run the layers below the first critical head once for both passes


class HFBackend:
    Spec = HFSpec

    def __init__(self, spec: HFSpec):
        import torch

        opts = spec.options
        self.model = None
        self._threads_before = torch.get_num_threads() if spec.threads else None
        if spec.threads:
            torch.set_num_threads(spec.threads)
        try:
            self.model = load_model(spec.ref, dtype=spec.dtype, device=spec.device, allow_pickle=opts.allow_pickle,
                                    trust_remote_code=opts.trust_remote_code, shard=spec.shard, config=spec.config)
        except BaseException:
            self._restore_threads()
            raise
        self.ablation = HeadAblation(self.model, spec.heads)
        self.batch_tokens = int(opts.batch_tokens or default_batch_tokens(spec.device))
        self.max_tokens = token_limit(opts.max_tokens, spec.config)  # --max-tokens, within the model's context
        self.pad_id = spec.pad_id
        self.share_prefix = bool(spec.share_prefix)
        self.embed = bool(opts.embed)  # also the response's mean last hidden state (TokenLosses.pooled)
        self.batcher = batch_by_tokens  # (lengths, budget) -> [[row index]]; the bench swaps it to measure
        # a backend dropped without close() lets go of the heap when it is collected
        self._release_heap = (weakref.finalize(self, heap.release) if str(spec.device) == "cpu" and heap.hold()
                              else None)

    @property
    def heap_held(self) -> bool:
        """Whether this backend holds the process's freed memory (``air_ray.engine.heap``) now."""
        return self._release_heap is not None and self._release_heap.alive

    def token_losses(self, prepared: Sequence[PreparedRow], on_batch: OnBatch | None = None) -> list[TokenLosses]:
        out: list = [None] * len(prepared)
        for batch in self.batcher([len(p.input_ids) for p in prepared], self.batch_tokens):
            seqs = [prepared[i].input_ids for i in batch]
            starts = [prepared[i].n_prompt_tokens for i in batch]
            base, ref, ent, *pooled = token_nll_pair(self.model, seqs, starts, ablated=self.ablation.ablated,
                                                     first_layer=self.ablation.first_layer, pad_id=self.pad_id,
                                                     share_prefix=self.share_prefix, pool=self.embed)
            for j, (i, b, r, e) in enumerate(zip(batch, base, ref, ent)):
                out[i] = TokenLosses(b, r, e, pooled[0][j] if pooled else None)
            if on_batch is not None:
                on_batch(len(batch), sum(len(s) for s in seqs))
        return out

    def _restore_threads(self) -> None:
        if self._threads_before:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def close(self) -> None:
        """Drop the model (its memory goes back when nothing else holds it); torch's threads as they were."""
        self._restore_threads()
        if self.model is None:
            return
        cuda = any(p.is_cuda for p in self.model.parameters())
        self.ablation.disable()
        self.model = self.ablation = None
        if cuda:  # the CUDA caching allocator returns memory only for tensors already collected
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        if self._release_heap is not None:
            self._release_heap()  # once: a finalizer runs at most once
