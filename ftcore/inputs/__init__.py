"""What a run starts from: the model (presets, checkpoint checks, Llama facts), the data (records,
tokenising, batches) and the shared starting points every backend uses (initial LoRA weights, the
loss contract)."""
