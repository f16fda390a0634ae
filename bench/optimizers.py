"""Optimizer step time and effective bandwidth, Nestor's Adan paths beside named peers.

Contenders step interleaved round by round (A B C ... A B C ...), because memory bandwidth
drifts (on the 2-core CPU machine by several times within an hour); each figure is the
median over rounds.

On the CPU (``--device cpu``, the default; the README quotes these figures):

  torch AdamW fused   torch.optim.AdamW(fused=True): the bar to reach (28 bytes/param)
  Nestor Adan fused   compiled kernels (44 bytes/param)
  Nestor fused, new grads  the same, given new gradient tensors every step (as after
                      zero_grad() and backward): they are copied into its flat gradient
                      buffer first, 8 more bytes/param moved (not counted in its GB/s)
  Nestor Adan foreach torch._foreach_* path
  Nestor Adan single  the readable reference path
  p-o Adan foreach    pytorch-optimizer's Adan (foreach=True), the common third-party Adan

On a GPU (``--device cuda``):

  torch AdamW fused   torch.optim.AdamW(fused=True), torch's CUDA kernel (28 bytes/param)
  Nestor AdamW fused  optimizers.AdamW(fused=True), compiled through Triton (28 bytes/param)
  Nestor Adan fused   optimizers.Adan(fused=True) (44 bytes/param)
  authors' Adan fused the paper authors' CUDA kernel: adan.Adan(fused=True) of a
                      github.com/sail-sg/Adan checkout with its fused_adan extension built
                      (--authors DIR, else `import adan, fused_adan` from sys.path); it
                      also rewrites -g_prev after its kernel, but is credited 44 bytes/param
  p-o Adan foreach    pytorch-optimizer's Adan (foreach=True)

Each is timed with CUDA events around its steps (then synchronized), after 3 warm-up steps.
"host ms" is the wall time from calling step() to its return, the device idle before each
call: what launching a step costs the CPU. Where it exceeds "step ms" the GPU waits on the
host, as it may for the GPT-2 layout's 148 tensors. A contender that is not importable
(pytorch-optimizer, the authors' extension) is skipped with a line saying why.

Roofline: an in-place triad (a += s*b: reads a and b, writes a, 12 bytes/element) measured
in the same rounds. It is in place like the optimizers, so neither pays write-allocate traffic
that the byte counts leave out. "of triad" is a contender's GB/s as a share of the triad's.

Layouts (--layout): 1 (one tensor of --numel parameters), 200 (200 equal tensors totalling
--numel), gpt2 (GPT-2 small's parameters as nanoGPT's model has them: 148 tensors,
124,439,808 parameters; --gpt2-scale shrinks its width, vocabulary and context for a smoke
test), or all. Defaults: on the CPU 1 and 200 with 16M (2**24) parameters, on a GPU all
three with 2**28 (268,435,456) parameters for 1 and 200. Each layout's contenders are built,
measured and freed before the next layout's.
Host time: each fused optimizer over --host-tensors (150) tensors of 64 elements, where the
kernels cost next to nothing: the median wall time of a step() call, against torch's fused
AdamW (on a GPU each call starts with the device idle).
The fused path's first-step (compile) time is measured in fresh subprocesses, with an empty
and with a warm inductor cache (--no-first-step skips it).

    python bench/optimizers.py [--numel 16777216] [--rounds 7] [--steps 5] [--before TREE]

On a machine with a GPU (--authors DIR where a checkout of sail-sg/Adan with its extension
built is at hand; --out to bring the figures back as JSON):

    python bench/optimizers.py --device cuda [--authors DIR] [--out cuda.json]
    python bench/optimizers.py --device cuda --quick      # smoke test: small sizes, 2 rounds

Without a GPU, --device cuda exits with status 2 and one line saying why.
--before TREE adds the fused Adan of another checkout (git worktree add TREE REV) to the
same rounds, for before/after figures from one run.

Low-bit state (--lowbit, instead of the tables above): Nestor's Adan fused with fp32, bf16
and int8 state, torch's fused AdamW, Nestor's AdamW with int8 state, and the 8-bit AdamWs
of torchao (torchao.optim.AdamW8bit) and bitsandbytes (bnb.optim.AdamW8bit), each skipped
with a line saying why where it is not importable. Columns: the median step time over
interleaved rounds, its ratio to fp32 fused Adan, and the optimizer state's bytes per
parameter as allocated: every storage under the optimizer's state (inner tensors of
tensor subclasses, scales and code maps included, each storage once), step counts not.

    python bench/optimizers.py --lowbit --layout all --gpt2-scale 0.5 --rounds 5 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

# Run as a script, this file's folder heads sys.path and its name would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from optimizers import AdamW, Adan  # noqa: E402

# Bytes an update must move per parameter (the triad: per element).
BYTES_PER_PARAM = {"adamw": 28, "adan": 44, "triad": 12}

TRIAD = "triad (roofline)"
TORCH_ADAMW = "torch AdamW fused"
NESTOR_ADAN = "Nestor Adan fused"
AUTHORS_ADAN = "authors' Adan fused"
PO_ADAN = "p-o Adan foreach"

LAYOUTS = ("1", "200", "gpt2")
CUDA_WARMUP_STEPS = 3

Shape = tuple[int, ...]
Contenders = dict[str, tuple[str, Callable[[], None]]]  # name -> (bytes kind, one step)


def gpt2_shapes(scale: float = 1.0) -> list[Shape]:
    """GPT-2 small's parameter shapes in nanoGPT's ``model.parameters()`` order (nn.Linear
    weights are (out, in)); ``scale`` shrinks width, vocabulary and context, not depth.

    At scale 1: 124,439,808 parameters in 148 tensors. wte 38,597,376 + wpe 786,432
    + 12 layers x 7,087,872 + ln_f 1,536. Tensors: wte, wpe, 12 per layer (ln_1 w/b,
    c_attn w/b, attn c_proj w/b, ln_2 w/b, c_fc w/b, mlp c_proj w/b) and ln_f w/b:
    2 + 144 + 2 = 148; lm_head is tied to wte, so it is no tensor of its own.
    """
    d = max(1, round(768 * scale))  # n_embd
    vocab = max(1, round(50257 * scale))  # GPT-2's tokenizer, as from_pretrained("gpt2")
    block = max(1, round(1024 * scale))  # context length
    shapes: list[Shape] = [(vocab, d), (block, d)]  # wte, wpe
    for _ in range(12):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (3 * d, d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (4 * d, d), (4 * d,),  # mlp.c_fc
            (d, 4 * d), (d,),  # mlp.c_proj
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def layout_shapes(layout: str, numel: int, gpt2_scale: float) -> list[Shape]:
    """The parameter shapes of one layout (see the module docstring)."""
    if layout == "1":
        return [(numel,)]
    if layout == "200":
        return [(numel // 200,)] * 200
    if layout == "gpt2":
        return gpt2_shapes(gpt2_scale)
    raise ValueError(f"Invalid layout: {layout!r}, expected one of {LAYOUTS}")


def make_problem(shapes: list[Shape], seed: int, device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device))
        p.grad = torch.randn(shape, generator=gen, device=device).mul_(1e-2)
        params.append(p)
    return params


def import_path(name: str, path: str, package_folder: str | None = None) -> ModuleType:
    """Import the file ``path`` as module ``name`` (a package when ``package_folder`` is set)."""
    spec = importlib.util.spec_from_file_location(
        name,
        path,
        submodule_search_locations=[package_folder] if package_folder else None,
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_before(tree: str) -> type[torch.optim.Optimizer]:
    """Adan from another checkout's ``optimizers`` package, imported under another name so
    both builds step in one process, interleaved."""
    folder = os.path.join(tree, "optimizers")
    return import_path("optimizers_before", os.path.join(folder, "__init__.py"), folder).Adan


def load_authors(folder: str | None) -> type[torch.optim.Optimizer]:
    """The paper authors' Adan (github.com/sail-sg/Adan ``adan.py``) with its ``fused_adan``
    CUDA extension: from the checkout ``folder`` (its built ``fused_adan*.so`` in the folder
    or its ``build/lib*``), or from sys.path when None. Raises ImportError saying why not."""
    if folder is None:
        import adan as module
        import fused_adan  # adan.py imports it inside each fused step
    else:
        folder = os.path.abspath(folder)
        source = os.path.join(folder, "adan.py")
        if not os.path.isfile(source):
            raise ImportError(f"no adan.py in {folder}")
        builds = glob.glob(os.path.join(folder, "fused_adan*.so")) + glob.glob(
            os.path.join(folder, "build", "lib*", "fused_adan*.so")
        )
        # Only for this import: the checkout's other files (setup.py, tests.py) would shadow.
        added = [os.path.dirname(builds[0])] if builds else []
        sys.path[:0] = added
        try:
            import fused_adan  # noqa: F401
        except ImportError as exc:
            where = builds[0] if builds else f"no fused_adan*.so in {folder}"
            raise ImportError(f"{where}: {exc}") from exc
        finally:
            del sys.path[: len(added)]
        module = import_path("adan_authors", source)
    if "fused" not in inspect.signature(module.Adan).parameters:
        raise ImportError(f"{module.__file__}: its Adan has no fused option (an older checkout)")
    return module.Adan


@dataclass
class Peers:
    """The optional contenders' classes, loaded once; ``skipped`` says what is left out, why."""

    po_adan: type[torch.optim.Optimizer] | None = None
    authors_adan: type[torch.optim.Optimizer] | None = None
    before_adan: type[torch.optim.Optimizer] | None = None
    skipped: list[str] = field(default_factory=list)


def load_peers(device: torch.device, authors: str | None, before: str | None) -> Peers:
    """Load the optional contenders this device can run, noting each one left out and why."""
    peers = Peers(before_adan=load_before(before) if before else None)
    try:
        from pytorch_optimizer import Adan as PoAdan

        peers.po_adan = PoAdan
    except ImportError as exc:
        peers.skipped.append(f"{PO_ADAN}: skipped, pytorch_optimizer is not importable ({exc})")
    if device.type != "cuda":
        if authors:
            peers.skipped.append(f"{AUTHORS_ADAN}: skipped, its fused kernel needs --device cuda")
        return peers
    try:
        peers.authors_adan = load_authors(authors)
    except (ImportError, OSError) as exc:
        hint = (
            "" if authors else "; --authors DIR names a sail-sg/Adan checkout with fused_adan built"
        )
        peers.skipped.append(f"{AUTHORS_ADAN}: skipped, not importable ({exc}){hint}")
    return peers


def contenders(shapes: list[Shape], device: torch.device, peers: Peers) -> Contenders:
    """Every contender for this device, each with its own parameters, first step taken."""
    numel = sum(math.prod(s) for s in shapes)

    def problem(seed: int) -> list[torch.nn.Parameter]:
        return make_problem(shapes, seed, device)

    def stepper(opt: torch.optim.Optimizer) -> Callable[[], None]:
        opt.step()  # create state (and compile) outside the timed region
        return opt.step

    def fresh_grads(opt: torch.optim.Optimizer) -> Callable[[], None]:
        """Each step sees gradient tensors it has not seen, as after zero_grad() and a new
        backward (two sets, alternated: the tensors are made outside the timed region)."""
        params = opt.param_groups[0]["params"]
        sets = [[p.grad.clone() for p in params] for _ in range(2)]
        opt.step()
        turn = [0]

        def step() -> None:
            turn[0] ^= 1
            for p, g in zip(params, sets[turn[0]], strict=True):
                p.grad = g
            opt.step()

        return step

    def triad() -> Callable[[], None]:
        a = torch.randn(numel, device=device)
        b = torch.randn(numel, device=device)
        return lambda: a.add_(b, alpha=1e-9)

    kw = dict(lr=1e-3, weight_decay=0.02)
    cuda = device.type == "cuda"
    runners: Contenders = {
        TRIAD: ("triad", triad()),
        TORCH_ADAMW: ("adamw", stepper(torch.optim.AdamW(problem(0), fused=True, **kw))),
    }
    if cuda:
        runners["Nestor AdamW fused"] = ("adamw", stepper(AdamW(problem(6), fused=True, **kw)))
    runners[NESTOR_ADAN] = ("adan", stepper(Adan(problem(1), fused=True, **kw)))
    if peers.before_adan is not None:
        opt = peers.before_adan(problem(7), fused=True, **kw)
        runners["Adan fused (--before)"] = ("adan", stepper(opt))
    if cuda:
        if peers.authors_adan is not None:
            try:
                opt = peers.authors_adan(problem(8), fused=True, **kw)
                runners[AUTHORS_ADAN] = ("adan", stepper(opt))
            except RuntimeError as exc:  # an extension built for another GPU or torch
                peers.authors_adan = None
                peers.skipped.append(f"{AUTHORS_ADAN}: skipped, its first step failed ({exc})")
                print(peers.skipped[-1])
    else:
        runners["Nestor fused, new grads"] = (
            "adan",
            fresh_grads(Adan(problem(5), fused=True, **kw)),
        )
        runners["Nestor Adan foreach"] = (
            "adan",
            stepper(Adan(problem(2), foreach=True, fused=False, **kw)),
        )
        runners["Nestor Adan single"] = (
            "adan",
            stepper(Adan(problem(3), foreach=False, fused=False, **kw)),
        )
    if peers.po_adan is not None:
        runners[PO_ADAN] = ("adan", stepper(peers.po_adan(problem(4), foreach=True, **kw)))
    return runners


NESTOR_ADAN_FP32 = "Nestor Adan fp32 fused"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of ``opt``'s state as allocated: each storage reached from its state tensors
    (a tensor subclass's inner tensors included) counted once; step counts left out."""
    seen: dict[tuple[str, int], int] = {}

    def visit(t: torch.Tensor) -> None:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for name in names:
                visit(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()

    for entry in opt.state.values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and key != "step":
                visit(value)
    return sum(seen.values())


def lowbit_contenders(
    shapes: list[Shape], device: torch.device, skipped: list[str]
) -> dict[str, torch.optim.Optimizer]:
    """The low-bit table's optimizers, each with its own parameters, first step taken."""
    kw = dict(lr=1e-3, weight_decay=0.02)

    def problem(seed: int) -> list[torch.nn.Parameter]:
        return make_problem(shapes, seed, device)

    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        NESTOR_ADAN_FP32: lambda ps: Adan(ps, fused=True, **kw),
        "Nestor Adan bf16 fused": lambda ps: Adan(ps, fused=True, state_precision="bf16", **kw),
        "Nestor Adan int8 fused": lambda ps: Adan(ps, fused=True, state_precision="int8", **kw),
        TORCH_ADAMW: lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "Nestor AdamW int8 fused": lambda ps: AdamW(ps, fused=True, state_precision="int8", **kw),
    }
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        makers["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps, **kw)
    except ImportError as exc:
        skipped.append(f"torchao AdamW8bit: skipped, torchao is not importable ({exc})")
    try:
        import bitsandbytes as bnb

        makers["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, **kw)
    except ImportError as exc:
        skipped.append(f"bnb AdamW8bit: skipped, bitsandbytes is not importable ({exc})")
    opts = {}
    for i, (name, make) in enumerate(makers.items()):
        try:
            opt = make(problem(10 + i))
            opt.step()  # state and compiles outside the timed rounds
        except (RuntimeError, NotImplementedError) as exc:
            skipped.append(f"{name}: skipped, its first step failed ({exc})")
            continue
        opts[name] = opt
    return opts


def measure_lowbit(
    shapes: list[Shape], device: torch.device, rounds: int, steps: int, skipped: list[str]
) -> list[dict]:
    """One row per low-bit contender: median step time over interleaved rounds, its ratio
    to fp32 fused Adan, and state bytes per parameter measured from the tensors."""
    opts = lowbit_contenders(shapes, device, skipped)
    numel = sum(math.prod(s) for s in shapes)
    cuda = device.type == "cuda"
    if cuda:
        for opt in opts.values():
            for _ in range(CUDA_WARMUP_STEPS):
                opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            times[name].append(seconds_per_step(opt.step, steps, cuda))
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median[NESTOR_ADAN_FP32]
    return [
        dict(
            name=name,
            ms=median[name] * 1e3,
            vs_adan=median[name] / base,
            bytes_per_param=state_bytes(opt) / numel,
        )
        for name, opt in opts.items()
    ]


def print_lowbit_table(rows: list[dict]) -> None:
    print("| contender                | step ms | vs fp32 Adan | state B/param |")
    print("|--------------------------|---------|--------------|---------------|")
    for r in rows:
        print(
            f"| {r['name']:24} | {r['ms']:7.1f} | {r['vs_adan']:11.2f}x "
            f"| {r['bytes_per_param']:13.2f} |"
        )


def seconds_per_step(fn: Callable[[], None], n: int, cuda: bool) -> float:
    """Mean time of n back-to-back steps: CUDA events on a GPU, the wall clock on the CPU."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def host_seconds(fn: Callable[[], None], n: int) -> list[float]:
    """Wall time from call to return of n steps, each called with the device idle (the
    synchronize is outside the timed region), so a full launch queue cannot stall it."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return out


def measure(
    shapes: list[Shape], device: torch.device, rounds: int, steps: int, peers: Peers
) -> list[dict]:
    """One row per contender: medians over interleaved rounds, bandwidth and ratios."""
    runners = contenders(shapes, device, peers)
    numel = sum(math.prod(s) for s in shapes)
    cuda = device.type == "cuda"
    if cuda:
        for _, fn in runners.values():
            for _ in range(CUDA_WARMUP_STEPS):
                fn()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in runners}
    host: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (kind, fn) in runners.items():
            n = steps * 4 if kind == "triad" else steps
            times[name].append(seconds_per_step(fn, n, cuda))
            if cuda:
                host[name] += host_seconds(fn, steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    triad_gbs = BYTES_PER_PARAM["triad"] * numel / median[TRIAD] / 1e9
    rows = []
    for name, (kind, _) in runners.items():
        t = median[name]
        gbs = BYTES_PER_PARAM[kind] * numel / t / 1e9
        peer = kind != "triad"
        rows.append(
            dict(
                name=name,
                kind=kind,
                ms=t * 1e3,
                host_ms=statistics.median(host[name]) * 1e3 if host[name] else None,
                gbs=gbs,
                of_triad=gbs / triad_gbs,
                vs_adamw=t / median[TORCH_ADAMW] if peer else None,
                vs_authors=t / median[AUTHORS_ADAN] if peer and AUTHORS_ADAN in median else None,
            )
        )
    return rows


def print_table(rows: list[dict], cuda: bool) -> None:
    """A markdown table; on a GPU with "host ms", and "vs authors" when they ran."""

    def ratio(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}x"

    columns = [  # (header, width, cell); cells are right-aligned but the first
        ("contender", 24, lambda r: r["name"]),
        ("step ms", 8, lambda r: f"{r['ms']:.{3 if cuda else 2}f}"),
        ("host ms", 8, lambda r: f"{r['host_ms']:.3f}"),
        ("GB/s", 6, lambda r: f"{r['gbs']:.1f}"),
        ("vs AdamW fused", 14, lambda r: ratio(r["vs_adamw"])),
        ("vs authors", 10, lambda r: ratio(r["vs_authors"])),
        ("of triad", 8, lambda r: f"{r['of_triad']:.0%}"),
    ]
    if not cuda:
        columns = [c for c in columns if c[0] != "host ms"]
    if all(r["vs_authors"] is None for r in rows):
        columns = [c for c in columns if c[0] != "vs authors"]

    def line(cells: list[str]) -> str:
        first, *rest = zip(cells, columns, strict=True)
        aligned = [f"{first[0]:<{first[1][1]}}"] + [f"{c:>{w}}" for c, (_, w, _) in rest]
        return "| " + " | ".join(aligned) + " |"

    print(line([h for h, _, _ in columns]))
    print("|" + "|".join("-" * (w + 2) for _, w, _ in columns) + "|")
    for r in rows:
        print(line([cell(r) for _, _, cell in columns]))
    ms = {r["name"]: r["ms"] for r in rows}
    if PO_ADAN in ms:
        po = ms[PO_ADAN] / ms[NESTOR_ADAN]
        print(f"Nestor fused vs pytorch-optimizer: {po:.1f}x faster per step")
    if AUTHORS_ADAN in ms:
        print(
            f"Nestor fused vs the authors' fused CUDA Adan: "
            f"{ms[AUTHORS_ADAN] / ms[NESTOR_ADAN]:.2f}x faster per step"
        )


_FIRST_STEP = """
import time, torch
from optimizers import Adan
device = torch.device({device!r})
params = [torch.nn.Parameter(torch.randn({size}, device=device)) for _ in range({tensors})]
for p in params:
    p.grad = torch.randn_like(p)
opt = Adan(params, fused=True)
if device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
opt.step()
if device.type == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def first_step_seconds(numel: int, tensors: int, device: torch.device) -> tuple[float, float]:
    """(cold, warm): a fresh process with an empty inductor cache, then the same again."""
    code = _FIRST_STEP.format(size=numel // tensors, tensors=tensors, device=device.type)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = []
        for _ in range(2):
            res = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            out.append(float(res.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def require_cuda() -> None:
    """Exit with status 2 and one line saying why, where this torch sees no GPU."""
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} built without CUDA"
    else:
        why = f"torch {torch.__version__} with CUDA {torch.version.cuda}: no GPU visible"
    print(f"--device cuda: CUDA is not available ({why})", file=sys.stderr)
    sys.exit(2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--layout",
        choices=(*LAYOUTS, "all"),
        help="parameter layout (default: 1 and 200 on the CPU, all on a GPU)",
    )
    parser.add_argument(
        "--numel", type=int, help="parameters in layouts 1 and 200 (default: 2**24 CPU, 2**28 GPU)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7)")
    parser.add_argument("--steps", type=int, help="steps per round (default: 5 CPU, 20 GPU)")
    parser.add_argument(
        "--gpt2-scale",
        type=float,
        help="shrink the gpt2 layout's width, vocabulary and context (default 1; --quick 0.1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: small sizes, 2 rounds of 3 steps, no first-step measurement",
    )
    parser.add_argument(
        "--no-first-step", action="store_true", help="skip the first-step (compile) timing"
    )
    parser.add_argument(
        "--before", metavar="TREE", help="also step the fused Adan of this checkout"
    )
    parser.add_argument(
        "--authors",
        metavar="DIR",
        help="a sail-sg/Adan checkout with adan.py and its fused_adan extension built "
        "(default: import adan and fused_adan from sys.path, if there)",
    )
    parser.add_argument(
        "--host-tensors",
        type=int,
        default=150,
        help="tensors in the host-time table (tiny ones: what a step costs the CPU; 0: skip)",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--lowbit",
        action="store_true",
        help="the low-bit state table (fp32/bf16/int8 Adan, 8-bit AdamWs) instead",
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    # An explicit option wins over --quick, which wins over the device's default.
    defaults = dict(
        layout="all" if cuda else None,
        numel=(2**20 if cuda else 2**16) if args.quick else (2**28 if cuda else 2**24),
        rounds=2 if args.quick else 7,
        steps=3 if args.quick else (20 if cuda else 5),
        gpt2_scale=0.1 if args.quick else 1.0,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.layout is None:
        args.layouts = ["1", "200"]
    elif args.layout == "all":
        args.layouts = list(LAYOUTS)
    else:
        args.layouts = [args.layout]
    args.no_first_step = args.no_first_step or args.quick
    for name in ("numel", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.numel < 200 and "200" in args.layouts:
        parser.error(f"--numel must be at least 200 for layout 200, got {args.numel}")
    if args.gpt2_scale <= 0:
        parser.error(f"--gpt2-scale must be positive, got {args.gpt2_scale}")
    return args


HOST_SIZE = 64  # elements per tensor in the host-time table: kernel time is negligible


def host_overhead(
    device: torch.device, tensors: int, rounds: int, steps: int, peers: Peers
) -> list[dict]:
    """Host time per fused step over ``tensors`` tiny tensors (what launching a step costs
    the CPU, apart from its kernels), each contender's median over interleaved rounds, with
    the ratio to torch's fused AdamW. On a GPU each call starts with the device idle."""
    shapes = [(HOST_SIZE,)] * tensors
    kw = dict(lr=1e-3, weight_decay=0.02)
    makers = {
        TORCH_ADAMW: lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "Nestor AdamW fused": lambda ps: AdamW(ps, fused=True, **kw),
        NESTOR_ADAN: lambda ps: Adan(ps, fused=True, **kw),
    }
    if peers.before_adan is not None:
        makers["Adan fused (--before)"] = lambda ps: peers.before_adan(ps, fused=True, **kw)
    steppers = {}
    for i, (name, make) in enumerate(makers.items()):
        opt = make(make_problem(shapes, i, device))
        for _ in range(3):  # state, flat buffers, compile: not the steady state
            opt.step()
        steppers[name] = opt.step
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            for _ in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[TORCH_ADAMW])
    return [
        dict(name=name, host_us=statistics.median(t) * 1e6, vs_adamw=statistics.median(t) / base)
        for name, t in times.items()
    ]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        require_cuda()
    peers = load_peers(device, args.authors, args.before)

    meta = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None,
        threads=torch.get_num_threads(),
        rounds=args.rounds,
        steps=args.steps,
        warmup_steps=CUDA_WARMUP_STEPS if cuda else 0,
    )
    if cuda:
        print(
            f"{meta['device']}, torch {meta['torch']}, CUDA {meta['cuda']}, fp32 parameters, "
            f"median of {args.rounds} interleaved rounds of {args.steps} steps "
            f"(CUDA events, after {CUDA_WARMUP_STEPS} warm-up steps)"
        )
    else:
        size = f"{args.numel / 2**20:.0f}M " if {"1", "200"} & set(args.layouts) else ""
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{size}fp32 parameters, median of {args.rounds} interleaved "
            f"rounds of {args.steps} steps"
        )
    for line in peers.skipped:
        print(line)
    if args.lowbit:
        main_lowbit(args, device)
        return

    layouts = []
    for layout in args.layouts:
        shapes = layout_shapes(layout, args.numel, args.gpt2_scale)
        numel = sum(math.prod(s) for s in shapes)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows = measure(shapes, device, args.rounds, args.steps, peers)
        if layout == "gpt2":
            scaled = "" if args.gpt2_scale == 1 else f", scaled by {args.gpt2_scale:g}"
            title = f"GPT-2 small shapes{scaled}: {numel:,} parameters as {len(shapes)} tensors"
        else:
            title = f"{numel / 2**20:.0f}M parameters as {len(shapes)} tensor(s)"
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        print(f"\n{title}" + (f" (peak {peak_gib:.1f} GiB allocated)" if cuda else ""))
        print_table(rows, cuda)
        layouts.append(
            dict(layout=layout, numel=numel, tensors=len(shapes), peak_gib=peak_gib, rows=rows)
        )
        # This layout's contenders are gone with `rows` built; return their memory.
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    host = None
    if args.host_tensors:
        host = host_overhead(device, args.host_tensors, args.rounds, 5 * args.steps, peers)
        print(f"\nhost time per fused step, {args.host_tensors} tensors of {HOST_SIZE} elements")
        print("| contender                | host us | vs AdamW fused |")
        print("|--------------------------|---------|----------------|")
        for row in host:
            print(f"| {row['name']:24} | {row['host_us']:7.0f} | {row['vs_adamw']:13.2f}x |")

    first_step = None
    if not args.no_first_step:
        cold, warm = first_step_seconds(args.numel, 200, device)
        first_step = dict(tensors=200, numel=args.numel, cold_s=cold, warm_s=warm)
        print(
            f"\nfirst fused step (compile), 200 tensors: {cold:.1f} s with an empty inductor "
            f"cache, {warm:.1f} s with a warm one"
        )
    if args.out:
        with open(args.out, "w") as f:
            result = dict(
                meta, layouts=layouts, host=host, skipped=peers.skipped, first_step=first_step
            )
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")


def main_lowbit(args: argparse.Namespace, device: torch.device) -> None:
    """The low-bit state table, one per layout (see the module docstring)."""
    layouts = []
    for layout in args.layouts:
        shapes = layout_shapes(layout, args.numel, args.gpt2_scale)
        numel = sum(math.prod(s) for s in shapes)
        skipped: list[str] = []
        rows = measure_lowbit(shapes, device, args.rounds, args.steps, skipped)
        if layout == "gpt2":
            scaled = "" if args.gpt2_scale == 1 else f", scaled by {args.gpt2_scale:g}"
            title = f"GPT-2 small shapes{scaled}: {numel:,} parameters as {len(shapes)} tensors"
        else:
            title = f"{numel:,} parameters as {len(shapes)} tensor(s)"
        print(f"\n{title}")
        for line in skipped:
            print(line)
        print_lowbit_table(rows)
        layouts.append(dict(layout=layout, numel=numel, rows=rows, skipped=skipped))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(device), torch=torch.__version__, layouts=layouts), f)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
