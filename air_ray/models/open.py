"""One way to open a model from its options: ``open_model(options)`` -> ``OpenModel``.

``options`` is anything with ``model``, ``allow_pickle`` and ``trust_remote_code`` (every ``air_ray.config``
class with model options). The model is prepared (resolved, converted or downloaded once: ``resolve``) and its
config read; the tokenizer is loaded on first use, the weights only when ``load`` is called. Every part that needs
a model (the scorer, the prepare stage, the driver's checks, heads, training, compare, export) opens it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from air_ray.models.families import Family, family_of
from air_ray.models.load import load_config, load_model, load_tokenizer, model_shape, token_limit
from air_ray.models.resolve import ModelRef, prepare_model


@dataclass
class OpenModel:
    """A prepared model: its checkpoint (``ref``: name, local path, fingerprint) and config; ``tokenizer`` (loaded
    once, on first use) and ``load()`` (the weights)."""

    ref: ModelRef
    config: object  # the transformers config
    allow_pickle: bool = False
    trust_remote_code: bool = False
    _tokenizer: object = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        return self.ref.fingerprint

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(num_layers, num_heads, num_kv_heads, head_dim)."""
        return model_shape(self.config)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ref, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def family(self) -> Family:
        """The supported decoder family of this model; one line naming the supported ones otherwise."""
        return family_of(self.config)

    def token_limit(self, max_tokens: int | None) -> int | None:
        """``--max-tokens`` within the model's context (``air_ray.models.load.token_limit``)."""
        return token_limit(max_tokens, self.config)

    def load(self, *, dtype: str = "auto", device: str = "auto", shard: bool = False):
        """The causal LM in eval mode (``air_ray.models.load.load_model``)."""
        return load_model(self.ref, dtype=dtype, device=device, allow_pickle=self.allow_pickle,
                          trust_remote_code=self.trust_remote_code, shard=shard, config=self.config)


def open_model(options, *, check_family: bool = False) -> OpenModel:
    """Prepare the model ``options`` name and read its config; ``check_family``: refuse a model outside the supported
    families (``air_ray.models.families``) now, with one line, before anything loads."""
    ref = prepare_model(options.model, allow_pickle=options.allow_pickle)
    trust = options.trust_remote_code
    opened = OpenModel(ref, load_config(ref, trust_remote_code=trust), options.allow_pickle, trust)
    if check_family:
        opened.family()
    return opened
