"""Why the training loop's step is slower than profile_step's: variants in one process."""
import importlib.util, os, sys, time, tempfile
import numpy as np, torch
ROOT = os.getcwd(); sys.path.insert(0, os.path.join(ROOT, "bench"))
from synthetic import write_synthetic, synthetic_tokens
name = sys.argv[1]
spec = importlib.util.spec_from_file_location("s", os.path.join(ROOT, f"train_gpt_{name}.py"))
s = importlib.util.module_from_spec(spec); sys.modules["s"] = s; spec.loader.exec_module(s)
T = 65536
d = tempfile.mkdtemp(); tr, va = write_synthetic(d, 400 * T + 1, 2 * T + 1)
cfg = s.parse_config([f"--train_files={tr}", f"--val_files={va}", "--num_iterations=300", f"--val_tokens={T}", f"--batch_tokens={T}"])
ctx = s.init_distributed()
accum, loader, _ = s.preflight(cfg, ctx)
torch.manual_seed(0)
model = s.GPT(cfg).to(device=ctx.device, dtype=torch.bfloat16)
opts, sched = s.build_optimizers(cfg, model, 0, 1)
s.compile_model(cfg, model)
fixed = [loader.next_step() for _ in range(4)]
rng = np.random.default_rng(0)
pbatches = [torch.from_numpy(synthetic_tokens(T + 1, rng).astype(np.int64)).cuda() for _ in range(4)]
pbatches = [(w[:-1], w[1:]) for w in pbatches]

def prof_step(i, data):
    x, y = data[i % 4]
    model(x, y).backward(); sched(i)
    for o in opts: o.step()
    model.zero_grad(set_to_none=True)

def timeit(label, fn, n=25):
    torch.cuda.synchronize(); t0 = time.perf_counter(); host = []
    for i in range(n):
        h = time.perf_counter(); fn(i); host.append(time.perf_counter() - h)
    torch.cuda.synchronize(); ms = 1000 * (time.perf_counter() - t0) / n
    print(f"{label:55s} {ms:7.2f} ms/step  host enqueue median {1000*np.median(host):6.2f} max {1000*max(host):6.2f}", flush=True)

for i in range(5): prof_step(i, pbatches)
timeit("A profile loop, profile batches (no warm_up yet)", lambda i: prof_step(i, pbatches))
s.warm_up(cfg, model, model, opts, sched, accum, ctx)
timeit("A profile loop, profile batches (after warm_up)", lambda i: prof_step(i, pbatches))
state = {"p": None}
def late_item(i):
    loss = s.train_step(model, model, opts, sched, i, loader.next_step(), ctx)
    if state["p"] is not None: state["p"].item()
    state["p"] = loss
timeit("D train_step + loader + loss.item() one step late", late_item)
import warnings, traceback
from torch._dynamo.utils import counters
print("dynamo counters:", {k: dict(v) for k, v in counters.items() if k in ("graph_break", "stats", "recompiles")})
seen = set()
def show(message, category, filename, lineno, file=None, line=None):
    stack = "".join(traceback.format_stack(limit=14)[:-1])
    key = (str(message)[:80], filename, lineno)
    if key in seen: return
    seen.add(key)
    print(f"SYNC WARNING: {message} at {filename}:{lineno}\n{stack}", flush=True)
warnings.showwarning = show
warnings.simplefilter("always")
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("warn")
for i in range(2):
    s.train_step(model, model, opts, sched, i, loader.next_step(), ctx)
torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()
print("sync check done", flush=True)
# host time of the parts of one step, the GPU kept busy beforehand by a long queue
def parts(i):
    x, y = loader.next_step()[0]
    h0 = time.perf_counter(); loss = model(x, y); h1 = time.perf_counter(); loss.backward(); h2 = time.perf_counter()
    sched(i)
    for o in opts: o.step()
    h3 = time.perf_counter(); model.zero_grad(set_to_none=True)
    return h1 - h0, h2 - h1, h3 - h2
for i in range(3): parts(i)
torch.cuda.synchronize()
rows = [parts(i) for i in range(6)]
torch.cuda.synchronize()
print("host ms forward/backward/optimizer per step:", [tuple(round(1000 * v, 1) for v in r) for r in rows], flush=True)
