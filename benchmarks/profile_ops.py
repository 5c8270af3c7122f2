"""Per-op account of one training or inference step: tlflax (XLA CPU) vs torchvision.

Not a test. `throughput.py` says how far apart the two frameworks are; this
script says where the difference goes. For one (model, mode, res, batch) case it

1. traces tlflax's compiled step (built exactly as `throughput.py` builds it)
   with `jax.profiler`; the CPU trace holds one event per executed HLO thunk
   (`args.hlo_op`). Convolutions and dots run asynchronously on XLA's Eigen
   pool, so their event is only the launch: the timeline is split instead
   (time inside a thunk event goes to that thunk; time with none running goes
   to the asynchronous ops in flight, which end at the first launch of an op
   that uses their result). Every HLO instruction of the compiled module is
   mapped to a category (convolution forward / backward-input /
   backward-filter, depthwise, batch norm, pooling, layout copies, optimizer,
   ...) from its opcode, the computation it calls, its shape (a kernel-shaped
   convolution result is a weight gradient) and the `op_name` metadata JAX
   writes (module path, `jvp` vs `transpose(jvp)`);
2. profiles the torchvision step with `torch.profiler` and maps each aten op's
   self time to the same categories through its chain of parent ops (torch
   computes a layer's input and weight gradients in one `convolution_backward`;
   `--split-torch-conv-bwd` times them apart, layer by layer);
3. prints the two side by side (ms per step, share of the step, difference,
   share of the gap) and writes JSON with the categories, the top ops of both
   frameworks and the plain (unprofiled) step times.

`--variants` compiles the tlflax step more than once in the same process:
with other XLA compile options (`Lowered.compile(options)`), under another
matmul precision, or with an op swapped while tracing (a convolution whose
weight gradient is per-tap GEMMs, max pooling as shifted slices). The first
variant is the reference; the others are timed in the same rounds and
reported as the median of their per-round ratio to it.

Profiled and plain steps are interleaved (the order alternates) and every
figure is a median over rounds, so other jobs on the machine hit all alike;
shares of each step are printed beside the ms because they survive load
better than absolute times. The load average is recorded.

  python benchmarks/profile_ops.py --model resnet18 --mode train --res 224 --batch 32 \
      [--rounds 3] [--warmup 1] [--json out.json] [--no-torch] [--no-xla-flags]
      [--xla-flags "--xla_cpu_..."] [--variants base,shifted_maxpool,...]
      [--split-torch-conv-bwd] [--hlo-out FILE]

`--xla-flags` is prepended to `XLA_FLAGS` before tlflax adds its own (so a
setting of tlflax's flag here wins). See benchmarks/README.md, "Per-op account
of the remaining gap".
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONV_FWD, CONV_BWD_IN, CONV_BWD_W = "conv fwd", "conv bwd-input", "conv bwd-filter"
CONV_BWD = "conv bwd (input+filter)"
CONV_BWD_UNSPLIT = "conv bwd (unsplit)"  # torch: one convolution_backward per layer.
DW_FWD, DW_BWD = "depthwise fwd", "depthwise bwd"
CATEGORIES = [  # Print order; the JSON has every category met.
    CONV_FWD, CONV_BWD_IN, CONV_BWD_W, CONV_BWD_UNSPLIT, "copies for conv fwd",
    "copies for conv bwd",
    DW_FWD, DW_BWD, "batch norm", "pooling", "dense (classifier)", "loss",
    "elementwise (relu, add, ...)", "reductions (other)", "optimizer update",
    "copies/transposes (other)", "other", "unattributed (executor)"]
ROLLUPS = {CONV_BWD: (CONV_BWD_IN, CONV_BWD_W, CONV_BWD_UNSPLIT, "copies for conv bwd")}


def log(message: str) -> None:
  """Progress goes to stderr so stdout holds only the table."""
  print(f"[profile_ops {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet18")
  p.add_argument("--mode", default="train", choices=("train", "infer"))
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3, help="profiled (and plain) steps per framework")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--json", default=None)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-xla-flags", action="store_true", help="TLFLAX_NO_XLA_FLAGS=1")
  p.add_argument("--xla-flags", default="", help="prepended to XLA_FLAGS (yours win)")
  p.add_argument("--report", default=None, help="only re-print the tables of a saved JSON")
  p.add_argument("--markdown", action="store_true", help="tables as markdown")
  p.add_argument("--tlflax-quiet-ms", type=float, default=None,
                 help="with --report: tlflax's quiet-machine step time to project onto, when "
                      "the code changed since --project-onto was measured (an estimate)")
  p.add_argument("--hlo", default=None,
                 help="with --report: re-derive tlflax's categories from this HLO text")
  p.add_argument("--project-onto", default=str(HERE / "results.json"),
                 help="throughput.py JSON whose quiet step times the shares are also "
                      "shown on (default: benchmarks/results.json)")
  p.add_argument("--top", type=int, default=15, help="top ops listed per framework")
  p.add_argument("--split-torch-conv-bwd", action="store_true",
                 help="also time torch's conv backward per layer as input-only and weight-only")
  p.add_argument("--hlo-out", default=None, help="write the compiled HLO text here")
  p.add_argument("--variants", default="base",
                 help=f"tlflax variants compiled and timed side by side, the first is the "
                      f"reference: {', '.join(VARIANTS)}")
  p.add_argument("--no-profile-variants", action="store_true",
                 help="time the variants after the first, but do not trace them")
  p.add_argument("--no-profile", action="store_true",
                 help="plain timing only (an A/B of variants); no per-op table")
  args = p.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
  return args


def load_average():
  try:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
  except (OSError, ValueError):
    return None


# ---------------------------------------------------------------- HLO text -> categories


class Instr:
  """One HLO instruction: the fields the classifier needs."""

  def __init__(self, name, shape, opcode, operands, attrs, computation):
    self.name, self.shape, self.opcode = name, shape, opcode
    self.operands, self.attrs, self.computation = operands, attrs, computation
    self.users, self.is_root = [], False

  def attr(self, key):
    m = re.search(rf"\b{key}=(%?[\w.\-]+|\"[^\"]*\")", self.attrs)
    return m.group(1).strip('"').lstrip("%") if m else None

  @property
  def op_name(self):
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def parse_instruction(line: str, computation: str):
  m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
  if not m:
    return None
  rest = line[m.end():]
  end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
  shape, rest = rest[:end], rest[end:]
  op = re.match(r"\s*([\w\-]+)\(", rest)
  if not op:
    return None
  close = _balanced(rest, op.end() - 1)
  operands = re.findall(r"%([\w.\-]+)", rest[op.end() - 1:close])
  ins = Instr(m.group(1), shape, op.group(1), operands, rest[close:], computation)
  ins.is_root = line.lstrip().startswith("ROOT ")
  return ins


def parse_hlo(text: str):
  """{computation: [Instr]}, name of the entry computation."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    head = re.match(r"(ENTRY )?%(\S+) \(.*\{\s*$", line)
    if head:
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current:
      ins = parse_instruction(line, current)
      if ins:
        comps[current].append(ins)
  return comps, entry


def dims(shape: str):
  """Non-unit dimensions of an array shape, sorted: a layout-free signature."""
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  if not m:
    return None
  return tuple(sorted(int(d) for d in m.group(1).split(",") if d and int(d) != 1))


class Classifier:
  """Maps HLO instruction names of one compiled module to categories."""

  def __init__(self, hlo_text: str, training: bool = True):
    self.comps, self.entry = parse_hlo(hlo_text)
    self.training = training  # Outside jvp/transpose only the optimizer runs, in training.
    self.by_name = {i.name: i for c in self.comps.values() for i in c}
    for ins in self.by_name.values():
      for o in ins.operands:
        if o in self.by_name:
          self.by_name[o].users.append(ins)
    kernels = [i.shape for i in self.comps[self.entry]
               if i.opcode == "parameter" and "kernel" in i.op_name]
    self.kernels = {dims(k) for k in kernels}
    # One tap of a kernel, (Ci, Co): what a per-tap weight-gradient dot yields.
    self.taps = {dims(re.sub(r"\[.*,(\d+),(\d+)\]", r"[\1,\2]", k)) for k in kernels}
    self.cache = {}

  def inner(self, ins):
    """Instructions of the computations `ins` calls (fusions, while bodies), recursively."""
    out, todo, seen = [], [ins], set()
    while todo:
      cur = todo.pop()
      for key in ("calls", "body", "condition", "to_apply"):
        comp = cur.attr(key)
        if comp and comp in self.comps and comp not in seen:
          seen.add(comp)
          out.extend(self.comps[comp])
          todo.extend(self.comps[comp])
    return out

  def is_async(self, name: str) -> bool:
    """Ops XLA CPU may run asynchronously: convolutions, dots, library fusions, custom calls."""
    ins = self.by_name.get(name)
    if ins is None:
      return False
    return (ins.opcode in ("convolution", "dot", "custom-call")
            or (ins.opcode == "fusion" and "kind=kCustom" in ins.attrs)
            or any(i.opcode in ("convolution", "dot") for i in self.inner(ins)))

  def users_of(self, name: str):
    """Users that run as thunks (through bitcasts and tuple plumbing, which do not)."""
    ins, out = self.by_name.get(name), []
    todo = list(ins.users) if ins else []
    while todo:
      u = todo.pop()
      if u.opcode in ("bitcast", "get-tuple-element", "tuple"):
        todo.extend(u.users)
      else:
        out.append(u.name)
    return out

  def category(self, name: str) -> str:
    if name not in self.cache:
      ins = self.by_name.get(name)
      self.cache[name] = self._classify(ins) if ins else (
          name if name.startswith("unattributed") else "other")
    return self.cache[name]

  # tlflax's compiled CPU kernels (tlflax/ops/csrc), by FFI target name.
  FFI_TARGETS = {"tlflax_conv_weight_grad": CONV_BWD_W, "tlflax_depthwise_forward": DW_FWD,
                 "tlflax_depthwise_input_grad": DW_BWD, "tlflax_depthwise_weight_grad": DW_BWD,
                 "tlflax_max_pool": "pooling", "tlflax_max_pool_with_index": "pooling",
                 "tlflax_max_pool_grad": "pooling"}

  def _classify(self, ins):
    if ins.opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
      target = target.group(1) if target else ""
      if target == "tlflax_conv_forward":  # Also a stride-1 input gradient.
        return CONV_BWD_IN if "transpose(" in (ins.op_name or "") else CONV_FWD
      if target in self.FFI_TARGETS:
        return self.FFI_TARGETS[target]
    inner = self.inner(ins)
    ops = {ins.opcode} | {i.opcode for i in inner}
    names = [ins.op_name] + [i.op_name for i in inner if i.op_name]
    conv = next((i for i in [ins] + inner if i.opcode == "convolution"), None)
    if conv is not None:
      return self._conv_kind(ins, conv)
    if "dot" in ops:
      dot = next(i for i in [ins] + inner if i.opcode == "dot")
      name = dot.op_name or ins.op_name
      if "/conv/" in name and dims(dot.shape) in self.taps | self.kernels:
        return CONV_BWD_W  # Per-tap weight-gradient GEMMs (tlflax.ops.conv, taps_wgrad).
      if "conv_general_dilated" in name:
        return self._conv_kind(ins, dot)
      return "dense (classifier)"
    return self._non_conv(ins, ops, names)

  def _conv_kind(self, outer, conv):
    op_name = conv.op_name or outer.op_name
    grouped = any(int(conv.attr(k) or 1) > 1
                  for k in ("feature_group_count", "batch_group_count"))
    # XLA's rewrites drop the metadata of some backward convolutions (the weight
    # gradients here), so a kernel-shaped result decides first, then the op_name.
    kernel_shaped = dims(conv.shape) in self.kernels
    backward = "transpose(" in op_name or not op_name
    if grouped:
      return DW_BWD if backward or kernel_shaped else DW_FWD
    if kernel_shaped:
      return CONV_BWD_W
    return CONV_BWD_IN if backward else CONV_FWD

  def _non_conv(self, ins, ops, names):
    joined = " ".join(names)
    if ins.opcode == "while" or re.search(r"/(dw|depthwise)\w*/conv/", joined):
      return DW_BWD if "transpose(" in joined else DW_FWD
    if ops <= {"broadcast", "constant", "parameter", "fusion"} and self._feeds_while(ins):
      return self._feeds_while(ins)  # A loop's zero-initialised output buffer.
    if ops <= {"copy", "transpose", "bitcast", "reverse", "reshape", "parameter", "fusion",
               "slice", "pad", "constant", "broadcast"} or \
        self._root_opcode(ins) in ("copy", "transpose"):
      # Also a fusion that recomputes (BN, ReLU) into a transposed copy: its work
      # is the layout change a convolution asked for.
      return self._copy_owner(ins)
    if re.search(r"/(bn\w*|BatchNorm\w*|norm\w*)/", joined):
      return "batch norm"
    if ops & {"reduce-window", "select-and-scatter"} or "max_pool" in joined:
      return "pooling"
    if self.training and names and names[0] and "jvp(" not in joined:
      return "optimizer update" if ins.computation == self.entry else "other"
    if any(k in joined for k in ("log_softmax", "cross_entropy", "/loss")):
      return "loss"
    if "reduce" in ops:
      return "reductions (other)"
    return "elementwise (relu, add, ...)"

  def _root_opcode(self, ins):
    comp = ins.attr("calls") if ins.opcode == "fusion" else None
    roots = [i for i in self.comps.get(comp, []) if i.is_root]
    return roots[0].opcode if roots else None

  def _feeds_while(self, ins):
    """The category of the while loop this value initialises, if any."""
    for u in ins.users:
      for w in (u.users if u.opcode == "tuple" else [u]):
        if w.opcode == "while":
          return self.category(w.name)
    return None

  def _copy_owner(self, ins):
    """A layout copy belongs to the convolution it feeds or drains, when there is one."""
    near = ins.users + [self.by_name[o] for o in ins.operands if o in self.by_name]
    for other in near:
      if other.opcode in ("fusion", "convolution", "dot", "custom-call"):
        kind = self.category(other.name)
        if kind in (CONV_FWD, CONV_BWD_IN, CONV_BWD_W):
          return "copies for conv fwd" if kind == CONV_FWD else "copies for conv bwd"
    return "copies/transposes (other)"


# ---------------------------------------------------------------- trace -> per-op times


def read_trace(logdir: str):
  files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {logdir}")
  with gzip.open(files[-1]) as f:
    return json.load(f)["traceEvents"]


def thunk_events(events, module_prefix: str):
  """Outermost HLO thunk events of our module, (op, start, end, tid), and "end: op" marks.

  Thunks nested in another on the same thread (a while loop's body) are left
  out: the loop's own event already covers them.
  """
  rows = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
          and e["args"].get("hlo_module", "").startswith(module_prefix)]
  spans = []
  for tid in {e["tid"] for e in rows}:
    last_end = -1.0
    for e in sorted((e for e in rows if e["tid"] == tid), key=lambda e: e["ts"]):
      if e["ts"] >= last_end:
        spans.append((e["args"]["hlo_op"], float(e["ts"]), float(e["ts"] + e["dur"]), tid))
        last_end = e["ts"] + e["dur"]
  marks = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("name", "").startswith("end: "):
      marks[e["name"][5:]].append(float(e["ts"]))
  return spans, marks


def async_windows(spans, marks, classifier):
  """Convolutions and dots run asynchronously on XLA's Eigen pool: their thunk
  event is only the launch. Such an op is in flight from its launch until the
  first of its "end:" mark (emitted late: after the executor has run the ready
  successors) and the launch of any op that uses its result."""
  starts = collections.defaultdict(list)
  for op, a, _, _ in spans:
    starts[op].append(a)
  horizon = max(b for _, _, b, _ in spans)
  out = []
  for op, a, _, _ in spans:
    if not classifier.is_async(op):
      continue
    later = [t for t in marks.get(op, []) if t >= a]
    later += [t for u in classifier.users_of(op) for t in starts.get(u, []) if t > a]
    out.append((op, a, min(later) if later else horizon))
  return out


def attribute(spans, windows):
  """Splits the step's timeline into ms per op: time covered by running thunks
  goes to them (shared equally when concurrent); time with none running goes
  to the asynchronous ops in flight; the rest is "unattributed (executor)"."""
  points = sorted({t for _, a, b, _ in spans for t in (a, b)} |
                  {t for _, a, b in windows for t in (a, b)})
  sync = sorted(((a, b, op) for op, a, b, _ in spans), key=lambda r: r[0])
  asyn = sorted(((a, b, op) for op, a, b in windows), key=lambda r: r[0])
  ops = collections.Counter()
  active_s, active_a, i, j = [], [], 0, 0
  for a, b in zip(points, points[1:]):
    while i < len(sync) and sync[i][0] <= a:
      active_s.append(sync[i])
      i += 1
    while j < len(asyn) and asyn[j][0] <= a:
      active_a.append(asyn[j])
      j += 1
    active_s = [r for r in active_s if r[1] > a]
    active_a = [r for r in active_a if r[1] > a]
    owners = [r[2] for r in (active_s or active_a)]
    for op in owners or ["unattributed (executor)"]:
      ops[op] += (b - a) / 1e3 / max(len(owners), 1)
  return ops


def tlflax_profile(step, classifier, module_prefix):
  """Per-category ms, per-op ms and wall ms of one traced step."""
  import jax
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    events = read_trace(logdir)
  spans, marks = thunk_events(events, module_prefix)
  ops = attribute(spans, async_windows(spans, marks, classifier))
  cats = collections.Counter()
  for op, ms in ops.items():
    cats[classifier.category(op)] += ms
  return {"categories": dict(cats), "ops": dict(ops), "wall_ms": 1e3 * wall}


# ---------------------------------------------------------------- remedies (variants)


def _options(**kw):
  return lambda: (kw, contextlib.nullcontext())


def _precision(value):
  def make():
    import jax
    return {}, jax.default_matmul_precision(value)
  return make


def _taps_wgrad():
  return {}, patched_conv(taps_weight_grad)


@contextlib.contextmanager
def _env(name, value):
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = old


def _pointwise_wgrad():
  return {}, patched_conv(pointwise_weight_grad)


VARIANTS = {  # name: () -> (XLA compile options, context the step is traced in)
    "base": _options(),
    # The process's XLA_FLAGS (tlflax adds -individual_convolution) set the YNN
    # list; a compile option replaces it with exactly one type.
    "ynn_conv": _options(xla_cpu_experimental_ynn_fusion_type=
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),
    "ynn_dot": _options(xla_cpu_experimental_ynn_fusion_type="LIBRARY_FUSION_TYPE_DOT"),
    "no_ynn": _options(xla_cpu_experimental_ynn_fusion_type="LIBRARY_FUSION_TYPE_INVALID"),
    "onednn": _options(xla_cpu_use_onednn=True),
    "onednn_custom_call": _options(xla_cpu_experimental_onednn_custom_call=True),
    "no_xnnpack": _options(xla_cpu_use_xnnpack=False),
    "xnn_graph_greedy": _options(
        xla_cpu_experimental_xnn_graph_fusion_mode="XNN_GRAPH_FUSION_MODE_GREEDY"),
    "fast_math": _options(xla_cpu_enable_fast_math=True),
    "eigen_single_thread": _options(xla_cpu_multi_thread_eigen=False),
    "matmul_bf16": _precision("bfloat16"),
    "matmul_highest": _precision("highest"),
    "taps_wgrad": _taps_wgrad,
    "gemm_1x1_wgrad": _pointwise_wgrad,
    "shifted_maxpool": lambda: ({}, patched_max_pool()),
    # tlflax.ops.conv's switch (read at trace time): lax's own 1x1 weight gradient.
    "lax_wgrad": lambda: ({}, _env("TLFLAX_CONV_WGRAD_IMPL", "lax")),
}


def taps_weight_grad(x, g, kernel_shape, strides, padding):
  """Weight gradient of an NHWC/HWIO convolution as one GEMM per kernel tap:
  dW[i, j] = X_ij^T G with X_ij the (i, j)-shifted, strided input and G the
  output gradient, both flattened to (N*H*W, C): the shape Eigen's GEMM likes."""
  from jax import lax
  import jax.numpy as jnp
  kh, kw, ci, co = kernel_shape
  n, ho, wo, _ = g.shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if pt or pb or pl or pr else x
  g2 = g.reshape(-1, co)

  def tap(i, j):
    xs = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                   (1, sh, sw, 1))
    return lax.dot_general(xs.reshape(-1, ci), g2, (((0,), (0,)), ((), ())))

  return jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)])


def pointwise_weight_grad(x, g, kernel_shape, strides, padding):
  """`taps_weight_grad` for 1x1 kernels only (one GEMM); None: XLA's own gradient."""
  if kernel_shape[:2] != (1, 1):
    return None
  return taps_weight_grad(x, g, kernel_shape, strides, padding)


def shifted_max_pool(x, window_shape, strides=None, padding="VALID"):
  """Max pooling as a running maximum over the window's strided slices of the
  (-inf padded) input, like tlflax's shifted depthwise convolution: XLA fuses
  the forward into one loop and autodiff turns the backward into selects and
  pads that fuse too, instead of reduce-window + select-and-scatter. Ties
  share the gradient (lax.max's rule) instead of going to the first maximum;
  after a ReLU only exact zeros tie, and their gradient is zeroed anyway."""
  from jax import lax
  import jax.numpy as jnp
  (kh, kw), (sh, sw) = window_shape, strides or (1, 1)
  pads = ((0, 0), (0, 0)) if padding == "VALID" else tuple(tuple(p) for p in padding)
  xp = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), constant_values=-jnp.inf)
  n, hp, wp, c = xp.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
      out = tap if out is None else jnp.maximum(out, tap)
  return out


@contextlib.contextmanager
def patched_max_pool():
  """nn.max_pool -> shifted_max_pool for 4-D NHWC inputs while the step is traced."""
  import flax.linen as nn
  original = nn.max_pool

  def pool(inputs, window_shape, strides=None, padding="VALID"):
    if inputs.ndim != 4 or len(window_shape) != 2 or isinstance(padding, str) and \
        padding != "VALID":
      return original(inputs, window_shape, strides, padding)
    return shifted_max_pool(inputs, window_shape, strides, padding)

  nn.max_pool = pool
  try:
    yield
  finally:
    nn.max_pool = original


@contextlib.contextmanager
def patched_conv(weight_grad):
  """Routes plain 2-D NHWC convolutions (no groups, no dilation, explicit
  padding: what nn.Conv emits for ResNet) through a custom_vjp whose weight
  gradient is `weight_grad`; everything else keeps lax's convolution. Active
  while tracing only: the compiled step is what gets timed. tlflax.ops.conv calls
  lax.conv_general_dilated too, so this applies underneath it."""
  from jax import lax
  original = lax.conv_general_dilated

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1, **kw):
    plain = (feature_group_count == 1 and batch_group_count == 1 and lhs.ndim == 4
             and not isinstance(padding, str) and not kw.get("preferred_element_type")
             and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
             and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape))
    if not plain:
      return original(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count, **kw)
    return _custom_conv(original, weight_grad, tuple(window_strides),
                        tuple(tuple(p) for p in padding), dimension_numbers)(lhs, rhs)

  lax.conv_general_dilated = conv
  try:
    yield
  finally:
    lax.conv_general_dilated = original


def _is_nhwc(dn, lhs_shape, rhs_shape):
  from jax import lax
  if dn is None:
    return False
  spec = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dn)
  return (spec.lhs_spec, spec.rhs_spec, spec.out_spec) == ((0, 3, 1, 2), (3, 2, 0, 1),
                                                          (0, 3, 1, 2))


def _custom_conv(original, weight_grad, strides, padding, dn):
  import jax

  def fwd_only(x, w):
    return original(x, w, strides, padding, dimension_numbers=dn)

  @jax.custom_vjp
  def conv(x, w):
    return fwd_only(x, w)

  def fwd(x, w):
    return fwd_only(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    dw = weight_grad(x, g, w.shape, strides, padding)
    if dw is None:
      return jax.vjp(fwd_only, x, w)[1](g)
    dx = jax.vjp(lambda x_: fwd_only(x_, w), x)[1](g)[0]
    return dx, dw.astype(w.dtype)

  conv.defvjp(fwd, bwd)
  return conv


# ---------------------------------------------------------------- tlflax step


def compile_variant(fn, args_, variant: str, donate: bool):
  """jit + lower inside the variant's context, compile with its XLA options."""
  import jax
  options, context = VARIANTS[variant]()
  jitted = jax.jit(fn, donate_argnums=0) if donate else jax.jit(fn)
  with context:
    lowered = jitted.lower(*args_)
  return lowered.compile(options) if options else lowered.compile()


def build_tlflax(args, variant: str):
  """(step callable, compiled HLO text, module name prefix) as throughput.py builds them."""
  import jax
  import throughput as T
  import tlflax
  from tlflax import optim, steps
  module, variables = tlflax.create_model(args.model, num_classes=1000)
  data = T.tlflax_inputs(args.batch, args.res)
  if args.mode == "infer":
    compiled = compile_variant(lambda v, x: module.apply(v, x, train=False),
                               (variables, data["image"]), variant, donate=False)
    return (lambda: jax.block_until_ready(compiled(variables, data["image"])),
            compiled.as_text(), "jit_")
  cfg = T.train_config()
  tx, labels, _ = optim.make(cfg.optim, variables["params"], 1000)
  module = T.with_bn_mode(module, cfg.model.bn_mode, labels)
  state = [steps.create_state(variables, tx)]
  compiled = compile_variant(steps.make_train_step(module, tx, labels), (state[0], data),
                             variant, donate=True)

  def step():
    state[0], metrics = compiled(state[0], data)
    jax.block_until_ready((state[0], metrics))

  return step, compiled.as_text(), "jit_train_step"


# ---------------------------------------------------------------- torch side


TORCH_RULES = [  # (regex on an op or autograd-node name, category); first match up the chain.
    (r"^Optimizer\.|AccumulateGrad", "optimizer update"),
    (r"ConvolutionBackward|convolution_backward", "conv bwd"),
    (r"^aten::(conv2d|convolution|_convolution|mkldnn_convolution|_slow_conv2d|thnn_conv)",
     "conv fwd"),
    (r"[Bb]atch_?[Nn]orm", "batch norm"),
    (r"max_pool|MaxPool|adaptive_avg_pool|AdaptiveAvgPool|MeanBackward|aten::mean", "pooling"),
    (r"addmm|Addmm|aten::mm$|aten::linear|MmBackward", "dense (classifier)"),
    (r"cross_entropy|log_softmax|LogSoftmax|nll_loss|NllLoss", "loss"),
    (r"relu|Relu|clamp|threshold|hardtanh|Hardtanh|aten::add|AddBackward|aten::mul|dropout"
     r"|Dropout", "elementwise (relu, add, ...)"),
    (r"aten::(copy_|_to_copy|to$|contiguous|clone)", "copies/transposes (other)"),
]
COPY_OPS = re.compile(r"aten::(copy_|_to_copy|to|contiguous|clone|as_strided|empty\w*|resize_)$")


def torch_conv_weight(ev):
  """Weight shape of the nearest convolution op at or above `ev`, if the profiler kept it."""
  while ev is not None:
    shapes = getattr(ev, "input_shapes", None) or []
    if ev.name in ("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution"):
      return shapes[1] if len(shapes) > 1 else None
    if ev.name == "aten::convolution_backward":
      return shapes[2] if len(shapes) > 2 else None
    ev = ev.cpu_parent
  return None


def torch_category(ev) -> str:
  chain, cur = [], ev
  while cur is not None:
    chain.append(cur)
    cur = cur.cpu_parent
  for pattern, cat in TORCH_RULES:
    if any(re.search(pattern, c.name) for c in chain):
      break
  else:
    return "other"
  if cat in ("conv fwd", "conv bwd"):
    weight = torch_conv_weight(ev)
    if weight and len(weight) == 4 and weight[1] == 1 and weight[0] > 1:
      return DW_FWD if cat == "conv fwd" else DW_BWD
    if COPY_OPS.match(ev.name) and ev.name not in ("aten::empty",):
      return "copies for " + cat
    return CONV_FWD if cat == "conv fwd" else CONV_BWD_UNSPLIT
  return cat


def torch_profile(step):
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
  cats, ops = collections.Counter(), collections.Counter()
  for ev in prof.events():
    ms = ev.self_cpu_time_total / 1e3
    cats[torch_category(ev)] += ms
    ops[ev.name] += ms
  return {"categories": dict(cats), "ops": dict(ops), "wall_ms": 1e3 * wall}


def build_torch(args):
  import throughput as T
  return T.torch_runner(args.model, args.mode, args.batch, args.res)


def torch_conv_bwd_split(args, repeats=3):
  """Per-layer torch conv backward timed as input-grad only and weight-grad only.

  torch's profiler shows one `convolution_backward` per layer (oneDNN computes
  both gradients inside it), so this splits it the way XLA's HLO is split.
  Returns ms per step for each half (layers with the same config timed once).
  """
  import torch
  import torchvision
  model = getattr(torchvision.models, args.model)(num_classes=1000)
  model = model.to(memory_format=torch.channels_last)
  configs = collections.Counter()

  def hook(mod, inputs, output):
    configs[(tuple(inputs[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding,
             mod.dilation, mod.groups, tuple(output.shape))] += 1

  hooks = [m.register_forward_hook(hook) for m in model.modules()
           if isinstance(m, torch.nn.Conv2d)]
  with torch.no_grad():
    model(torch.randn(args.batch, 3, args.res, args.res).contiguous(
        memory_format=torch.channels_last))
  for h in hooks:
    h.remove()
  total = {"input": 0.0, "weight": 0.0, "both": 0.0}
  for (xs, ws, stride, pad, dil, groups, ys), count in configs.items():
    x = torch.randn(xs).contiguous(memory_format=torch.channels_last)
    w = torch.randn(ws).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(ys).contiguous(memory_format=torch.channels_last)
    for key, mask in (("input", [True, False, False]), ("weight", [False, True, False]),
                      ("both", [True, True, False])):
      if key == "input" and xs[1] == 3:
        continue  # The stem's input gradient is never computed.
      call = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
          gy, x, w, None, stride, pad, dil, False, [0, 0], groups, mask)
      call()
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
      total[key] += count * 1e3 * statistics.median(times)
  return total


# ---------------------------------------------------------------- the run


def plain_ms(step):
  start = time.perf_counter()
  step()
  return 1e3 * (time.perf_counter() - start)


def framework_name(variant: str, first: bool) -> str:
  return "tlflax" if first else f"tlflax:{variant}"


def build_all(args):
  """Step callables and profilers: tlflax per variant (the first is "tlflax"), torch."""
  steps, profilers, classifiers = {}, {}, {}
  for k, variant in enumerate(args.variants):
    name = framework_name(variant, k == 0)
    log(f"compiling tlflax [{variant}] {args.model} {args.mode} res={args.res} "
        f"batch={args.batch}")
    steps[name], hlo, prefix = build_tlflax(args, variant)
    if args.hlo_out:
      Path(args.hlo_out + ("" if k == 0 else f".{variant}")).write_text(hlo)
    classifiers[name] = Classifier(hlo, training=args.mode == "train")
    profilers[name] = (lambda n=name, p=prefix: tlflax_profile(steps[n], classifiers[n], p))
  if not args.no_torch:
    steps["torch"] = build_torch(args)
    profilers["torch"] = lambda: torch_profile(steps["torch"])
  return steps, profilers, classifiers


def run(args):
  steps, profilers, classifiers = build_all(args)
  for fn in steps.values():
    for _ in range(args.warmup):
      fn()
  load_before = load_average()
  plain, profiled = {k: [] for k in steps}, {k: [] for k in steps}
  order = list(steps)
  for r in range(args.rounds):
    log(f"round {r + 1}/{args.rounds}")
    for name in (order if r % 2 == 0 else order[::-1]):
      plain[name].append(plain_ms(steps[name]))
      if not args.no_profile and (not args.no_profile_variants or name in ("tlflax", "torch")):
        profiled[name].append(profilers[name]())
  return {"plain_ms": plain, "profiled": {k: v for k, v in profiled.items() if v},
          "load_before": load_before, "load_after": load_average(),
          "tlflax_categories_of_ops": {k: _op_table(c, profiled.get(k, []))
                                       for k, c in classifiers.items()}}


def _op_table(classifier, rounds):
  ops = {op for r in rounds for op in r["ops"]}
  return {op: classifier.category(op) for op in ops}


def median_dict(dicts):
  keys = {k for d in dicts for k in d}
  return {k: statistics.median(d.get(k, 0.0) for d in dicts) for k in keys}


def summarize(raw, top: int):
  out = {}
  for fw, times in raw["plain_ms"].items():
    out[fw] = {"plain_step_ms_median": statistics.median(times),
               "plain_step_ms": [round(v, 2) for v in times]}
    if fw != "tlflax" and fw.startswith("tlflax"):
      pairs = [v / b for v, b in zip(times, raw["plain_ms"]["tlflax"])]
      out[fw]["plain_vs_first_variant"] = statistics.median(pairs)
    rounds = raw["profiled"].get(fw)
    if rounds:
      out[fw].update(profile_summary(rounds, top))
  return out


def profile_summary(rounds, top: int):
  cats = median_dict([r["categories"] for r in rounds])
  for roll, parts in ROLLUPS.items():
    cats[roll] = sum(cats.get(p, 0.0) for p in parts)
  ops = median_dict([r["ops"] for r in rounds])
  return {
      "profiled_step_ms_median": statistics.median(r["wall_ms"] for r in rounds),
      "attributed_ms": sum(v for k, v in cats.items() if k not in ROLLUPS),
      "categories_ms": {k: round(v, 3) for k, v in sorted(cats.items())},
      "top_ops_ms": [(k, round(v, 3)) for k, v in
                     sorted(ops.items(), key=lambda kv: -kv[1])[:top]],
  }


def table(summary, scale=None):
  """Rows: category, ms/step and share of the attributed time per framework, the
  difference and its share of the gap. `scale` ({framework: factor}) rescales
  each framework's ms, e.g. onto a quiet machine's step time."""
  tl, th = summary.get("tlflax"), summary.get("torch")
  k_tl, k_th = (scale or {}).get("tlflax", 1.0), (scale or {}).get("torch", 1.0)
  gap = (k_tl * tl["attributed_ms"] - k_th * th["attributed_ms"]) if th else None
  names = [c for c in CATEGORIES for c in (c, c + " *")] + list(ROLLUPS)
  cats = [c for c in names if any(c in s.get("categories_ms", {}) for s in (tl, th) if s)]
  rows = []
  for c in cats:
    a = k_tl * tl["categories_ms"].get(c, 0.0)
    b = k_th * th["categories_ms"].get(c, 0.0) if th else None
    if a < 0.005 * k_tl * tl["attributed_ms"] and (
        b is None or b < 0.005 * k_th * th["attributed_ms"]):
      continue  # Under half a percent of both steps: noise in a table meant to be read.
    diff = a - b if b is not None else None
    rows.append([c, a, a / (k_tl * tl["attributed_ms"]), b,
                 b / (k_th * th["attributed_ms"]) if th else None,
                 diff, diff / gap if diff is not None and gap else None])
  rows.append(["total attributed", k_tl * tl["attributed_ms"], None,
               k_th * th["attributed_ms"] if th else None, None, gap, None])
  return rows


def fmt(v, kind):
  if v is None:
    return "-" if kind else ""
  return {"ms": f"{v:.1f}", "pct": f"{100 * v:.0f}%"}.get(kind, str(v))


HEAD = ["category", "tlflax ms", "share", "torch ms", "share", "diff ms", "of gap"]
KINDS = [None, "ms", "pct", "ms", "pct", "ms", "pct"]


def render(rows, markdown: bool) -> str:
  cells = [HEAD] + [[r[0]] + [fmt(v, k) for v, k in zip(r[1:], KINDS[1:])] for r in rows]
  if markdown:
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines[:1] + ["|" + "---|" * len(HEAD)] + lines[1:])
  widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))) for line in cells)


def quiet_scale(result, results_json, tlflax_quiet_ms=None):
  """Factors that map each framework's attributed ms onto the quiet-machine step
  time of the same case in throughput.py's JSON (shares kept): under load torch
  slows down far more than XLA, so only shares compare across frameworks."""
  if not results_json or not Path(results_json).is_file():
    return None, None
  a = result["args"]
  for case in json.loads(Path(results_json).read_text()).get("cases", []):
    if (case.get("model"), case.get("mode"), case.get("batch"), case.get("res")) == (
        a["model"], a["mode"], a["batch"], a["res"]) and case.get("torch_step_ms_median"):
      s = result["summary"]
      quiet = {"tlflax": tlflax_quiet_ms or case["tlflax_step_ms_median"],
               "torch": case["torch_step_ms_median"]}
      return {fw: quiet[fw] / s[fw]["attributed_ms"] for fw in quiet if fw in s}, quiet
  return None, None


def split_torch_conv_bwd(summary, split):
  """torch's one `convolution_backward` per layer divided into input and weight
  gradients in the proportion the per-layer timing (`--split-torch-conv-bwd`)
  measured; the table says so in its header."""
  th = summary.get("torch")
  if not split or not th or not th["categories_ms"].get(CONV_BWD_UNSPLIT):
    return summary
  cats = dict(th["categories_ms"])
  unsplit = cats.pop(CONV_BWD_UNSPLIT)
  f_input = split["input"] / (split["input"] + split["weight"])
  cats[CONV_BWD_IN + " *"] = f_input * unsplit
  cats[CONV_BWD_W + " *"] = (1 - f_input) * unsplit
  tl = dict(summary["tlflax"], categories_ms={
      (k + " *" if k in (CONV_BWD_IN, CONV_BWD_W) else k): v
      for k, v in summary["tlflax"]["categories_ms"].items()})
  print(f"# rows marked *: torch's conv backward split {f_input:.0%} input / "
        f"{1 - f_input:.0%} weight gradient, as its layers timed alone divide it")
  return dict(summary, torch=dict(th, categories_ms=cats), tlflax=tl)


def print_report(result, markdown=False, results_json=None, tlflax_quiet_ms=None):
  s, a = result["summary"], result["args"]
  if "attributed_ms" not in s.get("tlflax", {}):
    print(f"# {a['model']} {a['mode']} res {a['res']} batch {a['batch']}: plain timing only; "
          f"load {result['load_before']} -> {result['load_after']}")
    print_variants(s)
    return
  print(f"# {a['model']} {a['mode']} res {a['res']} batch {a['batch']}; "
        f"XLA_FLAGS={result['xla_flags']!r}; load {result['load_before']} -> "
        f"{result['load_after']}")
  for fw, v in s.items():
    print(f"# {fw}: plain step {v['plain_step_ms_median']:.1f} ms (median of "
          f"{len(v['plain_step_ms'])})" + (
              f", profiled {v['profiled_step_ms_median']:.1f} ms, attributed to ops "
              f"{v['attributed_ms']:.1f} ms" if "attributed_ms" in v else ""))
  variants = s
  s = split_torch_conv_bwd(s, result.get("torch_conv_bwd_split_ms"))
  print(render(table(s), markdown))
  scale, quiet = quiet_scale(result, results_json, tlflax_quiet_ms)
  if scale and "torch" in scale:
    print(f"# the same shares on the quiet-machine step times of {results_json} "
          f"(tlflax {quiet['tlflax']:.1f} ms{' (given)' if tlflax_quiet_ms else ''}, "
          f"torch {quiet['torch']:.1f} ms):")
    print(render(table(s, scale), markdown))
  print_variants(variants)
  if "torch_conv_bwd_split_ms" in result:
    t = result["torch_conv_bwd_split_ms"]
    print(f"# torch conv backward per layer, timed alone: input-grad {t['input']:.1f} ms, "
          f"weight-grad {t['weight']:.1f} ms, both {t['both']:.1f} ms per step")


def print_variants(summary):
  """Variants' plain step time against the first variant's, paired round by round,
  and their profiled categories where they were traced."""
  names = [k for k in summary if k.startswith("tlflax:")]
  if not names:
    return
  print("# variants (plain step, median of rounds; 'vs first': median of per-round ratios)")
  for k in ["tlflax"] + names:
    v = summary[k]
    line = f"{k:28s} {v['plain_step_ms_median']:9.1f} ms"
    if "plain_vs_first_variant" in v:
      line += f"  vs first {v['plain_vs_first_variant']:.2f}"
    if "categories_ms" in v:
      c = v["categories_ms"]
      line += "  | " + ", ".join(f"{cat} {c.get(cat, 0.0):.0f}" for cat in (
          CONV_FWD, CONV_BWD_IN, CONV_BWD_W, "copies for conv bwd", DW_FWD, DW_BWD,
          "batch norm", "pooling") if c.get(cat))
    print(line)


def configure(args):
  """XLA_FLAGS: the variant's flags first, then tlflax's (a flag set here wins)."""
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (args.xla_flags + " " + os.environ.get("XLA_FLAGS", "")).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import throughput as T
  xla = T.configure_xla(args.no_xla_flags)
  T.setup_torch(args.no_torch)  # Before anything imports tensorflow.
  return xla["xla_flags"]


def reclassify(result, hlo_text: str, top: int) -> None:
  """Recomputes the first variant's categories of a saved run from its per-op
  times and the compiled HLO (`--hlo-out` of that run, or a compile of the same
  case and flags): for a classifier improved after the run."""
  classifier = Classifier(hlo_text, training=result["args"]["mode"] == "train")
  rounds = result["raw"]["profiled"]["tlflax"]
  for r in rounds:
    cats = collections.Counter()
    for op, ms in r["ops"].items():
      cats[classifier.category(op)] += ms
    r["categories"] = dict(cats)
  result["raw"]["tlflax_categories_of_ops"] = _op_table(classifier, rounds)
  result["summary"]["tlflax"].update(profile_summary(rounds, top))
  result["reclassified"] = True


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    result = json.loads(Path(args.report).read_text())
    if args.hlo:
      reclassify(result, Path(args.hlo).read_text(), args.top)
      if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print_report(result, args.markdown, args.project_onto, args.tlflax_quiet_ms)
    return
  xla_flags = configure(args)
  raw = run(args)
  result = {"args": vars(args), "xla_flags": xla_flags, "load_before": raw["load_before"],
            "load_after": raw["load_after"], "summary": summarize(raw, args.top),
            "raw": raw}
  if args.split_torch_conv_bwd and not args.no_torch:
    log("timing torch conv backward per layer (input-only / weight-only)")
    result["torch_conv_bwd_split_ms"] = torch_conv_bwd_split(args)
  result["load_end"] = load_average()
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  print_report(result, args.markdown, args.project_onto)


if __name__ == "__main__":
  import tlflax  # noqa: F401  First: its import tunes malloc (tlflax.xla_env) for both frameworks.
  main()
