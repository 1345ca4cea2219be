"""Test configuration: CPU runs exercise the real Triton kernels through Triton's interpreter.

``TRITON_INTERPRET`` must be set before triton (and lightning_op.kernels) is imported, so it is
set here, at collection, whenever no CUDA device is visible.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    # forced, not defaulted: with another preset value the interpreted-kernel tests could not run
    os.environ["TRITON_INTERPRET"] = "1"


def _inductor_cache_for_this_source() -> None:
    """Inductor's on-disk caches key a graph on its code, not on a custom op's fake: a graph
    compiled while the op's fake reported other strides would be served again, stale (torch 2.13).
    One cache directory per state of the package's source keeps reruns warm and never stale."""
    import hashlib
    import pathlib
    import tempfile

    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    package = pathlib.Path(__file__).resolve().parent.parent / "lightning_op"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_lightning_op_{digest.hexdigest()[:16]}")


_inductor_cache_for_this_source()


def _shard(items):
    """``LIGHTNING_TEST_SHARD=i/n`` keeps every n-th collected test starting at the i-th, so n
    processes can share a slow run (the GPU suite is mostly Triton compilation, which is per process)."""
    spec = os.environ.get("LIGHTNING_TEST_SHARD")
    if not spec:
        return
    try:
        index, count = (int(part) for part in spec.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"LIGHTNING_TEST_SHARD must be 'i/n' with 0 <= i < n, got {spec!r}") from None
    items[:] = items[index::count]


def pytest_collection_modifyitems(config, items):
    _shard(items)
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["reference", "triton"])
def cpu_backend(request, monkeypatch):
    """Run a CPU test through the chunked PyTorch path and through the interpreted kernels."""
    if request.param == "triton":
        from lightning_op._gates import TRITON_INTERPRETING

        if not TRITON_INTERPRETING:
            if _HAS_CUDA:  # a GPU run: the kernels are tested on the device (pytest -m gpu)
                pytest.skip("interpreted kernels run on CPU-only machines")
            # a failure, not a skip: on CPU a third of the suite would go missing
            pytest.fail("the interpreted-kernel tests need TRITON_INTERPRET=1 before lightning_op is imported")
    monkeypatch.setenv("LIGHTNING_OP_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _release_cached_gpu_memory():
    """In a sharded GPU run (``LIGHTNING_TEST_SHARD``) many processes share one device, and each
    caching allocator keeps what its tests freed: fourteen of them held an H100's 80 GB, and tests
    beside them failed with out-of-memory. Each test hands its cached blocks back when it ends."""
    yield
    if _HAS_CUDA and os.environ.get("LIGHTNING_TEST_SHARD") and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
