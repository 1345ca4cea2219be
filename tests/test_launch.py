"""The remembering launcher (lightning_op/kernels/_launch.py) against a stand-in for a Triton kernel.

On CPU the real kernels run interpreted and never take the fast path; these tests drive its key
and its launch with a stand-in that records which path each launch took. The GPU suite runs the
real kernels through it (tests/test_gpu.py::test_cuda_remembered_launches_follow_alignment).
"""

import inspect
from types import SimpleNamespace

import pytest
import torch

from lightning_op.kernels import _launch


class _Compiled:
    function = "function-handle"
    packed_metadata = "packed"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _Kernel:
    """Parameters X (pointer), stride (int), N (not specialised), scale (float), BLOCK (constexpr
    given at the call), FLAG (constexpr with a default), ROWS (a table pointer, None where its
    option is off)."""

    do_not_specialize = ["N"]

    def __init__(self):
        empty = inspect.Parameter.empty
        self.params = [SimpleNamespace(name=name, default=default, is_constexpr=name in ("BLOCK", "FLAG"))
                       for name, default in (("X", empty), ("stride", empty), ("N", empty), ("scale", empty),
                                             ("BLOCK", empty), ("FLAG", False), ("ROWS", None))]
        self.pre_run_hooks = []
        self.slow = []  # (grid, args, kwargs) of each launch through kernel[grid](...)
        self.compiled = _Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_raw_stream", lambda device: 1234)
    kernel = _Kernel()
    return kernel, _launch.FastLauncher(kernel)


def _aligned(dtype=torch.float32):
    return torch.zeros(64, dtype=dtype)


def test_second_launch_with_the_same_key_skips_triton_dispatch(fake):
    kernel, launch = fake
    x = _aligned()
    launch[(4, 2)](x, 64, 1000, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.slow) == 1 and not kernel.compiled.runs
    launch[(4, 2)](x, 64, 1000, 0.5, BLOCK=16, num_warps=4)
    assert len(kernel.slow) == 1 and launch.fast_launches == 1
    # the launcher gets what JITFunction.run hands it: grid, stream, handles, no launch metadata or
    # hooks, then every parameter in order, the constexpr given and the defaulted ones included
    assert kernel.compiled.runs[0] == (4, 2, 1, 1234, "function-handle", "packed", None, None, None,
                                       x, 64, 1000, 0.5, 16, False, None)


def test_unspecialised_integers_only_key_their_width(fake):
    kernel, launch = fake
    x = _aligned()
    for n in (1000, 1001, 17, 1):  # N is not specialised: one compiled kernel serves all
        launch[(1,)](x, 64, n, 0.5, BLOCK=16)
    assert len(kernel.slow) == 1 and launch.fast_launches == 3
    launch[(1,)](x, 64, 2**31, 0.5, BLOCK=16)  # a 64-bit N is another kernel
    assert len(kernel.slow) == 2


@pytest.mark.parametrize("change", ["stride", "dtype", "misaligned", "constexpr", "option", "device"])
def test_anything_triton_specialises_on_is_a_new_key(fake, monkeypatch, change):
    kernel, launch = fake
    x = _aligned()
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16, num_warps=4)
    args, kwargs = [x, 64, 100, 0.5], dict(BLOCK=16, num_warps=4)
    if change == "stride":
        args[1] = 65  # not divisible by 16 (and any other value is a key of its own)
    elif change == "dtype":
        args[0] = _aligned(torch.float16)
    elif change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary: vector loads would fault or read wrong
        assert args[0].data_ptr() % 16
    elif change == "constexpr":
        kwargs["FLAG"] = True
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launch[(1,)](*args, **kwargs)
    assert len(kernel.slow) == 2 and launch.fast_launches == 0
    launch[(1,)](*args, **kwargs)  # and that key is remembered in turn
    assert len(kernel.slow) == 2 and launch.fast_launches == 1


def test_keyword_tensors_are_keyed_as_positional_ones(fake):
    """A table passed by keyword is a new object every call: keyed by its dtype and alignment (as
    a positional tensor), not by the object, a later call with another table takes the fast path."""
    kernel, launch = fake
    x = _aligned()
    for _ in range(3):
        launch[(1,)](x, 64, 100, 0.5, BLOCK=16, ROWS=torch.arange(8, dtype=torch.int32))
    assert len(kernel.slow) == 1 and launch.fast_launches == 2 and len(launch.compiled) == 1


@pytest.mark.parametrize("change", ["dtype", "misaligned", "left out"])
def test_keyword_tensors_triton_specialises_differently_are_a_new_key(fake, change):
    kernel, launch = fake
    x, rows = _aligned(), torch.arange(8, dtype=torch.int32)
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16, ROWS=rows)
    if change == "dtype":
        kwargs = dict(ROWS=rows.long())
    elif change == "misaligned":
        kwargs = dict(ROWS=rows[1:])
        assert kwargs["ROWS"].data_ptr() % 16
    else:
        kwargs = {}  # Triton compiles the default None in as a constant: another kernel
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16, **kwargs)
    assert len(kernel.slow) == 2 and launch.fast_launches == 0
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16, **kwargs)
    assert len(kernel.slow) == 2 and launch.fast_launches == 1


def test_keywords_reach_the_launcher_in_parameter_order(fake):
    """Every parameter given by keyword, in another order than the kernel's: the launcher gets
    them in the kernel's order, as JITFunction.run binds them; an unspecialised keyword (N) keys
    its integer width only, a float by its type, as they would positionally."""
    kernel, launch = fake
    x, rows = _aligned(), torch.arange(8, dtype=torch.int32)
    for n, scale in ((1000, 0.5), (17, 0.25)):
        launch[(2,)](ROWS=rows, FLAG=True, BLOCK=16, scale=scale, N=n, stride=64, X=x, num_warps=4)
    assert len(kernel.slow) == 1 and launch.fast_launches == 1
    assert kernel.compiled.runs[0][9:] == (x, 64, 17, 0.25, 16, True, rows)
    launch[(2,)](ROWS=rows, FLAG=True, BLOCK=16, scale=0.5, N=2**31, stride=64, X=x, num_warps=4)
    assert len(kernel.slow) == 2  # a 64-bit N: another kernel, by keyword as by position


def test_keyword_constexprs_are_keyed_by_value_and_undescribed_runtime_values_go_through_triton(fake):
    kernel, launch = fake
    x = _aligned()
    for value in (None, "ieee", 1.5, 2.5, 1.5):  # a constexpr: its value is compiled in, whatever its type
        launch[(1,)](x, 64, 100, 0.5, BLOCK=16, FLAG=value)
    assert len(kernel.slow) == 4 and launch.fast_launches == 1
    for value in (None, None, "64", "64"):  # a runtime parameter: None where its default is not None, a string
        launch[(1,)](x, N=100, scale=0.5, BLOCK=16, stride=value)
    assert len(kernel.slow) == 8 and launch.fast_launches == 1


def test_arguments_the_key_cannot_describe_always_go_through_triton(fake):
    kernel, launch = fake
    for _ in range(3):
        launch[(1,)](None, 64, 100, 0.5, BLOCK=16)
    assert len(kernel.slow) == 3 and launch.fast_launches == 0


def test_registered_launch_hooks_and_pre_run_hooks_get_every_launch(fake):
    from triton import knobs

    kernel, launch = fake
    x = _aligned()
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.slow) == 2 and launch.fast_launches == 0
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    assert len(kernel.slow) == 3 and launch.fast_launches == 0
    kernel.pre_run_hooks.clear()
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    assert launch.fast_launches == 1


def test_interpreted_kernels_and_stand_ins_launch_as_they_are():
    from lightning_op.kernels.chunked import _chunk_output_kernel

    assert _launch.TRITON_INTERPRETING  # the CPU suite runs the kernels interpreted
    assert _launch.launcher(_chunk_output_kernel) is _chunk_output_kernel
    stand_in = object()  # host_time.py --stub's no-op kernels, say
    assert _launch.launcher(stand_in) is stand_in


def test_switched_off_every_launch_goes_through_triton(fake, monkeypatch):
    kernel, launch = fake
    monkeypatch.setattr(_launch, "ENABLED", False)  # LIGHTNING_OP_FAST_LAUNCH=0
    x = _aligned()
    for _ in range(3):
        launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    assert len(kernel.slow) == 3 and launch.fast_launches == 0


def test_launches_run_on_the_device_of_their_tensors(fake, monkeypatch):
    """Tensors on another GPU than the current one: the launch (Triton's, then the remembered one)
    happens under that device's guard, with that device's stream and its own launch key."""
    import contextlib

    kernel, launch = fake
    entered = []

    @contextlib.contextmanager
    def guard(index):
        entered.append(index)
        yield

    streams = []
    monkeypatch.setattr(torch.cuda, "device", guard)
    monkeypatch.setattr(_launch, "_raw_stream", lambda device: streams.append(device) or 99)
    x = _aligned()
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)  # current device (0): no guard
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    assert entered == [] and streams == [0]
    monkeypatch.setattr(_launch, "_device_of", lambda args: 1)
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)  # another key: through Triton, under the guard
    assert entered == [1] and len(kernel.slow) == 2
    launch[(1,)](x, 64, 100, 0.5, BLOCK=16)
    assert entered == [1, 1] and streams == [0, 1] and launch.fast_launches == 2


def test_the_table_starts_over_when_full(fake, monkeypatch):
    kernel, launch = fake
    monkeypatch.setattr(_launch, "MAX_KEYS", 2)
    x = _aligned()
    for stride in (16, 32, 48):
        launch[(1,)](x, stride, 100, 0.5, BLOCK=16)
    assert len(launch.compiled) == 1  # cleared at the third key, which is then remembered
    launch[(1,)](x, 48, 100, 0.5, BLOCK=16)
    assert launch.fast_launches == 1


def test_host_integer_helpers_match_triton_and_take_symbolic_sizes():
    """``kernels.config.cdiv`` / ``next_power_of_2`` stand in for triton's (slow) ones on the host; under
    torch.export N is a SymInt, which must pass through (it is unhashable: no caching wrapper)."""
    import triton
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from lightning_op.kernels import config

    for n in range(0, 600):
        assert config.next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 16, 64, 100):
            assert config.cdiv(n, b) == triton.cdiv(n, b)
    n = ShapeEnv().create_unbacked_symint()
    assert str(config.cdiv(torch.sym_max(n, 1), 64)) == "((Max(1, u0) + 63)//64)"
    assert hasattr(config.multiprocessors, "cache_info")  # a device query per launch is host time
