"""Edits a fused decoder graph the ways that could make a batch-1 step faster, and times each edit
against the original from Python onnxruntime (same in-place buffers as the runtime; 297-token prefill,
32 decode steps, median step per rep, reps interleaved across variants):
  - no output Identity nodes (the attention op writes present.* itself),
  - bias Adds folded into MatMulNBits (its optional bias input),
  - accuracy_level 1 (fp32 activations instead of int8),
  - any further decoder files given (e.g. decoder.onnx of a --block-size 128 export, copied in).
    python bench/ort_decode_variants.py EXPORT_DIR [EXTRA.onnx ...]   (a --fused export with inline weights)
Env: T=intra-op threads (2), SPIN=0|1 (ORT's intra-op spinning), REPS (4).
"""
import json, os, sys, tempfile, time
import numpy as np, onnx, onnxruntime as ort

d = sys.argv[1]
extra = sys.argv[2:]
work = tempfile.mkdtemp()

def edited(name, edit):
    m = onnx.load(os.path.join(d, 'decoder.onnx'))
    edit(m.graph)
    path = os.path.join(work, name + '.onnx')
    onnx.save(m, path)
    return path

def no_identity(g):
    outs = {o.name for o in g.output}
    ren = {n.input[0]: n.output[0] for n in g.node if n.op_type == 'Identity' and n.output[0] in outs}
    keep = [n for n in g.node if not (n.op_type == 'Identity' and n.output[0] in outs)]
    for n in keep:
        n.output[:] = [ren.get(o, o) for o in n.output]
        n.input[:] = [ren.get(x, x) for x in n.input]
    del g.node[:]
    g.node.extend(keep)

def bias_folded(g):
    inits = {i.name for i in g.initializer}
    users = {}
    for n in g.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    drop = set()
    for n in g.node:
        u = users.get(n.output[0], []) if n.op_type == 'MatMulNBits' else []
        if len(u) == 1 and u[0].op_type == 'Add':
            b = [x for x in u[0].input if x != n.output[0]][0]
            if b in inits:
                n.input.extend([''] * (5 - len(n.input)) + [b])
                n.output[0] = u[0].output[0]
                drop.add(id(u[0]))
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)

def accuracy_1(g):
    for n in g.node:
        for a in n.attribute:
            if n.op_type == 'MatMulNBits' and a.name == 'accuracy_level':
                a.i = 1

files = {'ours': os.path.join(d, 'decoder.onnx'), 'no Identity': edited('noid', no_identity),
         'bias in MatMulNBits': edited('bias', bias_folded), 'accuracy level 1': edited('acc1', accuracy_1)}
files.update({os.path.basename(os.path.dirname(os.path.abspath(f))) + '/' + os.path.basename(f): f for f in extra})
m = json.load(open(os.path.join(d, 'qadapt.json')))['decoder']
L, H, Dh, D = m['layers'], m['heads'], m.get('cache_head_dim') or m['head_dim'], m['hidden_size']
P, N, REPS = 297, 32, int(os.environ.get('REPS', '4'))
so = ort.SessionOptions()
so.intra_op_num_threads = int(os.environ.get('T', '2'))
if 'SPIN' in os.environ:
    so.add_session_config_entry('session.intra_op.allow_spinning', os.environ['SPIN'])
sess = {k: ort.InferenceSession(f, so, providers=['CPUExecutionProvider']) for k, f in files.items()}
rng = np.random.default_rng(0)
xp = rng.standard_normal((1, P, D)).astype(np.float32)
xs = [rng.standard_normal((1, 1, D)).astype(np.float32) for _ in range(N)]

def run(s, bufs, x, total, new, pos0):
    io = s.io_binding()
    io.bind_cpu_input('inputs_embeds', x)
    io.bind_cpu_input('attention_mask', np.ones((1, total), np.int64))
    if 'position_ids' in [i.name for i in s.get_inputs()]:
        io.bind_cpu_input('position_ids', np.arange(pos0, pos0 + new, dtype=np.int64)[None])
    io.bind_cpu_input('logits_positions', np.array([[new - 1]], np.int64))
    for i in range(L):
        for j, p in enumerate(('key', 'value')):
            io.bind_ortvalue_input(f'past_key_values.{i}.{p}', bufs[2 * i + j])
            io.bind_ortvalue_output(f'present.{i}.{p}', bufs[2 * i + j])
    io.bind_output('logits')
    s.run_with_iobinding(io)
    return io.get_outputs()[-1].numpy()

times = {k: [] for k in files}
last = {}
for _ in range(REPS):
    for k, s in sess.items():
        bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, H, P + N, Dh), np.float32)) for _ in range(2 * L)]
        run(s, bufs, xp, P, P, 0)
        t = []
        for i in range(N):
            t0 = time.perf_counter()
            last[k] = run(s, bufs, xs[i], P + i + 1, 1, P + i)
            t.append(time.perf_counter() - t0)
        times[k].append(1e3 * sorted(t)[N // 2])
for k in files:
    print(f"{k:<40} median step ms per rep {[round(x, 2) for x in times[k]]}  "
          f"max |Δlogit| vs ours {float(np.abs(last[k] - last['ours']).max()):.3g}")
