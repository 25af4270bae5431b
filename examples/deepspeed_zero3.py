"""GEM's fused path under DeepSpeed ZeRO-3 (or 1/2), runnable on a CPU.

    torchrun --nproc_per_node 2 examples/deepspeed_zero3.py              # ZeRO-3, 2 processes (gloo on CPU)
    torchrun --nproc_per_node 2 examples/deepspeed_zero3.py --offload    # + parameters offloaded to CPU
    torchrun --nproc_per_node 2 examples/deepspeed_zero3.py --stage 2 --bf16 --accum 2

Needs ``pip install deepspeed`` (in the ``dev`` / ``deepspeed`` extras). DeepSpeed's first launch on a
CPU compiles a small shared-memory op (a few minutes), cached in ~/.cache/torch_extensions.

A tiny Llama with an untied head (vocabulary 1000, hidden 64, 2 layers) is built from a config (no
download) under ``deepspeed.zero.Init``, as ``from_pretrained`` does under a ZeRO-3 config, patched
by ``apply_gem(model, beta=0.7)`` and trained with ``deepspeed.initialize``. Nothing else is
GEM-specific: the patched model's loss is GEM, computed from the last hidden states and the head's
weight, which DeepSpeed gathers for the head's call. ``--trace-head`` prints, for the first step, how
many elements of the head's weight this process holds at each point: the full [V, H] weight is
held only inside the head's call in the forward and between the start of backward and the end of
the head's backward.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig

from gem_kernels.integrations.transformers import apply_gem, shift_causal_labels


def toy_batches(n: int, rows: int, seq: int, vocab: int, seed: int = 0):
    """Learnable toy sequences (token t+1 = token t + a per-row stride); prompts of different
    lengths are labelled -100."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        start = torch.randint(0, vocab - 3, (rows, 1), generator=g)
        stride = torch.randint(1, 4, (rows, 1), generator=g)
        ids = (start + stride * torch.arange(seq)[None, :]) % (vocab - 3) + 3
        labels = ids.clone()
        for i in range(rows):
            labels[i, : 2 + 3 * i % 7] = -100
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def trace_head(head, log):
    """Log the local size of the head's weight at each point of a step (for --trace-head)."""
    w = head.weight

    def note(where):
        log.append((where, w.numel()))

    handles = [
        head.register_forward_pre_hook(lambda m, a: note("head forward starts (after DeepSpeed's fetch)")),
        head.register_forward_hook(lambda m, a, o: note("head forward returned (after DeepSpeed's release)")),
    ]

    def on_input(module, args):  # the hidden states, as DeepSpeed's pre-forward hook passed them on
        if args[0].requires_grad:
            args[0].register_hook(lambda g: note("backward: head's input gradient ready (fused backward done)"))

    handles.append(head.register_forward_pre_hook(on_input))
    return handles


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--offload", action="store_true", help="ZeRO-3 offload_param to CPU")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--trace-head", action="store_true")
    args = p.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = 2
    zero = {"stage": args.stage, "stage3_param_persistence_threshold": 0}  # release even small weights
    if args.offload:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": args.accum,
        "train_batch_size": micro * args.accum * world,
        "zero_optimization": zero,
        "bf16": {"enabled": args.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    # While an HfDeepSpeedConfig of a ZeRO-3 config is alive, transformers builds models under
    # deepspeed.zero.Init (from_pretrained too): each process only ever holds its shards.
    hf_ds = HfDeepSpeedConfig(config)
    model = AutoModelForCausalLM.from_config(cfg)
    apply_gem(model, beta=0.7, return_ce=True)  # the one GEM line
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config)
    engine.train()
    del hf_ds

    trace = []
    handles = trace_head(engine.module.lm_head, trace) if args.trace_head else []
    rows_per_step = micro * args.accum * world
    for step, batch in enumerate(toy_batches(args.steps, rows_per_step, 24, cfg.vocab_size), start=1):
        # Exact accumulation over micro-batches and processes: every micro-batch divides its summed
        # loss by the target tokens of the whole step; engine.backward divides by the accumulation
        # steps and the processes' gradients are averaged, so multiply both back.
        total = int((shift_causal_labels(batch["labels"]) != -100).sum())
        gem = torch.zeros(())
        ce = torch.zeros(())
        for a in range(args.accum):
            first = (a * world + rank) * micro
            local = {k: v[first : first + micro] for k, v in batch.items()}
            out = engine(**local, num_items_in_batch=total)
            engine.backward(out.loss * world * args.accum)
            if trace:
                trace.append(("after engine.backward", engine.module.lm_head.weight.numel()))
                for h in handles:
                    h.remove()
                if rank == 0:
                    print(
                        f"lm_head.weight [{cfg.vocab_size}, {cfg.hidden_size}]: elements of the full weight held by "
                        f"rank 0 in the first micro-batch (0: only its own shard)"
                    )
                    for where, n in trace:
                        print(f"  {n:>6}  {where}")
                trace = []
            engine.step()
            gem += out.loss.detach().float()
            ce += out.ce.detach().float()
        both = torch.stack([gem, ce])
        dist.all_reduce(both)
        if rank == 0:
            print(f"step {step}: GEM {both[0].item():+.4f}  CE {both[1].item():.4f}  ({total} target tokens)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
