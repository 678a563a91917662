"""The `ops` suite: each op alone (shrink, expand_add_, backward per token count M; merge_ of one
weight in float32 and bfloat16) beside the plain-PyTorch reference, the addmm_ recipe and PEFT's
modules. Shapes: bench/suites/common.py."""

import torch

from bench.harness import providers as P
from bench.harness.cases import Case, SuiteContext, element_size, generator, randn, register_suite
from bench.suites.common import (SCALE, adapter, backward_cost, expand_cost, merge_cost, merge_shape, ops_shape,
                                 shrink_cost)


@register_suite("ops", "the ops one by one: shrink, expand_add_, backward (per M), merge_ (fp32, bf16)")
def ops_suite(ctx: SuiteContext) -> list:
    ms, k, n, r = ops_shape(ctx)
    dev, dtype = ctx.device, ctx.dtype
    es = element_size(dtype)
    cases = []
    for m in ms:
        shape = {"M": m, "K": k, "N": n, "r": r}

        def make_shrink(m=m):
            g = generator(dev, 1)
            x = randn((m, k), dtype, dev, g)
            lora_a, _ = adapter(k, n, r, dtype, dev, g)
            return P.shrink_providers(x, lora_a, ctx.with_peft)

        def make_expand(m=m):
            g = generator(dev, 2)
            y = randn((m, n), dtype, dev, g)
            h = torch.randn((m, r), generator=g, device=dev)
            _, lora_b = adapter(k, n, r, dtype, dev, g)
            return P.expand_providers(y, h, lora_b, SCALE, ctx.with_peft)

        def make_backward(m=m):
            g = generator(dev, 3)
            x = randn((m, k), dtype, dev, g)
            grad_y = randn((m, n), dtype, dev, g)
            h = torch.randn((m, r), generator=g, device=dev)
            lora_a, lora_b = adapter(k, n, r, dtype, dev, g)
            return P.backward_providers(grad_y, x, h, lora_a, lora_b, SCALE)

        b, f = shrink_cost(m, k, r, es, es)
        cases.append(Case("ops", "shrink", dict(shape), dtype, b, f, make_shrink))
        b, f = expand_cost(m, n, r, es, es)
        cases.append(Case("ops", "expand_add_", dict(shape), dtype, b, f, make_expand))
        b, f = backward_cost(m, k, n, r, es, es)
        cases.append(Case("ops", "backward", dict(shape), dtype, b, f, make_backward))

    mn, mk, mr = merge_shape(ctx)
    merge_dtypes = [torch.float32, torch.bfloat16] + ([dtype] if dtype not in (torch.float32, torch.bfloat16) else [])
    for mdtype in merge_dtypes:

        def make_merge(mdtype=mdtype):
            g = generator(dev, 4)
            weight = randn((mn, mk), mdtype, dev, g, 0.02)
            lora_a, lora_b = adapter(mk, mn, mr, mdtype, dev, g)
            return P.merge_providers(weight, lora_a, lora_b, SCALE, ctx.with_peft)

        mes = element_size(mdtype)
        b, f = merge_cost(mn, mk, mr, mes, mes)
        case = Case("ops", "merge_", {"N": mn, "K": mk, "r": mr}, mdtype, b, f, make_merge, measure_memory=True)
        cases.append(case)
    return cases
