"""The `layer` suite: lora_linear forward, backward and forward+backward beside a frozen nn.Linear
("base", the cost the adapter is added to), PEFT's LoRA layer, the reference and the addmm_ recipe,
at dropout 0 and 0.1. Shapes: bench/suites/common.py."""

import math

from bench.harness import providers as P
from bench.harness.cases import Case, SuiteContext, element_size, generator, randn, register_suite
from bench.suites.common import SCALE, adapter, base_cost, layer_cost, layer_shape

LAYER_MODES = ("forward", "backward", "fwd+bwd")
LAYER_DROPOUTS = (0.0, 0.1)
# The project's goals for loracuda's forward+backward time over the frozen base layer's.
LAYER_TARGETS = {0.0: 1.07, 0.1: 1.10}


@register_suite("layer", "lora_linear forward, backward, forward+backward beside a frozen nn.Linear (base)")
def layer_suite(ctx: SuiteContext) -> list:
    ms, k, n, r = layer_shape(ctx)
    dev, dtype = ctx.device, ctx.dtype
    es = element_size(dtype)
    cases = []
    for m in ms:
        for p in LAYER_DROPOUTS:
            # The reference draws its dropout mask with int64 tensor arithmetic (the definition of the
            # hash, not a fast path): seconds per call at full size on a CPU, so --quick leaves it out.
            with_reference = not (ctx.quick and p > 0.0 and not ctx.tiny)
            for mode in LAYER_MODES:

                def make(m=m, p=p, mode=mode, with_reference=with_reference):
                    g = generator(dev, 5)
                    x = randn((m, k), dtype, dev, g)
                    weight = randn((n, k), dtype, dev, g, 1.0 / math.sqrt(k))
                    grad_y = randn((m, n), dtype, dev, g)
                    lora_a, lora_b = adapter(k, n, r, dtype, dev, g)
                    forwards = P.layer_forwards(weight, lora_a, lora_b, SCALE, p, ctx.with_peft, with_reference)
                    benches = {}
                    for name, (forward, trainable) in forwards.items():
                        benches[name] = P.layer_bench(forward, trainable, x, grad_y, mode)
                    bb, bf = base_cost(m, k, n, es, mode)
                    benches["base"].bytes, benches["base"].flops = bb, bf
                    return benches

                b, f = layer_cost(m, k, n, r, es, mode)
                shape = {"M": m, "K": k, "N": n, "r": r, "p": p}
                target = LAYER_TARGETS[p] if mode == "fwd+bwd" else None
                case = Case("layer", mode, shape, dtype, b, f, make, baseline="base", target=target)
                if not with_reference:
                    case.notes.append("reference left out under --quick (its hash dropout mask is slow by design)")
                cases.append(case)
    return cases
