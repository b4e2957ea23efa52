"""The library behind the commands at the repository's root (main.py, classify.py, export_onnx.py, bench.py).

Importing the package imports nothing else: main.py imports training.autoload_off before torch.
"""
