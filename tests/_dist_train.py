"""Run under torchrun by tests/test_train.py: the same tiny run with DDP, then with FSDP2, in one process group.

    python -m torch.distributed.run --nproc_per_node=2 tests/_dist_train.py OUT.json
"""
import json
import sys

import torch

from fastlayers import train


def main(out):
    torch.set_num_threads(1)
    cfg = train.Config(preset="hybridnorm-tiny", model_args=dict(n_layers=2, dim=64, ffn_hidden=160), seq_len=32,
                       data_bytes=256 << 10, steps=3, batch=4, eval_every=3, eval_batches=2, seed=int(sys.argv[2]))
    res = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        cfg.fsdp = fsdp
        r = train.train(cfg, progress=False)
        res[name] = dict(losses=r.losses, evals=r.evals, world=r.summary["world_size"])
    if train.Dist().rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
