"""Job tooling around the library: the training command, the TPU entry point,
the main job, the benchmarks, the placement tuner, the launcher, and the
example models and data they train.

The jobs import the library (`kfac_dist`); the library never imports them
(tests/repository/test_package_structure.py). Every command is a module here with a
`main` (`python -m kfac_dist.jobs.<module>`): train, train_tpu, main_job,
launch, autoencoder_benchmark, placement_benchmark, replica_benchmark,
trace_benchmark and tuner. Each parses its flags before TensorFlow loads, so
`--help` answers at once; `scripts/` and setup.py's console scripts call
those `main`s and nothing else.
"""
