"""The footnotes under the full table (report.md, `ftcore compare --verbose`): what each figure
means and how it was measured."""

FOOTNOTES = [
    "Training time: wall time of the timed steps after warm-up (warm-up/compilation steps "
    "reported apart).",
    "Repeated runs: time, throughput and memory figures are the median over a backend's runs "
    "that were not BUSY, with (min-max) across them; the verdict lines compare the runs' median "
    "step times and peak RSS with a 95% bootstrap interval and a Mann-Whitney U test (one run: "
    "no interval).",
    "Tokens/s (all) counts every position fed, padding included (batch x each batch's width); "
    "real tokens/s the non-pad tokens; loss tokens/s only the target tokens the loss is taken "
    "over; padding share = 1 - real / all.",
    "Epoch, projected: one pass over the records per projected epoch (--project-records, else "
    "the data's), with the trained records' length distribution, priced per batch width by a fit "
    "t = a + b*width over every run's timed steps, plus the warm-up's one-time start-up; 95% "
    "interval from a two-level bootstrap of the runs and their steps (ftcore.measure.projection). "
    "Fine-tune: --epochs N such passes.",
    "Memory = peak RSS of the backend's own process; framework peak (mx.get_peak_memory, "
    "torch.cuda.max_memory_allocated) is shown beside it, never instead.",
    "Speedup factor = reference training time / this training time; memory efficiency = "
    "reference peak RSS / this peak RSS (>1 means better than the reference).",
    "Memory model = what one process must hold for the run's --fine-tune (ftcore.measure."
    "memory_model): weights, adapters (LoRA; DoRA's magnitudes too; none for full), gradients "
    "and AdamW state of every trained parameter, saved activations (with --grad-checkpoint: each "
    "layer's input and one layer recomputed), one layer's backward working set, DoRA's weight "
    "norm, logits and their gradient, for one micro-batch; peak RSS / model (largest rank's for "
    "data parallel) shows what a backend holds beyond it, framework peak / model what its "
    "arrays hold beyond it (the interpreter and runtime are in RSS, not in the framework peak).",
    "CPU threads busy = the process's CPU seconds / wall seconds over the timed steps.",
    "MFU = achieved training FLOP/s (real tokens/s x FLOPs per token: a pad position is not "
    "useful work) / this machine's measured GEMM peak at that precision.",
    "Final loss: training loss (mean CE over target tokens) at the last step; eval loss on "
    "held-out records, before the first step (the base model) and after the last.",
    "Exact match: share of held-out records whose greedy answer (KV-cache decoding, up to EOS) "
    "equals the expected tokens exactly, before -> after the fine-tune; greedy agreement: "
    "records with token-for-token the same answer as the reference backend.",
    "Time to target: wall time from the first step to the end of the eval that first reached "
    "--target-eval-loss, evals included (steps alone: result.json target.train_seconds).",
    "Data parallel (xW rows): W ranks each training a shard of every global batch; peak RSS is "
    "summed over the ranks (largest rank beside it); threads are all ranks' together; scaling "
    "efficiency = this row's tokens/s / the same backend's one-process tokens/s at the same "
    "threads in all.",
    "Machine: BUSY when other processes used more than a quarter core (or the hypervisor stole "
    ">10%) during the timed steps; such timings are not the framework's.",
]
