"""Data-parallel training of a loracuda-injected Llama on 2 CPU processes (gloo, loopback):
DistributedDataParallel and FSDP2 (torch.distributed.fsdp.fully_shard), against a single-process run on
the concatenated batch.

The ranks are separate Python processes (tests/distributed_workers.py) started with subprocess on a
free port; each test bounds their time (TIMEOUT_S), kills them on failure or timeout, and removes its
temporary folder; the workers destroy their process group on the way out. Gradients of a data-parallel step are the average of the ranks' gradients, which
rounds differently from the single-process gradient of the whole batch: they are compared under
the gradient factor of docs/design.md, section 'Tolerance rule', against a float64 single-process run, and between
ranks exactly.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import peft
import pytest
import torch

import loracuda
import distributed_workers as W
from tiny_models import assert_within_rule, ids, llama, logits

TIMEOUT_S = 120
WORLD = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTOR_GRADIENTS = 3.0
FLOOR = 4 * 2.0**-24  # a few float32 roundings, relative to the reference's norm


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: str) -> list:
    """Runs the WORLD ranks of ``mode`` to completion; returns their results. Fails with the ranks'
    output as soon as one rank fails (the others are killed rather than left waiting in a collective)
    or when the run exceeds TIMEOUT_S; no rank outlives this call."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "tests", "distributed_workers.py")
    logs = [os.path.join(out, f"{mode}-rank{rank}.log") for rank in range(WORLD)]
    procs = []
    try:
        for rank in range(WORLD):
            with open(logs[rank], "w") as log:  # the child keeps its own copy of the descriptor
                procs.append(subprocess.Popen(
                    [sys.executable, script, mode, str(rank), str(WORLD), str(port), out],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                ))
        deadline = time.monotonic() + TIMEOUT_S
        while any(proc.poll() is None for proc in procs):
            failed = [rank for rank, proc in enumerate(procs) if proc.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def tail(rank: int) -> str:
        with open(logs[rank]) as f:
            return f.read()[-4000:]

    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, (
            f"{mode} rank {rank} exited with {proc.returncode} (-9: killed after another rank failed or past "
            f"the {TIMEOUT_S} s limit):\n{tail(rank)}"
        )
    return [torch.load(os.path.join(out, f"{mode}-rank{rank}.pt")) for rank in range(WORLD)]


@pytest.fixture
def out_dir():
    """A temporary folder for the ranks' results, removed after the test whatever its outcome."""
    with tempfile.TemporaryDirectory(prefix="loracuda-dist-") as folder:
        yield folder


@pytest.fixture(scope="module")
def reference():
    """The single-process runs: float32 (what plain PyTorch gets) and float64 (the reference)."""
    return W.single_process_run(torch.float32), W.single_process_run(torch.float64)


def assert_rule(what: str, got: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, factor: float) -> None:
    ref_norm = float(torch.linalg.vector_norm(ref64))
    err = float(torch.linalg.vector_norm(got.double() - ref64))
    err_plain = float(torch.linalg.vector_norm(plain.double() - ref64))
    assert err <= factor * err_plain + FLOOR * ref_norm, (what, err, err_plain, ref_norm)


def test_ddp_gradients_equal_on_ranks_and_match_one_process(out_dir, reference):
    plain, ref64 = reference
    ranks = launch("ddp", out_dir)
    lora_names = sorted(n for n in plain["grads"] if ".lora_A." in n or ".lora_B." in n)
    for result in ranks:
        # Only the LoRA factors require grad, and they are exactly what the reducer communicates.
        assert result["requires_grad"] == lora_names == sorted(plain["grads"])
        assert result["communicated"] == lora_names
    for name in lora_names:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        assert_rule(f"grad {name}", ranks[0]["grads"][name], plain["grads"][name], ref64["grads"][name], FACTOR_GRADIENTS)
    assert_rule("losses", ranks[0]["losses"], plain["losses"], ref64["losses"], 2.0)
    # Adam normalises each update, so the parameters after three steps amplify rounding of tiny
    # gradients; they are held to the same rule as the gradients.
    for name in lora_names:
        assert_rule(f"param {name}", ranks[0]["params"][name], plain["params"][name], ref64["params"][name], FACTOR_GRADIENTS)


def test_fsdp2_trains_and_saves_a_loadable_adapter(out_dir, reference):
    plain, ref64 = reference
    ranks = launch("fsdp2", out_dir)
    assert torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    assert_rule("losses", ranks[0]["losses"], plain["losses"], ref64["losses"], 2.0)
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]  # it trains
    gathered = ranks[0]["gathered"]
    assert sorted(gathered) == sorted(plain["params"])
    for name, value in gathered.items():
        assert torch.equal(value, ranks[1]["gathered"][name]), name
        assert torch.equal(value, ranks[0]["state_dict_lora"][name]), name  # DTensor gather == DCP full state dict
        assert_rule(f"param {name}", value, plain["params"][name], ref64["params"][name], FACTOR_GRADIENTS)

    folder = os.path.join(out_dir, "adapter")
    ours = loracuda.load_adapter(llama(seed=0, layers=2), folder)
    loaded = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    assert sorted(loaded) == sorted(gathered)
    for name, value in gathered.items():
        assert torch.equal(loaded[name].detach(), value), name

    theirs = peft.PeftModel.from_pretrained(llama(seed=0, layers=2), folder).eval()
    state = theirs.state_dict()
    for name, value in gathered.items():
        # loracuda: <path>.lora_A.default; PEFT: base_model.model.<path>.lora_A.default.weight
        assert torch.equal(state[f"base_model.model.{name}.weight"], value), name
    # Same logits under the tolerance rule; the float64 reference is PEFT's model in float64.
    theirs64 = peft.PeftModel.from_pretrained(llama(seed=0, layers=2).double(), folder).eval()
    tokens = ids()
    with torch.no_grad():
        ref = theirs64(tokens).logits
    assert_within_rule(logits(ours.eval(), tokens), logits(theirs, tokens), ref)


@pytest.mark.slow
def test_ddp_of_a_peft_model_on_loracuda_matches_one_process(out_dir):
    """A PeftModel on loracuda's kernels (apply_to_peft) under DDP: the ranks agree exactly, and the
    losses and first gradients match plain PEFT in one process on the whole batch (the rule against PEFT
    in float64)."""
    plain = W.single_process_run(torch.float32, lambda dtype: W.build_peft(dtype, accelerate=False))
    ref64 = W.single_process_run(torch.float64, lambda dtype: W.build_peft(dtype, accelerate=False))
    ranks = launch("peft-ddp", out_dir)
    names = sorted(plain["grads"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    for result in ranks:
        assert result["requires_grad"] == names
        assert result["communicated"] == names
    for name in names:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        assert_rule(f"grad {name}", ranks[0]["grads"][name], plain["grads"][name], ref64["grads"][name], FACTOR_GRADIENTS)
    # Parameters after three AdamW steps are compared between the ranks only: Adam divides each update by
    # the gradient's running magnitude, so for near-zero gradients the rounding of DDP's averaging (which
    # the one-process run does not do) moves an update by up to lr, whatever computes the layers.
    assert_rule("losses", ranks[0]["losses"], plain["losses"], ref64["losses"], 2.0)
