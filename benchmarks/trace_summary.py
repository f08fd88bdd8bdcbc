"""Where a profiled engine run spent its time, by kernel and source line.

Reads the trace that `profile_steps` writes and the HLO text that
`dump_hlo` writes, and attributes each XLA kernel's thread time to the
innermost source line of this project that produced it
(`bench.py --trace_summary WORKDIR`; docs/PROFILING.md).
"""

import collections
import glob
import gzip
import json
import os
import re


def _hlo_tables(text):
  """Source locations of every instruction of an HLO module's text.

  The text (`compiled.as_text()` or XLA's `*.cpu_after_optimizations.txt`)
  starts with FileNames, FunctionNames, FileLocations and StackFrames
  tables; each instruction's metadata names an op_name and a
  stack_frame_id. A frame's printed parent_frame_id is the parent's id + 1
  (0: no parent).

  Returns:
    {instruction name: (op_name, [(file, function, line), ...] innermost
    first)}.
  """

  def table(name):
    m = re.search(r"^%s\n(.*?)\n\n" % name, text, re.S | re.M)
    return m.group(1).splitlines() if m else []

  def fields(rest):
    return dict(kv.split("=", 1) for kv in rest.strip("{}").split())

  files = {int(l.split(" ", 1)[0]): l.split(" ", 1)[1].strip('"')
           for l in table("FileNames")}  # fmt: skip
  funcs = {int(l.split(" ", 1)[0]): l.split(" ", 1)[1].strip('"')
           for l in table("FunctionNames")}  # fmt: skip
  locs, frames = {}, {}
  for line in table("FileLocations"):
    i, rest = line.split(" ", 1)
    d = fields(rest)
    locs[int(i)] = (files.get(int(d["file_name_id"]), "?"),
                    funcs.get(int(d["function_name_id"]), "?"),
                    int(d["line"]))  # fmt: skip
  for line in table("StackFrames"):
    i, rest = line.split(" ", 1)
    d = fields(rest)
    frames[int(i)] = (int(d["file_location_id"]),
                      int(d["parent_frame_id"]) - 1)  # fmt: skip

  def chain(fid):
    out, seen = [], set()
    while fid in frames and fid not in seen:
      seen.add(fid)
      loc, fid = frames[fid]
      out.append(locs.get(loc, ("?", "?", 0)))
    return out

  inst = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*)$")
  comp = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{$")
  meta = re.compile(
      r"metadata=\{op_name=\"([^\"]*)\"(?: stack_frame_id=(\d+))?"
  )
  calls = re.compile(r"calls=%?([\w.-]+)")
  found, callee, first_in = {}, {}, {}
  current = None
  for line in text.splitlines():
    m = inst.match(line)
    if m is None:
      c = comp.match(line)
      current = c.group(1) if c else current
      continue
    md = meta.search(m.group(2))
    if md:
      found[m.group(1)] = (md.group(1), int(md.group(2) or 0))
      first_in.setdefault(current, found[m.group(1)])
    else:
      cm = calls.search(m.group(2))
      ops = re.findall(r"\(%([\w.-]+)", m.group(2))
      callee[m.group(1)] = (cm.group(1) if cm else None, ops)
  # Wrapped kernels carry no metadata themselves: use their body's, else
  # their first operand's.
  for name, (body, ops) in callee.items():
    if body in first_in:
      found[name] = first_in[body]
    else:
      for op in ops:
        if op in found:
          found[name] = found[op]
          break
      else:
        found[name] = ("", 0)
  return {name: (op, chain(fid)) for name, (op, fid) in found.items()}


def _project_frame(frames):
  """The innermost frame in the project's package (else the innermost)."""
  for file, func, line in frames:
    if "ultraad_jax" in file.replace(os.sep, "/").split("/"):
      return f"{os.path.basename(file)}:{func}:{line}"
  if frames:
    file, func, line = frames[0]
    return f"{os.path.basename(file)}:{func}:{line}"
  return "?"


def _control_flow(text):
  """Names of an HLO module's while, conditional and call instructions.

  Their trace events span the kernels of their bodies, which the trace
  records on their own.
  """
  pattern = r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\s(?:while|conditional|call)\("
  return set(re.findall(pattern, text, re.M))


def _kernel_ms(events, sources, skip=frozenset()):
  """Milliseconds of each kernel over the trace, asynchronous ones included.

  Some kernels return as soon as they are launched and finish on XLA's
  thread pool: Eigen's matrix products and YNNPACK's fusions. Their event
  lasts only the launch; the trace marks their completion with an
  `end: <kernel>` event. Each launch therefore counts until its end event
  (the launches of one kernel paired with its end events in order) or its
  own duration, whichever is later. Counted by launch alone, the large
  products of the ViT-B/16 train step showed a tenth of their time.

  Args:
    events: the trace's events.
    sources: `_hlo_tables`' result (kernel name -> source).
    skip: kernels not to count (`_control_flow`'s: their bodies' kernels
      are counted instead).

  Returns:
    A Counter: kernel name -> milliseconds.
  """
  pending = collections.defaultdict(collections.deque)
  spans = []
  timed = sorted(
      (e for e in events if e.get("ph") == "X"), key=lambda e: e.get("ts", 0)
  )
  for e in timed:
    name = e.get("name", "")
    start = e.get("ts", 0)
    if name in sources and name not in skip:
      span = [name, start, start + e.get("dur", 0)]
      spans.append(span)
      pending[name].append(span)
    elif name.startswith("end: ") and pending.get(name[5:]):
      span = pending[name[5:]].popleft()
      span[2] = max(span[2], start)
  kernel_ms = collections.Counter()
  for name, start, end in spans:
    kernel_ms[name] += (end - start) / 1e3
  return kernel_ms


def summarize(workdir, top=20):
  """Where the profiled train steps spent their time, by kernel and source.

  Reads the newest trace written by `profile_steps` (`<workdir>/profile/
  plugins/profile/*/*.trace.json.gz`) and the compiled step's HLO
  (`<workdir>/hlo/train_step.txt` from `dump_hlo=True`, else XLA's dump of
  the train step), and attributes each XLA kernel's thread time to the
  innermost project source line that produced it (so the prompt-patch
  fusion shows up as fusion.py:_cross_attention, the maps as maps.py:...).

  Args:
    workdir: a run's work directory.
    top: rows of each table.

  Returns:
    {"steps", "total_ms_per_step", "kernels", "by_function", "by_source"}
    with thread milliseconds per step (kernels split over threads count
    once per thread; an asynchronous kernel from its launch to its end,
    see `_kernel_ms`).

  Raises:
    FileNotFoundError: no trace or no HLO text in the workdir.
  """
  traces = sorted(
      glob.glob(
          os.path.join(
              workdir, "profile", "plugins", "profile", "*", "*.trace.json.gz"
          )
      )
  )
  if not traces:
    raise FileNotFoundError(
        f"No *.trace.json.gz under {workdir}/profile: run with "
        "--config.profile_steps=N (N >= 1) and enough train.steps (the trace "
        "starts after 2 warm-up steps)."
    )
  hlo = os.path.join(workdir, "hlo", "train_step.txt")
  if not os.path.isfile(hlo):
    dumps = sorted(
        glob.glob(
            os.path.join(
                workdir,
                "hlo",
                "xla_dump",
                "*train_steps.cpu_after_optimizations.txt",
            )
        )
    )
    if not dumps:
      raise FileNotFoundError(
          f"Neither {hlo} nor an XLA dump of the train step exists: run with "
          "--config.dump_hlo=True."
      )
    hlo = dumps[-1]
  with open(hlo, encoding="utf-8") as f:
    text = f.read()
  sources = _hlo_tables(text)
  with gzip.open(traces[-1], "rt", encoding="utf-8") as f:
    events = json.load(f)["traceEvents"]
  kernel_ms = _kernel_ms(events, sources, _control_flow(text))
  # One "train" slice per compiled call, which records its steps (a call of
  # several steps, train.steps_per_call).
  steps = sum(int(e.get("args", {}).get("steps", 1)) for e in events
              if e.get("ph") == "X" and e.get("name") == "train")  # fmt: skip
  steps = max(steps, 1)
  total = sum(kernel_ms.values()) / steps
  by_source = collections.Counter()
  by_function = collections.Counter()
  kernels = []
  for name, ms in kernel_ms.most_common():
    op_name, frames = sources[name]
    src = _project_frame(frames)
    by_source[src] += ms / steps
    by_function[src.rsplit(":", 1)[0]] += ms / steps
    kernels.append({"kernel": name, "ms_per_step": ms / steps,
                    "share": ms / steps / total if total else 0.0,
                    "source": src, "op_name": op_name})  # fmt: skip
  return {
      "trace": traces[-1],
      "hlo": hlo,
      "steps": steps,
      "total_ms_per_step": total,
      "kernels": kernels[:top],
      "by_function": [{"function": k, "ms_per_step": v,
                       "share": v / total if total else 0.0}
                      for k, v in by_function.most_common(top)],
      "by_source": [{"source": k, "ms_per_step": v,
                     "share": v / total if total else 0.0}
                    for k, v in by_source.most_common(top)],
  }  # fmt: skip


def print_summary(summary):
  print(
      f"{summary['steps']} profiled step(s), {summary['total_ms_per_step']:.1f}"
      " thread-ms of XLA kernels per step"
  )
  print(f"trace: {summary['trace']}\nhlo:   {summary['hlo']}")
  print("\nby function (innermost project frame):")
  for row in summary["by_function"]:
    print(
        f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%}  "
        f"{row['function']}"
    )
  print("\nby source line:")
  for row in summary["by_source"]:
    print(
        f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%}  {row['source']}"
    )
  print("\nby kernel:")
  for row in summary["kernels"]:
    print(
        f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%}  "
        f"{row['kernel']:<40} {row['source']}"
    )
