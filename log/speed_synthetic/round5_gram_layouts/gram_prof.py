import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("m", "train_gpt_M.py"); s = importlib.util.module_from_spec(spec); sys.modules["m"] = s; spec.loader.exec_module(s)
dev = torch.device("cuda"); gen = torch.Generator(device=dev).manual_seed(2)
def gpu_ms(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps): fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000 / reps
b, c = -4.775, 2.0315
for n, R, K in ((48, 768, 768), (24, 768, 3072)):
    X = (torch.randn(n, R, K, device=dev, generator=gen) / K**0.5).bfloat16()
    A = s.fused_gram(X)
    B = s.fused_gram(A, A, b, c)
    rows = {
        "XXt cuBLAS NT": lambda: torch.bmm(X, X.mT),
        "XXt fused w8s3": lambda: s.fused_gram(X),
        "XXt fused w4s4": lambda: s.fused_gram(X, num_warps=4, num_stages=4),
        "bA+cAA cuBLAS NN (A A)": lambda: torch.baddbmm(A, A, A, beta=b, alpha=c),
        "bA+cAA cuBLAS NT (A A^T)": lambda: torch.baddbmm(A, A, A.mT, beta=b, alpha=c),
        "bA+cAA cuBLAS TN (A^T A)": lambda: torch.baddbmm(A, A.mT, A, beta=b, alpha=c),
        "bA+cAA fused w8s3": lambda: s.fused_gram(A, A, b, c),
        "bA+cAA fused w4s4": lambda: s.fused_gram(A, A, b, c, num_warps=4, num_stages=4),
        "aX+BX cuBLAS NN (B X)": lambda: torch.baddbmm(X, B, X, beta=3.4445),
        "aX+BX cuBLAS TN (B^T X)": lambda: torch.baddbmm(X, B.mT, X, beta=3.4445),
        "NS 5 steps (script)": lambda: s.newton_schulz(X, 5),
    }
    for name, fn in rows.items():
        print(f"{n}x{R}x{K} {name:28s} {gpu_ms(fn):7.3f} ms GPU", flush=True)
