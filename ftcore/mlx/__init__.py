"""ftcore's MLX side: the Llama model (model, ops, lora), the HF <-> MLX converter, adapter
files, loss, optimizer, row streams and the environment of an MLX process.

This package file imports nothing, so the parent process can use `ftcore.mlx.env` without MLX.
"""
