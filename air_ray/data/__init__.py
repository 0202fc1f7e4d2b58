"""The data contract: what a corpus row may look like and what the engine gets from it.

``corpus`` expands URIs and reads files as chunks of raw records; ``shapes`` turns a record of any supported
shape into one ``Conversation`` or a ``RowError`` with a stable reason; ``rows`` renders the scored response and
turns it into token ids, response token offsets and step spans (``PreparedRow``); ``steps`` splits a response
into steps; ``ids`` finds global duplicate ids.

May import: ``air_ray.errors``, ``air_ray.fsio``; a tokenizer is passed in. Never ``config`` (options are read
by attribute; the choice lists and defaults the options use are declared here), a model, torch or Ray.
"""

from pathlib import Path

# 200 GSM8K rows installed with the package (README.md beside it): what `air-ray demo` scores
SAMPLE = Path(__file__).with_name("gsm8k_sample.jsonl")
