"""The child side of a run: what runs inside a backend's process and its launchers (rank info,
sharding, thread arithmetic, rank files, the step gate's child end). backends/, torch/ and mlx/
import it; ftcore.run keeps the parent side. It imports only ftcore's floor (config, result)."""
