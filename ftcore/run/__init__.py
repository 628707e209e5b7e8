"""Run orchestration: checks before any backend starts (preflight), run folders, one backend per
fresh process (backend_process, parent side; child, the process's entry), compare, sweep (a
compare per model size), data-parallel ranks, the step gate, child-process lifetimes, and
`ftcore generate`."""
