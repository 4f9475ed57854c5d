"""Times the fused decoder graph alone, from Python onnxruntime with the same in-place buffers the runtime
binds (past and present the same OrtValue): what a decode step costs without qadapt-run around it.
Compare with bench_run's decode ms/token on the same export to see the runtime's own overhead per token.
    python bench/ort_decode_step.py EXPORT_DIR   (a --fused export; 297-token prefill, 32 decode steps, 3 reps)
"""
import numpy as np, onnxruntime as ort, time, json, sys
d = sys.argv[1]
m = json.load(open(d + '/qadapt.json'))['decoder']
L, H, Dh, D = m['layers'], m['heads'], m.get('cache_head_dim') or m['head_dim'], m['hidden_size']
s = ort.InferenceSession(d + '/decoder.onnx', providers=['CPUExecutionProvider'])
names = [i.name for i in s.get_inputs()]
P, N = 297, 32
slots = P + N
bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, H, slots, Dh), np.float32)) for _ in range(2 * L)]
def step(x, total, new, pos0):
    io = s.io_binding()
    io.bind_cpu_input('inputs_embeds', x)
    io.bind_cpu_input('attention_mask', np.ones((1, total), np.int64))
    if 'position_ids' in names:
        io.bind_cpu_input('position_ids', np.arange(pos0, pos0 + new, dtype=np.int64)[None])
    io.bind_cpu_input('logits_positions', np.array([[new - 1]], np.int64))
    for i in range(L):
        for j, p in enumerate(('key', 'value')):
            io.bind_ortvalue_input(f'past_key_values.{i}.{p}', bufs[2 * i + j])
            io.bind_ortvalue_output(f'present.{i}.{p}', bufs[2 * i + j])
    io.bind_output('logits')
    s.run_with_iobinding(io)
    return io.get_outputs()[0].numpy()
rng = np.random.default_rng(0)
for rep in range(3):
    step(rng.standard_normal((1, P, D)).astype(np.float32), P, P, 0)
    t = []
    for k in range(N):
        x = rng.standard_normal((1, 1, D)).astype(np.float32)
        t0 = time.perf_counter(); step(x, P + k + 1, 1, P + k); t.append(time.perf_counter() - t0)
    print('rep', rep, 'median decode run ms', round(1e3 * sorted(t)[len(t) // 2], 2), 'mean', round(1e3 * sum(t) / len(t), 2))
