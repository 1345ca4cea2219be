"""Eager launches of compiled Triton kernels with Triton's per-call dispatch remembered.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run`` on every call: it binds and
specialises each of the ~45 arguments of our kernels (alignment, value classes, dtypes), builds a
cache key string, looks the compiled kernel up and only then launches. At short shapes that host
work took longer than the GPU work it launched, so the host set the pace (benchmarks/RESULTS.md).

:func:`launcher` remembers, per kernel, the compiled kernel Triton chose for each *launch key*: the
device of the launch's tensors and every parameter's value, whether the call passes it by position
or by keyword or leaves it to its default, keyed as Triton specialises it but finer: an integer
by its exact value (except for parameters the kernel does not specialise, like ``N``, which only
contribute their integer width), a tensor by its dtype and whether its address is 16-byte
aligned, a float by its type, a constexpr by its value, None only where Triton compiles it as a
constant (a table pointer left out, :data:`NONE_ARGUMENTS`, or a parameter whose default is None);
then the launch options (``num_warps``, ...) by value. That key is finer than Triton's own
specialisation (which only keeps classes of integers: 1, divisible by 16, 32- or 64-bit), so a
remembered kernel is always the one Triton would have picked; a new key costs one ordinary launch,
which also compiles if needed. Remembered launches call the compiled kernel's launcher directly,
with every parameter's value in order, as ``JITFunction.run`` does last.

The slow path (plain ``kernel[grid](...)``) is taken for anything the key does not describe: an
argument of another type, launch hooks registered with ``triton.knobs`` (profilers such as proton
read the launch metadata), a kernel's pre-run hooks, the interpreter, or
``LIGHTNING_OP_FAST_LAUNCH=0`` in the environment (read when this module is imported).

Every launch, remembered or not, runs on the device of its first CUDA tensor argument (a device
guard is entered only when that is not the current device).
"""

from __future__ import annotations

import inspect
import os

import torch

from .._gates import TRITON_INTERPRETING

ENABLED = os.environ.get("LIGHTNING_OP_FAST_LAUNCH", "1") != "0" and not TRITON_INTERPRETING
#: remembered launch keys per kernel before the table starts over (each distinct shape, stride
#: pattern and configuration is one key)
MAX_KEYS = 1024

_UNSUPPORTED = object()
_TRUE, _FALSE = (bool, True), (bool, False)  # a bool's key part: True == 1 would meet the integer 1

#: pointer parameters our kernels take as None where their option is off (the packed-sequence
#: tables and offsets of dense launches): Triton compiles None as a constant, so None is part of the key there
#: (elsewhere a None argument goes through Triton's dispatch)
NONE_ARGUMENTS = frozenset({"SEGMENTS", "PIECES", "SEQUENCES", "CU_SEQLENS"})

try:
    from triton import knobs as _knobs
except ImportError:  # older triton: no knobs module, no hooks to honour this way
    _knobs = None


def _hooks_idle() -> bool:
    """True when no launch hook is registered (an empty ``HookChain`` counts as none). Read on
    every launch: a profiler may register its hooks at any time."""
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class FastLauncher:
    """``launcher(kernel)[grid](*args, **kwargs)``: the same launch as ``kernel[grid](...)``."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = kernel.params
        self.names = [p.name for p in params]
        # each parameter's default (constexpr options left out of a call), or the marker
        self.defaults = [p.default if p.default is not inspect.Parameter.empty else _UNSUPPORTED for p in params]
        not_specialised = getattr(kernel, "do_not_specialize", None) or ()
        self.unspecialised = frozenset(
            i for i, p in enumerate(params) if p.name in not_specialised or i in not_specialised
        )
        self.constexprs = frozenset(i for i, p in enumerate(params) if getattr(p, "is_constexpr", False))
        # a parameter whose default is None is one the kernel is written to take as a constant None
        self.may_be_none = frozenset(i for i, p in enumerate(params) if p.name in NONE_ARGUMENTS or p.default is None)
        # the same sets by name, for keyword arguments; anything not a runtime parameter (a constexpr,
        # a launch option such as num_warps) is keyed by its value
        self.unspecialised_names = frozenset(self.names[i] for i in self.unspecialised)
        self.may_be_none_names = frozenset(self.names[i] for i in self.may_be_none)
        self.runtime_names = frozenset(name for i, name in enumerate(self.names) if i not in self.constexprs)
        self.compiled: dict = {}
        self.fast_launches = 0  # for tests: launches that skipped JITFunction.run

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key(self, device: int, args, kwargs):
        """The launch key (see the module's docstring), or None where an argument is not one it
        describes: the positional values' parts, then the keywords' names (a tuple of strings, which no
        positional part is) and their values' parts."""
        key = [device]
        append = key.append
        unspecialised, constexprs = self.unspecialised, self.constexprs
        for index, arg in enumerate(args):
            kind = type(arg)
            if kind is int:
                append(-2**31 <= arg < 2**31 if index in unspecialised else arg)
            elif isinstance(arg, torch.Tensor):
                append((arg.dtype, arg.data_ptr() % 16 == 0))
            elif kind is bool:
                append(_TRUE if arg else _FALSE)
            elif kind is float:
                append((float, arg) if index in constexprs else float)
            elif arg is None and index in self.may_be_none:
                append(None)
            elif index in constexprs:  # a string, a tl.dtype, ...: compiled in by value
                append((kind, arg))
            else:  # None, SymInt, numpy scalars, ...: Triton's own dispatch decides
                return None
        runtime, unspecialised_names = self.runtime_names, self.unspecialised_names
        append(tuple(kwargs))
        for name, arg in kwargs.items():
            kind = type(arg)
            if kind is int:
                append(-2**31 <= arg < 2**31 if name in unspecialised_names else arg)
            elif kind is bool:
                append(_TRUE if arg else _FALSE)
            elif isinstance(arg, torch.Tensor):
                append((arg.dtype, arg.data_ptr() % 16 == 0))
            elif kind is float and name in runtime:
                append(float)
            elif arg is None and name in self.may_be_none_names:
                append(None)
            elif name not in runtime:  # constexprs and launch options: by value
                append((kind, arg))
            else:
                return None
        return tuple(key)

    def _all_args(self, args, kwargs):
        """Every parameter's value in order, as ``JITFunction.run`` hands them to the launcher."""
        values = list(args)
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            value = kwargs.get(name, default)
            if value is _UNSUPPORTED:
                return None
            values.append(value)
        return values

    def launch(self, grid, args, kwargs):
        """On the device of the first CUDA tensor argument: Triton launches on the current device,
        which for tensors on another GPU is the wrong one (an error, or another device's memory
        read through peer access)."""
        device = _device_of(args)
        current = torch.cuda.current_device()
        if device is not None and device != current:
            with torch.cuda.device(device):
                return self._launch(grid, args, kwargs, device)
        return self._launch(grid, args, kwargs, current)

    def _launch(self, grid, args, kwargs, device: int):
        kernel = self.kernel
        if not ENABLED or kernel.pre_run_hooks or not _hooks_idle():
            return kernel[grid](*args, **kwargs)
        try:
            key = self._key(device, args, kwargs)
            compiled = None if key is None else self.compiled.get(key)
        except TypeError:  # an unhashable constexpr or launch option
            key = compiled = None
        values = None if compiled is None else self._all_args(args, kwargs)
        if values is None:
            compiled = kernel[grid](*args, **kwargs)
            if key is not None and compiled is not None and hasattr(compiled, "run"):
                if len(self.compiled) >= MAX_KEYS:
                    self.compiled.clear()
                self.compiled[key] = compiled
            return compiled
        grid_x = grid[0]
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        stream = _raw_stream(key[0])
        compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *values)
        self.fast_launches += 1
        return compiled


def _device_of(args):
    """The device index of the first CUDA tensor among ``args``, or None."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_cuda:
            return arg.device.index
    return None


def _raw_stream(device: int) -> int:
    """The current CUDA stream's handle on ``device``, as Triton's driver reads it."""
    return torch._C._cuda_getCurrentRawStream(device)


_launchers: dict = {}


def launcher(kernel):
    """The remembering launcher of ``kernel`` (a ``triton.jit`` function; with
    ``LIGHTNING_OP_FAST_LAUNCH=0`` it only adds the device guard); anything else (an interpreted
    kernel, a test's stand-in) is returned as it is."""
    if TRITON_INTERPRETING or not hasattr(kernel, "params") or not hasattr(kernel, "pre_run_hooks"):
        return kernel
    found = _launchers.get(kernel)
    if found is None:
        found = _launchers[kernel] = FastLauncher(kernel)
    return found
