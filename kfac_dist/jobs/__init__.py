"""Job tooling around the library: the training command, the TPU entry point,
the main job, the benchmarks, the placement tuner, the launcher, and the
example models and data they train.

The jobs import the library (`kfac_dist`); the library never imports them
(tests/test_package_structure.py). The commands are the `scripts/` and the
console scripts of setup.py.
"""
