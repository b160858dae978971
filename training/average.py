"""Uniform weight averaging of gated-LoRA adapters from one training lineage (a "model soup").

Owns the last step of the demo adapter's recipe: the mean of warm-started stages 7 and 8 scored a
higher held-out TPF than either stage alone (docs/training.md). A and B are averaged separately,
as they are stored, so the result is again a plain rank-r PEFT adapter of the same size; that is
not the mean of the updates B @ A, only an approximation of it that is reasonable for adapters
warm-started one from another, and the held-out evaluation is what judges it. The inputs must agree on everything but
the weights (rank, alpha, target modules, tensor names and shapes, MASK token, stride, group);
any mismatch is a ValueError naming the field and the adapter, before anything is written.

    python -m training.average runs/s7/adapter runs/s8/adapter --out runs/soup/adapter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.loader import read_adapter_files, write_adapter_files

# adapter_config.json fields (top level, then under "idlm") that averaged adapters must share
_SAME = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora")
_SAME_IDLM = ("mask_token_id", "stride", "gated", "group")


def average_adapters(dirs: list[str | Path], out: str | Path) -> dict:
    """Writes the element-wise mean of the adapters in `dirs` to `out` (same dtype as the first);
    returns the written adapter_config. `idlm.train_steps` is the largest input's (the lineage's
    latest stage) and `idlm.averaged_train_steps` lists every input's."""
    if len(dirs) < 2:
        raise ValueError("average: needs at least two adapters")
    cfgs, weights = zip(*(read_adapter_files(d) for d in dirs))
    first, w0 = cfgs[0], weights[0]
    for d, cfg, w in zip(dirs[1:], cfgs[1:], weights[1:]):
        for k in _SAME:
            if cfg.get(k) != first.get(k):
                raise ValueError(f"average: {d} has {k}={cfg.get(k)!r}, {dirs[0]} has {first.get(k)!r}")
        for k in _SAME_IDLM:
            a, b = (cfg.get("idlm") or {}).get(k), (first.get("idlm") or {}).get(k)
            if a != b:
                raise ValueError(f"average: {d} has idlm.{k}={a!r}, {dirs[0]} has {b!r}")
        if w.keys() != w0.keys():
            raise ValueError(f"average: {d} holds different tensors than {dirs[0]} "
                             f"(e.g. {sorted(w.keys() ^ w0.keys())[:3]})")
        bad = [k for k in w0 if w[k].shape != w0[k].shape]
        if bad:
            raise ValueError(f"average: {d} {bad[0]!r} has shape {tuple(w[bad[0]].shape)}, "
                             f"{dirs[0]} has {tuple(w0[bad[0]].shape)}")
    # accumulate in fp32: the stored weights are fp16 and the mean must not round per addition
    mean = {k: (sum(w[k].float() for w in weights) / len(weights)).to(w0[k].dtype).contiguous()
            for k in w0}
    steps = [int((c.get("idlm") or {}).get("train_steps", 0)) for c in cfgs]
    config = {**first, "idlm": {**(first.get("idlm") or {}), "train_steps": max(steps),
                                "averaged_train_steps": steps}}
    write_adapter_files(out, config, mean)
    return config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+", help="adapter directories to average (two or more)")
    p.add_argument("--out", required=True, help="directory to write the averaged adapter to")
    a = p.parse_args(argv)
    cfg = average_adapters(a.adapters, a.out)
    print(json.dumps({"out": a.out, "averaged_train_steps": cfg["idlm"]["averaged_train_steps"]}))


if __name__ == "__main__":
    main()
