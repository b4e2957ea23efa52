import os

import pytest

# Tests share two cores with loader workers and with each other's processes; OpenMP threads that spin
# on a busy core make every step 10-100x slower, so every test process uses one thread.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

from helpers import (LAUNCHER_VARIABLES, run_main_in_process,  # noqa: E402  (helpers puts the checkout on sys.path)
                     tiny_flags, write_image_folder)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A small ImageNet-layout folder: 3 classes, 12 train and 5 val images each (15 val: odd on purpose)."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def trained(image_folder, tmp_path_factory):
    """One short training run (8 epochs of the small folder), shared by the tests of training, evaluation and resume
    that inspect its results: (output folder, summary)."""
    output_dir = tmp_path_factory.mktemp("trained")
    summary = run_main_in_process(image_folder, *tiny_flags(output_dir, "--epochs", "8", "--warmup", "1", "--seed", "0",
                                                            "--nesterov"))
    return output_dir, summary


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP spinning made model tests ~15x slower;
    for modules that a previous test may have left with more threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The process-wide state that the code under test reads, and that a test may change only if it puts it back.
GUARDED_ENVIRONMENT = ("TORCH_DEVICE_BACKEND_AUTOLOAD", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                       "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG",
                       "HCCL_DETERMINISTIC")
GUARDED_ATTRIBUTES = ((torch.cuda, "is_available"), (torch.cuda, "device_count"), (torch.cuda, "set_device"),
                      (torch.nn.Module, "zero_grad"))  # Ascend apex replaces it (tests/standins/apex_amp.py)
GUARDED_FLAGS = ((torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32"),
                 (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic"))


def _process_state():
    """{name: (value, restore)} of everything GUARDED_* names, the number of threads and the privateuse1 name."""
    state = {}
    for module, name in GUARDED_ATTRIBUTES:
        state[f"{module.__name__}.{name}"] = (getattr(module, name),
                                             lambda value, module=module, name=name: setattr(module, name, value))
    for module, name in GUARDED_FLAGS:
        # Flags that torch.backends serves through properties and __getattr__: read and set through them.
        label = f"torch.backends.{'cudnn' if module is torch.backends.cudnn else 'cuda.matmul'}.{name}"
        state[label] = (getattr(module, name), lambda value, module=module, name=name: setattr(module, name, value))
    state["torch.npu present"] = (hasattr(torch, "npu"), _restore_npu_absent)
    state["torch.get_num_threads()"] = (torch.get_num_threads(), torch.set_num_threads)
    state["torch.are_deterministic_algorithms_enabled()"] = (torch.are_deterministic_algorithms_enabled(),
                                                             torch.use_deterministic_algorithms)
    state["privateuse1 backend name"] = (torch._C._get_privateuse1_backend_name(), None)  # cannot be renamed back
    for name in GUARDED_ENVIRONMENT:
        state[f"os.environ[{name!r}]"] = (os.environ.get(name), lambda value, name=name: _restore_variable(name, value))
    return state


def _restore_npu_absent(present):
    if not present and hasattr(torch, "npu"):
        delattr(torch, "npu")


def _restore_variable(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(autouse=True)
def process_state_is_left_as_found():
    """Fails the test that leaves changed any process-wide state the code reads (torch's device functions and
    kernel flags, threads, the launcher variables): a leak makes later tests fail far from their cause. Puts back
    what it can, so that only the leaking test fails."""
    before = _process_state()
    yield
    after = _process_state()
    changed = [name for name, (value, _) in before.items() if after[name][0] != value]
    for name in changed:
        value, restore = before[name]
        if restore is not None:
            restore(value)
    if changed:
        pytest.fail(f"the test left changed: {', '.join(changed)}", pytrace=False)


@pytest.fixture
def kernel_flags():
    """For tests that set torch's cuDNN/cuBLAS flags or deterministic mode: they are put back as they were, through
    the same public attributes and setters (torch.backends serves the flags through properties and __getattr__,
    which monkeypatch cannot undo)."""
    saved = [(module, name, getattr(module, name)) for module, name in GUARDED_FLAGS]
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    for module, name, value in saved:
        setattr(module, name, value)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's variables (torchrun's, SLURM_*, MASTER_*) in this process's environment during the test;
    returns the monkeypatch, for the test's own changes."""
    for name in [*os.environ]:
        if name.startswith("SLURM_") or name in LAUNCHER_VARIABLES:
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def bf16_cpu(monkeypatch):
    """--amp's bf16 path on any CPU. Where oneDNN has no native bf16 (e.g. AVX2 only, as on the 2-core test machine)
    NativeAmp stays in fp32, since emulated bf16 is slower; the casts it makes are the same either way, and emulated
    bf16 kernels compute them, so the check is forced on to test those casts here too."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


def pytest_configure(config):
    # pipeline.py silences this for runs; pytest resets warning filters per test.
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
