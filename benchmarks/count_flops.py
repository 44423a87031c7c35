"""FlopCounterMode's count of one training step (forward + backward) of a config on the current
device, beside the analytic count of ``megabyte.flops``.

    python benchmarks/count_flops.py --config configs/bench/config-m.yaml [--batch 1]
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import main
from megabyte.flops import training_flops_per_byte
from megabyte.bits import byte_bits
from megabyte.model import build_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=1)
    args, overrides = parser.parse_known_args()
    cli = main([f"--config={args.config}", *overrides, "--trainer.logger=false"], run=False)
    device = cli.trainer.strategy.root_device
    model = build_model(cli.model.config).to(device)
    T = cli.datamodule.seq_len
    x = torch.randint(0, 256, (args.batch, T), device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
        byte_bits(model(x), x).mean().backward()
    counted = counter.get_total_flops() / (args.batch * T)
    analytic = training_flops_per_byte(cli.model.config, T)
    print(f"| {type(model).__name__} | {args.config} | {device} | FlopCounterMode {counted / 1e6:,.2f} M | "
          f"analytic {analytic / 1e6:,.2f} M FLOPs per byte |")
