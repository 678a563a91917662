"""The issue's layer target, measured robustly on a noisy machine: lora_linear forward+backward against a
frozen nn.Linear's, fp32, M = K = N = 2048, r = 16, dropout 0 and 0.1. The three are timed in turns
(one call each per round), the ratio is taken within each round (same machine conditions), and the
median and 20th/80th percentiles of those per-round ratios are printed.

    python bench/layer_ratio.py [threads] [rounds]
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import loracuda  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 40
torch.set_num_threads(threads)
torch.manual_seed(0)
M=K=N=2048; r=16
lin=torch.nn.Linear(K,N); lin.weight.requires_grad_(False); lin.bias.requires_grad_(False)
A=(torch.randn(r,K)*0.02).requires_grad_(); B=(torch.randn(N,r)*0.02).requires_grad_()
x=torch.randn(M,K,requires_grad=True); dy=torch.randn(M,N)
def base():
    y=lin(x); y.backward(dy)
def lora(p):
    y=loracuda.lora_linear(x,lin.weight,lin.bias,A,B,2.0,p,True); y.backward(dy)
fs={"base":base,"p0":lambda: lora(0.0),"p.1":lambda: lora(0.1)}
ts={k:[] for k in fs}
for f in fs.values(): f()
for i in range(rounds):
    for k,f in fs.items():
        s=time.perf_counter(); f(); ts[k].append(time.perf_counter()-s)
def quantiles(values):
    q = statistics.quantiles(values, n=10)
    return statistics.median(values), q[1], q[7]  # median, 20th, 80th percentile


print(f"threads {threads}, {rounds} rounds, base median {statistics.median(ts['base']) * 1e3:.1f} ms")
for name, target in (("p0", 1.07), ("p.1", 1.10)):
    med, p20, p80 = quantiles([a / b for a, b in zip(ts[name], ts["base"])])
    print(f"  dropout {name[1:] or 0}: loracuda / base = {med:.3f} (p20 {p20:.3f}, p80 {p80:.3f}); target <= {target}")
