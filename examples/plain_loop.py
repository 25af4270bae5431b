"""GEM in a plain PyTorch (or accelerate) training loop, with exact gradient accumulation.

    python examples/plain_loop.py                  # plain PyTorch, CPU or one GPU
    python examples/plain_loop.py --accelerate     # the same loop driven by accelerate.Accelerator
    torchrun --nproc_per_node 2 examples/plain_loop.py --accelerate   # two processes (DDP; gloo on CPU)

A tiny Llama is built from a config (no download) and trained on toy arithmetic sequences, so the
numbers only show that the loop runs and learns; swap in your model, tokenizer and data. The one GEM-specific
line is ``apply_gem(model, beta=0.7)``: afterwards ``model(**batch, labels=labels)`` in training
mode returns the GEM loss, computed from the last hidden states and the LM-head weight without
building the [batch, seq, vocab] logits.

Gradient accumulation: every micro-batch's loss is its *summed* GEM divided by the number of
target tokens in the whole accumulated batch (``num_items_in_batch``), so the accumulated gradient
is exactly that of one big batch. With several processes that count is summed over processes and
the loss multiplied by the number of processes, because DDP averages gradients.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gem_kernels.integrations.transformers import apply_gem, shift_causal_labels


def random_batches(n_batches: int, batch_size: int, seq: int, vocab: int, seed: int = 0):
    """Right-padded batches of learnable toy sequences (token t+1 = token t + a per-row stride,
    modulo the vocabulary); the first tokens of each row play the prompt (-100)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        start = torch.randint(0, vocab - 3, (batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (batch_size, 1), generator=g)
        ids = (start + stride * torch.arange(seq)[None, :]) % (vocab - 3) + 3
        lengths = torch.randint(seq // 2, seq + 1, (batch_size,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # pad id 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerate", action="store_true", help="drive the loop with accelerate.Accelerator")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    apply_gem(model, beta=args.beta, return_ce=True)  # the one GEM line
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    accelerator = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        model, optimizer = accelerator.prepare(model, optimizer)
        device = accelerator.device
    else:
        model.to(device)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0

    batches = random_batches(args.steps * args.accum, args.batch_size, args.seq, config.vocab_size, seed=rank)
    model.train()
    for step in range(args.steps):
        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(args.accum)]
        # Target tokens of the whole accumulated batch (on every process), after the causal shift.
        num_items = sum((shift_causal_labels(b["labels"]) != -100).sum() for b in micro)
        if accelerator is not None:
            num_items = accelerator.reduce(num_items, reduction="sum")
        step_loss = torch.zeros(2, device=device)  # this process's share of (GEM, CE)
        for i, batch in enumerate(micro):
            sync = accelerator.no_sync(model) if accelerator is not None and i < args.accum - 1 else _null()
            with sync:
                out = model(**batch, num_items_in_batch=num_items)
                # DDP averages gradients over processes; the loss is already normalised by the
                # global token count, so undo that average.
                loss = out.loss * world
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
            step_loss += torch.stack([out.loss.detach(), out.ce])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:  # the shares of all processes add up to the global batch's means
            step_loss = accelerator.reduce(step_loss, reduction="sum")
        if rank == 0:
            gem, ce = step_loss.tolist()
            print(f"step {step + 1}: gem {gem:.4f}  ce {ce:.4f}  (target tokens {int(num_items)})")

    # Evaluation and generation are the model's own: logits are returned as usual.
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    unwrapped.eval()
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in next(random_batches(1, 2, args.seq, config.vocab_size, seed=99)).items()}
        out = unwrapped(**batch)
        prompt = batch["input_ids"][:1, :8]
        generated = unwrapped.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
        )
    if rank == 0:
        print(
            f"eval: gem {out.loss.item():.4f}, logits {tuple(out.logits.shape)}; "
            f"generated {generated.shape[1] - prompt.shape[1]} tokens"
        )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
