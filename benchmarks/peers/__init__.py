"""Side-by-side benchmark of influx against peer libraries (pyDVL, kronfluence).

`problem.py` is pure numpy and imported by both environments; `torch_side.py` runs in the
peer virtual environment (see ``benchmarks/peers_setup.sh``); `jax_side.py` holds the
influx/JAX half (training, export, float64 dense reference, influx timings).
"""
