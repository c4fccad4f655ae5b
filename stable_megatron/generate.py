"""`stable-megatron generate CHECKPOINT --prompt TEXT`: continue a prompt with a trained model.

The quickest look at what a run learned. The checkpoint may come from any TP x PP x DP layout:
its tensor-parallel shards are merged (`checkpoint.view`, read-only, `weights_only` loads)
and the model is built in this one process at TP = PP = 1 on the CPU (or `--device cuda`).
Text goes through the run's own tokenizer: the built-in corpus's (rebuilt in the data cache
if it is gone) or the recipe's `data.tokenizer_model`; `--tokenizer` overrides it.

Decoding: greedy (`--temperature 0`, the default) or sampling from softmax(logits / T),
optionally restricted to the `--top-k` most likely tokens, with `--seed`. Only the tokenizer's
ids are candidates (never the vocabulary padding). The context is the last `seq_length` tokens
(the positions the model was trained on); each new token runs the model over that context
again (no key/value cache: meant for looking, not serving). Generation stops after
`--max-new-tokens` or at the end-of-document token.

    stable-megatron generate runs/tiny --prompt "The President" --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Generator:
    """A model loaded from a checkpoint, ready to continue token sequences."""

    model: torch.nn.Module
    cfg: object  # stable_megatron.config.Config
    tokenizer: object  # stable_megatron.data.tokenizer.Tokenizer
    device: torch.device

    @torch.no_grad()
    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """[vocab of the tokenizer] fp32 logits for the token after `ids`."""
        context = ids[-self.cfg.model.seq_length:]
        tokens = torch.tensor([context], dtype=torch.long, device=self.device)
        logits = self.model(tokens)  # [s, b, V_padded]
        return logits[-1, 0, : self.tokenizer.vocab_size].float()

    def tokens(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0) -> Iterator[int]:
        """The continuation of `prompt_ids`, one token id at a time."""
        if not prompt_ids:
            prompt_ids = [self.tokenizer.eod_id]  # an empty prompt starts a new document
        ids = list(prompt_ids)
        rng = torch.Generator(device="cpu").manual_seed(seed)
        for _ in range(max_new_tokens):
            token = choose(self.next_token_logits(ids).cpu(), temperature, top_k, rng)
            if token == self.tokenizer.eod_id:
                return
            ids.append(token)
            yield token


def choose(logits: torch.Tensor, temperature: float, top_k: int | None,
           rng: torch.Generator) -> int:
    """The argmax at temperature 0; else a draw from softmax(logits / temperature) over the
    `top_k` largest logits (all when None)."""
    if temperature <= 0:
        return int(logits.argmax())
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))


def run_tokenizer(cfg, override: str | None = None):
    """The tokenizer of the run `cfg` describes (or the file `override`)."""
    from stable_megatron.checkpoint.view import tokenizer_model_of
    from stable_megatron.data.tokenizer import Tokenizer

    return Tokenizer(tokenizer_model_of(cfg, override))


def load(path: str, config: str | None = None, tokenizer: str | None = None,
         device: str = "cpu") -> Generator:
    """The checkpoint at `path` (a tag, a checkpoint directory or a run directory) as a
    `Generator` in this process. Raises `CheckpointError` / `DataError` with the problem."""
    from stable_megatron import parallel
    from stable_megatron.checkpoint import shards, view
    from stable_megatron.model.gpt import build_model

    ckpt = view.open_checkpoint(path, config)
    cfg = shards.reference_config(ckpt.config, ckpt.tp)
    tok = run_tokenizer(cfg, tokenizer)
    state = view.merged_state_dict(ckpt)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its partitioning
        ps = parallel.initialize(1, 1, device)
        model = build_model(cfg, ps.topology, ps.device).to(ps.device)
    view.load_into_model(model, state)
    model.eval()
    return Generator(model=model, cfg=cfg, tokenizer=tok, device=ps.device)


def main(argv: list[str] | None = None) -> int:
    from stable_megatron.checkpoint.format import CheckpointError
    from stable_megatron.data import DataError

    parser = argparse.ArgumentParser(
        prog="stable-megatron generate",
        description="Continue a prompt with a checkpoint's model (any layout; one process).")
    parser.add_argument("checkpoint", help="a checkpoint tag, checkpoint directory or run "
                                           "directory (its newest complete checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); > 0: sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--config", help="the run's config, for checkpoints without one")
    parser.add_argument("--tokenizer", help="a sentencepiece model instead of the run's")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be >= 1")
    try:
        gen = load(args.checkpoint, args.config, args.tokenizer, args.device)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        prompt_ids = gen.tokenizer.encode(args.prompt)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        # decode the prompt with the continuation, so that a piece's leading space (which
        # sentencepiece drops at the start of a text) survives, and print what is new
        shown = gen.tokenizer.decode(prompt_ids)
        emitted = list(prompt_ids)
        for token in gen.tokens(prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                                args.seed):
            emitted.append(token)
            text = gen.tokenizer.decode(emitted)  # whole pieces: byte tokens join into chars
            sys.stdout.write(text[len(shown):] if text.startswith(shown) else text)
            sys.stdout.flush()
            shown = text
        sys.stdout.write("\n")
    finally:
        from stable_megatron import parallel

        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
