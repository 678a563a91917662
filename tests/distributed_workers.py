"""Worker processes of tests/test_distributed.py: one process per rank on loopback (gloo, CPU).

Run as ``python tests/distributed_workers.py <ddp|fsdp2|peft-ddp> <rank> <world size> <port> <out dir>``; each
rank writes what the test compares to ``<out dir>/<mode>-rank<rank>.pt`` (and rank 0 of fsdp2 the
adapter folder ``<out dir>/adapter``). The model, its adapter and the data are built here and by the
test's single-process run from the same functions, so both see the same numbers.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loracuda  # noqa: E402
from loracuda import LoraConfig  # noqa: E402
from tiny_models import ids, llama, randomize_adapters  # noqa: E402

STEPS = 3
LR = 1e-2
BATCH = 4  # sequences in the whole batch, split evenly over the ranks
LENGTH = 9


def build(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny Llama with a trainable adapter on every linear layer (B random, so gradients reach A)."""
    model = llama(seed=0, layers=2)
    loracuda.inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale_b=0.05)
    return model.to(dtype).train()


def build_peft(dtype: torch.dtype = torch.float32, accelerate: bool = True) -> torch.nn.Module:
    """The same tiny Llama as a PEFT model (every linear layer, B random), on loracuda's kernels
    (loracuda.apply_to_peft) unless ``accelerate`` is False."""
    import peft

    model = peft.get_peft_model(llama(seed=0, layers=2), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale_b=0.05)
    if accelerate:
        loracuda.apply_to_peft(model)
    return model.to(dtype).train()


BUILDERS = {"ddp": build, "fsdp2": build, "peft-ddp": build_peft}


def batch() -> torch.Tensor:
    return ids(batch=BATCH, length=LENGTH, seed=1)


def loss_fn(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def trainable(model: torch.nn.Module) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def single_process_run(dtype: torch.dtype = torch.float32, builder=build) -> dict:
    """The reference: STEPS AdamW steps on the whole batch in one process. Returns the losses, the first
    step's gradients and the final trainable parameters, by parameter name."""
    model = builder(dtype)
    params = trainable(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=LR)
    tokens = batch()
    losses, first_grads = [], None
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, tokens)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in params}
        opt.step()
        losses.append(loss.detach().double())
    return {"losses": torch.stack(losses), "grads": first_grads, "params": {n: p.detach().clone() for n, p in params}}


def _local_batch(rank: int, world: int) -> torch.Tensor:
    per = BATCH // world
    return batch()[rank * per : (rank + 1) * per]


def run_ddp(rank: int, world: int, out: str, mode: str = "ddp") -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = BUILDERS[mode]()
    ddp = DDP(model)
    communicated = []  # the tensors of every bucket the reducer all-reduces

    def record_and_allreduce(state, bucket):
        communicated.extend(bucket.parameters())
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, record_and_allreduce)
    params = trainable(ddp.module)
    opt = torch.optim.AdamW([p for _, p in params], lr=LR)
    tokens = _local_batch(rank, world)
    losses, first_grads, first_communicated = [], None, None
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        communicated.clear()
        loss = loss_fn(ddp, tokens)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in params}
            ids_ = {id(t) for t in communicated}
            first_communicated = sorted(n for n, p in ddp.module.named_parameters() if id(p) in ids_)
        opt.step()
        mean = loss.detach().double()
        dist.all_reduce(mean)  # the whole batch's mean loss: the ranks' halves are equal in size
        losses.append(mean / world)
    torch.save(
        {
            "losses": torch.stack(losses),
            "grads": first_grads,
            "params": {n: p.detach().clone() for n, p in params},
            "communicated": first_communicated,
            "requires_grad": sorted(n for n, _ in params),
        },
        os.path.join(out, f"{mode}-rank{rank}.pt"),
    )


def run_fsdp2(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    model = build()
    for layer in model.model.layers:  # one FSDP unit per decoder layer, the rest in the root unit
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = trainable(model)
    assert all(isinstance(p, DTensor) for _, p in params)
    opt = torch.optim.AdamW([p for _, p in params], lr=LR)
    tokens = _local_batch(rank, world)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, tokens)
        loss.backward()
        opt.step()
        mean = loss.detach().double()
        dist.all_reduce(mean)
        losses.append(mean / world)
    # The full LoRA weights, two ways: each DTensor gathered, and torch.distributed.checkpoint's full
    # state dict (gathered to rank 0, on the CPU).
    gathered = {n: p.full_tensor().detach().clone() for n, p in params}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        # save_adapter writes plain tensors: load the gathered LoRA weights into an unsharded copy of
        # the model and save that one.
        plain = build()
        lora = {k: v for k, v in full.items() if ".lora_A." in k or ".lora_B." in k}
        missing, unexpected = plain.load_state_dict(lora, strict=False)
        assert not unexpected and not [k for k in missing if ".lora_" in k], (missing, unexpected)
        loracuda.save_adapter(plain, os.path.join(out, "adapter"))
        torch.save(
            {"losses": torch.stack(losses), "gathered": gathered, "state_dict_lora": lora},
            os.path.join(out, f"fsdp2-rank{rank}.pt"),
        )
    else:
        torch.save({"losses": torch.stack(losses), "gathered": gathered}, os.path.join(out, f"fsdp2-rank{rank}.pt"))


def main() -> None:
    mode, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)  # two ranks share a small machine
    # A bounded collective timeout: a rank whose peer died fails instead of waiting (the test also kills it).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        if mode == "fsdp2":
            run_fsdp2(rank, world, out)
        else:
            run_ddp(rank, world, out, mode)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
