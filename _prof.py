import time
from skulk.engine.accel import enable_fast_blas
print(enable_fast_blas().backend)
import mlx.core as mx
def t_op(f, n=200):
    for _ in range(5): mx.eval(f())
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); mx.eval(f()); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//10]*1e3  # 10th percentile ms
x = mx.random.normal((1,1,576)); xi = mx.random.normal((1,1,1536))
shapes = {"q/o 576x576": (576,576,2), "k/v 192x576": (192,576,2), "gate/up 1536x576": (1536,576,2), "down 576x1536": (576,1536,1)}
tot_q=tot_f=0
for name,(o,i,cnt) in shapes.items():
    W = mx.random.normal((o,i))
    for bits in (4,):
        wq, s, b = mx.quantize(W, group_size=32, bits=bits); s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
        inp = x if i==576 else xi
        tq = t_op(lambda: mx.quantized_matmul(inp, wq, s32, b32, transpose=True, group_size=32, bits=bits))
        tf = t_op(lambda: inp @ W.T)
        print(f"{name}: q4 {tq:.3f} ms  f32 {tf:.3f} ms (x{cnt}/layer)")
        tot_q += tq*cnt*30; tot_f += tf*cnt*30
E = mx.random.normal((49152,576)); eq, es, eb = mx.quantize(E, group_size=32, bits=8)
th8 = t_op(lambda: mx.quantized_matmul(x, eq, es.astype(mx.float32), eb.astype(mx.float32), transpose=True, group_size=32, bits=8), 30)
thf = t_op(lambda: x @ E.T, 30)
print(f"head 49152x576: q8 {th8:.2f} ms f32 {thf:.2f} ms")
print(f"matmuls per token: quantized {tot_q+th8:.1f} ms, f32 {tot_f+thf:.1f} ms")
