"""A stand-in for torch_npu's kernel settings as ``torch.npu`` exposes them, which refuses a misspelled name.

Mirrored from torch_npu 2.14.0, torch_npu/npu/npu_config.py, made ``torch.npu.*`` by torch_npu/npu/__init__.py
(``config = _npuConfig()``, ``matmul = _allowHF32Matmul()``, ``conv = _allowHF32Conv()``):

- ``set_compile_mode(jit_compile=False)`` sets the option "jitCompile" to "enable" / "disable"
  (torch_npu._C._npu_setOption); ``is_jit_compile_false()`` reads it back. Unset, the chip decides (C++, in
  libtorch_npu.so; Ascend documents True on Atlas training/inference series, False on A2/A3): the stand-in's
  ``binary_by_default``.
- ``_npuConfig.__setattr__``: "allow_internal_format" sets "ALLOW_INTERNAL_FORMAT"; the class has no getter, so
  reading it raises AttributeError.
- ``_allowHF32Conv`` / ``_allowHF32Matmul``: "allow_hf32" takes a bool (TypeError otherwise) and sets
  "ALLOW_CONV_HF32" / "ALLOW_MATMUL_HF32"; read back, an unset conv option is True, an unset matmul option False.

The real setters ignore a name they do not know, so a typo would set nothing, silently; these raise
AttributeError, and a test catches it. Reduced to what the tests use (no cube_math_type).
"""
import types


class InternalFormatConfig:
    """``torch.npu.config`` (_npuConfig)."""
    __slots__ = ("_options",)

    def __init__(self, options):
        object.__setattr__(self, "_options", options)

    def __setattr__(self, name, value):
        if name != "allow_internal_format":
            raise AttributeError(f"torch.npu.config has no setting {name!r}")
        self._options["ALLOW_INTERNAL_FORMAT"] = "enable" if value else "disable"


class HF32Switch:
    """``torch.npu.conv`` (_allowHF32Conv) or ``torch.npu.matmul`` (_allowHF32Matmul)."""
    __slots__ = ("_options", "_option", "_unset")

    def __init__(self, options, option, unset):
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_option", option)
        object.__setattr__(self, "_unset", unset)

    def __setattr__(self, name, value):
        if name != "allow_hf32":
            raise AttributeError(f"no setting {name!r}")
        if not isinstance(value, bool):
            raise TypeError(f"allow_hf32 must be a bool, but got {type(value).__name__}")
        self._options[self._option] = "enable" if value else "disable"

    def __getattr__(self, name):
        if name != "allow_hf32":
            raise AttributeError(name)
        value = self._options.get(self._option)
        return self._unset if value is None else value == "enable"


def npu_module(binary_by_default, devices=1):
    """A ``torch.npu`` for distributed.setup_runtime: (module, the options it set by name, the devices it bound)."""
    options, bound = {}, []

    def set_compile_mode(jit_compile=False):
        options["jitCompile"] = "enable" if jit_compile else "disable"

    def is_jit_compile_false():
        mode = options.get("jitCompile")
        return binary_by_default if mode is None else mode == "disable"

    module = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: devices, set_device=bound.append,
        set_compile_mode=set_compile_mode, is_jit_compile_false=is_jit_compile_false,
        config=InternalFormatConfig(options), conv=HF32Switch(options, "ALLOW_CONV_HF32", True),
        matmul=HF32Switch(options, "ALLOW_MATMUL_HF32", False))
    return module, options, bound
