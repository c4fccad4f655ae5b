"""Export the weights of a stable_megatron checkpoint, tensor-parallel shards merged.

usage:
  stable-megatron export PATH --format safetensors --out model.safetensors
  stable-megatron export PATH --format hf-gpt2 --out hf_model/ [--trim-vocab]

- safetensors: the full state dict, named `<PipelineModule block index>.<key>` (the same at
  every parallel layout; sigma-reparam's u/v buffers included), with the resolved config and
  the checkpoint's step, consumed samples and layout as JSON in the file's metadata.
- hf-gpt2: a Hugging Face GPT-2 directory (config.json + model.safetensors + tokenizer) for
  `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir)`, for baseline models only
  (learned positions, pre-LN, standard attention, no softmax cap, no sigma-reparam); anything
  else is refused naming the config fields. The vocabulary stays padded (as trained) unless
  --trim-vocab.
- hf-llama: the same for Llama-style models (model.normalization=rmsnorm,
  model.activation=swiglu, rope, pre-norm, standard attention); others are refused naming the
  config fields.
Both hf formats write the run's sentencepiece tokenizer as a Hugging Face fast tokenizer
(tokenizer.json) that encodes and decodes as our tokenizer does (--tokenizer to pick the file).

PATH and --config as for `stable-megatron inspect`. Read-only for the checkpoint: files are
loaded with torch.load(weights_only=True) and never unpickled as arbitrary objects.
Exit code 2 with one line on stderr for a checkpoint that cannot be read or exported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

EXIT_ERROR = 2
FORMATS = ("safetensors", "hf-gpt2", "hf-llama")


def main(argv: list[str] | None = None, prog: str = "stable-megatron export") -> int:
    """`prog`: the name in usage and error lines (tools/export_checkpoint.py passes its own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a stable_megatron checkpoint's merged weights.",
    )
    parser.add_argument("path", help="checkpoint directory, step directory or run directory")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True,
                        help="output file (safetensors) or directory (hf-gpt2)")
    parser.add_argument("--config", help="the run's config YAML, for checkpoints without "
                        "stable_megatron.json whose run directory has no config.yaml")
    parser.add_argument("--trim-vocab", action="store_true",
                        help="hf-gpt2: drop the vocabulary padding rows")
    parser.add_argument("--tokenizer", help="hf-*: the sentencepiece model to export (default: "
                        "the run's own, from its config)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")  # import-time notices of megatron-core and torch
    from stable_megatron.checkpoint import CheckpointError, export

    try:
        with contextlib.redirect_stdout(sys.stderr):
            ckpt = export.open_checkpoint(args.path, args.config)
            if args.format == "safetensors":
                out = export.export_safetensors(ckpt, args.out)
            elif args.format == "hf-llama":
                out = export.export_hf_llama(ckpt, args.out, tokenizer=args.tokenizer)
            else:
                out = export.export_hf_gpt2(ckpt, args.out, trim_vocab=args.trim_vocab,
                                            tokenizer=args.tokenizer)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {out} ({args.format}) from {ckpt.tag_dir} (step {ckpt.step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
