"""Peak memory of one DeepSpeed ZeRO-3 training step (forward + backward) on each process: the
fused path (``apply_gem``) against the logits path (``gem_compute_loss_func``).

    PYTHONPATH=. torchrun --nproc_per_node 2 -m benchmarks.zero3_memory [--vocab 32000 --rows 4 --seq 256]

A tiny Llama with an untied head (hidden 64, 2 layers) built under ``deepspeed.zero.Init``, ZeRO-3
with ``stage3_param_persistence_threshold: 0`` (every weight is released after use), one process
per CPU over gloo (DeepSpeed's CPU accelerator; on a GPU machine pass ``--device cuda``). Each path
runs one unmeasured step first (DeepSpeed records its module trace then), then one measured step
with ``benchmarks.measure.peak_memory``. Printed by rank 0: peak memory above the step's start and
the largest single allocation.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rows", type=int, default=4, help="rows per process")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig

    from benchmarks.measure import peak_memory
    from gem_kernels.integrations.transformers import apply_gem, gem_compute_loss_func, remove_gem

    deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": args.rows,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.rows * world,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf_ds = HfDeepSpeedConfig(config)  # noqa: F841 (from_config builds under zero.Init while it lives)
    model = AutoModelForCausalLM.from_config(cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
    engine.train()
    dev = engine.device
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.rows, args.seq), generator=g).to(dev)
    mask = torch.ones_like(ids)

    def fused_step():
        engine.backward(engine(input_ids=ids, attention_mask=mask, labels=ids).loss)

    logits_loss = gem_compute_loss_func(beta=0.7)

    def logits_step():
        out = engine(input_ids=ids, attention_mask=mask)
        engine.backward(logits_loss(out, ids))

    results = {}
    for name, step in (("logits path (gem_compute_loss_func)", logits_step), ("fused path (apply_gem)", fused_step)):
        if step is fused_step:
            apply_gem(engine.module, beta=0.7)
        else:
            remove_gem(engine.module)
        step()
        engine.step()
        results[name] = peak_memory(step, device=args.device)
        engine.step()
    if rank == 0:
        n = args.rows * args.seq
        print(
            f"ZeRO-3, {world} processes, per process: {args.rows} x {args.seq} tokens, V = {args.vocab}, "
            f"H = {args.hidden}; head weight {args.vocab * args.hidden * 4 / 2**20:.2f} MiB fp32, logits "
            f"[{n}, {args.vocab}] {n * args.vocab * 4 / 2**20:.2f} MiB fp32"
        )
        print("| path | peak memory of the step (rank 0) | largest single allocation |")
        print("|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r.peak_bytes / 2**20:.2f} MiB | {r.largest_alloc_bytes / 2**20:.2f} MiB |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
