import time, statistics
from skulk.engine.accel import enable_fast_blas
print(enable_fast_blas().backend)
import mlx.core as mx
from pathlib import Path
from mlx_lm.utils import load_model
from skulk.engine.weights import prepare_weights
from skulk.engine.stages import make_layer_caches
m, _ = load_model(Path("/tmp/smol")); prepare_weights(m, "float32")
ids = mx.array([list(range(100, 137))])
def run(n=20):
    cache = make_layer_caches(m); y = m(ids, cache=cache); mx.eval(y)
    tok = y[:, -1:].argmax(-1)
    ts=[]
    for i in range(n):
        t=time.perf_counter(); y = m(tok, cache=cache); tok = y[:, -1:].argmax(-1); mx.eval(tok); ts.append(time.perf_counter()-t)
    return sorted(ts)[len(ts)//4]*1000
print("full step ms (p25):", run())
# per-part timing with syncs
cache = make_layer_caches(m); y = m(ids, cache=cache); mx.eval(y)
h = m.model.embed_tokens(mx.array([[5]])); mx.eval(h)
parts = {"attn":[], "mlp":[], "norms":[], "head":[]}
from mlx_lm.models.base import create_attention_mask
for rep in range(10):
    h = m.model.embed_tokens(mx.array([[5]])); mx.eval(h)
    for layer, c in zip(m.model.layers, cache):
        t=time.perf_counter(); x = layer.input_layernorm(h); mx.eval(x); t1=time.perf_counter()
        r = layer.self_attn(x, None, c); mx.eval(r); t2=time.perf_counter()
        h2 = h + r; x = layer.post_attention_layernorm(h2); mx.eval(x); t3=time.perf_counter()
        r = layer.mlp(x); h = h2 + r; mx.eval(h); t4=time.perf_counter()
        parts["norms"].append((t1-t)+(t3-t2)); parts["attn"].append(t2-t1); parts["mlp"].append(t4-t3)
    t=time.perf_counter(); o = m.model.embed_tokens.as_linear(m.model.norm(h)); mx.eval(o); parts["head"].append(time.perf_counter()-t)
for k,v in parts.items():
    per = statistics.median(v)*1000
    print(k, f"{per:.3f} ms each", f"x{30 if k!='head' else 1} = {per*(30 if k!='head' else 1):.1f} ms/token")
