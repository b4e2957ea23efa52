"""Stand-ins for libraries that cannot run here (apex, torch_npu), one module per faked library. Each copies the
real API's signatures and behaviour from the source named in its docstring, reduced to what the tests exercise."""
