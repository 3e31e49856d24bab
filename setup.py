"""Packaging for kfac-dist: K-FAC for Keras 3 under every tf.distribute strategy."""

from setuptools import find_packages, setup

EXAMPLES = [
    "tensorflow-datasets>=4.9",
    # tensorflow-datasets 4.9.x imports importlib_resources inside tfds.load
    # without declaring it (the etils it brings no longer installs it either).
    "importlib_resources>=6",
    "mlxtend>=0.23",
    "matplotlib>=3.8",
    # TensorFlow 2.21 no longer installs TensorBoard; Keras' callback needs it.
    "tensorboard>=2.21,<2.22",
]

# keras-hub's models (GPT-2, BERT: ReversibleEmbedding, PositionEmbedding); its
# tested release installs next to TensorFlow 2.21 without changing it (0.32 brings
# tensorflow-text 2.21, tokenizers, sentencepiece, kagglehub).
HUB = ["keras-hub>=0.32,<0.33"]

setup(
    name="kfac-dist",
    version="0.1.0",
    description="Distributed K-FAC optimizer for Keras 3 on TensorFlow 2.21",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kfac_dist", "kfac_dist.*"]),
    python_requires=">=3.10",
    # The project relies on Keras and TensorFlow internals (trainer hooks,
    # tf.distribute collective launchers): only the tested range is allowed.
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "numpy>=1.26",
    ],
    # The commands a user runs (scripts/ holds the same entry points as files).
    entry_points={
        "console_scripts": [
            "kfac-train=kfac_dist.jobs.train:main",
            "kfac-train-tpu=kfac_dist.jobs.train_tpu:main",
            "kfac-launch=kfac_dist.jobs.launch:main",
            "kfac-main-job=kfac_dist.jobs.main_job:main",
            "kfac-benchmark-autoencoder=kfac_dist.jobs.autoencoder_benchmark:main",
            "kfac-benchmark-placement=kfac_dist.jobs.placement_benchmark:main",
            "kfac-benchmark-resnet=kfac_dist.jobs.resnet_benchmark:main",
            "kfac-benchmark-replicas=kfac_dist.jobs.replica_benchmark:main",
            "kfac-benchmark-statistics=kfac_dist.jobs.statistics_benchmark:main",
            "kfac-benchmark-trace=kfac_dist.jobs.trace_benchmark:main",
            "kfac-benchmark-transformer=kfac_dist.jobs.transformer_benchmark:main",
            "kfac-benchmark-convnet=kfac_dist.jobs.convnet_benchmark:main",
            "kfac-benchmark-starting-point=kfac_dist.jobs.starting_point_benchmark:main",
            "kfac-benchmark-factor-split=kfac_dist.jobs.factor_split_benchmark:main",
            "kfac-coverage=kfac_dist.jobs.coverage:main",
            "kfac-tune-placement=kfac_dist.jobs.tuner:main",
        ]
    },
    extras_require={
        "examples": EXAMPLES,
        # The tests run the examples as users get them (tfds included), and the
        # static checks (tests/repository/test_static_checks.py): mypy's and ruff's results
        # change between releases, so each is held to the range it passes on.
        # keras-hub too: tests/jobs/test_coverage_hub.py trains its tiny models.
        "test": ["pytest>=8", "mypy>=2.0,<3", "ruff>=0.17,<0.18", *EXAMPLES, *HUB],
        "hub": HUB,
        "tpu": ["cloud-tpu-client>=0.10"],
    },
)
