"""Step-weighted SFT on an AIR selection, as a Ray job: submit this file with
``ray job submit --working-dir . --`` and the interpreter, then the flags, e.g.
``--selection out/select --scores out/score --corpus data/gsm8k_sample --output out/sft --max-steps 100``.

Fine-tunes the model with Hugging Face `Trainer` on the selected rows, each response token's loss weighted by
its step's weight from the scores (see air_ray.training). Thin: everything happens in air_ray.training.
(Not an `air-ray` subcommand: tests/test_cluster_manifests.py checks every "python jobs/<x>.py" command line
against the CLI, so none is written out here.)
"""

import _jobpath  # noqa: F401  (first: fixes sys.path; jobs/select.py would shadow the stdlib select)

import argparse
import sys

from air_ray.errors import AirRayError
from air_ray.training import TrainConfig, train_weighted_sft


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description="step-weighted SFT on an AIR selection")
    p.add_argument("--selection", required=True, help="selection.parquet, or the select output directory")
    p.add_argument("--scores", required=True, help="the score output directory (or a folder of partitions)")
    p.add_argument("--corpus", required=True, nargs="+", help="the corpus that was scored (files, dirs, globs)")
    p.add_argument("--output", required=True, help="local directory for the fine-tuned model")
    p.add_argument("--model", default=None, help="model spec (default: smollm2-135m)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--format", choices=("chat", "raw"), default="chat", help="as used for scoring")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="weights dtype (float32; use --bf16 for mixed precision)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-missing", action="store_true",
                   help="train on the rows found when some selected ids are missing from the scores or corpus")
    p.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not append EOS to responses")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    a = p.parse_args(argv)
    return TrainConfig(
        selection=a.selection, scores=a.scores, corpus=a.corpus, output=a.output, model=a.model,
        max_steps=a.max_steps, lr=a.lr, batch_size=a.batch_size, max_length=a.max_length, format=a.format,
        grad_accum=a.grad_accum, device=a.device, dtype=a.dtype, bf16=a.bf16, seed=a.seed,
        allow_missing=a.allow_missing, add_eos=a.add_eos, allow_pickle=a.allow_pickle,
        trust_remote_code=a.trust_remote_code,
    )


def main(argv=None) -> int:
    try:
        train_weighted_sft(parse_args(argv))
    except AirRayError as e:
        print(f"air-ray train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
