"""ftcore's torch side: transformers + PEFT model loading, LoRA state get/set, loss, optimizer and
the environment of a torch process.

This package file imports nothing, so the parent process can use `ftcore.torch.env` without torch.
(Inside this package `import torch` still means PyTorch: imports are absolute.)
"""
