"""Cost of the checkpoint checksums (checkpoint/format.py): writing a shard through the
CRC-32 writer against plain `torch.save`, and the read that verifies a shard on resume, here,
then what that implies for the 830M recipe's checkpoint (recipes/rybakov_830m/baseline.yaml).

After an untimed warm-up, each round writes one shard of `--mb` MB of fp32 tensors both ways
(the order alternating) and reads it back to checksum it; medians over rounds. The 830M
extrapolation scales the measured rates to its checkpoint (fp32 weights, fp32 master copy and
two Adam moments: 16 bytes per parameter), spread over the ranks of its layout, which write
and verify their parts at once.

    python tools/bench_checksum.py              # 256 MB shards, 5 rounds
    python tools/bench_checksum.py --mb 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stable_megatron.bench import ROOT, table
from stable_megatron.checkpoint.format import file_checksum
from stable_megatron.checkpoint.save import save_with_checksum
from stable_megatron.config import load_config, validate
from stable_megatron.model.size import total_params

RECIPE_830M = ROOT / "recipes" / "rybakov_830m" / "baseline.yaml"
BYTES_PER_PARAM = 16  # fp32 weights + fp32 master + Adam's two moments


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="shard size in MB")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    state = {f"t{i}": torch.randn(args.mb * 2**20 // 4 // 16) for i in range(16)}
    size = sum(t.numel() * 4 for t in state.values())
    plain, checked, verify = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "plain.pt", Path(tmp) / "checked.pt"
        torch.save(state, a)  # an untimed warm-up round: the first writes of a file cost more
        save_with_checksum(state, b)
        for r in range(args.rounds):
            arms = [("plain", lambda: torch.save(state, a)),
                    ("checked", lambda: save_with_checksum(state, b))]
            for name, fn in arms if r % 2 == 0 else arms[::-1]:
                (plain if name == "plain" else checked).append(timed(fn))
            verify.append(timed(lambda: file_checksum(b)))
    p, c, v = (statistics.median(x) for x in (plain, checked, verify))
    gb = size / 1e9
    print(f"shard {gb:.2f} GB, {args.rounds} rounds (medians)")
    for line in table(["", "seconds", "GB/s"], [
            ["torch.save", f"{p:.3f}", f"{gb / p:.2f}"],
            ["torch.save + CRC-32", f"{c:.3f}", f"{gb / c:.2f}"],
            ["verify (read + CRC-32)", f"{v:.3f}", f"{gb / v:.2f}"]]):
        print(line)
    print(f"write overhead of the checksum: {100 * (c / p - 1):+.1f}%")

    cfg = load_config(RECIPE_830M)
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    validate(cfg, model_parallel)  # resolves the vocabulary
    total = total_params(cfg, cfg.parallel.tp) * BYTES_PER_PARAM / 1e9
    for ranks in sorted({model_parallel, 8, 64}):
        per_rank = total / ranks
        print(f"830M checkpoint {total:.1f} GB over {ranks} ranks ({per_rank:.2f} GB each): "
              f"checksums add {per_rank / (gb / c) - per_rank / (gb / p):+.2f} s to a save, "
              f"verifying costs {per_rank / (gb / v):.2f} s at resume (at this machine's rates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
