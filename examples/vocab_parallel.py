"""Vocabulary-parallel GEM with torch.distributed: every rank holds a slice of the lm_head rows.

Run on CPU with the gloo backend (any number of ranks; the vocabulary need not divide evenly):

    torchrun --nproc_per_node=2 examples/vocab_parallel.py

Each rank computes the logits of its vocabulary slice only, ``gem_loss(..., process_group=...)``
combines the per-row statistics across ranks (three all-reduces of O(tokens) values), and every rank
gets the same loss and the gradient of its own slice. The fused path does the same from the hidden
states and the weight slice without materialising logits. Rank 0 then checks both against a
single-process computation on the full vocabulary.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gem_kernels import fused_linear_gem_loss, gem_loss

TOKENS, HIDDEN, VOCAB = 64, 32, 1001  # 1001 does not divide evenly: shards are 501 + 500 on 2 ranks


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    group = dist.group.WORLD  # in a real job: the tensor-parallel group

    # Replicated activations and labels (same seed everywhere), a vocabulary slice of the lm_head.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).to(device)
    full_weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.3).to(device)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g).to(device)
    labels[::5] = -100  # some ignored positions (prompt tokens, padding)
    rows = torch.tensor_split(torch.arange(VOCAB), world)[rank]
    start, stop = int(rows[0]), int(rows[-1]) + 1
    weight = full_weight[start:stop].clone().requires_grad_(True)

    # 1) Logits path: this rank's logits [TOKENS, V_local] only.
    logits = hidden @ weight.t()
    loss = gem_loss(logits, labels, beta=0.7, process_group=group)
    loss.backward()

    # 2) Fused path: the same loss from hidden states and the weight slice, no logits tensor.
    h = hidden.clone().requires_grad_(True)
    w = full_weight[start:stop].clone().requires_grad_(True)
    fused = fused_linear_gem_loss(h, w, labels, beta=0.7, process_group=group)
    fused.backward()
    for r in range(world):  # print in rank order
        if r == rank:
            print(
                f"[rank {rank}] vocab [{start}, {stop}): loss {loss.item():.6f}, fused loss {fused.item():.6f}",
                flush=True,
            )
        dist.barrier()

    # Check against one process holding the whole vocabulary.
    # (gloo's all_gather needs equal sizes, so the uneven weight-gradient slices are summed into place)
    grad_weight = torch.zeros(VOCAB, HIDDEN, device=device)
    grad_weight[start:stop] = weight.grad
    dist.all_reduce(grad_weight)
    if rank == 0:
        w_full = full_weight.clone().requires_grad_(True)
        h_full = hidden.clone().requires_grad_(True)
        ref = gem_loss(h_full @ w_full.t(), labels, beta=0.7)
        ref.backward()
        print(f"single process loss {ref.item():.6f}")
        print(
            f"|loss - single| = {abs(loss.item() - ref.item()):.2e}, "
            f"|fused - single| = {abs(fused.item() - ref.item()):.2e}"
        )
        print(f"max |grad_weight - single| = {(grad_weight - w_full.grad).abs().max().item():.2e}")
        print(f"max |fused grad_hidden - single| = {(h.grad - h_full.grad).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
