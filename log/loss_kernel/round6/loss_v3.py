"""Round-6 variants of the loss kernel (development only). Flags: FAST (libdevice's ftz exp2 and fast division:
one MUFU instruction each), SPLIT (pass 1's full blocks without masks, then the tail), PREFETCH (the next
block loaded before working on this one), I32 (the one-hot's compare in 32 bits)."""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.exp2(x)
    return tl.exp2(x)


@triton.jit
def _sigmoid_parts(x, k2, FAST: tl.constexpr, RCP_FMA: tl.constexpr = False):
    a = x * k2
    e = _exp2(tl.minimum(a, 126.0), FAST)
    if RCP_FMA:  # 1 / y for y in [1, 2^126]: a seed from the bits, three Newton steps on the FMA pipe
        y = 1.0 + e
        r = (0x7EF311C3 - y.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
        r = r + r * (1.0 - y * r)
        r = r + r * (1.0 - y * r)
        s = r + r * (1.0 - y * r)
    elif FAST:
        s = libdevice.fast_dividef(1.0, 1.0 + e)
    else:
        s = 1.0 / (1.0 + e)
    return s, e * s


@triton.jit
def _pass1(x, mask, acc, m_vec, k2, cap, cap_log2e, SOFTCAP: tl.constexpr, FIXED_SHIFT: tl.constexpr,
           MASKED: tl.constexpr, FAST: tl.constexpr, RCP_FMA: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    if FIXED_SHIFT:
        s, t = _sigmoid_parts(x, k2, FAST, RCP_FMA)
        p = _exp2(t * -cap_log2e, FAST)
        if MASKED:
            p = tl.where(mask, p, 0.0)
        acc += p
    else:
        if SOFTCAP:
            s, t = _sigmoid_parts(x, k2, FAST, RCP_FMA)
            x = cap * s
        if MASKED:
            x = tl.where(mask, x, float("-inf"))
        d = x - m_vec
        e = _exp2(-tl.abs(d) * LOG2E, FAST)
        acc = tl.where(d > 0.0, acc * e + 1.0, acc + e)
        m_vec = tl.maximum(m_vec, x)
    return acc, m_vec


@triton.jit
def _pass2(x, ptrs, mask, onehot, shift, c1, k2, cap, cap_log2e, g_scale, SOFTCAP: tl.constexpr,
           FIXED_SHIFT: tl.constexpr, FAST: tl.constexpr, RCP_FMA: tl.constexpr, STORE_HINT: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    if SOFTCAP:
        s, t = _sigmoid_parts(x, k2, FAST, RCP_FMA)
        q = _exp2(t * -cap_log2e if FIXED_SHIFT else (cap * s - shift) * LOG2E, FAST) * c1
        g = tl.where(onehot, q - g_scale, q) * (s * t)
    else:
        q = _exp2((x - shift) * LOG2E, FAST) * c1
        g = tl.where(onehot, q - g_scale, q)
    if STORE_HINT == 1:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask, eviction_policy="evict_first")
    elif STORE_HINT == 2:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def loss_kernel(logits_ptr, targets_ptr, loss_ptr, n_rows, V, stride_row, k2, cap, cap_log2e, g_scale,
                SOFTCAP: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK_V: tl.constexpr, FAST: tl.constexpr,
                PERSIST: tl.constexpr, STORE_HINT: tl.constexpr, KEEP0: tl.constexpr):
    """Prefetch, split, 32-bit one-hot always; PERSIST: programs loop over rows; STORE_HINT 1: evict_first stores,
    2: streaming (.cs) stores; KEEP0: the row's first block stays in registers from pass 1 to the end of pass 2."""
    LOG2E: tl.constexpr = 1.4426950408889634
    RCP_FMA: tl.constexpr = False
    cols = tl.arange(0, BLOCK_V)
    first = tl.program_id(0)
    step_rows = tl.num_programs(0) if PERSIST else n_rows
    for row32 in range(first, n_rows, step_rows):
        row = tl.cast(row32, tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row).to(tl.int32)
        x_t = tl.load(row_ptr + target).to(tl.float32)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        m_vec = tl.full([BLOCK_V], -3.4028234663852886e38, dtype=tl.float32)
        v_full = (V // BLOCK_V) * BLOCK_V
        x_next = tl.load(row_ptr + cols, mask=cols < V, eviction_policy="evict_last")
        x0 = x_next
        for start in range(0, v_full, BLOCK_V):
            x = x_next.to(tl.float32)
            x_next = tl.load(row_ptr + start + BLOCK_V + cols, mask=cols < V - start - BLOCK_V, eviction_policy="evict_last")
            acc, m_vec = _pass1(x, None, acc, m_vec, k2, cap, cap_log2e, SOFTCAP, FIXED_SHIFT, False, FAST, RCP_FMA)
        for start in range(v_full, V, BLOCK_V):
            mask = cols < V - start
            x = x_next.to(tl.float32)
            acc, m_vec = _pass1(x, mask, acc, m_vec, k2, cap, cap_log2e, SOFTCAP, FIXED_SHIFT, True, FAST, RCP_FMA)
        if FIXED_SHIFT:
            shift = cap
            total = tl.sum(acc, axis=0)
        else:
            shift = tl.max(m_vec, axis=0)
            total = tl.sum(acc * tl.exp2((m_vec - shift) * LOG2E), axis=0)
        if FIXED_SHIFT:
            s_t, t_t = _sigmoid_parts(x_t, k2, False)
            shift_minus_z_t = cap * t_t
        elif SOFTCAP:
            s_t, t_t = _sigmoid_parts(x_t, k2, False)
            shift_minus_z_t = shift - cap * s_t
        else:
            shift_minus_z_t = shift - x_t
        tl.store(loss_ptr + row, shift_minus_z_t + tl.log(total))
        c1 = g_scale / total
        nb = tl.cdiv(V, BLOCK_V)
        last = (nb - 1) * BLOCK_V
        stop = 1 if KEEP0 else 0  # the last block pass 2 loads (block 0 is in registers with KEEP0)
        x_next = tl.load(row_ptr + last + cols, mask=cols < tl.where(last >= stop * BLOCK_V, V - last, 0), eviction_policy="evict_first")
        for back in range(0, nb - stop):
            start = last - back * BLOCK_V
            mask = cols < V - start
            x = x_next.to(tl.float32)
            nxt = start - BLOCK_V
            x_next = tl.load(row_ptr + nxt + cols, mask=cols < tl.where(nxt >= stop * BLOCK_V, V - nxt, 0), eviction_policy="evict_first")
            _pass2(x, row_ptr + start + cols, mask, cols == target - start, shift, c1, k2, cap, cap_log2e, g_scale,
                   SOFTCAP, FIXED_SHIFT, FAST, RCP_FMA, STORE_HINT)
        if KEEP0:
            _pass2(x0.to(tl.float32), row_ptr + cols, cols < V, cols == target, shift, c1, k2, cap, cap_log2e, g_scale,
                   SOFTCAP, FIXED_SHIFT, FAST, RCP_FMA, STORE_HINT)


def run(logits, targets, softcap, softcap_scale, grad_scale, block_v=4096, num_warps=8, fast=True, persist=0,
        store_hint=0, keep0=False):
    import torch
    n, V = logits.shape
    use_cap = softcap > 0
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    programs = min(n, persist * torch.cuda.get_device_properties(logits.device).multi_processor_count) if persist else n
    loss_kernel[(programs,)](logits, targets, loss, n, V, logits.stride(0), -1.4426950408889634 / softcap_scale if use_cap else 0.0,
                      softcap, softcap * 1.4426950408889634, grad_scale * softcap / softcap_scale if use_cap else grad_scale,
                      SOFTCAP=use_cap, FIXED_SHIFT=use_cap and softcap <= 60, BLOCK_V=block_v, FAST=fast,
                      PERSIST=bool(persist), STORE_HINT=store_hint, KEEP0=keep0, num_warps=num_warps)
    return loss, logits
