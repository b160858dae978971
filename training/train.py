"""Training CLI.

    python -m training.train --objective gated-lora|idlm --model smollm2 --stride 4 \
        --steps 400 --out runs/smollm2-risd [--resume] [--export workers/adapters/smollm2-risd]

Checkpoints (trainable params + optimizer + step + rng) go to OUT/ckpt.pt every --ckpt-every
seconds; the gated-LoRA adapter is saved in PEFT format (loader.save_adapter) to OUT/adapter and
to --export if given. Runs on CPU (torch.set_num_threads(--threads)) or CUDA.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm


def load_rows(path: Path) -> list[tuple[list[int], int]]:
    rows = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):  # the data builder is mid-write: its last row is not whole yet
                break
            r = json.loads(line)
            rows.append((r["prompt_ids"] + r["response_ids"], len(r["prompt_ids"])))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", choices=["gated-lora", "idlm"], default="gated-lora")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", nargs="+", default=["training/data/smollm2"],
                    help="data directories; their train.jsonl rows are pooled (e.g. the grid and the diverse set)")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--group", type=int, default=7, help="MASK rows per cut (gated-lora); 7 covers N<=8")
    ap.add_argument("--cuts", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--decay", type=float, default=0.8)
    ap.add_argument("--distill", type=float, default=0.0,
                    help="gated-lora: weight in [0, 1] of KL to the base's own distribution (rest: CE)")
    ap.add_argument("--seed", type=int, default=0,
                    help="row/cut sampling seed: a warm-started stage on the same rows wants a new one")
    ap.add_argument("--out", default="runs/smollm2-risd")
    ap.add_argument("--export", default="")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ckpt-every", type=float, default=120.0, help="seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-gb", type=float, default=6.0,
                    help="memory cap of the frozen real-row K/V cache (oldest entries evicted past it)")
    ap.add_argument("--init-adapter", default="", help="PEFT adapter dir whose LoRA weights start the run")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds of training after which the run saves and stops early (0: none)")
    ap.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="adapter file dtype (float16 halves the file; the engine casts on load)")
    ap.add_argument("--base-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the frozen base model; bfloat16 runs the base products under autocast "
                         "(native bf16 CPUs, GPUs) while the LoRA weights and optimizer stay fp32")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the LoRA weights")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path's input (training only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if not 0.0 <= a.distill <= 1.0 or (a.distill and a.objective != "gated-lora"):
        ap.error(f"--distill: {a.distill} must be in [0, 1] and is only for --objective gated-lora")
    torch.set_num_threads(a.threads)

    from workers.aliases import default_mask_token_id
    from workers.loader import load_adapter, load_model, resolve_model, save_adapter

    model_dir = resolve_model(a.model)
    model, cfg = load_model(model_dir, device=a.device, dtype=getattr(torch, a.base_dtype))
    mask_id = default_mask_token_id(a.model, cfg)
    train_files = [Path(d) / "train.jsonl" for d in a.data]
    while not all(f.exists() and f.stat().st_size > 0 for f in train_files):  # data builder still running
        time.sleep(5)

    def sizes() -> list[int]:
        return [f.stat().st_size for f in train_files]

    rows, size = [r for f in train_files for r in load_rows(f)], sizes()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    init_steps = 0  # steps already in an --init-adapter: the saved adapter counts them too
    if a.objective == "gated-lora":
        from training import gated_lora as obj
        from training import prefix_cached

        params = obj.prepare_model(model, a.rank, a.alpha)
        if a.init_adapter:  # warm start from a PEFT adapter of the same rank (e.g. a CPU-trained one)
            info = load_adapter(model, a.init_adapter)  # the engine's loader: same validation
            if (info.rank, info.alpha) != (a.rank, a.alpha):
                raise ValueError(f"init-adapter: rank {info.rank} alpha {info.alpha}, the run's are "
                                 f"{a.rank} and {a.alpha}")
            params = obj.lora_params(model)
            init_cfg = json.loads((Path(a.init_adapter) / "adapter_config.json").read_text())
            init_steps = init_cfg.get("idlm", {}).get("train_steps", 0)
        # row -> frozen real rows' (K/V [layers, 2, L, Hkv, D], hidden [L, H]), fp16
        kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        kv_bytes = 0  # ~6 MB a 250-token row on SmolLM2-135M: a wide data set does not fit whole
    else:
        from training import idlm_objective as obj

        params = obj.prepare_model(model)
    for p in params:  # master LoRA weights in fp32 whatever the base dtype
        p.data = p.data.float()
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout = a.lora_dropout
    model.train()
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    autocast = torch.autocast(device_type=torch.device(a.device).type, dtype=torch.bfloat16,
                              enabled=a.base_dtype == "bfloat16")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(a.steps, 1))
    )
    step, rng = 0, random.Random(a.seed)
    ck = out / "ckpt.pt"
    if a.resume and ck.exists():
        st = torch.load(ck, map_location=a.device, weights_only=False)
        named = dict(model.named_parameters())
        for n, t in st["params"].items():
            named[n].data.copy_(t)
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step = st["step"]
        rng.setstate(st["rng"])
        print(f"resumed at step {step}")

    def save():
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"params": trainable, "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "rng": rng.getstate(), "args": vars(a)}, str(ck) + ".tmp")
        Path(str(ck) + ".tmp").replace(ck)
        if a.objective == "gated-lora":
            for d in [out / "adapter"] + ([Path(a.export)] if a.export else []):
                save_adapter(model, d, mask_id, stride=a.stride, base_model_name_or_path=a.model,
                             extra={"train_steps": init_steps + step, "group": a.group},
                             dtype=getattr(torch, a.save_dtype))

    last, t0 = time.time(), time.time()
    bar = tqdm(total=a.steps, initial=step, desc=a.objective)
    log = open(out / "log.jsonl", "a")
    while step < a.steps:
        if step % 10 == 0 and sizes() != size:  # a data builder still appending
            size = sizes()
            rows = [r for f in train_files for r in load_rows(f)] or rows
        picks = [rng.randrange(len(rows)) for _ in range(a.batch)]
        opt.zero_grad(set_to_none=True)
        if a.objective == "gated-lora":
            # Real rows never see the LoRA: their K/V are computed once and reused (prefix_cached);
            # the MASK rows of the whole batch run in one forward (block-diagonal over sequences).
            kvs, cut_lists = [], []
            todo = [i for i in picks if i not in kv_cache]
            for j in range(0, len(todo), 64):  # first visits: one padded no-grad forward per 64
                chunk = sorted(set(todo[j : j + 64]))
                for i, kv in zip(chunk, prefix_cached.real_kv_batch(model, [rows[i][0] for i in chunk])):
                    kv_cache[i] = tuple(t.to(torch.float16) for t in kv)
                    kv_bytes += sum(t.nbytes for t in kv_cache[i])
            # evict the oldest entries past the cap, never one this step still needs (the key list
            # is only built when over the cap: most steps are under it)
            cap = a.kv_cache_gb * 2**30
            for i in list(kv_cache) if kv_bytes > cap else []:
                if kv_bytes <= cap:
                    break
                if i not in picks:
                    kv_bytes -= sum(t.nbytes for t in kv_cache.pop(i))
            for i in picks:
                seq, plen = rows[i]
                cuts = obj.sample_cuts(plen, len(seq), a.cuts, rng)
                if cuts:
                    kvs.append(prefix_cached.unstack(seq, plen, kv_cache[i]))
                    cut_lists.append(cuts)
            if not kvs:
                continue
            with autocast:
                loss, stats = prefix_cached.mask_rows_loss_batch(
                    model, kvs, cut_lists, a.group, mask_id, a.decay, a.distill)
            loss.backward()
        else:
            ex = [rows[i] for i in picks]
            batch = obj.collate(ex, a.stride, mask_id)
            batch = tuple(t.to(a.device) for t in batch)
            loss, stats = obj.loss_fn(model, batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        stats = {"step": step, "loss": round(loss.item(), 4), **{k: round(v, 3) for k, v in stats.items()},
                 "elapsed_s": round(time.time() - t0, 1)}
        log.write(json.dumps(stats) + "\n")
        log.flush()
        bar.set_postfix({k: v for k, v in stats.items() if k != "step"})
        bar.update(1)
        if time.time() - last > a.ckpt_every:
            save()
            last = time.time()
        if a.deadline and time.time() - t0 > a.deadline:
            print(f"deadline reached at step {step}")
            break
    save()
    bar.close()
    print(json.dumps({"done": step, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
