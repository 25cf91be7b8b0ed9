import time, sys
from skulk.engine.accel import enable_fast_blas
print(enable_fast_blas().backend)
import mlx.core as mx, mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import load_model, load_tokenizer
from mlx_lm.models.cache import make_prompt_cache

def dequant_all(model):
    def swap(m):
        for name, child in m.children().items():
            pass
    layers = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.QuantizedLinear):
            w = mx.dequantize(mod.weight, mod.scales.astype(mx.float32), mod.biases.astype(mx.float32), group_size=mod.group_size, bits=mod.bits)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in mod)
            lin.weight = w
            if "bias" in mod: lin.bias = mod.bias
            layers.append((path, lin))
        elif isinstance(mod, nn.QuantizedEmbedding):
            w = mx.dequantize(mod.weight, mod.scales.astype(mx.float32), mod.biases.astype(mx.float32), group_size=mod.group_size, bits=mod.bits)
            e = nn.Embedding(w.shape[0], w.shape[1]); e.weight = w
            layers.append((path, e))
    model.update_modules(__import__("mlx.utils", fromlist=["tree_unflatten"]).tree_unflatten(layers))

def bench(model, label, steps=24):
    ids = mx.array([list(range(100, 137))])
    cache = make_prompt_cache(model)
    t = time.perf_counter(); y = model(ids, cache=cache); mx.eval(y); pre = time.perf_counter()-t
    tok = y[:, -1:].argmax(-1)
    times=[]
    for i in range(steps):
        t=time.perf_counter(); y = model(tok, cache=cache); tok = y[:, -1:].argmax(-1); mx.eval(tok); times.append(time.perf_counter()-t)
    times = sorted(times[4:])
    print(f"{label}: prefill37 {pre*1000:.0f} ms, decode median {times[len(times)//2]*1000:.1f} ms min {times[0]*1000:.1f}", flush=True)

path = "/tmp/smol"
m, _ = load_model(__import__("pathlib").Path(path)); mx.eval(m.parameters()); bench(m, "quantized f16 scales")
m.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.float16 else a, m.parameters())); mx.eval(m.parameters()); bench(m, "quantized f32 scales")
dequant_all(m); mx.eval(m.parameters()); bench(m, "dequantized f32")
m.update(tree_map(lambda a: a.astype(mx.float16) if a.dtype == mx.float32 else a, m.parameters())); mx.eval(m.parameters()); bench(m, "dequantized f16")
