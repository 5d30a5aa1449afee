"""Benchmarks behind ``parameternet benchmark``: ParameterNet against GhostNet on a CPU in every execution mode
(:mod:`.cpu`, :mod:`.modes`) and on a GPU (:mod:`.gpu`). Each is imported on its own: this package imports nothing."""
